"""What `popscore train` does around training (training.jobs): rank 0 prepares the cache while
the other ranks wait, whichever backend the run's process group has."""

import datetime
import time
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from popscore.training import jobs
from tests.conftest import free_port


def test_the_wait_for_rank_0_works_where_the_default_group_takes_no_cpu_tensors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """NCCL's rule (no CPU tensors), simulated by gloo registered for CUDA alone."""
    prepared: list[tuple[object, ...]] = []
    monkeypatch.setattr(jobs, "prepare_cache", lambda *a, **_: prepared.append(a))
    init = f"tcp://127.0.0.1:{free_port()}"
    dist.init_process_group("cuda:gloo", init_method=init, rank=0, world_size=1)
    try:
        jobs._prepare_on_rank_0(Path("catalog.csv"), "audio")
    finally:
        dist.destroy_process_group()
    assert prepared == [(Path("catalog.csv"), "audio")]


PREPARE_SECONDS = 6.0
DEFAULT_TIMEOUT = datetime.timedelta(seconds=2)


def _rank(rank: int, init: str, outcomes: "mp.Queue[tuple[int, str]]") -> None:
    """One of two ranks whose default group times out in 2 s; rank 0 prepares for 6 s."""
    jobs.prepare_cache = lambda *_, **__: time.sleep(PREPARE_SECONDS)  # type: ignore[assignment,misc]
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=2, timeout=DEFAULT_TIMEOUT
    )
    try:
        jobs._prepare_on_rank_0(Path("catalog.csv"), "audio")
        outcomes.put((rank, "ok"))
    except Exception as exc:  # reported to the test, which names it
        outcomes.put((rank, f"{type(exc).__name__}: {str(exc)[:200]}"))
    finally:
        dist.destroy_process_group()


def test_a_prepare_longer_than_the_default_timeout_does_not_time_out_the_others() -> None:
    context = mp.get_context("spawn")
    outcomes: mp.Queue[tuple[int, str]] = context.Queue()
    init = f"tcp://127.0.0.1:{free_port()}"
    workers = [context.Process(target=_rank, args=(r, init, outcomes)) for r in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=90)
    assert sorted(outcomes.get(timeout=5) for _ in workers) == [(0, "ok"), (1, "ok")]
