"""The one error of the artifact package."""


class ArtifactError(ValueError):
    """An artifact, or the metadata given for one, is missing, unreadable or incomplete; the
    first line of the message says which file and what is wrong."""
