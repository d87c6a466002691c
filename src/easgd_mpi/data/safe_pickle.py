"""Reading a CIFAR-10 python batch without trusting it.

The batches are pickles, and unpickling runs whatever callables the file names. A downloaded or
shared file is untrusted input, so the unpickler here only resolves the handful of names a
CIFAR-10 batch really contains (the NumPy array and dtype reconstructors, and the bytes helpers
a Python 3 protocol-2 pickle uses) and hands out guarded stand-ins for them rather than the real
callables: each checks its arguments before NumPy sees them. Anything else is refused before it
runs, with a one-line :class:`DataError` naming the file and the object it asked for.

The pure-Python unpickler is used (not the C one) because only it lets BUILD, the opcode that
calls ``__setstate__``, be checked too: NumPy's dtype and ndarray ``__setstate__`` accept
structured, object and oversized layouts that a batch never needs.
"""

from __future__ import annotations

import math
import pickle
import struct

import numpy as np

from ..errors import DataError

__all__ = ["ALLOWED_GLOBALS", "safe_load_cifar_batch"]

# (module, name) pairs a CIFAR-10 batch may name. The original files were written by Python 2's
# cPickle with NumPy 1.x (``numpy.core``); NumPy 2 writes ``numpy._core``. ``_codecs.encode`` and
# ``__builtin__.bytes`` are how Python 3 writes bytes (and empty bytes) at protocol 2.
ALLOWED_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
        ("__builtin__", "bytes"),
        ("builtins", "bytes"),
    }
)

# Element types a batch's arrays may have: plain integers and floats (a re-saved batch may hold
# floats; the loader then checks they convert to uint8 without loss). No objects, no records.
_DTYPE_CODES = frozenset({"u1", "u2", "u4", "u8", "i1", "i2", "i4", "i8", "f4", "f8"})
_BYTE_ORDERS = frozenset({"|", "<", ">", "="})

# NumPy's own reconstructor, whatever module this NumPy version keeps it in.
_NP_RECONSTRUCT = np.empty(0).__reduce__()[0]


class _NdarrayToken:
    """Stands in for ``numpy.ndarray`` in the pickle: only the guarded reconstructor accepts it,
    so the pickle cannot call the ndarray constructor itself (which allocates any shape)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "numpy.ndarray"


_NDARRAY = _NdarrayToken()

# Exceptions a damaged or truncated pickle raises from inside the unpickler or NumPy.
_DAMAGE = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    struct.error,
    UnicodeDecodeError,
    OverflowError,
    MemoryError,
)


def safe_load_cifar_batch(fileobj, source_name) -> dict:
    """Unpickle one CIFAR-10 batch from the binary file object ``fileobj``.

    Returns the batch dict as stored (keys are bytes for the original Python 2 files, str for
    batches written by Python 3); the caller checks its contents. ``source_name`` names the file
    in every error."""
    unpickler = _BatchUnpickler(fileobj, source_name)
    try:
        batch = unpickler.load()
    except DataError:
        raise
    except _DAMAGE as exc:
        raise DataError(
            f"CIFAR-10 batch {source_name} is damaged: {_why(exc)}; download it again"
        ) from None
    if not isinstance(batch, dict):
        raise DataError(
            f"CIFAR-10 batch {source_name} holds a {type(batch).__name__}, not a dict: "
            f"not a CIFAR-10 batch"
        )
    return batch


def _brief(obj) -> str:
    """A short description of an untrusted object for an error message: never the repr of a
    30 MB buffer."""
    if obj is None or type(obj) in (bool, int, float):
        return repr(obj)[:40]
    if type(obj) in (str, bytes):
        return repr(obj[:24]) + ("..." if len(obj) > 24 else "")
    if type(obj) in (tuple, list, dict):
        return f"a {type(obj).__name__} of {len(obj)}"
    if obj is _NDARRAY or isinstance(obj, np.dtype):
        return repr(obj)
    return f"a {type(obj).__name__}"


def _why(exc: BaseException) -> str:
    """What an exception from inside the unpickler means, in one line."""
    if isinstance(exc, EOFError):
        return "it ends too early (cut short?)"
    if isinstance(exc, KeyError) and exc.args and type(exc.args[0]) is int:
        # The pure-Python unpickler looks opcodes up in a dict.
        return f"unknown pickle opcode 0x{exc.args[0]:02x} (not a pickle, or garbled)"
    return _one_line(exc)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


class _BatchUnpickler(pickle._Unpickler):
    """A pure-Python unpickler whose globals and BUILD steps are limited to a CIFAR-10 batch."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, fileobj, source_name):
        # encoding="bytes": Python 2 ``str`` objects (keys, labels, the pixel buffer) stay bytes
        # instead of being decoded as text, as with ``pickle.load(f, encoding="bytes")``.
        super().__init__(fileobj, encoding="bytes")
        self.source_name = source_name

    def _damaged(self, why: str) -> DataError:
        return DataError(f"CIFAR-10 batch {self.source_name} is damaged: {why}")

    def find_class(self, module, name):
        if (module, name) not in ALLOWED_GLOBALS:
            raise DataError(
                f"CIFAR-10 batch {self.source_name} asks to load {module}.{name}: "
                f"not a CIFAR-10 batch"
            )
        if name == "_reconstruct":
            return self._reconstruct
        if name == "ndarray":
            return _NDARRAY
        if name == "dtype":
            return self._dtype
        if name == "encode":
            return self._encode
        return self._empty_bytes

    def persistent_load(self, pid):
        raise DataError(
            f"CIFAR-10 batch {self.source_name} asks for an external object ({_brief(pid)}): "
            f"not a CIFAR-10 batch"
        )

    # -- guarded stand-ins for the allowed globals ---------------------------------------------

    def _reconstruct(self, subtype=None, shape=None, dtype=None, *rest):
        # NumPy pickles every array as _reconstruct(ndarray, (0,), b"b") followed by BUILD with
        # the real shape and data; any other call would allocate or build something else.
        ok = (
            not rest
            and subtype is _NDARRAY
            and type(shape) is tuple
            and shape == (0,)
            and type(dtype) in (bytes, str)
            and dtype in (b"b", "b")
        )
        if not ok:
            raise self._damaged(
                f"unexpected array reconstruction "
                f"({_brief(subtype)}, {_brief(shape)}, {_brief(dtype)})"
            )
        return _NP_RECONSTRUCT(np.ndarray, (0,), b"b")

    def _dtype(self, spec=None, align=False, copy=True, *rest):
        code = spec.decode("ascii", "replace") if type(spec) is bytes else spec
        bad_align = type(align) not in (bool, int) or align
        if rest or type(code) is not str or code not in _DTYPE_CODES or bad_align:
            raise self._damaged(f"array element type {_brief(spec)} is not a plain number type")
        # Always a copy: BUILD then sets the byte order on this object, never on NumPy's shared
        # dtype singletons (copy=False in the pickle would otherwise change them process-wide).
        return np.dtype(code, False, True)

    def _encode(self, text=None, encoding=None, *rest):
        if rest or not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise self._damaged(f"unexpected _codecs.encode({_brief(text)}, {_brief(encoding)})")
        return text.encode("latin-1")

    def _empty_bytes(self, *args):
        # Protocol 2 writes b"" as bytes(); bytes(n) would allocate n zero bytes.
        if args:
            raise self._damaged(f"unexpected bytes({', '.join(_brief(a) for a in args)})")
        return b""

    # -- BUILD: only the two __setstate__ calls a NumPy array pickle makes ---------------------

    def _load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, np.dtype):
            inst.__setstate__(self._dtype_state(inst, state))
        elif isinstance(inst, np.ndarray):
            inst.__setstate__(self._array_state(state))
        else:
            raise self._damaged(f"unexpected state for a {type(inst).__name__}")

    dispatch[pickle.BUILD[0]] = _load_build

    def _dtype_state(self, dtype: np.dtype, state) -> tuple:
        # (version, byte order, subarray, names, fields, elsize, alignment, flags[, metadata]):
        # a plain number type has no subarray, names, fields or metadata and elsize -1.
        if type(state) is not tuple or len(state) not in (8, 9):
            raise self._damaged(f"unexpected dtype state ({_brief(state)})")
        order = state[1].decode("ascii", "replace") if type(state[1]) is bytes else state[1]
        plain = (
            type(state[0]) is int
            and state[0] in (3, 4)
            and all(part is None for part in state[2:5])
            and [type(part) for part in state[5:8]] == [int, int, int]
            and state[5:8] == (-1, -1, 0)
            and (len(state) == 8 or state[8] is None)
        )
        single_byte = dtype.itemsize == 1
        bad_order = type(order) is not str or order not in _BYTE_ORDERS
        if not plain or bad_order or (order == "|") != single_byte:
            raise self._damaged(f"unexpected dtype state ({', '.join(map(_brief, state))})")
        return (3, order, None, None, None, -1, -1, 0)

    def _array_state(self, state) -> tuple:
        # (version, shape, dtype, is_fortran, raw data); NumPy before 1.0 left out the version.
        if type(state) is tuple and len(state) == 5 and type(state[0]) is int and state[0] == 1:
            state = state[1:]
        if type(state) is not tuple or len(state) != 4:
            raise self._damaged(f"unexpected array state ({_brief(state)})")
        shape, dtype, fortran, raw = state
        if type(raw) is str:
            raw = raw.encode("latin-1")  # Python 3 protocol 0/1 or encoding="latin1"
        ok = (
            type(shape) is tuple
            and len(shape) <= 32  # NumPy's own limit is 64; a batch has 2
            and all(type(d) is int and d >= 0 for d in shape)
            and isinstance(dtype, np.dtype)
            and dtype.kind in "iuf"
            and dtype.fields is None
            and dtype.subdtype is None
            and type(fortran) in (bool, int)
            and type(raw) is bytes
        )
        if not ok:
            raise self._damaged(
                f"unexpected array state ({_brief(shape)}, {_brief(dtype)}, {_brief(raw)})"
            )
        expected = math.prod(shape) * dtype.itemsize
        if len(raw) != expected:
            raise self._damaged(
                f"array of shape {shape} needs {expected:,} bytes but the file holds {len(raw):,}"
            )
        return (1, shape, dtype, bool(fortran), raw)
