"""``s3://bucket/key`` URIs and S3's bucket naming rules.

Standard library only: the settings check bucket names with it at start-up, and importing
boto3 there would slow every command down (``popscore --help`` included).
"""

import ipaddress
import re

from consumer.errors import DeadLetter
from schemas.dead_letter import DeadLetterReason as Reason

SCHEME = "s3://"
MAX_KEY_BYTES = 1024  # S3's limit on a key, in UTF-8 bytes
# S3's rules for new buckets: 3-63 characters of a-z 0-9 . -, a letter or digit at each end.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
BUCKET_RULE = "3-63 of a-z 0-9 . -, starting and ending with a letter or digit"
# C0 controls and DEL: no real key has them, and they would reach log lines and headers.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def bucket_name_problem(name: str) -> str | None:
    """Why ``name`` is not an S3 bucket name, or None when it is one."""
    if not _BUCKET.match(name):
        return f"{name!r} is not an S3 bucket name ({BUCKET_RULE})"
    if ".." in name:
        return f"{name!r} is not an S3 bucket name (two dots in a row)"
    try:
        ipaddress.IPv4Address(name)
    except ValueError:
        return None
    return f"{name!r} is not an S3 bucket name (an IP address)"


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """The bucket and key of ``s3://bucket/key``, or a DeadLetter (uri_unsupported) saying what
    is wrong with it. The key is taken literally, as the AWS CLI and console print it: no
    percent-decoding, and ``?`` or ``#`` are part of the key, not a query or a fragment."""
    if uri[: len(SCHEME)].lower() != SCHEME:
        raise DeadLetter(Reason.URI_UNSUPPORTED, "not an s3:// URI")
    bucket, slash, key = uri[len(SCHEME) :].partition("/")
    if not bucket:
        raise DeadLetter(Reason.URI_UNSUPPORTED, "the s3 URI names no bucket")
    # The whole bucket is checked, so userinfo ("user:secret@bucket") or a port cannot pass;
    # it is not echoed, since it might be such a credential.
    if bucket_name_problem(bucket):
        raise DeadLetter(Reason.URI_UNSUPPORTED, f"not an S3 bucket name ({BUCKET_RULE})")
    if not slash or not key:
        raise DeadLetter(Reason.URI_UNSUPPORTED, "the s3 URI names no key")
    _check_key(key)
    return bucket, key


def _check_key(key: str) -> None:
    if _CONTROL.search(key):
        raise DeadLetter(Reason.URI_UNSUPPORTED, "the s3 key holds a control character")
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate
        raise DeadLetter(Reason.URI_UNSUPPORTED, "the s3 key is not valid Unicode") from None
    if size > MAX_KEY_BYTES:
        raise DeadLetter(Reason.URI_UNSUPPORTED, f"the s3 key is over {MAX_KEY_BYTES} bytes")
    # With path-style addressing (an IP endpoint, MinIO) the bucket is the URL's first segment:
    # a "." or ".." segment normalised anywhere on the way would leave the allowed bucket.
    if any(part in (".", "..") for part in key.split("/")):
        raise DeadLetter(Reason.URI_UNSUPPORTED, "the s3 key has a '.' or '..' segment")
