"""The one error type the command line prints as a single line instead of a traceback."""


class UserError(RuntimeError):
    """Bad input the user can fix: the message names what is wrong and how to fix it."""
