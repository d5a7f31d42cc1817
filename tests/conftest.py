"""Suite-wide settings."""

from hypothesis import settings

# Two shared cores: a slow first example must not fail a property test on timing alone.
settings.register_profile("popscore", deadline=None, max_examples=200)
settings.load_profile("popscore")
