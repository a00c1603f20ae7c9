"""Exceptions that mean "the user asked for something that cannot be done".

The CLI prints a :class:`UserError` as one line on stderr and exits with its
``exit_code`` (2 unless the error says otherwise); everything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the user's input: a missing file, a bad value, a bad config."""

    exit_code = 2


class ConfigError(UserError):
    """A configuration file or override that does not match the typed config."""


class DataError(UserError):
    """Data that cannot be used, raised instead of a counted skip in strict mode."""
