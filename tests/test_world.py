"""The synthetic world: determinism, contracts, causality of engagements, the user simulator."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from tandem import schema as s
from tandem.data.dataset import EVENT_COLUMNS, ITEM_COLUMNS, USER_COLUMNS, positives
from tandem.data.landing import event_records
from tandem.data.world import World
from tandem.data.world_config import ARRIVAL_TS, DAY_MS, WorldConfig
from tandem.validation import validate, validate_event

H = 3_600_000
CFG = WorldConfig(n_users=200, n_items=100, n_events_target=20_000, days=3, seed=7)


@pytest.fixture(scope="module")
def world() -> World:
    return World.generate(CFG)


@pytest.fixture(scope="module")
def data(world):
    return world.to_dataset()


def test_same_seed_same_world_other_seed_differs(data):
    again = World.generate(CFG).to_dataset()
    pd.testing.assert_frame_equal(data.events, again.events)
    pd.testing.assert_frame_equal(data.items, again.items)
    pd.testing.assert_frame_equal(data.users, again.users)
    other = World.generate(WorldConfig(**{**CFG.__dict__, "seed": 8})).to_dataset()
    assert not data.events[s.ITEM_ID].head(1000).equals(other.events[s.ITEM_ID].head(1000))
    assert not data.items[s.CREATED_AT].equals(other.items[s.CREATED_AT])


def test_shapes_volume_and_contracts(data):
    ev, items, users = data.events, data.items, data.users
    assert tuple(ev.columns) == EVENT_COLUMNS
    assert tuple(items.columns) == ITEM_COLUMNS and tuple(users.columns) == USER_COLUMNS
    assert (len(items), len(users)) == (100, 200)
    assert 17_000 <= len(ev) <= 23_000  # ~n_events_target
    assert ev[s.EVENT_ID].is_unique
    assert set(ev[s.EVENT_TYPE]) == {s.IMPRESSION, s.CLICK, s.PLAY, s.COMPLETE, s.LIKE,
                                     s.DISLIKE, s.SHARE, s.ADD_TO_LIST}
    for event in event_records(ev.sample(2000, random_state=0)):
        validate_event(event)
    for row in json.loads(items.to_json(orient="records")):
        validate(row, "item")
    for row in json.loads(users.to_json(orient="records")):
        validate(row, "user")


def test_engagements_follow_their_impression(data):
    ev = data.events
    imp = ev[ev[s.EVENT_TYPE] == s.IMPRESSION]
    eng = ev[ev[s.EVENT_TYPE] != s.IMPRESSION]
    assert imp[s.PROPENSITY].between(0, 1, inclusive="right").all()
    assert eng[s.PROPENSITY].isna().all()
    assert imp[[s.REQUEST_ID, s.SESSION_ID, s.POSITION, s.CTX_DEVICE]].notna().all().all()
    key = [s.REQUEST_ID, s.POSITION]
    assert not imp.duplicated(key).any()
    assert not imp.duplicated([s.REQUEST_ID, s.ITEM_ID]).any()  # no item twice in a slate
    joined = eng.merge(imp[key + [s.ITEM_ID, s.USER_ID, s.TS]], on=key, suffixes=("", "_imp"))
    assert len(joined) == len(eng)  # every engagement references an impression
    assert (joined[s.ITEM_ID] == joined[s.ITEM_ID + "_imp"]).all()
    assert (joined[s.USER_ID] == joined[s.USER_ID + "_imp"]).all()
    assert (joined[s.TS] > joined[s.TS + "_imp"]).all()
    has_dwell = ev[s.DWELL_MS].notna()
    assert set(ev.loc[has_dwell, s.EVENT_TYPE]) == {s.PLAY, s.COMPLETE}
    # an engagement type implies its cause: complete/like/share need a play of the same slot
    plays = set(map(tuple, ev.loc[ev[s.EVENT_TYPE] == s.PLAY, key].to_numpy()))
    need_play = ev[ev[s.EVENT_TYPE].isin([s.COMPLETE, s.LIKE, s.SHARE])]
    assert all(tuple(k) in plays for k in need_play[key].to_numpy())
    clicks = ev[ev[s.EVENT_TYPE] == s.CLICK]
    assert (len(clicks) > 0) and positives(ev).sum() > len(clicks)


def test_catalog_grows_and_nothing_is_shown_before_release(world, data):
    items = data.items.set_index(s.ITEM_ID)
    fresh = items[s.CREATED_AT] > CFG.start_ms
    assert 15 <= fresh.sum() <= 45  # 1 - catalog_at_start of 100 items released in the window
    imp = data.events[data.events[s.EVENT_TYPE] == s.IMPRESSION]
    assert (imp[s.TS].to_numpy() >= items.loc[imp[s.ITEM_ID], s.CREATED_AT].to_numpy()).all()
    users = data.users.set_index(s.USER_ID)
    assert (imp[s.TS].to_numpy() >= users.loc[imp[s.USER_ID], s.SIGNUP_TS].to_numpy()).all()
    # sessions start inside the window; a late session's next requests may spill over minutes
    assert imp[s.TS].min() >= CFG.start_ms and imp[s.TS].max() < CFG.start_ms + 3 * DAY_MS + H
    # popularity is power-law: the top 10% of items get far more than 10% of impressions
    counts = imp[s.ITEM_ID].value_counts()
    assert counts.iloc[:10].sum() / counts.sum() > 0.25 and counts.iloc[0] > 5 * counts.median()


def test_position_bias(data):
    ev = data.events
    imp = ev[ev[s.EVENT_TYPE] == s.IMPRESSION].groupby(s.POSITION).size()
    clk = ev[ev[s.EVENT_TYPE] == s.CLICK].groupby(s.POSITION).size()
    ctr = (clk / imp).to_numpy()
    assert ctr[0] > 2 * ctr[9]
    assert ctr[:3].mean() > ctr[-3:].mean()


def test_simulator_rewards_taste(world):
    rng = np.random.default_rng(0)
    users = np.arange(200)
    taste = world.user_vec @ world.item_vec.T  # [200, 100]
    order = np.argsort(-taste, axis=1)
    aligned = world.simulate(users, order[:, :10], rng)
    anti = world.simulate(users, order[:, -10:], rng)
    assert aligned.click.shape == (200, 10) and aligned.dwell_ms.dtype == np.int64
    assert aligned.click.sum() > 500 and anti.click.sum() < 50
    assert aligned.click.sum() > 10 * anti.click.sum()
    assert aligned.like.sum() > anti.like.sum() and aligned.dwell_ms.sum() > anti.dwell_ms.sum()
    assert not (aligned.play & ~aligned.click).any()
    assert (aligned.dwell_ms[~aligned.play] == 0).all()
    again = world.simulate(users, order[:, :10], np.random.default_rng(0))
    assert np.array_equal(aligned.click, again.click)


def test_chunks_stream_arrival_and_duplicates():
    cfg = WorldConfig(n_users=100, n_items=50, n_events_target=6_000, days=2, seed=3,
                      chunk_requests=100, late_share=0.2, duplicate_share=0.05)
    world = World.generate(cfg)
    plan = world.chunks()
    assert len(plan) > 2 and {d for d, _, _ in plan} == {0, 1}
    tables = list(world.generate_events())
    assert len(tables) == len(plan)
    t = pa.concat_tables(tables).to_pandas()
    assert (t[ARRIVAL_TS] >= t[s.TS]).all()
    late = (t[ARRIVAL_TS] - t[s.TS]) >= H
    assert 0.1 < late.mean() < 0.3
    dup = t[t[s.EVENT_ID].duplicated(keep=False)]
    assert 0.02 < len(dup) / 2 / len(t) < 0.08
    first, second = (dup.groupby(s.EVENT_ID)[ARRIVAL_TS].min(),
                     dup.groupby(s.EVENT_ID)[ARRIVAL_TS].max())
    assert (second > first).all()


def test_write_landing_is_idempotent(paths):
    world = World.generate(WorldConfig(n_users=50, n_items=30, n_events_target=3_000, days=2,
                                       seed=1))
    counts = world.write(paths)
    files = sorted(paths.landing_events.rglob("*.jsonl"))
    lines = sum(len(f.read_text().splitlines()) for f in files)
    assert lines == counts["events"] and counts["items"] == 30
    world.write(paths)  # rerun: same files, same content
    assert sorted(paths.landing_events.rglob("*.jsonl")) == files
    assert sum(len(f.read_text().splitlines()) for f in files) == lines
    assert all(f.parent.name.startswith("hour=") and len(f.parent.name) == 7 for f in files)


def test_a_world_spec_folder_is_an_offline_dataset(tmp_path, data):
    """``make eval DATA=<folder>``: a folder with ``world_config.json`` (``tandem.cli world
    --spec``) loads as the world its seed generates; a misspelt field is an error, not a silent
    default; any other folder is read as MovieLens."""
    from tandem.cli.commands import main as cli
    from tandem.data.datasets import load_dataset

    cli(["world", "--spec", str(tmp_path / "w"), "--users", str(CFG.n_users), "--items",
         str(CFG.n_items), "--events", str(CFG.n_events_target), "--days", str(CFG.days),
         "--seed", str(CFG.seed)])
    loaded = load_dataset(tmp_path / "w")
    pd.testing.assert_frame_equal(loaded.events, data.events)
    assert len(loaded.items) == CFG.n_items and loaded.name == "world-7"
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "world_config.json").write_text(json.dumps({"n_user": 5}))
    with pytest.raises(ValueError, match="n_user"):
        load_dataset(tmp_path / "bad")
    with pytest.raises(FileNotFoundError, match="u.data"):
        load_dataset(tmp_path)
