"""The one error type loaders raise for a checkpoint that cannot be used."""


class CheckpointError(Exception):
    """A checkpoint problem, described in one line that names the file and the cause.

    Command-line entry points print the message alone (no traceback).
    """
