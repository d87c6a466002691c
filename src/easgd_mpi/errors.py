"""The package's exceptions.

Every error a user can cause (bad config, bad data, bad checkpoint, bad launch) is an
:class:`EasgdError`. The command line turns one into a single line on stderr and exit code 2;
anything else is a bug and aborts the MPI job with a traceback.
"""

__all__ = [
    "EasgdError",
    "ConfigError",
    "DataError",
    "CheckpointError",
    "BackendError",
    "LaunchError",
    "ExportError",
]


class EasgdError(Exception):
    """Base class for errors caused by input rather than by a bug."""

    exit_code = 2


class ConfigError(EasgdError):
    """A configuration file, key or value is wrong."""


class DataError(EasgdError):
    """A data set cannot be loaded or does not fit the model."""


class CheckpointError(EasgdError):
    """A checkpoint cannot be written, read or does not match the run."""


class BackendError(EasgdError):
    """The compute backend (NumPy / CuPy kernels) cannot do what was asked."""


class LaunchError(EasgdError):
    """The MPI launch is unusable (e.g. world size 1)."""


class ExportError(EasgdError):
    """An export target cannot be written (``easgd export``)."""
