"""Exceptions that mean "the user asked for something that cannot be done".

The CLI prints a :class:`UserError` as one line on stderr and exits with status 2;
everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the user's input: a missing file, a bad value, a bad config."""


class ConfigError(UserError):
    """A configuration file or override that does not match the typed config."""


class DataError(UserError):
    """Data that cannot be used, raised instead of a counted skip in strict mode."""
