"""popscore's exceptions: one root, each subclass carrying what its log line needs.

PopscoreError
├── ConfigError          a bad POPSCORE_* setting; start-up stops with one line
├── UsageError           a command's argument names something unusable; one line, exit 2
├── DeadLetter           one event cannot be scored; it goes to the DLQ with a reason
├── DeviceUnavailable     the requested device (e.g. CUDA) is not there
├── DeviceFailure         the device failed while scoring (CUDA fault, out of memory for
│                         one event): the batch fails, not its events
└── SinkError            Redis or Kafka refused a write; the batch is not committed

A model file that cannot serve raises ``popscore.artifact.ArtifactError`` (its owner's one error);
start-up turns it, like DeviceUnavailable, into a ConfigError naming POPSCORE_MODEL.
"""

from schemas.dead_letter import DeadLetterReason


class PopscoreError(Exception):
    """Root of everything popscore raises on purpose."""


class ConfigError(PopscoreError):
    """A setting is invalid; the message names the environment variable."""


class UsageError(PopscoreError):
    """An argument is well-formed but what it names cannot be used (a file that is not a
    report, a CSV without its columns); the message names the argument."""


class DeadLetter(PopscoreError):
    """This event is bad input; the message is the ``popscore.error.detail`` header."""

    def __init__(self, reason: DeadLetterReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


class DeviceUnavailable(PopscoreError):
    """The artifact cannot serve on the device asked for."""


class DeviceFailure(PopscoreError):
    """The scoring device failed (a CUDA, cuBLAS, cuFFT, cuDNN or NVRTC error, or out of
    memory for a single event): not the events' fault, so the batch fails uncommitted."""


class SinkError(PopscoreError):
    """A sink write failed after its retries; nothing past it may be committed."""
