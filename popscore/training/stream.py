"""Training that streams from a prepared cache (training.cache) instead of holding clips in RAM.

    table = read_table(cache)
    clips = CachedClips(cache, table, rows=np.arange(len(table.rows)), crop_samples=6 * 22050)
    history = train_stream(net, clips, config, Stream(workers=2, checkpoint=Path("ck.pt")))

Memory is bounded whatever the catalog's size: the row table (labels, groups, features) is
the only per-track state, and each DataLoader worker holds a few batches of crops read with
`pread` (nothing mapped). One process, or one per device under torchrun (DDP, gloo on CPU,
NCCL on CUDA): `torch.distributed` is initialised from torchrun's environment, each rank reads
its share of every epoch through a DistributedSampler and takes batch/world rows a step (the
global batch stays the configured one), and rank 0 writes the checkpoints. BatchNorm's batch
statistics are each rank's own (not synchronised), so N processes match one within noise,
not bit for bit.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler
from tqdm import tqdm

from consumer.errors import UsageError
from popscore.training.cache import CachedTable, shard_name
from popscore.training.model import FusionNet
from popscore.training.train import TrainConfig, _hide_modalities, feature_groups

BYTES_PER_SAMPLE = 2  # float16 clips


class CachedClips(Dataset[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]):
    """`rows` of a cache as (waveform crop [crop_samples], features [F], audio_ok, popularity).

    Training takes a random crop of each stored clip (the CNN pools over time, so it serves
    30 s having learnt on crops), evaluation the centred one. A crop is read alone: one
    `pread` of crop_samples x 2 bytes at its offset in the shard."""

    def __init__(
        self,
        directory: Path,
        table: CachedTable,
        rows: np.ndarray,
        crop_samples: int,
        random_crop: bool = True,
        hide_features: bool = False,
    ) -> None:
        clip = table.manifest.clip_samples
        if not 0 < crop_samples <= clip:
            raise ValueError(f"crop of {crop_samples} samples from clips of {clip}")
        self.directory = directory
        self.clip_samples, self.crop_samples, self.random_crop = clip, crop_samples, random_crop
        self.shard, self.offset = table.shard[rows], table.offset[rows]
        features = table.features[rows]
        if hide_features:  # the audio-only variant: trained and scored without features
            features = np.full_like(features, np.nan)
        self.features = torch.from_numpy(features)
        self.audio_ok = torch.from_numpy(table.audio_ok[rows])
        self.popularity = torch.from_numpy(table.popularity[rows])
        self.data = _digest(table.rows[rows], features, table.popularity[rows])
        self._data_offsets: dict[int, int] = {}  # shard -> where its rows start in the file

    def __len__(self) -> int:
        return len(self.shard)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        room = self.clip_samples - self.crop_samples
        # torch's generator: DataLoader seeds it per worker and epoch, so crops are reproducible.
        start = int(torch.randint(0, room + 1, ())) if self.random_crop else room // 2
        shard = int(self.shard[i])
        path = self.directory / shard_name(shard, ".npy")
        position = self._data_offset(shard, path)
        position += (int(self.offset[i]) * self.clip_samples + start) * BYTES_PER_SAMPLE
        # Opened per read: a catalog of a million rows has thousands of shards, more than a
        # process may hold open; an open is cheap beside the crop's read and the CNN's step.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            raw = os.pread(fd, self.crop_samples * BYTES_PER_SAMPLE, position)
        finally:
            os.close(fd)
        wave = torch.from_numpy(np.frombuffer(raw, dtype=np.float16).astype(np.float32))
        return wave, self.features[i], self.audio_ok[i], self.popularity[i]

    def _data_offset(self, shard: int, path: Path) -> int:
        if shard not in self._data_offsets:
            with path.open("rb") as handle:  # the header's length, once per shard
                np.lib.format.read_magic(handle)
                np.lib.format.read_array_header_1_0(handle)
                self._data_offsets[shard] = handle.tell()
        return self._data_offsets[shard]


def _digest(*arrays: np.ndarray) -> str:
    # What the rows are (catalog row numbers, features, labels), wherever the cache now lies.
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Stream:
    """How to stream: DataLoader workers, and where checkpoints go."""

    workers: int = 2
    checkpoint: Path | None = None  # written after every epoch (rank 0), atomically
    resume: bool = False  # continue from `checkpoint` when it exists
    amp: bool = True  # mixed precision (float16 autocast + gradient scaling) on CUDA only
    crop_seconds: float = 6.0  # training crops (the CNN pools over time; serving uses 30 s)


class _TrainForward(nn.Module):
    """FusionNet's training outputs in one forward, so DDP sees (and syncs) every parameter."""

    def __init__(self, net: FusionNet) -> None:
        super().__init__()
        self.net = net

    def forward(
        self, waveform: torch.Tensor, features: torch.Tensor, audio_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.net.use_audio:
            # The log-Mel frontend in float32 even under autocast: a loud bass line's mel
            # power passes float16's maximum (65,504) and would turn the loss into NaN.
            with torch.autocast(waveform.device.type, enabled=False):
                logmel = self.net.frontend(waveform.float())
            audio = self.net.audio(logmel)
        else:
            audio = self.net.embed_audio(waveform)
        popularity, hit_logit = self.net.fuse(audio, features, audio_mask)
        probe = self.net.pop_centre + self.net.pop_scale * self.net.audio_probe(audio).squeeze(1)
        return popularity, hit_logit, probe


def _loss(
    net: FusionNet, outputs: tuple[torch.Tensor, ...], target: torch.Tensor, config: TrainConfig
) -> torch.Tensor:
    popularity, hit_logit, probe = (o.float() for o in outputs)
    scale = net.pop_scale
    loss = nn.functional.huber_loss(popularity / scale, target / scale, delta=config.huber_delta)
    is_hit = (target >= config.hit_threshold).float()
    loss = loss + config.hit_weight * nn.functional.binary_cross_entropy_with_logits(
        hit_logit, is_hit
    )
    # The probe term is always in the graph (weight 0 or not): DDP wants every parameter used.
    weight = config.probe_weight if net.use_audio else 0.0
    return loss + weight * nn.functional.mse_loss(probe / scale, target / scale)


def _rank() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


@dataclass
class _Trainer:
    """One process's training state; `step` trains on one batch."""

    net: FusionNet
    forward: nn.Module  # _TrainForward, wrapped in DDP when there are several ranks
    optimizer: torch.optim.Optimizer
    schedule: Any
    scaler: torch.amp.GradScaler
    config: TrainConfig
    device: torch.device

    def step(self, batch: list[torch.Tensor], generator: torch.Generator) -> float:
        wave, features, audio_ok, target = batch
        groups = feature_groups(self.net.feature_paths)
        hidden, mask = _hide_modalities(features, audio_ok, groups, self.config, generator)
        on = [t.to(self.device, non_blocking=True) for t in (wave, hidden, mask, target)]
        with torch.autocast(
            self.device.type, dtype=torch.float16, enabled=self.scaler.is_enabled()
        ):
            outputs = self.forward(on[0], on[1], on[2])
        loss = _loss(self.net, outputs, on[3], self.config)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.schedule.step()
        return float(loss.detach())


def train_stream(
    net: FusionNet,
    clips: CachedClips,
    config: TrainConfig,
    stream: Stream,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> list[float]:
    """AdamW + cosine decay over `config.epochs` epochs of `clips`; the mean training loss of
    each epoch (averaged over ranks). Seeds make a run reproducible, a resumed run included."""
    device = torch.device(device)
    rank, world = _rank()
    trainer = _trainer(net, clips, config, stream, device, rank, world)
    history: list[float] = []
    # What a checkpoint must match to be resumed: every training setting, the rows, the ranks.
    run = {**asdict(config), "rows": len(clips), "data": clips.data, "world": world}
    start = _restore(stream, trainer, history, run)
    for epoch in range(start, config.epochs):
        seed = config.seed * 1_000_003 + epoch * 7919 + rank
        generator = torch.Generator().manual_seed(seed)  # modality hiding
        torch.manual_seed(seed)  # dropout, and the crops when there are no worker processes
        net.train()
        loader = _loader(clips, config, stream, epoch, rank, world, device)
        name = f"epoch {epoch + 1}/{config.epochs}"
        losses = [
            trainer.step(batch, generator)
            for batch in tqdm(loader, desc=name, unit="batch", disable=not progress or rank > 0)
        ]
        history.append(_mean_over_ranks(sum(losses) / max(len(losses), 1), world, device))
        if stream.checkpoint is not None and rank == 0:
            _save(stream.checkpoint, trainer, history, run)
    net.eval()
    return history


def _trainer(
    net: FusionNet,
    clips: CachedClips,
    config: TrainConfig,
    stream: Stream,
    device: torch.device,
    rank: int,
    world: int,
) -> _Trainer:
    net.fit_normalizer(clips.features.numpy())
    net.fit_target(clips.popularity.numpy())
    net.to(device)
    forward: nn.Module = _TrainForward(net)
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        forward = nn.parallel.DistributedDataParallel(forward, device_ids=ids)
    # The steps this rank will take (DistributedSampler pads each rank to the same share).
    steps = config.epochs * len(
        _loader(clips, config, replace(stream, workers=0), 0, rank, world, device)
    )
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))
    scaler = torch.amp.GradScaler("cuda", enabled=stream.amp and device.type == "cuda")
    return _Trainer(net, forward, optimizer, schedule, scaler, config, device)


def _loader(
    clips: CachedClips,
    config: TrainConfig,
    stream: Stream,
    epoch: int,
    rank: int,
    world: int,
    device: torch.device,
) -> DataLoader[Any]:
    """This epoch's batches: the order and the crops depend only on (seed, epoch, rank), so a
    resumed run reads exactly what an uninterrupted one would have."""
    seed = config.seed * 1_000_003 + epoch * 7919 + rank * 104_729
    if world > 1:
        sampler: Any = DistributedSampler(clips, world, rank, shuffle=True, seed=config.seed)
        sampler.set_epoch(epoch)
    else:
        sampler = RandomSampler(clips, generator=torch.Generator().manual_seed(seed))
    return DataLoader(
        clips,
        # Each rank takes its share of the batch: the global batch, and so the schedule and
        # the result, do not depend on how many processes train.
        batch_size=max(config.batch_size // world, 2),
        sampler=sampler,
        num_workers=stream.workers,
        # BatchNorm cannot train on a batch of one; a short last batch is dropped.
        drop_last=len(clips) > config.batch_size,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(seed + 1),  # the workers' crop seeds
        persistent_workers=False,
    )


def _mean_over_ranks(value: float, world: int, device: torch.device) -> float:
    if world == 1:
        return value
    total = torch.tensor([value], device=device)
    dist.all_reduce(total)
    return float(total) / world


def _save(path: Path, trainer: _Trainer, history: list[float], run: dict[str, Any]) -> None:
    state = {
        "run": run,
        "net": trainer.net.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "schedule": trainer.schedule.state_dict(),
        "scaler": trainer.scaler.state_dict(),
        "history": history,
    }
    partial = path.with_suffix(path.suffix + ".partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, partial)
    partial.replace(path)  # a crash mid-write leaves the previous epoch's checkpoint


def _restore(stream: Stream, trainer: _Trainer, history: list[float], run: dict[str, Any]) -> int:
    """The epoch to start at: 0, or the one after the checkpoint's (with its state loaded).
    A checkpoint of another run (any training setting, the data, the number of processes, or
    another model) is a UsageError naming the first difference."""
    path = stream.checkpoint
    if not (stream.resume and path is not None and path.exists()):
        return 0
    try:
        state = torch.load(path, map_location=trainer.device, weights_only=True)
        saved = state.get("run")
        if saved != run:
            raise ValueError(_difference(saved if isinstance(saved, dict) else {}, run))
        trainer.net.load_state_dict(state["net"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.schedule.load_state_dict(state["schedule"])
        trainer.scaler.load_state_dict(state["scaler"])
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UsageError(f"--resume: {path} cannot be resumed here: {str(exc)[:200]}") from None
    history.extend(state["history"])
    return len(history)


def _difference(saved: dict[str, Any], run: dict[str, Any]) -> str:
    key = next(k for k in [*run, *saved] if saved.get(k) != run.get(k))
    return f"its {key} is {saved.get(key)!r}, this run's {run.get(key)!r}"


@torch.inference_mode()
def predict_cached(
    model: nn.Module,
    clips: CachedClips,
    workers: int = 2,
    batch_size: int = 16,
) -> tuple[np.ndarray, np.ndarray]:
    """Eval-mode scoring of cached rows (their whole stored clip: build `clips` with
    crop_samples = the clip and random_crop False) -> (popularity [n], hit_probability [n])."""
    model.eval()
    device = next(model.parameters()).device
    pops, probs = [], []
    loader = DataLoader(clips, batch_size=batch_size, num_workers=workers)
    for wave, features, audio_ok, _ in loader:
        pop, logit = model(wave.to(device), features.to(device), audio_ok.to(device))
        pops.append(pop.cpu().numpy())
        probs.append(torch.sigmoid(logit).cpu().numpy())
    return np.concatenate(pops), np.concatenate(probs)
