"""``easgd export``: a checkpoint's center as a PyTorch ``state_dict`` (``.pt``) or as plain
arrays (``.npz``), named as the model names its tensors.

A ``.pt`` file holds only a dict of tensors, so ``torch.load(path, weights_only=True)`` reads
it and ``model.load_state_dict(...)`` accepts it (integer buffers such as BatchNorm's
``num_batches_tracked`` come from the master's copy stored in the checkpoint). Both files are
written to a temporary name and renamed, so an interrupted export leaves no half file.

A run folder stands for its newest valid checkpoint, as ``easgd train --resume FOLDER`` takes
it (``easgd inspect`` reads its argument the same way, with :func:`read_checkpoint`).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np

from .checkpoint import CheckpointData
from .errors import ConfigError, ExportError, os_reason

__all__ = ["center_tensors", "export_checkpoint", "read_checkpoint", "EXPORT_FORMATS"]

EXPORT_FORMATS = (".pt", ".pth", ".npz")


def center_tensors(checkpoint) -> dict[str, np.ndarray]:
    """Name → array of the center (copies, shaped as the model's tensors), then the
    per-process tensors the checkpoint stores."""
    views = checkpoint.layout.views(checkpoint.center)
    out = {name: np.array(view, dtype=np.float32) for name, view in views.items()}
    for name, value in checkpoint.local_tensors.items():
        out[name] = np.array(value)
    return out


def read_checkpoint(source) -> tuple[Path, CheckpointData]:
    """``(path, data)`` of checkpoint file ``source``, or of the newest valid checkpoint of run
    folder ``source`` (damaged ones are reported through the ``easgd_mpi`` logger and
    skipped). A folder without a valid checkpoint is a :class:`CheckpointError` that says so."""
    from .rundir import find_checkpoint  # noqa: PLC0415  (the rule --resume follows)

    # To --resume, "auto" means the configured run folder; here it can only be a path.
    spec = os.path.join(".", source) if str(source) == "auto" else source
    return find_checkpoint(spec, "")


def export_checkpoint(source, target) -> Path:
    """Write the center of checkpoint ``source`` (a file, or a run folder: its newest valid
    checkpoint) to ``target`` (.pt/.pth or .npz)."""
    target = Path(target)
    suffix = target.suffix.lower()
    if suffix not in EXPORT_FORMATS:
        raise ConfigError(
            f"export target {target} must end in .pt or .pth (a PyTorch state_dict) or .npz "
            f"(plain arrays)"
        )
    tensors = center_tensors(read_checkpoint(source)[1])
    if suffix == ".npz":
        return _atomic(target, lambda fh: np.savez(fh, **tensors))
    from .models.torch_adapter import import_torch  # noqa: PLC0415

    torch = import_torch("export to a .pt file")
    state = {name: torch.from_numpy(value) for name, value in tensors.items()}
    return _atomic(target, lambda fh: torch.save(state, fh))


def _atomic(target: Path, write) -> Path:
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        _discard(tmp)
        raise ExportError(f"cannot write {target}: {os_reason(exc)}") from None
    except BaseException:
        _discard(tmp)
        raise
    return target


def _discard(tmp: Path) -> None:
    """Remove a half-written temporary file. Its folder may not exist or be a file (then
    unlink fails with ENOTDIR, not ENOENT): nothing was written, and the write's own error is
    the one to report."""
    with contextlib.suppress(OSError):
        tmp.unlink(missing_ok=True)
