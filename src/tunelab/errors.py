"""Errors meant for users: the CLI prints them as one line and exits with their code, no traceback."""


class TunelabError(Exception):
    """An expected problem with the user's input or environment. `str(err)` is the whole message."""

    exit_code = 2


class ConfigError(TunelabError):
    """A recipe, override or CLI argument is wrong."""


class DataError(TunelabError):
    """The data files have blocking problems (details are in the issue list)."""

    exit_code = 1


class ModelError(TunelabError):
    """A model reference cannot be resolved or loaded."""
