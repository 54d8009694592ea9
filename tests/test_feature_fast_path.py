"""Serving's one-row fast path in tandem.features.entity gives exactly the vectorized (training)
values.

A request's raw row arrives as ``{field: [value]}`` and skips pandas/pyarrow; a training frame of
many rows goes through ``pd.to_numeric`` / ``pd.Categorical`` / pyarrow. Random rows with every
kind of missing or odd value (absent field, None, NaN, out-of-vocabulary strings, numbers as
strings, wrong-length lists) must give bit-identical matrices both ways.
"""

import numpy as np
import pandas as pd
import pytest

from tandem import schema as s
from tandem.features import entity as F

NOW_MS = 1_767_225_600_000
_ABSENT = object()  # the field is not in the row at all


def _value(rng: np.random.Generator, field: F.Field):
    """One raw value of ``field``'s dtype, missing or odd about half of the time."""
    roll = rng.random()
    if roll < 0.1:
        return _ABSENT
    if roll < 0.2:
        return None
    if field.dtype in ("int64", "float32"):
        if roll < 0.3:
            return float("nan")
        if roll < 0.35:
            return rng.choice(["12", "x"])  # parsed by pd.to_numeric; "x" -> default
        if field.name.endswith("_ts") or field.name == "item_created_at":
            return int(NOW_MS - rng.integers(-3_600_000, 400 * 86_400_000))
        return int(rng.integers(0, 500)) if field.dtype == "int64" else float(rng.uniform(0, 5))
    if field.dtype == "string":
        vocab = F.AGE_BUCKETS if "age" in field.name else F.GENDERS
        return rng.choice([*vocab, "zz", "", 5, float("nan")])
    if field.dtype == "string_list":
        if roll < 0.3:
            return float("nan")
        genres = list(rng.choice([*F.GENRE_VOCAB, "Polka"], int(rng.integers(0, 4))))
        return np.array(genres, dtype=object) if roll > 0.9 else genres
    # float32_list (genre affinity): right length, wrong length, or with missing entries
    width = F.N_GENRES if roll < 0.8 else int(rng.integers(0, 5))
    values = [float(x) for x in rng.dirichlet(np.ones(max(width, 1)))[:width]]
    if roll < 0.3 and values:
        values[0] = None
    return values


def _rows(fields, n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        row = {"id": f"e{i}"}
        for field in fields:
            value = _value(rng, field)
            if value is not _ABSENT:
                row[field.name] = value
        rows.append(row)
    return rows


def _one(row: dict) -> dict[str, list]:
    return {k: [v] for k, v in row.items()}


@pytest.mark.parametrize(("fields", "matrix"), [
    (F.USER_FIELDS, F.user_matrix),
    (F.SESSION_FIELDS, F.session_matrix),
    (F.ITEM_FIELDS, F.item_matrix),
])
def test_one_row_fast_path_equals_the_frame_path(fields, matrix):
    rows = _rows(fields, 300, seed=len(fields))
    batch = matrix(pd.DataFrame(rows), NOW_MS)  # > F._SMALL rows: pandas/pyarrow path
    one_by_one = np.vstack([matrix(_one(r), NOW_MS) for r in rows])
    np.testing.assert_array_equal(one_by_one, batch)
    assert batch.dtype == np.float32


def test_vectors_of_rows_and_of_nothing_match_the_frame_path():
    users = _rows(F.USER_FIELDS, 40, seed=1)
    sessions = _rows(F.SESSION_FIELDS, 40, seed=2)
    np.testing.assert_array_equal(np.vstack([F.user_vector(r, NOW_MS) for r in users]),
                                  F.user_matrix(pd.DataFrame(users), NOW_MS))
    np.testing.assert_array_equal(np.vstack([F.session_vector(r, NOW_MS) for r in sessions]),
                                  F.session_matrix(pd.DataFrame(sessions), NOW_MS))
    # an unknown user reads as the default row, whichever path builds it
    nobody = pd.DataFrame({s.USER_ID: ["a"] * 10})
    np.testing.assert_array_equal(F.user_matrix(nobody, NOW_MS)[0], F.user_vector({}, NOW_MS))
    np.testing.assert_array_equal(F.user_vector(F.default_row(F.USER_FIELDS), NOW_MS),
                                  F.user_vector({}, NOW_MS))
    np.testing.assert_array_equal(F.session_matrix(nobody, NOW_MS)[0],
                                  F.session_vector({}, NOW_MS))
