"""The AWS environment the s3 tests run in, unit and integration alike."""

import os

import pytest


def fake_aws(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake credentials and a region, and nothing else of the machine's AWS configuration
    (no config files, no instance role to wait on)."""
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never wait on an instance role
