"""The package's exceptions.

Every error a user can cause (bad config, bad data, bad checkpoint, bad launch) is an
:class:`EasgdError`. The command line (and ``ea.run`` for a script) turns one into a single line
on stderr and exit code 2: raised on every rank at once (an :class:`AgreedError`) each rank exits
2; raised on one rank only, that line is followed by ``MPI_Abort(2)`` so no rank is left waiting.
Anything else is a bug and aborts the MPI job with a traceback.
"""

import os

__all__ = [
    "EasgdError",
    "ConfigError",
    "DataError",
    "CheckpointError",
    "BackendError",
    "LaunchError",
    "ExportError",
    "RunFolderError",
    "UsageError",
    "AgreedError",
    "PlotError",
    "os_reason",
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


class RunFolderError(EasgdError):
    """The run folder cannot be used: another run holds it, or a file in it cannot be written."""


class UsageError(EasgdError):
    """A user's own loop calls the API where or when it cannot work (easgd_mpi.torch): the
    worker API on a serving rank, a step before the model is bound, a model changed after."""


class PlotError(EasgdError):
    """A metrics path cannot be read or plotted (``easgd plot``)."""


class AgreedError(EasgdError):
    """An input error that every rank raises at the same point: exit cleanly, no abort.

    Raised by :func:`easgd_mpi.comm.agree_or_fail` (which also re-exports it) with the message
    of the first rank that failed.
    """


def os_reason(exc: OSError) -> str:
    """The operating system's reason for a failed file operation, as ``strerror`` words
    ("No space left on device", "File too large"), without the file name or the errno."""
    if getattr(exc, "errno", None):
        # h5py builds its OSErrors with HDF5's long text as strerror: the errno is the reason.
        return os.strerror(exc.errno)
    return getattr(exc, "strerror", None) or str(exc) or exc.__class__.__name__
