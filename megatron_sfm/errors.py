"""User-facing errors.

Anything a user can cause (a bad file, key, flag or layout) raises :class:`SfmError`
with a one-line message that names the file, line or key. The CLI prints it as
``error: <message>`` and exits with status 2; nothing else is caught.
"""


class SfmError(Exception):
    """An error caused by user input; the message is shown to the user as is."""


class ConfigError(SfmError):
    """A config file or override is invalid (the message names the key)."""
