"""The one error type users see: a sentence naming the input, the rule and the fix."""


class KoalaError(Exception):
    """A user-facing error; the CLI prints its message on one line and exits non-zero."""
