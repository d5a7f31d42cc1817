"""Secrets out of log lines and dead-letter details: the credentials and the query of a URL.

A presigned object URL carries its signature in the query (``X-Amz-Signature``,
``X-Amz-Credential``), a basic-auth URL its password before the host; either would be usable
by whoever reads the log. botocore's DEBUG lines (the canonical request it signs, with a
session token; the Authorization header; STS responses holding temporary credentials) are
dropped whole instead.
"""

import logging
import re

# Up to the last "@" before the path: a password may hold an unescaped "@".
_USERINFO = re.compile(r"(?<=://)[^/\s\"']*@")
_QUERY = re.compile(r"(://[^\s?\"']*)\?[^\s\"']*")


def redact(text: str) -> str:
    """``text`` with every URL's userinfo and query replaced by ``***``."""
    return _QUERY.sub(r"\1?***", _USERINFO.sub("***@", text))


class RedactURLs(logging.Filter):
    """Rewrites a record's message with ``redact`` (installed on httpx's and httpcore's loggers,
    which log each request URL)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def redact_loggers(*names: str) -> None:
    """Install RedactURLs on these loggers once."""
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactURLs) for f in logger.filters):
            logger.addFilter(RedactURLs())


class DropDebug(logging.Filter):
    """Drops a logger's DEBUG records, keeping INFO and above (installed on botocore's
    loggers whose DEBUG lines hold signing material or credentials, which no pattern could
    reliably pick out of canonical requests and response bodies)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.DEBUG


def drop_debug(*names: str) -> None:
    """Install DropDebug on these loggers once. A logger's filters see only its own records,
    not its children's, so each logger that writes such lines is named."""
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropDebug) for f in logger.filters):
            logger.addFilter(DropDebug())
