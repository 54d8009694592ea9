"""MovieLens loaders: the 100K format and the CSV format of later releases, mapped to contracts.

A rating becomes a ``rating`` event (``value`` = stars, ``ts`` = unix seconds * 1000,
``event_id = "ml-<user>-<item>-<ts_ms>"``, which is unique because MovieLens has one rating per
user and item). A rating is a positive engagement when ``value >= schema.POSITIVE_RATING``
(:func:`tandem.data.dataset.positives`).

Why ``created_at`` is the item's first rating time (and ``signup_ts`` the user's): MovieLens has no
catalog-entry or sign-up time, and ``release_year`` is useless as one (films are decades older
than the site). The first rating is the earliest moment the item or user demonstrably existed in
the system, so time-split evaluation and "fresh item" logic never see an item before it could
have been recommended. Where tags.csv exists its times count too (the earlier of first rating
and first tag); an item with neither gets the dataset's first event time.

The data is never copied into the repository: :func:`load_movielens` reads a folder (by default
``../shared/data/ml-100k``) and :func:`ensure_movielens` downloads a release from GroupLens into a
folder you choose, when the internet is reachable.
"""

from __future__ import annotations

import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from tandem import schema as s
from tandem.data.dataset import EVENT_COLUMNS, ITEM_COLUMNS, USER_COLUMNS, Dataset, conform

GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens"
NO_GENRES = {"(no genres listed)", "unknown"}  # 100K's "unknown" flag means the same
AGE_BUCKETS = ((18, "<18"), (25, "18-24"), (35, "25-34"), (45, "35-44"), (50, "45-49"),
               (56, "50-55"))  # (upper bound exclusive, label); 56 and over -> "56+"
_YEAR_IN_TITLE = r"\((\d{4})\)\s*$"


class MovieLensUnavailable(RuntimeError):
    """A MovieLens release is not on disk and could not be downloaded."""


def age_bucket(age: pd.Series) -> pd.Series:
    """Ages -> the user.v1 ``age_bucket`` labels (MovieLens-1M's buckets); null stays null."""
    a = pd.to_numeric(age, errors="coerce").to_numpy(dtype=float)
    bounds = np.array([b for b, _ in AGE_BUCKETS], dtype=float)
    labels = np.array([lab for _, lab in AGE_BUCKETS] + ["56+"], dtype=object)
    out = labels[np.searchsorted(bounds, np.nan_to_num(a, nan=0.0), side="right")]
    return pd.Series(np.where(np.isnan(a), None, out), index=age.index, dtype=object)


def _year(text: pd.Series, pattern: str) -> pd.Series:
    year = pd.to_numeric(text.str.extract(pattern, expand=False), errors="coerce")
    return year.where((year >= 1800) & (year <= 2100)).astype("Int64")


def _rating_events(user: pa.Array, item: pa.Array, rating: pa.Array, ts_s: pa.Array
                   ) -> pd.DataFrame:
    """Flat rating events from columns of equal length (vectorized in Arrow)."""
    user_id, item_id = pc.cast(user, pa.string()), pc.cast(item, pa.string())
    ts = pc.multiply(pc.cast(ts_s, pa.int64()), 1000)
    event_id = pc.binary_join_element_wise("ml", user_id, item_id, pc.cast(ts, pa.string()), "-")
    n = len(user_id)
    table = pa.table({
        s.EVENT_ID: event_id, s.EVENT_TYPE: pa.repeat(s.RATING, n), s.USER_ID: user_id,
        s.ITEM_ID: item_id, s.TS: ts, s.VALUE: pc.cast(rating, pa.float64()),
    })
    return conform(table.to_pandas(), EVENT_COLUMNS)


def _first_ts(events: pd.DataFrame, key: str, ids: pd.Series, fallback: pd.DataFrame | None,
              default: int) -> np.ndarray:
    """First time per id in ``ids`` over ``events`` and ``fallback`` (tags); else ``default``."""
    seen = [events[[key, s.TS]]] + ([fallback[[key, s.TS]]] if fallback is not None else [])
    first = pd.concat(seen, ignore_index=True).groupby(key)[s.TS].min()
    return ids.map(first).fillna(default).astype("int64").to_numpy()


def _users_from_ids(ids: pd.Series, events: pd.DataFrame, tags: pd.DataFrame | None
                    ) -> pd.DataFrame:
    default = int(events[s.TS].min()) if len(events) else 0
    users = pd.DataFrame({s.USER_ID: ids.to_numpy()})
    users[s.SIGNUP_TS] = _first_ts(events, s.USER_ID, users[s.USER_ID], tags, default)
    return users


def load_100k(folder: Path) -> Dataset:
    """MovieLens-100K (``u.data``, ``u.item``, ``u.user``, ``u.genre``) as contract frames.

    Genres come from the 19 flags of ``u.item`` named by ``u.genre``; the "unknown" flag maps
    to no genre. ``release_year`` is the year of the release date, else the "(1995)" in the title.
    """
    folder = Path(folder)
    data = pacsv.read_csv(
        folder / "u.data",
        read_options=pacsv.ReadOptions(column_names=["u", "i", "r", "t"]),
        parse_options=pacsv.ParseOptions(delimiter="\t"))
    events = _rating_events(data["u"], data["i"], data["r"], data["t"])

    genre_names = pd.read_csv(folder / "u.genre", sep="|", header=None, names=["g", "n"],
                              encoding="latin-1").dropna()["g"].to_numpy()
    raw = pd.read_csv(folder / "u.item", sep="|", header=None, encoding="latin-1", dtype=str,
                      keep_default_na=False)
    flags = raw.iloc[:, 5:5 + len(genre_names)].to_numpy() == "1"
    flags[:, np.isin(genre_names, list(NO_GENRES))] = False
    rows, cols = np.nonzero(flags)  # row-major, so each item's genres keep u.genre's order
    genres = np.split(genre_names[cols], np.searchsorted(rows, np.arange(1, len(raw))))
    year = _year(raw[2], r"(\d{4})\s*$").fillna(_year(raw[1], _YEAR_IN_TITLE))
    items = pd.DataFrame({s.ITEM_ID: raw[0], s.TITLE: raw[1],
                          s.GENRES: [list(g) for g in genres], s.RELEASE_YEAR: year})
    default = int(events[s.TS].min())
    items[s.CREATED_AT] = _first_ts(events, s.ITEM_ID, items[s.ITEM_ID], None, default)

    u = pd.read_csv(folder / "u.user", sep="|", header=None, dtype=str, encoding="latin-1",
                    names=["id", "age", "gender", "occupation", "zip"])
    users = _users_from_ids(u["id"], events, None)
    users[s.AGE_BUCKET] = age_bucket(u["age"]).to_numpy()
    users[s.GENDER] = u["gender"].to_numpy()
    users[s.OCCUPATION] = u["occupation"].to_numpy()
    return Dataset(events, conform(items, ITEM_COLUMNS), conform(users, USER_COLUMNS),
                   folder.name)


def load_csv_release(folder: Path) -> Dataset:
    """A CSV-format release (``ratings.csv``, ``movies.csv``, optional ``tags.csv``).

    As in ml-latest(-small), ml-20m, ml-25m and ml-32m. There is no users file, so user rows are
    derived from the user ids seen in ratings and tags, with null demographics.
    """
    folder = Path(folder)
    ratings = pacsv.read_csv(folder / "ratings.csv")
    events = _rating_events(ratings["userId"], ratings["movieId"], ratings["rating"],
                            ratings["timestamp"])
    tags = None
    if (folder / "tags.csv").exists():
        t = pd.read_csv(folder / "tags.csv", dtype={"userId": str, "movieId": str, "tag": str})
        tags = pd.DataFrame({s.USER_ID: t["userId"], s.ITEM_ID: t["movieId"], "tag": t["tag"],
                             s.TS: t["timestamp"].astype("int64") * 1000})
    default = int(events[s.TS].min()) if len(events) else 0

    movies = pd.read_csv(folder / "movies.csv", dtype=str, keep_default_na=False)
    genres = movies["genres"].str.split("|")
    items = pd.DataFrame({
        s.ITEM_ID: movies["movieId"], s.TITLE: movies["title"],
        s.GENRES: [[g for g in gs if g not in NO_GENRES] for gs in genres],
        s.RELEASE_YEAR: _year(movies["title"], _YEAR_IN_TITLE),
    })
    items[s.CREATED_AT] = _first_ts(events, s.ITEM_ID, items[s.ITEM_ID], tags, default)

    seen = [events[s.USER_ID]] + ([tags[s.USER_ID]] if tags is not None else [])
    ids = pd.Series(pd.unique(pd.concat(seen, ignore_index=True)))
    ids = ids.iloc[np.argsort(pd.to_numeric(ids, errors="coerce").to_numpy(), kind="stable")]
    users = _users_from_ids(ids.reset_index(drop=True), events, tags)
    return Dataset(events, conform(items, ITEM_COLUMNS), conform(users, USER_COLUMNS),
                   folder.name, tags)


def load_movielens(folder: Path) -> Dataset:
    """Load whichever MovieLens format ``folder`` holds (100K files or CSV release)."""
    folder = Path(folder)
    if (folder / "u.data").exists():
        return load_100k(folder)
    if (folder / "ratings.csv").exists():
        return load_csv_release(folder)
    raise FileNotFoundError(f"{folder} holds neither u.data (MovieLens-100K) nor ratings.csv "
                            "(MovieLens CSV release); see tandem.data.movielens.ensure_movielens")


def ensure_movielens(name: str, dest: Path, base_url: str = GROUPLENS_URL,
                     timeout_s: float = 60.0) -> Path:
    """``dest/<name>``, downloading ``<base_url>/<name>.zip`` from GroupLens when missing.

    Parameters
    ----------
    name : release name, e.g. ``ml-100k``, ``ml-latest-small``, ``ml-25m``, ``ml-32m``.
    dest : folder to unzip into (keep it outside the repository: the data's license forbids
        redistributing it).

    Raises
    ------
    MovieLensUnavailable : the folder is missing and the download failed (e.g. offline).
    """
    target = Path(dest) / name
    if (target / "u.data").exists() or (target / "ratings.csv").exists():
        return target
    url = f"{base_url}/{name}.zip"
    Path(dest).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        archive = Path(tmp) / f"{name}.zip"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as resp, open(archive, "wb") as f:
                shutil.copyfileobj(resp, f)
        except (urllib.error.URLError, OSError, ValueError) as err:
            raise MovieLensUnavailable(
                f"MovieLens {name!r} is not at {target} and downloading {url} failed ({err}). "
                f"Download and unzip it there by hand, or point TANDEM_ML100K at a copy.") from err
        with zipfile.ZipFile(archive) as z:
            z.extractall(tmp)
        shutil.move(str(Path(tmp) / name), target)
    return target
