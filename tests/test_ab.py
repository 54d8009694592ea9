"""A/B assignment is a pure function of (salt, user id) and splits traffic by weight."""

import numpy as np
import pytest

from tandem.policy.ab import Experiment, Variant, bucket

EXP = Experiment("ranker-v2", "salt-1", (Variant("control", 1.0, "champion"),
                                         Variant("treatment", 1.0, "challenger",
                                                 {"mmr_lambda": 0.5})))


def test_assignment_is_stable_across_instances():
    again = Experiment.from_dict({"name": "ranker-v2", "salt": "salt-1", "variants": [
        {"name": "control", "alias": "champion"},
        {"name": "treatment", "alias": "challenger", "overrides": {"mmr_lambda": 0.5}}]})
    users = [f"u{i}" for i in range(500)]
    assert [EXP.assign(u).name for u in users] == [again.assign(u).name for u in users]


def test_bucket_is_pinned():
    # sha256("salt-1:u42")[:8] / 2**64, pinned so a refactor cannot silently reshuffle users
    assert bucket("salt-1", "u42") == pytest.approx(0.7741754770952722, abs=1e-15)
    assert EXP.assign("u42").name == "treatment"  # 0.774 >= 0.5
    assert bucket("salt-1", "u42") != bucket("salt-2", "u42")


@pytest.mark.parametrize("weights", [(1, 1), (9, 1), (1, 2, 1)])
def test_split_matches_weights(weights):
    exp = Experiment("e", "s", tuple(Variant(f"v{i}", w) for i, w in enumerate(weights)))
    names = [exp.assign(f"user-{i}").name for i in range(20_000)]
    shares = np.array([names.count(f"v{i}") for i in range(len(weights))]) / len(names)
    expected = np.array(weights) / sum(weights)
    assert np.abs(shares - expected).max() < 0.015


def test_new_salt_reshuffles_users():
    other = Experiment("ranker-v2", "salt-2", EXP.variants)
    users = [f"u{i}" for i in range(2000)]
    same = np.mean([EXP.assign(u).name == other.assign(u).name for u in users])
    assert 0.4 < same < 0.6  # independent 50/50 splits agree about half the time


def test_aliases_and_single():
    assert EXP.aliases == ("champion", "challenger")
    single = Experiment.single("champion")
    assert single.assign("anyone").name == "control"
    with pytest.raises(ValueError):
        Experiment("e", "s", (Variant("a", 0.0),))
    with pytest.raises(ValueError):
        Experiment("e", "s", (Variant("a"), Variant("a")))
