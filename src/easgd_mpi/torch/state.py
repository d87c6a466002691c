"""A user loop's own state (optimizer, schedules, gradient scaler, sampler, registered dicts) as
a safe tree: JSON for the structure, plain numeric arrays for the tensors (docs/CHECKPOINT.md,
"User state"). Nothing in it can run code when it is read: no pickles, no class names that are
looked up; a leaf of any other type is refused when the state is saved, naming where it is.

The JSON has no untagged objects, so a user's dict can never be taken for a tag:

==========================  ============================================================
value                       JSON
==========================  ============================================================
None, bool, int, str        itself
float                       itself (Python's repr: read back bit for bit); NaN and the
                            infinities as ``{"float": "nan" | "inf" | "-inf"}``
list / tuple                ``{"list": [...]}`` / ``{"tuple": [...]}``
dict                        ``{"dict": [[key, value], ...]}`` (keys of any type above, in order)
torch.Tensor                ``{"tensor": k, "dtype": "float32", "shape": [...]}``: array k
numpy array                 ``{"ndarray": k}``: array k
==========================  ============================================================

Tensors come back on the CPU (``load_state_dict`` of an optimizer moves its state to its
parameters' device); bfloat16 travels as its 16-bit pattern.
"""

from __future__ import annotations

import json
import math

import numpy as np

from ..errors import CheckpointError, ConfigError
from ..workerstate import UserState

__all__ = ["encode_state", "decode_state"]

#: Tensor dtypes a state may hold, by name: how each is stored (a NumPy dtype of the same size).
_STORED = {
    "float32": np.float32,
    "float64": np.float64,
    "float16": np.float16,
    "bfloat16": np.int16,  # its bit pattern
    "int8": np.int8,
    "int16": np.int16,
    "int32": np.int32,
    "int64": np.int64,
    "uint8": np.uint8,
    "bool": np.bool_,
}


def encode_state(tree, what: str = "the state") -> UserState:
    """``tree`` as a :class:`UserState`; a :class:`ConfigError` naming the leaf that cannot be
    stored (``what``: how the error names the tree)."""
    import torch  # noqa: PLC0415

    arrays: list[np.ndarray] = []

    def enc(value, path: str):
        if value is None or isinstance(value, (bool, int, str)):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else {"float": repr(value)}
        if isinstance(value, torch.Size):
            return {"tuple": [int(d) for d in value]}
        if isinstance(value, (list, tuple)):
            tag = "list" if isinstance(value, list) else "tuple"
            return {tag: [enc(v, f"{path}[{i}]") for i, v in enumerate(value)]}
        if isinstance(value, dict):
            items = value.items()
            return {"dict": [[enc(k, f"{path} key"), enc(v, f"{path}[{k!r}]")] for k, v in items]}
        if isinstance(value, torch.Tensor):
            name = str(value.dtype).removeprefix("torch.")
            if name not in _STORED:
                raise ConfigError(f"cannot save {what}: {path} is a {value.dtype} tensor")
            data = value.detach().cpu().contiguous()
            if name == "bfloat16":
                data = data.view(torch.int16)
            arrays.append(data.numpy().copy())
            return {"tensor": len(arrays) - 1, "dtype": name, "shape": list(value.shape)}
        if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
            arrays.append(np.ascontiguousarray(value).copy())
            return {"ndarray": len(arrays) - 1}
        if isinstance(value, np.generic) and value.dtype.kind in "biuf":
            return enc(value.item(), path)
        raise ConfigError(
            f"cannot save {what}: {path} is a {type(value).__name__} (a state holds numbers, "
            f"strings, tensors, lists and dicts)"
        )

    structure = json.dumps(enc(tree, "state"), allow_nan=False)
    return UserState(structure=structure, arrays=arrays)


def decode_state(state: UserState, where: str = "the checkpoint"):
    """The tree :func:`encode_state` stored, tensors on the CPU; a :class:`CheckpointError`
    naming ``where`` if it is not one."""
    import torch  # noqa: PLC0415

    arrays = state.arrays

    def array(k) -> np.ndarray:
        if not isinstance(k, int) or not 0 <= k < len(arrays):
            raise ValueError(f"array {k!r} does not exist")
        return arrays[k]

    def dec(node):
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        if isinstance(node, list) or not isinstance(node, dict) or not node:
            raise ValueError(f"untagged {type(node).__name__}")
        if "list" in node:
            return [dec(v) for v in node["list"]]
        if "tuple" in node:
            return tuple(dec(v) for v in node["tuple"])
        if "dict" in node:
            return {dec(k): dec(v) for k, v in node["dict"]}
        if "float" in node:
            return float(node["float"])
        if "ndarray" in node:
            return array(node["ndarray"]).copy()
        if "tensor" in node:
            name = node["dtype"]
            stored = array(node["tensor"])
            if name not in _STORED or stored.dtype != np.dtype(_STORED[name]):
                raise ValueError(f"tensor of dtype {name!r} stored as {stored.dtype}")
            tensor = torch.from_numpy(stored.copy()).reshape(node["shape"])
            return tensor.view(torch.bfloat16) if name == "bfloat16" else tensor
        raise ValueError(f"unknown tag {sorted(node)}")

    try:
        return dec(json.loads(state.structure))
    except (ValueError, TypeError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"the user state in {where} is not readable: {exc}") from None
