"""The one exception family every user-facing error belongs to.

The CLI turns any ``TinyLMError`` into one line on stderr and exit code 2; anything
else reaching the user is a bug.
"""


class TinyLMError(Exception):
    """Base of every error tinylm raises on purpose: the message says what to do."""


class ShapeError(TinyLMError, ValueError):
    """Arrays whose shapes do not fit the operation."""


class DeviceError(TinyLMError, RuntimeError):
    """A device was asked for that is not available, or arrays live on different devices."""


class GraphError(TinyLMError, RuntimeError):
    """Misuse of the autograd graph (backward twice, backward from a non-scalar, ...)."""


class CheckpointError(TinyLMError, OSError):
    """A checkpoint file that is missing, truncated, malformed or does not fit the model."""


class PluginError(TinyLMError):
    """A plugin that failed to load or register, or a name registered twice."""


class ConfigError(TinyLMError, ValueError):
    """A config (model, training, sampling) with a missing, unknown or invalid field."""
