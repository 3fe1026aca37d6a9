"""User-facing errors: each one is printed as a single line naming the key, file or row at fault."""

import argparse


class ComolError(Exception):
    """Base class for errors caused by user input (config, data, checkpoint, model name)."""


class ConfigError(ComolError, ValueError):
    """A config value is invalid; the message names the key."""


class DataError(ComolError, ValueError):
    """A data file or row is invalid; the message names the file and row."""


class DataFileNotFound(DataError, FileNotFoundError):
    """A data file named in the config does not exist."""


class ModelNotFoundError(ComolError):
    """Backbone weights/config could not be found locally or on the hub."""


class CheckpointError(ComolError):
    """A saved adapter directory is incomplete or does not match the model."""


def config_check(ok: bool, key: str, value, expected: str) -> None:
    """Raise ConfigError(``key=value: expected ...``) when ``ok`` is false."""
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: expected {expected}")


class UsageError(ComolError):
    """A command line a CLI cannot parse (unknown flag, missing or bad flag value)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse for comol's CLIs: ``--help`` as usual, a bad command line raises UsageError (one line, which
    the CLI prints as ``error: ...`` and exits 2) instead of printing the usage block."""

    def error(self, message: str):
        raise UsageError(message)
