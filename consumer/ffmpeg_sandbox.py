"""FFmpeg runs in child processes: what one file does to it costs that file alone.

FFmpeg's demuxers and decoders are a large surface, and a review of the in-process path found a
file that kills the process (PyAV 18.1 reads past a frame's plane pointers at 8+ planar
channels: SIGSEGV on an ordinary 7.1 AAC), files of a few kB that make it allocate GBs (MP4
sample tables, edit lists, a zlib-compressed ``moov``: +1 to +2 GB) and files that keep it busy
for minutes (Matroska content compression). Checking each ahead of FFmpeg is a race without an
end, so the decode runs in a worker process instead, under limits the kernel enforces:

- address space (``Limits.memory_mb``, RLIMIT_AS): an allocation past it fails inside FFmpeg,
  which reports it as an error;
- wall time per file (``Limits.timeout_s``): the worker is killed;
- the kernel's OOM killer takes a worker before the service (oom_score_adj 1000), should the
  workers together outgrow the memory the service may use;
- a worker that dies (a signal, the limit) or is killed is replaced; the file is dead-lettered
  ``audio_decode_failed`` with what happened, and the consumer goes on.

A decode thread borrows an idle worker, or starts one (``python -m consumer.ffmpeg_sandbox``,
which loads numpy and FFmpeg only, ~50 MB): as many workers as threads decode such files at
once, started at the first one. The file goes over as a descriptor (SCM_RIGHTS on a
SOCK_SEQPACKET pair): a local file's own, or a memfd holding an in-memory body; the window
comes back the same way.
"""

import atexit
import contextlib
import os
import pickle
import queue
import resource
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import BinaryIO, cast

import numpy as np

from consumer import ffmpeg, id3, limits
from consumer.errors import DeadLetter
from schemas.dead_letter import DeadLetterReason as Reason


@dataclass(frozen=True)
class Limits:
    """What one file may cost its worker (POPSCORE_FFMPEG_MEMORY_MB, POPSCORE_FFMPEG_TIMEOUT_S)."""

    memory_mb: int = 1024
    """Address space: ~240 MB of it is Python, numpy and FFmpeg mapped."""
    timeout_s: float = 30.0
    """Wall time: the window of a 30-minute file decodes in well under a second."""


DEFAULT_LIMITS = Limits()
MAX_MESSAGE = 4096
# One thread each in the worker: its parallelism is the decode pool's (and fewer threads, less
# address space reserved for their stacks and arenas under the limit).
WORKER_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
PASSED_ON = ("PATH", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "LANG", "LC_ALL", "TMPDIR")


def decode_window(
    handle: BinaryIO | int,
    start: int,
    demuxer: str,
    seconds: tuple[float, float],
    budget: Limits = DEFAULT_LIMITS,
) -> tuple[np.ndarray, int, int]:
    """``ffmpeg.decode_window`` of the audio ``start`` bytes into ``handle``, in a worker, for
    ``seconds`` (the clip's, the longest stated length accepted) within ``budget``."""
    return pool().decode(handle, start, (demuxer, *seconds, budget.memory_mb), budget.timeout_s)


class _Worker:
    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "consumer.ffmpeg_sandbox", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                env={**_passed_on(), **WORKER_ENV},
            )
        self.sock = ours

    def run(
        self, fd: int, request: tuple[object, ...], timeout_s: float
    ) -> tuple[np.ndarray, int, int] | None:
        """The answer, or None when the worker was gone before it read the file."""
        try:
            socket.send_fds(self.sock, [pickle.dumps(request)], [fd])
            self.sock.settimeout(timeout_s)
            message, fds, _flags, _addr = socket.recv_fds(self.sock, MAX_MESSAGE, 1)
        except (BrokenPipeError, ConnectionResetError):
            self.kill()  # died before it read the request: not this file's doing
            return None
        except TimeoutError:
            self.kill()
            detail = f"the FFmpeg decoder took over {timeout_s:g} s on this file; stopped"
            raise DeadLetter(Reason.AUDIO_DECODE_FAILED, detail) from None
        except BaseException:
            self.kill()  # an answer may still come: never hand this worker out again
            raise
        if not message:
            raise DeadLetter(Reason.AUDIO_DECODE_FAILED, self._death())
        return _answer(pickle.loads(message), fds)

    def _death(self) -> str:
        """What ended the worker, which died on this file."""
        self.kill()
        code = self.proc.returncode
        how = f"signal {signal.Signals(-code).name}" if code and code < 0 else f"exit {code}"
        return f"the FFmpeg decoder died on this file ({how})"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait()
        self.sock.close()


def _passed_on() -> dict[str, str]:
    """What of the service's environment a worker gets: what Python needs to start, not the
    credentials (Kafka, Redis, S3) the service holds."""
    return {name: os.environ[name] for name in PASSED_ON if name in os.environ}


def _answer(answer: tuple[object, ...], fds: list[int]) -> tuple[np.ndarray, int, int]:
    """The worker's answer: the window (in the memfd it sent) or the file's dead letter."""
    if answer[0] == "dead":
        raise DeadLetter(Reason(str(answer[1])), str(answer[2]))
    _ok, rate, frames, count = cast(tuple[str, int, int, int], answer)
    with os.fdopen(fds[0], "rb") as window:
        size = os.fstat(window.fileno()).st_size
        if size != count * 4:  # allocate only what the worker did write
            raise DeadLetter(Reason.AUDIO_DECODE_FAILED, "the FFmpeg decoder's answer is torn")
        mono = np.empty(size // 4, dtype=np.float32)
        got = window.readinto(mono.data.cast("B"))
    if got != mono.nbytes:
        raise DeadLetter(Reason.AUDIO_DECODE_FAILED, "the FFmpeg decoder's answer was cut short")
    return mono, rate, frames


class _Pool:
    """Idle workers; a thread takes one (or starts one) for a file and gives it back."""

    def __init__(self) -> None:
        self.idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self.workers: set[_Worker] = set()
        """Every worker started and not yet gone (idle or decoding)."""
        self.lock = threading.Lock()

    def decode(
        self, handle: BinaryIO | int, start: int, request: tuple[object, ...], timeout_s: float
    ) -> tuple[np.ndarray, int, int]:
        with _descriptor(handle, start) as (fd, offset):
            for _ in range(3):
                worker = self._take()
                try:
                    answer = worker.run(fd, (*request, offset), timeout_s)
                finally:
                    if worker.alive():
                        self.idle.put(worker)
                    else:
                        self._drop(worker)
                if answer is not None:
                    return answer
        raise DeadLetter(Reason.AUDIO_DECODE_FAILED, "no FFmpeg decoder could be started")

    def _take(self) -> _Worker:
        while True:
            try:
                worker = self.idle.get_nowait()
            except queue.Empty:
                worker = _Worker()
                with self.lock:
                    self.workers.add(worker)
                return worker
            if worker.alive():
                return worker
            self._drop(worker)

    def _drop(self, worker: _Worker) -> None:
        worker.kill()
        with self.lock:
            self.workers.discard(worker)

    def close(self) -> None:
        """Stop the idle workers (one decoding stops when its thread gives it back)."""
        while True:
            try:
                self._drop(self.idle.get_nowait())
            except queue.Empty:
                return


_POOLS: dict[int, _Pool] = {}


def pool() -> _Pool:
    """This process's workers (a forked child starts its own: the sockets are its parent's)."""
    return _POOLS.setdefault(os.getpid(), _Pool())


atexit.register(lambda: pool().close())


@contextlib.contextmanager
def _descriptor(handle: BinaryIO | int, start: int):  # type: ignore[no-untyped-def]
    """A descriptor for the worker and where the audio starts in it: a local file's own, or
    a memfd holding an in-memory body from ``start`` on."""
    if isinstance(handle, int):
        yield handle, start
        return
    fd = os.memfd_create("popscore-audio", os.MFD_CLOEXEC)
    try:
        handle.seek(start)
        while chunk := handle.read(1 << 20):
            _write_all(fd, chunk)
        os.lseek(fd, 0, os.SEEK_SET)  # the worker reads from the shared position
        yield fd, 0
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# --- the worker ------------------------------------------------------------------------------


def _serve(sock: socket.socket) -> None:
    """Decode one file per message until the service closes its end."""
    while True:
        message, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, 1)
        if not message:
            return
        demuxer, clip_seconds, max_seconds, memory_mb, offset = pickle.loads(message)
        # The soft limit, per file: a later file may be given another (the hard one stays).
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, hard))
        with os.fdopen(fds[0], "rb") as file:
            answer, window = _decode(file, offset, demuxer, (clip_seconds, max_seconds))
        if window is None:
            socket.send_fds(sock, [pickle.dumps(answer)], [])
            continue
        try:
            socket.send_fds(sock, [pickle.dumps(answer)], [window])
        finally:
            os.close(window)


def _decode(
    file: BinaryIO, offset: int, demuxer: str, seconds: tuple[float, float]
) -> tuple[tuple[object, ...], int | None]:
    """The answer to send, and the memfd holding the window when there is one. Whatever the
    file makes the decode raise is its answer: the worker itself goes on."""
    clip_seconds, max_seconds = seconds
    check = limits.stated_checker(max_seconds)
    try:
        handle = cast(BinaryIO, id3.Behind(file, offset) if offset else file)
        mono, rate, frames = ffmpeg.decode_window(handle, demuxer, clip_seconds, check, max_seconds)
    except DeadLetter as exc:
        return ("dead", exc.reason.value, exc.detail), None
    except MemoryError:
        limit = resource.getrlimit(resource.RLIMIT_AS)[0] >> 20
        detail = f"the FFmpeg decoder needed over {limit} MB for this file"
        return ("dead", Reason.AUDIO_DECODE_FAILED.value, detail), None
    except Exception as exc:  # any failure is this file's, never the worker's
        detail = f"the FFmpeg decoder failed: {type(exc).__name__}: {exc}"[:300]
        return ("dead", Reason.AUDIO_DECODE_FAILED.value, detail), None
    window = os.memfd_create("popscore-window", os.MFD_CLOEXEC)
    _write_all(window, np.ascontiguousarray(mono, dtype=np.float32).tobytes())
    os.lseek(window, 0, os.SEEK_SET)
    return ("ok", rate, frames, len(mono)), window


def main() -> None:
    _first_to_go()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the service stops it by closing the socket
    sock = socket.socket(fileno=int(sys.argv[1]))
    _serve(sock)


def _first_to_go() -> None:
    """Ask the kernel's OOM killer to take this worker before anything else (the service above
    all): a worker's death costs one file, the service's every batch in hand. Best effort: a
    system without the file (not Linux) keeps its default."""
    with contextlib.suppress(OSError), open("/proc/self/oom_score_adj", "w") as adj:
        adj.write("1000")


if __name__ == "__main__":
    main()
