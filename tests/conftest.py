"""Suite-wide settings and helpers."""

import socket

from hypothesis import settings

# Two shared cores: a slow first example must not fail a property test on timing alone.
settings.register_profile("popscore", deadline=None, max_examples=200)
settings.load_profile("popscore")


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on (at the moment of asking)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
