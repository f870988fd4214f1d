"""The one exception type users see: a single line that names the thing and says what to do."""


class EdgekdError(Exception):
    """A user-facing error. The message names the file, key or value and says what to do."""


class EdgekdWarning(UserWarning):
    """A setting outside what the literature found to work: the build goes on, with the reason."""
