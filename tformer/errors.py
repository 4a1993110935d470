"""Exceptions raised by tformer for bad input."""


class ConfigError(ValueError):
    """An invalid configuration value: names the field and the valid choices."""


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded: says which file and what is wrong."""


class UnsupportedArgumentError(ConfigError, TypeError):
    """A keyword argument tformer does not take (e.g. torch.nn's ``tgt_mask``): says what to pass instead.

    A ``TypeError`` as Python raises for an unexpected keyword, and a ``ConfigError``.
    """
