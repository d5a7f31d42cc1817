"""The one error of the artifact package, and how its messages quote another error."""


class ArtifactError(ValueError):
    """An artifact, or the metadata given for one, is missing, unreadable or incomplete; the
    first line of the message says which file and what is wrong."""


def first_line(exc: BaseException) -> str:
    """An error's first non-blank line (TorchScript's carry a C++ trace below it), or its type's
    name when it says nothing."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
