"""Exceptions raised by tformer for bad input."""


class ConfigError(ValueError):
    """An invalid configuration value: names the field and the valid choices."""


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded: says which file and what is wrong."""
