"""Errors shared by every part of the project."""


class UserError(Exception):
    """A problem the user can fix (a bad flag, a missing file, a wrong setting).

    The command line prints it as `error: ...` and exits with code 2, without a traceback.
    """
