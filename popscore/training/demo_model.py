"""Build the demo artifact from SYNTHETIC data: `python -m popscore.training.demo_model --out FILE`.

Generates synthetic tracks (popscore.training.synthetic), trains FusionNet on short crops (the net
pools over time, so it serves 30 s clips all the same), reports held-out MAE beside the
mean predictor's, and exports the TorchScript artifact. Seeded: the same seed on the same
machine gives the same weights and hence the same model_version.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from popscore.artifact import (
    DEFAULT_FEATURES,
    ArtifactMeta,
    Reference,
    TrainingSummary,
    save,
    weights_digest,
)
from popscore.training.model import FusionNet
from popscore.training.synthetic import make_dataset
from popscore.training.train import TrainConfig, evaluate, predict, train

SAMPLE_RATE = 22050
CLIP_SECONDS = 30.0
CROP_SECONDS = 6.0
TEST_FRACTION = 0.2
# About one minute of generation + training on 2 CPU cores per unit of --minutes.
TRACKS_PER_MINUTE = 1280
EPOCHS = 10
HIT_DEFINITION = "trained label: popularity >= hit_threshold; hit_probability = sigmoid(hit_logit)"


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m popscore.training.demo_model", description=__doc__
    )
    parser.add_argument("--out", type=Path, default=Path("models/demo.pt"), help="artifact path")
    parser.add_argument("--seed", type=int, default=0, help="seed for data, init and batches")
    parser.add_argument(
        "--minutes", type=float, default=1.0, help="rough CPU budget; scales the track count"
    )
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--crop-seconds", type=float, default=CROP_SECONDS)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if not 0.05 <= args.minutes <= 120 or args.epochs < 1 or not 1.0 <= args.crop_seconds <= 30:
        parser.error("need 0.05 <= --minutes <= 120, --epochs >= 1, 1 <= --crop-seconds <= 30")
    return args


def build(args: argparse.Namespace) -> ArtifactMeta:
    """Generate, train, evaluate and export; returns the metadata written into the artifact."""
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    n = max(64, round(TRACKS_PER_MINUTE * args.minutes))
    started = time.perf_counter()
    print(f"generating {n} SYNTHETIC tracks ({args.crop_seconds:g} s crops)...", flush=True)
    waveforms, features, popularity = make_dataset(args.seed, n, args.crop_seconds, SAMPLE_RATE)
    generated = time.perf_counter()
    n_test = round(n * TEST_FRACTION)
    train_rows, test_rows = slice(0, n - n_test), slice(n - n_test, n)
    model = FusionNet(DEFAULT_FEATURES, sample_rate=SAMPLE_RATE)
    model.fit_normalizer(features[train_rows])
    config = TrainConfig(epochs=args.epochs, seed=args.seed)
    history = train(
        model, waveforms[train_rows], features[train_rows], popularity[train_rows],
        config, progress=not args.quiet,
    )  # fmt: skip
    trained = time.perf_counter()
    train_mean = float(popularity[train_rows].mean())
    metrics = evaluate(
        model, waveforms[test_rows], features[test_rows], popularity[test_rows],
        train_mean, config.hit_threshold,
    )  # fmt: skip
    training = TrainingSummary(
        data="synthetic",
        synthetic=True,
        rows=n - n_test,
        seed=args.seed,
        variant="fusion",
        details={
            "generator": "popscore.training.synthetic",
            "n": n,
            "n_train": n - n_test,
            "n_test": n_test,
            "epochs": args.epochs,
            "crop_seconds": args.crop_seconds,
            "train_loss": [round(x, 5) for x in history],
            "metrics": {key: round(value, 4) for key, value in metrics.items()},
        },
    )
    fitted, _ = predict(model, waveforms[train_rows], features[train_rows])
    reference = Reference.build(DEFAULT_FEATURES, features[train_rows], fitted)
    # No timings or dates in the metadata: a rerun on the same machine gives the same weights
    # and the same metadata (the file bytes still differ by torch's random serialization id).
    meta = ArtifactMeta.for_model(
        model,
        model_version=f"demo-synth-{args.seed}-{weights_digest(model)}",
        clip_seconds=CLIP_SECONDS,
        hit_threshold=config.hit_threshold,
        training=training,
        reference=reference,
        hit_definition=HIT_DEFINITION,
        torch_version=torch.__version__,
    )
    path = save(model, args.out, meta)
    print(
        f"held-out MAE {metrics['mae']:.2f} vs mean predictor {metrics['mean_predictor_mae']:.2f} "
        f"(features only {metrics['features_only_mae']:.2f}, "
        f"audio only {metrics['audio_only_mae']:.2f}); "
        f"hit AUC {metrics['hit_roc_auc']:.3f}\n"
        f"generate {generated - started:.1f} s, train {trained - generated:.1f} s; "
        f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB) as {meta.model_version}"
    )
    return meta


def main(argv: Sequence[str] | None = None) -> int:
    build(_parse(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
