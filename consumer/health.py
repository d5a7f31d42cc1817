"""The service's one HTTP port: ``/metrics``, ``/healthz`` (liveness), ``/readyz`` (readiness)."""

import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

# The loop beats at least once per idle poll; three missed minutes means it is stuck.
STALL_S = 180.0
# Records in hand and nothing committed for this long (at least; the app raises it to what its
# slowest legitimate batch may take), while Kafka and Redis answer: an abort loop or a wedged
# stage, which a restart may clear (a dependency outage is not counted).
STUCK_S = 300.0


class Health:
    """State the probes read; the main loop writes it."""

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, stuck_s: float = STUCK_S
    ) -> None:
        self._clock = clock
        self._beat = clock()
        self._progress = clock()
        self._waiting = False
        self.stuck_s = stuck_s
        self.model_loaded = False
        self.started = False
        """Set once start-up is over: until then /healthz answers 503 "starting", so a
        startup probe keeps waiting (the port is served from the first moment of start-up)."""
        self.readiness: Callable[[], tuple[bool, str]] = lambda: (False, "starting")
        self.waiting: Callable[[], bool] = lambda: False
        """Whether records wait to be committed (set by the app; asked on the main loop only)."""

    def beat(self) -> None:
        """Called by the main loop every iteration."""
        self._beat = self._clock()
        self._waiting = self.waiting()
        if not self._waiting:
            self._progress = self._beat  # idle is not stuck

    def progressed(self) -> None:
        """Called when a batch is committed."""
        self._progress = self._clock()

    def liveness(self) -> tuple[bool, str]:
        """The main loop iterates, and records in hand get committed while the dependencies
        answer; else why not."""
        if not self.started:
            return False, "starting"
        now = self._clock()
        if now - self._beat >= STALL_S:
            return False, "main loop stalled"
        stuck = now - self._progress
        if stuck >= self.stuck_s and self._waiting and self.readiness()[0]:
            return False, f"nothing committed for {stuck:.0f} s while records wait"
        return True, "ok"

    def alive(self) -> bool:
        """See ``liveness``."""
        return self.liveness()[0]


class BackgroundCheck:
    """A dependency check run on a thread of its own every ``every_s``; the probes read its
    last answer and never wait on the dependency: a Redis that accepted connections but never
    answered made every probe time out, liveness included, so every pod would have been
    restarted at once."""

    def __init__(
        self,
        check: Callable[[], str | None],
        every_s: float = 2.0,
        stale_s: float = 15.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``check``: the problem, or None when all is well; it must time out by itself
        well within ``stale_s``."""
        self._check, self.every_s, self.stale_s, self._clock = check, every_s, stale_s, clock
        self._problem: str | None = "not checked yet"
        self._at = clock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health-check", daemon=True)

    def start(self) -> "BackgroundCheck":
        self._thread.start()
        return self

    def problem(self) -> str | None:
        """The last check's problem; or that the check itself has not answered lately."""
        age = self._clock() - self._at
        if age > self.stale_s:
            return f"no answer for {age:.0f} s"
        return self._problem

    def close(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._problem = self._check()
            except Exception as exc:  # a check that raises is a failing check, not a dead thread
                self._problem = f"check failed: {exc}"
            self._at = self._clock()
            self._stop.wait(self.every_s)


class HealthServer:
    """A small threaded HTTP server on its own daemon thread."""

    def __init__(self, port: int, registry: CollectorRegistry, health: Health) -> None:
        handler = _make_handler(registry, health)
        self.server = ThreadingHTTPServer(("0.0.0.0", port), handler)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> "HealthServer":
        """Serve in the background."""
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving (if it started) and free the port."""
        if self._thread.is_alive():  # shutdown() waits for a serve loop that never began
            self.server.shutdown()
        self.server.server_close()


def _make_handler(registry: CollectorRegistry, health: Health) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                ok, why = health.liveness()
                self._send(200 if ok else 503, (why + "\n").encode())
            elif path == "/readyz":
                ready, why = health.readiness()
                self._send(200 if ready else 503, (why + "\n").encode())
            else:
                self._send(404, b"not found\n")

        def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
            try:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the prober gave up waiting: nothing to answer, nothing to log

        def log_message(self, *_args: Any) -> None:
            """Scrapes every few seconds would flood the log."""

    return Handler
