"""The project's error types: each message names the field, file or key and the fix.

Entry points (``main``, ``convert``, ``predict``, ``data``) turn them into one line on stderr
and exit status 2; see the README for every exit status.
"""


class ConfigError(ValueError):
    """A bad configuration value; the message names the config field (``config.x.y``)."""
