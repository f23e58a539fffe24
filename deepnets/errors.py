"""The one exception type a user can cause: the CLI prints it as `error: ...` and exits 2."""


class UserError(Exception):
    """Bad input a user can fix: a config key, a data file, a checkpoint, an output dir.

    The message must name the culprit (key path or file) and fit on one line.
    """
