"""MovieLens loaders: 100K on ../shared (never copied), the CSV format on a tiny folder we write."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pandas as pd
import pytest

from tandem import schema as s
from tandem.data.dataset import EVENT_COLUMNS, ITEM_COLUMNS, USER_COLUMNS, positives
from tandem.data.landing import event_records
from tandem.data.movielens import (
    MovieLensUnavailable,
    age_bucket,
    ensure_movielens,
    load_movielens,
)
from tandem.validation import validate, validate_event
from tests.conftest import free_port


def records(frame: pd.DataFrame) -> list[dict]:
    """Rows as JSON-typed dicts (what a contract validates)."""
    return json.loads(frame.to_json(orient="records"))


@pytest.fixture(scope="module")
def ml100k(ml100k_dir):
    return load_movielens(ml100k_dir)


def test_100k_counts_and_columns(ml100k):
    ev, items, users = ml100k.events, ml100k.items, ml100k.users
    assert ml100k.name == "ml-100k"
    assert (len(ev), len(items), len(users)) == (100_000, 1682, 943)
    assert tuple(ev.columns) == EVENT_COLUMNS
    assert tuple(items.columns) == ITEM_COLUMNS
    assert tuple(users.columns) == USER_COLUMNS
    assert ev[s.EVENT_ID].is_unique
    assert set(ev[s.EVENT_TYPE]) == {s.RATING}
    # rating >= schema.POSITIVE_RATING (4): 34,174 fours + 21,201 fives
    assert positives(ev).sum() == 55_375
    assert (ev[s.VALUE] >= s.POSITIVE_RATING).sum() == 55_375
    assert ev[s.VALUE].value_counts().sort_index().tolist() == [6110, 11370, 27145, 34174, 21201]
    assert ev[s.USER_ID].nunique() == 943 and ev[s.ITEM_ID].nunique() == 1682
    assert ev[s.SESSION_ID].isna().all() and ev[s.POSITION].isna().all()


def test_100k_mapping(ml100k):
    ev, items, users = ml100k.events, ml100k.items, ml100k.users
    first = ev.iloc[0]  # u.data line 1: 196 242 3 881250949
    assert (first[s.EVENT_ID], first[s.USER_ID], first[s.ITEM_ID], first[s.TS],
            first[s.VALUE]) == ("ml-196-242-881250949000", "196", "242", 881250949000, 3.0)
    toy = items.set_index(s.ITEM_ID).loc["1"]
    assert toy[s.TITLE] == "Toy Story (1995)"
    assert toy[s.GENRES] == ["Animation", "Children's", "Comedy"]
    assert toy[s.RELEASE_YEAR] == 1995
    unknown = items.set_index(s.ITEM_ID).loc["267"]  # title "unknown", no date, genre "unknown"
    assert unknown[s.GENRES] == [] and pd.isna(unknown[s.RELEASE_YEAR])
    assert (items[s.GENRES].str.len() == 0).sum() == 2
    assert items[s.RELEASE_YEAR].isna().sum() == 1
    # created_at / signup_ts: first rating time
    first_item = ev.groupby(s.ITEM_ID)[s.TS].min()
    assert items.set_index(s.ITEM_ID)[s.CREATED_AT].sort_index().equals(first_item.sort_index())
    first_user = ev.groupby(s.USER_ID)[s.TS].min()
    assert users.set_index(s.USER_ID)[s.SIGNUP_TS].sort_index().equals(first_user.sort_index())
    u1 = users.set_index(s.USER_ID).loc["1"]  # 1|24|M|technician|85711
    assert (u1[s.AGE_BUCKET], u1[s.GENDER], u1[s.OCCUPATION]) == ("18-24", "M", "technician")
    assert users[s.AGE_BUCKET].value_counts().to_dict() == {
        "25-34": 310, "18-24": 198, "35-44": 194, "45-49": 80, "50-55": 73, "56+": 52, "<18": 36}
    assert users[s.COUNTRY].isna().all()


def test_100k_validates_against_contracts(ml100k):
    for event in event_records(ml100k.events.sample(500, random_state=0)):
        validate_event(event)
    for item in records(ml100k.items):
        validate(item, "item")
    for user in records(ml100k.users):
        validate(user, "user")


def test_age_buckets():
    ages = pd.Series(["17", "18", "24", "25", "34", "35", "44", "45", "49", "50", "55", "56", "",
                      None])
    assert age_bucket(ages).tolist() == [
        "<18", "18-24", "18-24", "25-34", "25-34", "35-44", "35-44", "45-49", "45-49", "50-55",
        "50-55", "56+", None, None]


def write_csv_release(folder, with_tags: bool):
    folder.mkdir(parents=True)
    (folder / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n"
        "1,10,4.0,1000\n1,20,2.5,1100\n2,10,5.0,900\n2,30,3.5,1200\n3,20,4.5,1300\n")
    (folder / "movies.csv").write_text(
        "movieId,title,genres\n"
        "10,Heat (1995),Action|Crime|Thriller\n"
        '20,"Bird, The (2001)",(no genres listed)\n'
        "30,Untitled,Drama\n"
        "40,Tagged Only (1980),Comedy\n")
    if with_tags:
        (folder / "tags.csv").write_text(
            "userId,movieId,tag,timestamp\n1,40,funny,800\n7,40,classic,1500\n")
    return folder


@pytest.mark.parametrize("with_tags", [False, True])
def test_csv_release(tmp_path, with_tags):
    data = load_movielens(write_csv_release(tmp_path / "ml-latest-small", with_tags))
    ev, items, users = data.events, data.items, data.users
    assert data.name == "ml-latest-small"
    assert tuple(ev.columns) == EVENT_COLUMNS and len(ev) == 5
    assert ev[s.EVENT_ID].tolist()[:2] == ["ml-1-10-1000000", "ml-1-20-1100000"]
    assert positives(ev).sum() == 3  # 4.0, 5.0, 4.5
    it = items.set_index(s.ITEM_ID)
    assert it.loc["10", s.GENRES] == ["Action", "Crime", "Thriller"]
    assert it.loc["20", s.GENRES] == []
    assert it.loc["20", s.TITLE] == "Bird, The (2001)"
    assert it[s.RELEASE_YEAR].tolist()[:2] == [1995, 2001] and pd.isna(it.loc["30",
                                                                              s.RELEASE_YEAR])
    assert it[s.CREATED_AT].tolist()[:3] == [900_000, 1_100_000, 1_200_000]
    # never rated: its first tag time when tags exist, else the dataset's first event time
    assert it.loc["40", s.CREATED_AT] == (800_000 if with_tags else 900_000)
    expected_users = ["1", "2", "3", "7"] if with_tags else ["1", "2", "3"]
    assert users[s.USER_ID].tolist() == expected_users
    # user 1 tagged (t=800 s) before rating (t=1000 s): the earlier counts
    assert users[s.SIGNUP_TS].tolist()[:3] == [(800_000 if with_tags else 1_000_000), 900_000,
                                               1_300_000]
    assert users[[s.AGE_BUCKET, s.GENDER, s.OCCUPATION, s.COUNTRY]].isna().all().all()
    assert (data.tags is not None) == with_tags
    if with_tags:
        assert data.tags["tag"].tolist() == ["funny", "classic"]
    for event in event_records(ev):
        validate_event(event)
    for row in records(items):
        validate(row, "item")
    for row in records(users):
        validate(row, "user")


def test_load_movielens_unknown_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither u.data"):
        load_movielens(tmp_path)


def test_ensure_movielens_present_is_not_downloaded(tmp_path):
    write_csv_release(tmp_path / "ml-32m", with_tags=False)
    # an unreachable base URL proves no download is attempted
    assert ensure_movielens("ml-32m", tmp_path, base_url="http://127.0.0.1:9") == \
        tmp_path / "ml-32m"


def test_ensure_movielens_offline_error(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(MovieLensUnavailable, match="ml-25m.zip failed"):
        ensure_movielens("ml-25m", tmp_path / "data", base_url=url, timeout_s=5)
    assert not (tmp_path / "data" / "ml-25m").exists()


def test_ensure_movielens_unzips_a_download(tmp_path):
    src = write_csv_release(tmp_path / "src" / "ml-latest-small", with_tags=True)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    with zipfile.ZipFile(mirror / "ml-latest-small.zip", "w") as z:
        for f in src.iterdir():
            z.write(f, f"ml-latest-small/{f.name}")
    dest = tmp_path / "data"
    got = ensure_movielens("ml-latest-small", dest, base_url=mirror.as_uri())
    assert got == dest / "ml-latest-small"
    assert len(load_movielens(got).events) == 5
    assert sorted(p.name for p in dest.iterdir()) == ["ml-latest-small"]  # no temp leftovers
    assert np.array_equal(sorted(p.name for p in got.iterdir()),
                          ["movies.csv", "ratings.csv", "tags.csv"])
