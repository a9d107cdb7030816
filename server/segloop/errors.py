"""User-facing errors: printed as one line on stderr, never with a traceback."""


class UserError(Exception):
    """Bad input or a bad request from the user; the message says what to do."""
