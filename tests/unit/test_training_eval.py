"""Unit tests for the evaluation side of training/: CSV mapping, grouped folds, the report,
the features-only model and its artifact, and the train/evaluate/export commands."""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from sklearn.metrics import roc_auc_score

from consumer.audio import AudioPolicy, decode_window
from consumer.device import Scorer
from consumer.soxr_resample import SoxrResampler
from popscore.artifact import load
from popscore.artifact.features import extract
from popscore.cli.main import main
from popscore.training.cache import prepare, read_table, shard_name
from popscore.training.catalog import row_event
from popscore.training.data import (
    PAPER_CSV,
    PAPER_FEATURES,
    TrackTable,
    load_catalog,
)
from popscore.training.evaluate import (
    BASELINES,
    FEATURES_ONLY,
    _split_predictions,
    baseline_predictions,
    cross_validate,
    fit_model,
    predict_rows,
)
from popscore.training.metrics import THRESHOLDS, best_cut, group_folds, metrics
from popscore.training.model import Ensemble, FusionNet
from popscore.training.plots import write_plots
from popscore.training.report import oof_path, summary, write_report
from popscore.training.train import TrainConfig
from tests.unit.artifact_helpers import export

F = len(PAPER_FEATURES)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))]  # fmt: skip
# Tiny but complete: two seeds, an inner CV for the decision cut, a few full-batch steps.
TINY = replace(
    FEATURES_ONLY, members=2, inner_folds=2, config=replace(FEATURES_ONLY.config, epochs=5)
)
HEADER = ["name", "popularity", "duration_ms", "artist", "release_date", "tempo",
          "artist_popularity", "artist_followers", "music_file"]  # fmt: skip


def _table(n: int = 60, artists: int = 12, seed: int = 0) -> TrackTable:
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n, F)).astype(np.float32)
    features[:, 1] = rng.integers(1_000, 10**8, n)  # followers: a count, log1p'd
    features[rng.random((n, F)) < 0.05] = np.nan
    popularity = np.clip(70 + 10 * np.nan_to_num(features[:, 0]) + rng.normal(0, 5, n), 0, 100)
    groups = np.array([f"artist-{i % artists}" for i in range(n)])
    return TrackTable(features, popularity.astype(np.float32), groups, PAPER_FEATURES, "test")


def _write_csv(path: Path, rows: list[list[object]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(HEADER)
        writer.writerows(rows)
    return path


# --- features and CSV mapping ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("date", "year"),
    [(dt.date(2014, 8, 25), 2014), ("2014-08-25", 2014), ("2009", 2009), (None, None), ("?", None)],
)
def test_release_year_is_derived_from_the_date(date: object, year: int | None) -> None:
    [value] = extract({"release": {"date": date}}, ["release.year"])
    assert (math.isnan(value) and year is None) or value == year


def test_release_year_from_a_validated_event() -> None:
    from schemas.events import ReleaseEvent

    event = ReleaseEvent.model_validate_json(
        json.dumps({"event_id": "e", "track_id": "t", "emitted_at": "2024-01-01T00:00:00Z",
                    "audio_uri": "file:///x.wav", "release": {"date": "2021-03-04"}})
    )  # fmt: skip
    assert extract(event.model_dump(), ["release.year"])[0] == 2021


def test_row_to_event_maps_columns_to_release_event_paths() -> None:
    row = {"artist": "A", "artist_popularity": "85", "artist_followers": "94489318",
           "release_date": "2014-08-25", "duration_ms": "236133", "tempo": "98.99",
           "time_signature": "4", "loudness": "", "name": "Song - Live 2011",
           "artists_list": "ignored"}  # fmt: skip
    event = row_event(row)
    assert event["artist"] == {"name": "A", "popularity": 85, "followers": 94489318}
    assert event["release"] == {
        "title": "Song - Live 2011",
        "date": "2014-08-25",
        "duration_ms": 236133,
    }
    assert event["audio_features"] == {"tempo": 98.99, "time_signature": 4}
    features = extract(event, PAPER_FEATURES)
    assert features[PAPER_FEATURES.index("release.year")] == 2014
    assert math.isnan(features[PAPER_FEATURES.index("audio_features.loudness")])
    assert features[PAPER_FEATURES.index("release.title.live")] == 1.0
    assert features[PAPER_FEATURES.index("release.title.remix")] == 0.0


def test_load_catalog_groups_by_artist_and_resolves_audio(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "t.csv", [
        ["a", 50, 200000, "X", "2020-01-01", 120, 80, 1000, "a.wav"],
        ["b", 70, 180000, "Y", "2019", "", 70, 10, ""],
    ])  # fmt: skip
    table = load_catalog(path, audio_column="music_file")
    assert table.features.shape == (2, F) and list(table.groups) == ["X", "Y"]
    assert table.popularity.tolist() == [50.0, 70.0]
    assert table.audio_paths == ((tmp_path / "a.wav").as_uri(), None)
    with pytest.raises(ValueError, match="column"):
        load_catalog(path, audio_column="no_such_column")


def test_training_clips_are_the_clips_the_service_scores(tmp_path: Path) -> None:
    """Train/serve parity: the centred window, decoded, mixed down and resampled by the
    consumer's own code (the head of the track used to be taken: silence in this file)."""
    rate = 44_100
    t = np.arange(10 * rate) / rate
    tone = np.where((t > 4) & (t < 6), 0.4 * np.sin(2 * np.pi * 440 * t), 0.0)
    sf.write(tmp_path / "a.wav", np.stack([tone, tone], axis=1).astype(np.float32), rate)
    (tmp_path / "b.wav").write_bytes(b"not audio")
    path = _write_csv(tmp_path / "t.csv", [
        ["a", 50, 200000, "X", "2020-01-01", 120, 80, 1000, "a.wav"],
        ["b", 70, 180000, "Y", "2019", "", 70, 10, "b.wav"],
    ])  # fmt: skip
    policy = AudioPolicy.create((tmp_path,))
    prepare(path, "music_file", tmp_path / "cache", policy, PAPER_FEATURES, 22_050, 2.0,
            workers=1, progress=False)  # fmt: skip
    table = read_table(tmp_path / "cache")
    assert table.audio_ok.tolist() == [True, False]
    served = SoxrResampler(22_050, 2.0)(decode_window(tmp_path / "a.wav", 2.0, policy))
    clip = np.load(tmp_path / "cache" / shard_name(0, ".npy"))[0].astype(np.float32)
    np.testing.assert_allclose(clip, served, atol=1e-3)  # float16 on disk
    assert np.abs(clip).max() > 0.3  # the tone in the middle, not the silent head


@pytest.mark.skipif(not PAPER_CSV.is_file(), reason=f"paper data not found at {PAPER_CSV}")
def test_paper_csv_maps_fully() -> None:
    table = load_catalog(PAPER_CSV)
    assert table.features.shape == (1967, F)
    assert len(np.unique(table.groups)) == 98
    assert np.isfinite(table.features).all(), "every paper row has every mapped feature"


# --- folds and the report -------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_group_folds_never_share_an_artist(seed: int) -> None:
    groups = _table(n=200, artists=37).groups
    folds = group_folds(groups, 5, seed)
    assert sorted(np.concatenate(folds).tolist()) == list(range(200))
    artists = [set(groups[f]) for f in folds]
    for i, a in enumerate(artists):
        for b in artists[i + 1 :]:
            assert not a & b
    assert max(map(len, folds)) - min(map(len, folds)) <= 10  # balanced
    again = group_folds(groups, 5, seed)
    assert all(np.array_equal(x, y) for x, y in zip(folds, again, strict=True))
    with pytest.raises(ValueError):
        group_folds(groups, 38, seed)


def test_metrics_of_a_diverged_model_are_nan_not_an_exception() -> None:
    target = np.array([40.0, 60.0, 75.0, 90.0])
    out = metrics(target, np.full(4, np.nan))
    assert all(math.isnan(out[k]) for k in ("mae", "rmse", "r2"))
    assert math.isnan(out["at"]["70"]["roc_auc"]) and out["at"]["70"]["positive_rate"] == 0.0


def test_metrics_match_their_definitions_on_a_small_case() -> None:
    """The scikit-learn metrics against hand-computed values: MAE, F1 of both classes, ties."""
    target = np.array([40.0, 60.0, 75.0, 90.0])
    prediction = np.array([50.0, 72.0, 72.0, 80.0])
    out = metrics(target, prediction)
    assert out["mae"] == pytest.approx((10 + 12 + 3 + 10) / 4)
    at70 = out["at"]["70"]  # truth F F T T, decided F T T T: F1(hit) 0.8, F1(not) 2/3
    assert at70["f1"] == pytest.approx(0.8) and at70["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)
    assert at70["roc_auc"] == pytest.approx(0.875)  # the tie at 72 counts half
    assert out["at"]["50"]["f1"] == pytest.approx(6 / 7)


def test_best_cut_separates_a_clean_split() -> None:
    target = np.array([60, 65, 75, 80.0])
    assert 62 < best_cut(target, np.array([1, 2, 3, 4.0]) + 60, 70) <= 63
    assert 65 < best_cut(target, target, 70) <= 75


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, TrackTable]:
    table = _table()
    folds = group_folds(table.groups, 3, 0)
    result, outcome = cross_validate(table, [TINY], folds, seed=0, progress=False, resamples=200)
    path = tmp_path_factory.mktemp("eval") / "r.json"
    write_report(result, outcome.model.prediction, table.popularity, path)
    write_plots(path.parent / "plots", table, outcome)
    return json.loads(path.read_text()), path, table


def test_report_has_every_metric_for_model_and_baselines(report: tuple) -> None:
    data, _, _ = report
    blocks = [data["models"][data["model"]], *data["baselines"].values()]
    assert set(data["baselines"]) == set(BASELINES) == {"mean", "always_hit", "ridge", "blend"}
    for block in blocks:
        m = block["metrics"]
        assert {"mae", "rmse", "r2"} <= set(m)
        assert set(m["at"]) == {f"{t:g}" for t in THRESHOLDS} == {"50", "70"}
        for at in m["at"].values():
            assert {"accuracy", "f1", "macro_f1", "roc_auc", "positive_rate"} <= set(at)
    split = data["split"]
    assert split["folds"] == 3 and split["seed"] == 0 and split["group_key"] == "artist"
    assert split["artists_in_two_folds"] == 0
    assert len(data["models"][data["model"]]["fold_cuts"]) == 3
    # The trees' share is chosen per fold by the inner CV, from the spec's grid.
    assert all(f["tree_weight"] in TINY.tree_weight_grid
               for f in data["models"][data["model"]]["fold_cuts"])  # fmt: skip
    assert "inner CV" in data["models"][data["model"]]["blend"]
    # Ridge and the blend are decided like the model; constant predictors at the threshold.
    assert "inner CV" in data["baselines"]["ridge"]["decision"]
    assert "inner CV" in data["baselines"]["blend"]["decision"]
    assert "threshold" in data["baselines"]["mean"]["decision"]


def test_report_gives_the_per_fold_roc_auc_beside_the_pooled_one(report: tuple) -> None:
    data, path, table = report
    folds = group_folds(table.groups, 3, 0)
    model = data["models"][data["model"]]["metrics"]["at"]["70"]
    oof = np.loadtxt(oof_path(path), delimiter=",", skiprows=1)
    truth = table.popularity >= 70
    expected = [roc_auc_score(truth[f], oof[f, 2]) for f in folds]
    np.testing.assert_allclose(model["roc_auc_per_fold"], expected, atol=1e-3)  # OOF: 4 digits
    assert model["roc_auc_fold_mean"] == pytest.approx(np.mean(model["roc_auc_per_fold"]))
    # The mean predictor is constant within a fold: 0.5 in each, whatever the pooled AUC says.
    mean = data["baselines"]["mean"]["metrics"]["at"]["70"]
    assert mean["roc_auc_per_fold"] == [0.5, 0.5, 0.5] and mean["roc_auc"] != 0.5
    assert summary(data)["model"]["roc_auc_fold_mean@70"] == round(model["roc_auc_fold_mean"], 4)


def test_report_gives_artist_bootstrap_intervals(report: tuple) -> None:
    data, _, _ = report
    intervals = data["intervals"]
    assert "12 artists" in intervals["method"]
    for name in ("model", "ridge", "blend", "mean", "model - ridge", "model - blend"):
        for metric in ("mae", "roc_auc@70", "macro_f1@70"):
            block = intervals[name][metric]
            assert block["low"] <= block["high"]
    # The estimates are the report's own metrics, and a difference is the difference of those.
    model = data["models"][data["model"]]["metrics"]
    ridge_mae = data["baselines"]["ridge"]["metrics"]["mae"]
    assert intervals["model"]["mae"]["estimate"] == pytest.approx(model["mae"])
    assert intervals["model"]["macro_f1@70"]["estimate"] == pytest.approx(
        model["at"]["70"]["macro_f1"]
    )
    assert intervals["model - ridge"]["mae"]["estimate"] == pytest.approx(model["mae"] - ridge_mae)


def test_ridge_and_blend_cuts_come_from_the_inner_cv() -> None:
    table = _table()
    folds = group_folds(table.groups, 3, 0)
    baselines = baseline_predictions(table, folds, seed=0, inner_folds=3)
    for name in ("ridge", "blend"):
        cuts = baselines[name].cuts[70.0]
        assert len(np.unique(cuts)) <= 3 and not np.all(cuts == 70.0)  # one cut per fold
    assert np.all(baselines["mean"].cuts[70.0] == 70.0)
    # Without an inner CV (the audio-only variant) every baseline decides at the threshold.
    plain = baseline_predictions(table, folds, seed=0, inner_folds=0)
    assert np.all(plain["ridge"].cuts[70.0] == 70.0)


def test_evaluate_plots_are_written(report: tuple) -> None:
    _, path, _ = report
    written = sorted(p.name for p in (path.parent / "plots").iterdir())
    assert written == sorted([
        "predicted_vs_actual.png", "roc_70.png", "calibration.png",
        "error_by_artist_size.png", "loss_curves.png",
    ])  # fmt: skip
    for name in written:
        assert (path.parent / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_split_predictions_reblend_to_the_ensemble() -> None:
    """(1 - w) * nets + w * trees is the ensemble built with the trees at share w."""
    table = _table()
    rows = np.arange(40)
    model = fit_model(table, TINY, rows, seed=0, sample_rate=22050, tree_weight=0.3)
    nets, trees = _split_predictions(model, table, TINY, np.arange(40, 60))
    whole = predict_rows(model, table, TINY, np.arange(40, 60))
    np.testing.assert_allclose(0.7 * nets + 0.3 * trees, whole, atol=1e-3)


def test_oof_csv_has_one_row_per_input_row(report: tuple) -> None:
    data, path, table = report
    oof = oof_path(path)
    assert oof.name == "r.oof.csv" and data["oof"] == oof.name
    with oof.open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(table.popularity)
    assert list(rows[0]) == ["row", "target", "prediction"]
    assert [int(r["row"]) for r in rows] == list(range(len(rows)))
    assert all(math.isfinite(float(r["prediction"])) for r in rows)


# --- the features-only model and its artifact -----------------------------------------------


@pytest.fixture(scope="module")
def features_only() -> Ensemble:
    table = _table()
    members = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = FusionNet(PAPER_FEATURES, use_audio=False, **TINY.net)
        from popscore.training.train import train

        train(net, None, table.features, table.popularity, TrainConfig(epochs=3), False)
        members.append(net)
    return Ensemble(members).eval()


def _batch(n: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    features = torch.from_numpy(_table(n=n, seed=3).features)
    return torch.zeros(n, 22050), features, torch.tensor([True, False] * (n // 2) + [True])


@pytest.mark.parametrize("device", DEVICES)
def test_features_only_artifact_matches_eager(
    features_only: Ensemble, tmp_path: Path, device: str
) -> None:
    path = export(features_only, tmp_path / "fo.pt", "fo-test", 1.0)
    artifact = load(path, device)
    scripted = artifact.module
    assert artifact.meta.features == PAPER_FEATURES
    eager = features_only.to(device)
    inputs = [x.to(device) for x in _batch()]
    with torch.inference_mode():
        for a, b in zip(eager(*inputs), scripted(*inputs), strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    features_only.cpu()
    # Served: no audio branch, so the Scorer scores the batch in one call, not per slice.
    scorer = Scorer(path, device)
    assert scorer.staged and not scorer.listens
    wave, feats, mask = _batch()
    scores = scorer.score(wave.numpy(), feats.numpy(), mask.numpy())
    with torch.inference_mode():
        expected, _ = features_only(wave, feats, mask)
    np.testing.assert_allclose(scores.popularity, expected.numpy(), atol=1e-4)


def test_features_only_batched_equals_item_by_item(features_only: Ensemble) -> None:
    wave, feats, mask = _batch()
    with torch.inference_mode():
        whole = features_only(wave, feats, mask)
        items = [
            features_only(wave[i : i + 1], feats[i : i + 1], mask[i : i + 1]) for i in range(5)
        ]
    for k in range(2):
        torch.testing.assert_close(whole[k], torch.cat([x[k] for x in items]), atol=1e-4, rtol=0)


def test_features_only_scores_nan_features_and_no_audio(features_only: Ensemble) -> None:
    wave, feats, _ = _batch()
    with torch.inference_mode():
        pop, logit = features_only(wave * math.nan, feats * math.nan, torch.zeros(5, dtype=bool))
    assert torch.isfinite(pop).all() and torch.isfinite(logit).all()
    assert ((pop >= 0) & (pop <= 100)).all()


# --- commands -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["evaluate"],
        ["evaluate", "--synthetic", "100"],
        ["evaluate", "--data", "/no/such.csv", "--report", "r.json"],
        ["evaluate", "--synthetic", "5", "--report", "r.json"],
        ["evaluate", "--synthetic", "100", "--report", "r.json", "--folds", "1"],
        ["evaluate", "--synthetic", "100", "--report", "r.json", "--device", "tpu"],
        ["train", "--synthetic", "100"],
        ["train", "--synthetic", "100", "--out", "x.pt"],  # neither --evaluation nor --no-
        ["evaluate", "--synthetic", "100", "--report", "r.json", "--without", "artist.popularity"],
        ["compare", "/no/such.json", "/no/such.json"],
        ["evaluate", "--synthetic", "100", "--report", "r.json", "--seed", "-1"],
        ["export", "/no/such.pt", "--out", "x.pt"],
    ],
)
def test_training_commands_reject_bad_arguments(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("popscore")


def test_train_then_export_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [[f"t{i}", 40 + i % 50, 200000 + i, f"A{i % 9}", f"{2000 + i % 20}-01-01",
             100 + i % 40, 60 + i % 30, 1000 * (i + 1), ""] for i in range(45)]  # fmt: skip
    data = _write_csv(tmp_path / "d.csv", rows)
    out = tmp_path / "m.pt"
    args = ["train", "--data", str(data), "--out", str(out), "--quiet", "--device", "cpu"]
    assert main([*args, "--no-evaluation", "--plots", str(tmp_path / "plots")]) == 0
    assert (tmp_path / "plots" / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"
    meta = load(out).meta
    assert meta.features == PAPER_FEATURES and meta.hit_threshold == 70.0
    assert meta.training is not None and meta.training.rows == 45
    assert meta.reference is not None and meta.reference.rows == meta.reference.score_rows == 45
    assert meta.reference.features["release.year"].bins is not None
    again = tmp_path / "m2.pt"
    assert main(["export", str(out), "--out", str(again), "--hit-threshold", "66.5"]) == 0
    meta2 = load(again).meta
    assert meta2 == meta.replace(hit_threshold=66.5), "only the cut changed"
    capsys.readouterr()


def test_files_that_are_not_what_an_argument_names_exit_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _thirty_rows(tmp_path / "d.csv")
    report = tmp_path / "r.json"
    report.write_text(json.dumps(_fake_report("fusion", rows=30)))
    not_csv = tmp_path / "x.csv"
    not_csv.write_text("just one line, no header worth the name\n")
    not_pt = tmp_path / "x.pt"
    not_pt.write_text("not a TorchScript artifact")
    out = str(tmp_path / "m.pt")
    few = _write_csv(tmp_path / "few.csv", [[f"t{i}", 40 + i, 200000, f"A{i % 4}", "2001-01-01",
                                             100, 60, 1000, ""] for i in range(20)])  # fmt: skip
    for args, needle in [
        (  # 4 artists in 2 outer folds leave 2 for the 3 inner ones
            ["evaluate", "--data", str(few), "--report", str(report), "--folds", "2"],
            "--folds 2: an outer fold's training rows hold only 2 artists",
        ),
        (
            ["train", "--data", str(data), "--out", out, "--evaluation", str(report)],
            "it evaluated fusion on 30 rows; this run trains features_only on 30",
        ),
        (["train", "--data", str(data), "--out", out, "--evaluation", str(not_csv)], "report"),
        (["evaluate", "--data", str(not_csv), "--report", str(tmp_path / "r2.json")], "--data"),
        (["export", str(not_pt), "--out", out], "x.pt"),
        (
            ["evaluate", "--data", str(data), "--report", str(report), "--without", "artist.pop"],
            "--without: no feature artist.pop",
        ),
        (["compare", str(not_csv), str(report)], "not a `popscore evaluate` report"),
        (
            [
                "evaluate",
                "--data",
                str(data),
                "--report",
                str(report),
                "--folds",
                "10",
                "--features-only",
            ],
            "--folds 10",
        ),
        (
            [
                "evaluate",
                "--data",
                str(data),
                "--report",
                str(report),
                "--plots",
                str(not_csv),
                "--features-only",
            ],
            "not a folder",
        ),
    ]:
        with pytest.raises(SystemExit) as info:
            main(args)
        assert info.value.code == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("popscore") and needle in err, err


def _thirty_rows(path: Path) -> Path:
    rows = [[f"t{i}", 40 + i % 50, 200000 + i, f"A{i % 9}", "2001-01-01", 100, 60, 1000, ""]
            for i in range(30)]  # fmt: skip
    return _write_csv(path, rows)


def _fake_report(model: str, rows: int) -> dict[str, object]:
    """The parts of an `evaluate` report that `train --evaluation` reads."""
    metrics = {"mae": 9.0, "rmse": 11.0, "r2": 0.1, "at": {"70": {"roc_auc": 0.7, "macro_f1": 0.6}}}
    return {
        "model": model,
        "data": {"source": "d.csv", "rows": rows, "features": list(PAPER_FEATURES)},
        "split": {"method": "artist-grouped k-fold", "folds": 5, "seed": 0},
        "models": {
            model: {"metrics": metrics, "fold_cuts": [{"70": 66.0}, {"70": 68.0}, {"70": 67.0}]}
        },
        "baselines": {"mean": {"metrics": metrics}},
    }


def test_train_embeds_a_matching_evaluation_and_its_cut(tmp_path: Path) -> None:
    data = _thirty_rows(tmp_path / "d.csv")
    report = tmp_path / "r.json"
    report.write_text(json.dumps(_fake_report("features_only", rows=30)))
    out = tmp_path / "m.pt"
    args = ["train", "--data", str(data), "--out", str(out), "--evaluation", str(report)]
    assert main([*args, "--quiet", "--device", "cpu"]) == 0
    meta = load(out).meta
    assert meta.hit_threshold == 67.0  # the median of the folds' cuts
    assert meta.training is not None and meta.training.evaluation is not None
    assert meta.training.evaluation["model"]["mae"] == 9.0


def test_an_evaluation_of_another_model_is_refused_by_train_and_export(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _thirty_rows(tmp_path / "d.csv")
    report = _fake_report("features_only", rows=30)
    report["models"]["features_only"]["train"] = asdict(FEATURES_ONLY.config)  # type: ignore[index]
    good = tmp_path / "good.json"
    good.write_text(json.dumps(report))
    (tmp_path / "other").mkdir()  # another catalog of 30 rows: not the data beside the report
    other = _write_csv(tmp_path / "other" / "d.csv", [[f"t{i}", 41 + i % 50, 200000 + i,
        f"A{i % 9}", "2001-01-01", 100, 60, 1000, ""] for i in range(30)])  # fmt: skip
    out = tmp_path / "m.pt"
    train = ["train", "--out", str(out), "--quiet", "--device", "cpu", "--evaluation", str(good)]
    for extra, needle in [
        (["--without", "release.title"], "its 20 features are not this model's 14 (feature 15:"),
        (["--seed", "1"], "it evaluated seed 0, this model's seed is 1"),
        (["--epochs", "3"], "its epochs is 150, this model's 3"),
        (["--data", str(other)], "it evaluated the data d.csv, not this model's"),
    ]:
        with pytest.raises(SystemExit) as info:
            main([*train, *(["--data", str(data)] if "--data" not in extra else []), *extra])
        err = capsys.readouterr().err
        assert info.value.code == 2 and err.count("\n") == 1 and needle in err, err
    assert main([*train, "--data", str(data)]) == 0  # the data beside the report: accepted
    # export checks a report against the artifact's own metadata.
    fewer = tmp_path / "fewer.json"
    fewer.write_text(json.dumps(report | {"data": {**report["data"], "features": ["x"]}}))
    export = ["export", str(out), "--out", str(tmp_path / "x.pt"), "--evaluation"]
    with pytest.raises(SystemExit) as info:
        main([*export, str(fewer)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "its 1 features are not this model's 20" in err, err
    assert main([*export, str(good)]) == 0


def _report_with_oof(path: Path, data: Path, prediction: np.ndarray, folds: int = 3) -> Path:
    report = _fake_report("features_only", rows=len(prediction))
    report["data"] = {"source": str(data), "rows": len(prediction), "features": ["x"]}
    report["split"] = {"method": "artist-grouped k-fold", "folds": folds, "seed": 0}
    report["models"]["features_only"]["fold_cuts"] = [{"70": 66.0 + i} for i in range(folds)]
    path.write_text(json.dumps(report))
    target = [float(r["popularity"]) for r in csv.DictReader(data.read_text().splitlines())]
    with oof_path(path).open("w", newline="") as handle:
        out = csv.writer(handle)
        out.writerow(["row", "target", "prediction"])
        out.writerows([i, y, p] for i, (y, p) in enumerate(zip(target, prediction, strict=True)))
    return path


def test_compare_pairs_two_reports_of_the_same_folds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = np.array([40 + (7 * i) % 60 for i in range(30)], dtype=float)  # hits and not
    rows = [[f"t{i}", y, 200000, f"A{i % 9}", "2001-01-01", 100, 60, 1000, ""]
            for i, y in enumerate(target)]  # fmt: skip
    data = _write_csv(tmp_path / "d.csv", rows)
    noise = np.random.default_rng(0).normal(0, 1, 30)
    a = _report_with_oof(tmp_path / "a.json", data, target + noise)  # close to the truth
    b = _report_with_oof(tmp_path / "b.json", data, target + 10 * noise)
    out = tmp_path / "cmp.json"
    assert main(["compare", str(a), str(b), "--json", str(out), "--resamples", "200"]) == 0
    result = json.loads(out.read_text())
    diff = result["intervals"]["a - b"]["mae"]
    assert diff["estimate"] == pytest.approx(np.abs(noise).mean() - 10 * np.abs(noise).mean())
    assert diff["high"] < 0  # A is better on every resample of the 9 artists
    other_folds = _report_with_oof(tmp_path / "c.json", data, target, folds=5)
    with pytest.raises(SystemExit) as info:
        main(["compare", str(a), str(other_folds)])
    assert info.value.code == 2 and "not of the same data and folds" in capsys.readouterr().err


def test_compare_finds_a_reports_relative_data_from_the_report_not_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Older reports hold `data.source` as typed, relative to where evaluate ran."""
    target = np.array([40 + (7 * i) % 60 for i in range(30)], dtype=float)
    rows = [[f"t{i}", y, 200000, f"A{i % 9}", "2001-01-01", 100, 60, 1000, ""]
            for i, y in enumerate(target)]  # fmt: skip
    data = _write_csv(tmp_path / "d.csv", rows)
    (tmp_path / "results").mkdir()
    a = _report_with_oof(tmp_path / "results" / "a.json", data, target)
    b = _report_with_oof(tmp_path / "results" / "b.json", data, target + 1)
    for path in (a, b):  # as evaluate wrote it when run in tmp_path
        report = json.loads(path.read_text())
        path.write_text(json.dumps(report | {"data": {**report["data"], "source": "d.csv"}}))
    monkeypatch.chdir(tmp_path / "results")  # where "d.csv" is not
    assert main(["compare", str(a), str(b), "--resamples", "100"]) == 0
