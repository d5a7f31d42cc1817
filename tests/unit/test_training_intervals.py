"""Artist-bootstrap intervals (training.intervals) and the title's version flags."""

import math

import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from popscore.artifact.features import TITLE_FEATURES, extract, version_text
from popscore.training.data import PAPER_FEATURES, without
from popscore.training.intervals import Scored, artist_bootstrap, macro_f1, rank_auc
from popscore.training.train import feature_groups


def _data(artists: int = 40, per_artist: int = 5, seed: int = 0) -> tuple:
    rng = np.random.default_rng(seed)
    groups = np.repeat([f"a{i}" for i in range(artists)], per_artist)
    artist_level = np.repeat(rng.normal(65, 12, artists), per_artist)
    target = np.clip(artist_level + rng.normal(0, 4, len(groups)), 0, 100)
    return target, groups


def test_a_clearly_better_model_has_a_difference_interval_below_zero() -> None:
    target, groups = _data()
    rng = np.random.default_rng(1)
    cut = np.full(len(target), 70.0)
    good = Scored(target + rng.normal(0, 2, len(target)), cut)
    poor = Scored(target + rng.normal(0, 8, len(target)), cut)
    out = artist_bootstrap(target, groups, {"good": good, "poor": poor},
                           [("good", "poor")], resamples=300)  # fmt: skip
    diff = out["good - poor"]["mae"]
    assert diff["high"] < 0 and diff["low"] < diff["estimate"] < diff["high"]
    assert out["good"]["mae"]["estimate"] == pytest.approx(np.abs(good.prediction - target).mean())
    assert "40 artists" in out["method"] and "300 resamples" in out["method"]


def test_equal_models_have_a_difference_interval_around_zero() -> None:
    target, groups = _data()
    rng = np.random.default_rng(2)
    cut = np.full(len(target), 70.0)
    a = Scored(target + rng.normal(0, 5, len(target)), cut)
    b = Scored(target + rng.normal(0, 5, len(target)), cut)
    diff = artist_bootstrap(target, groups, {"a": a, "b": b}, [("a", "b")], resamples=300)
    assert diff["a - b"]["mae"]["low"] < 0 < diff["a - b"]["mae"]["high"]


def test_the_bootstrap_is_reproducible_from_its_seed() -> None:
    target, groups = _data()
    scored = {"m": Scored(target + 3.0, np.full(len(target), 70.0))}
    first = artist_bootstrap(target, groups, scored, resamples=100, seed=7)
    assert first == artist_bootstrap(target, groups, scored, resamples=100, seed=7)


@pytest.mark.parametrize(
    ("title", "flags"),
    [
        ("Live Forever", set()),  # a song called "Live ...", no version part
        ("Song - Live at Wembley", {"live"}),
        ("Song (Radio Edit)", {"edit"}),
        ("Song (Robin Schulz Remix)", {"remix"}),
        ("Song - 2011 Remaster", {"remaster"}),
        ("Song [Sped Up]", {"sped_up"}),
        ("Song (Acoustic) - Live", {"acoustic", "live"}),
    ],
)
def test_version_flags_read_only_the_version_part(title: str, flags: set[str]) -> None:
    row = extract({"release": {"title": title}}, TITLE_FEATURES)
    assert {p.rsplit(".", 1)[1] for p, v in zip(TITLE_FEATURES, row, strict=True) if v} == flags


def test_no_title_is_missing_not_false() -> None:
    assert all(math.isnan(v) for v in extract({"release": {}}, TITLE_FEATURES))
    # An empty title is no title, in serving as in a catalog's empty cell.
    assert all(math.isnan(v) for v in extract({"release": {"title": "  "}}, TITLE_FEATURES))
    assert version_text("Plain title") == "" and version_text(None) is None


def test_without_drops_paths_and_prefixes_and_names_an_unknown_one() -> None:
    kept = without(PAPER_FEATURES, ["artist.popularity", "release.title"])
    assert "artist.popularity" not in kept and not any(p.startswith("release.title") for p in kept)
    assert "artist.followers" in kept and "release.year" in kept
    with pytest.raises(ValueError, match=r"no feature artist\.pop among"):
        without(PAPER_FEATURES, ["artist.pop"])


def test_title_flags_are_hidden_as_one_group_apart_from_the_other_release_fields() -> None:
    groups = feature_groups(PAPER_FEATURES).tolist()
    flags = {groups[PAPER_FEATURES.index(p)] for p in TITLE_FEATURES}
    assert len(flags) == 1
    assert flags != {groups[PAPER_FEATURES.index("release.year")]}
    assert (
        groups[PAPER_FEATURES.index("artist.popularity")]
        == groups[PAPER_FEATURES.index("artist.followers")]
    )


@pytest.mark.parametrize("seed", range(5))
def test_fast_metrics_equal_scikit_learns(seed: int) -> None:
    rng = np.random.default_rng(seed)
    truth = rng.random(200) < 0.4
    score = np.round(rng.normal(size=200) + truth, 1)  # rounded: ties across the classes
    decided = score > 0.5
    assert rank_auc(truth, score) == pytest.approx(roc_auc_score(truth, score))
    assert macro_f1(truth, decided) == pytest.approx(
        f1_score(truth, decided, average="macro", zero_division=1.0)
    )
    assert macro_f1(np.zeros(5, bool), np.zeros(5, bool)) == 1.0
    assert math.isnan(rank_auc(np.ones(5, bool), score[:5]))
