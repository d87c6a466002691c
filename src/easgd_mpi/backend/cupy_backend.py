"""The CuPy backend: NumpyBackend's interface on a GPU, one fused CUDA kernel per update.

The kernels are ``kernels/easgd.cu`` (grid-stride loops, float4 loads) over the per-element math
of ``kernels/easgd.cuh``; both are compiled at run time by CuPy's NVRTC, once per device and
process. The source is found as package data (``easgd_mpi/kernels/``) or, in an editable install,
in the repository's ``kernels/`` (:func:`kernel_source_dir`).

The per-element formulas round exactly like NumpyBackend (no FMA contraction), so results match
the reference bit for bit, except that CuPy always compiles with ``-ftz=true`` (appended after
any options we pass): subnormal inputs and results (|v| < 1.2e-38) become 0. The tests allow a
relative error of 1e-6 plus an absolute error of the smallest normal float32.

Host staging (DESIGN.md §4): the MPI window lives in host memory, so a worker moves the center and
the elastic difference through pinned buffers from :meth:`CupyBackend.host_empty`.
:meth:`~CupyBackend.to_host` and :meth:`~CupyBackend.from_host` are synchronous like NumPy's (the
host buffer may be used or reused when they return). ``to_host_async``/``from_host_async`` only
enqueue the copy on the current stream, for overlapping chunks; call :meth:`synchronize` before
MPI touches the host buffer.

This module imports without CuPy (``gpu_available`` then says why there is no GPU), so
``easgd check`` can report on any machine.
"""

from __future__ import annotations

import ctypes
import math
import threading
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from ..errors import BackendError

try:
    import cupy
except ImportError as _exc:  # CuPy not installed: the module still serves gpu_available/describe
    cupy = None
    _CUPY_IMPORT_ERROR: str = f"{_exc.__class__.__name__}: {_exc}"
else:
    _CUPY_IMPORT_ERROR = ""

__all__ = [
    "CupyBackend",
    "CODEC_KERNELS",
    "KERNELS",
    "KernelSpec",
    "describe",
    "gpu_available",
    "kernel_source",
    "kernel_source_dir",
]

_KERNEL_FILES = ("easgd.cu", "easgd.cuh")
_INCLUDE_LINE = '#include "easgd.cuh"'
_THREADS = 256
_BLOCKS_PER_SM = 32  # enough resident warps to saturate HBM; the grid-stride loop does the rest


# ---- the kernels: one table shared by the backend, the tests and the benchmark ----------------
class StreamStaging:
    """One chunk of an exchange through pinned host buffers, overlapped with the others.

    ``start`` enqueues host → device on a copy-in stream, the kernel on the worker's current
    (compute) stream after that copy's event, device → host on a copy-out stream after the
    kernel's event, and returns the copy-out's event. So chunk k's copy in, chunk k−1's kernel
    and chunk k−2's copy out can run at once on a GPU with separate copy engines, while MPI on
    the host reads k+1 and accumulates k−1; ``wait(ticket)`` blocks only until that one chunk's
    difference is on the host. Kernels stay in order on the compute stream, after everything
    the worker enqueued there before (its gradient, the look-ahead point).
    """

    def __init__(self):
        self._copy_in = cupy.cuda.Stream(non_blocking=True)
        self._copy_out = cupy.cuda.Stream(non_blocking=True)

    def start(self, c_host, c_dev, kernel, e_dev, e_host):
        compute = cupy.cuda.get_current_stream()
        ready = compute.record()  # the worker's earlier work on these device buffers
        self._copy_in.wait_event(ready)
        if c_dev.size:
            c_dev.data.copy_from_host_async(
                ctypes.c_void_p(c_host.ctypes.data), c_dev.nbytes, self._copy_in
            )
        compute.wait_event(self._copy_in.record())
        kernel(c_dev, e_dev)  # enqueued on the compute stream
        self._copy_out.wait_event(compute.record())
        if e_dev.size:
            e_dev.data.copy_to_host_async(
                ctypes.c_void_p(e_host.ctypes.data), e_dev.nbytes, self._copy_out
            )
        return self._copy_out.record()

    def wait(self, ticket) -> None:
        ticket.synchronize()


@dataclass(frozen=True)
class KernelSpec:
    """One fused method: its parameters in order, and which arrays it reads and writes.

    The CUDA kernel ``easgd_<name>`` (and the host shim's function of the same name) takes
    ``params`` in this order, arrays as pointers and scalars as float, followed by ``n``.
    """

    name: str
    params: tuple[str, ...]
    reads: tuple[str, ...]
    writes: tuple[str, ...]

    @cached_property
    def arrays(self) -> tuple[str, ...]:
        return tuple(p for p in self.params if p in self.reads or p in self.writes)

    @cached_property
    def scalars(self) -> tuple[str, ...]:
        return tuple(p for p in self.params if p not in self.arrays)

    @property
    def bytes_per_element(self) -> int:
        """float32 bytes moved per element by one fused pass (each array read or written once)."""
        return 4 * (len(self.reads) + len(self.writes))

    @property
    def symbol(self) -> str:
        return f"easgd_{self.name}"


def _spec(name: str, params: str, reads: str, writes: str) -> KernelSpec:
    return KernelSpec(name, tuple(params.split()), tuple(reads.split()), tuple(writes.split()))


KERNELS: dict[str, KernelSpec] = {
    s.name: s
    for s in (
        _spec("scale", "a s", "a", "a"),
        _spec("sgd_step", "x g lr wd", "x g", "x"),
        _spec("exchange", "x c e alpha", "x c", "x e"),
        _spec("exchange_sgd_step", "x c g e alpha lr wd", "x c g", "x e"),
        _spec("nesterov_lookahead", "x v delta y", "x v", "y"),
        _spec("nesterov_step", "x v g lr delta wd", "x v g", "x v"),
        _spec("exchange_nesterov_step", "x v c g e alpha lr delta wd", "x v c g", "x v e"),
        _spec("downpour_step", "x acc g lr wd", "x acc g", "x acc"),
        _spec("sync_easgd_update", "x c xmean alpha beta", "x c xmean", "x c"),
    )
}


#: The kernels of compressed pushes (docs/ARCHITECTURE.md §2.10), per codec: ``compress``
#: (e, r, codes, scales, block, n) codes one block per thread; ``decompress`` (codes, scales,
#: out, block, n) decodes element by element. Their arrays are not all float32 of length n, so
#: they are not in :data:`KERNELS`.
CODEC_KERNELS: dict[str, str] = {
    f"{op}_{codec}": f"easgd_{op}_{codec}"
    for op in ("compress", "decompress")
    for codec in ("int8", "fp8")
}


# ---- kernel source ----------------------------------------------------------------------------
def _has_kernels(d: Path) -> bool:
    return all((d / f).is_file() for f in _KERNEL_FILES)


def kernel_source_dir() -> Path:
    """The folder the kernel source is read from.

    Package data (``easgd_mpi/kernels/``) when installed; otherwise the first ``kernels/`` with
    both files found walking up from this module (the repository, in an editable install).
    """
    here = Path(__file__).resolve()
    package_dir = here.parents[1] / "kernels"  # easgd_mpi/kernels
    if _has_kernels(package_dir):
        return package_dir
    for parent in here.parents[2:]:
        if _has_kernels(parent / "kernels"):
            return parent / "kernels"
    raise BackendError(
        f"CUDA kernel source ({', '.join(_KERNEL_FILES)}) not found in {package_dir} nor in a "
        f"kernels/ folder above {here.parent}; reinstall easgd-mpi (the wheel ships them)"
    )


def kernel_source() -> str:
    """The text NVRTC compiles: easgd.cu with easgd.cuh inlined at its #include.

    Inlined rather than found through an include path because CuPy's compile cache is keyed on
    the source text: an edited header must change the key. ``#line`` directives keep compiler
    messages pointing at the real files and lines.
    """
    d = kernel_source_dir()
    cu_path, cuh_path = d / "easgd.cu", d / "easgd.cuh"
    cu_name, cuh_name = cu_path.as_posix(), cuh_path.as_posix()
    out = [f'#line 1 "{cu_name}"']
    included = False
    for lineno, line in enumerate(cu_path.read_text().splitlines(), start=1):
        if line.strip() == _INCLUDE_LINE and not included:
            out.append(f'#line 1 "{cuh_name}"')
            out.append(cuh_path.read_text())
            out.append(f'#line {lineno + 1} "{cu_name}"')
            included = True
        else:
            out.append(line)
    if not included:
        raise BackendError(f"{cu_name} does not contain the line {_INCLUDE_LINE}")
    return "\n".join(out) + "\n"


# ---- compiled modules, one per device ---------------------------------------------------------
_MODULES: dict[int, dict[str, object]] = {}
_MODULES_LOCK = threading.Lock()


def _kernels_for_device(device_id: int) -> dict[str, object]:
    """The compiled kernels of the current device (compiled on first use, then cached)."""
    fns = _MODULES.get(device_id)
    if fns is not None:
        return fns
    with _MODULES_LOCK:
        fns = _MODULES.get(device_id)
        if fns is None:
            try:
                module = cupy.RawModule(code=kernel_source())
                fns = {name: module.get_function(s.symbol) for name, s in KERNELS.items()}
                fns.update({k: module.get_function(sym) for k, sym in CODEC_KERNELS.items()})
            except Exception as exc:  # CompileException, missing NVRTC, driver too old, ...
                raise BackendError(
                    f"the CUDA kernels from {kernel_source_dir()} cannot be built for GPU "
                    f"{device_id}: {exc.__class__.__name__}: {exc}"
                ) from exc
            _MODULES[device_id] = fns
    return fns


def _nvrtc():
    """CuPy's NVRTC binding (internal to CuPy, so only used for diagnostics)."""
    from cupy_backends.cuda.libs import nvrtc  # noqa: PLC0415

    return nvrtc


def _nvrtc_compile_without_device(arch: str = "sm_80") -> None:
    """Compile the kernels with NVRTC for ``arch`` where no GPU is visible (``easgd check``).

    CuPy's own compile path asks the device for its architecture, so this goes through CuPy's
    NVRTC binding directly. Raises on any failure, with NVRTC's log when there is one.
    """
    nvrtc = _nvrtc()
    prog = nvrtc.createProgram(kernel_source(), "easgd.cu", (), ())
    try:
        try:
            nvrtc.compileProgram(prog, (f"-arch={arch}", "-ftz=true"))  # as CuPy compiles
        except Exception as exc:
            raise BackendError(f"NVRTC: {exc}\n{nvrtc.getProgramLog(prog)}") from exc
    finally:
        nvrtc.destroyProgram(prog)


# ---- availability and diagnostics -------------------------------------------------------------
def gpu_available() -> tuple[bool, str]:
    """``(True, "")`` when CuPy can use a CUDA device, else ``(False, why)``. Never raises."""
    if cupy is None:
        if _CUPY_IMPORT_ERROR.startswith("ModuleNotFoundError"):
            return False, "CuPy is not installed"
        return False, f"CuPy cannot be imported ({_CUPY_IMPORT_ERROR})"
    try:
        if cupy.cuda.is_available():
            return True, ""
        try:  # is_available() hides the reason; the runtime states it
            count = cupy.cuda.runtime.getDeviceCount()
            detail = f"{count} devices"
        except Exception as exc:  # noqa: BLE001 - any CUDA error is a reason, not a crash
            detail = str(exc)
        return False, f"CuPy {cupy.__version__} sees no usable CUDA device ({detail})"
    except Exception as exc:  # noqa: BLE001
        return False, f"CUDA unusable: {exc.__class__.__name__}: {exc}"


def _try(fn, default=None):
    try:
        return fn()
    except Exception:  # noqa: BLE001 - describe() reports what it can and never raises
        return default


def describe() -> dict:
    """What ``easgd check`` reports about CuPy, CUDA, the devices and the kernels. Never raises.

    ``kernels_compile`` is True/False after compiling for device 0 (or, without a GPU, for
    sm_80 through NVRTC alone); None when it could not be tried; ``kernel_error`` says why.
    """
    ok, reason = gpu_available()
    info: dict = {
        "cupy_version": cupy.__version__ if cupy is not None else None,
        "gpu_available": ok,
        "reason": reason,
        "cuda_runtime_version": None,
        "cuda_driver_version": None,
        "nvrtc_version": None,
        "devices": [],
        "kernel_source_dir": _try(lambda: str(kernel_source_dir())),
        "kernels_compile": None,
        "kernel_error": "",
    }
    if cupy is None:
        info["kernel_error"] = "CuPy is not installed"
        return info
    rt = cupy.cuda.runtime
    info["cuda_runtime_version"] = _try(lambda: _cuda_version_str(rt.runtimeGetVersion()))
    info["cuda_driver_version"] = _try(lambda: _cuda_version_str(rt.driverGetVersion()))
    info["nvrtc_version"] = _try(lambda: ".".join(map(str, _nvrtc().getVersion())))
    if ok:
        for i in range(_try(rt.getDeviceCount, 0)):
            props = _try(lambda i=i: rt.getDeviceProperties(i), {})
            name = props.get("name", b"?")
            info["devices"].append(
                {
                    "id": i,
                    "name": name.decode() if isinstance(name, bytes) else str(name),
                    "total_memory_bytes": int(props.get("totalGlobalMem", 0)),
                    "compute_capability": f"{props.get('major', '?')}.{props.get('minor', '?')}",
                    "multiprocessors": int(props.get("multiProcessorCount", 0)),
                }
            )
    try:
        if ok:
            with cupy.cuda.Device(0):
                _kernels_for_device(0)
        else:
            _nvrtc_compile_without_device()
        info["kernels_compile"] = True
    except Exception as exc:  # noqa: BLE001
        info["kernels_compile"] = False if isinstance(exc, BackendError) else None
        info["kernel_error"] = f"{exc.__class__.__name__}: {exc}"
    return info


def _cuda_version_str(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


# ---- the backend ------------------------------------------------------------------------------
class CupyBackend:
    """Fused CUDA kernels on one GPU, with NumpyBackend's interface.

    Arrays are 1-D-or-any-shape, C-contiguous ``cupy.ndarray`` float32 of equal size on the
    current device (views into flat buffers at any element offset are fine). Scalars are Python
    or NumPy numbers and are passed to the kernels as float32. Kernels run on the current stream;
    the in-place updates are asynchronous like any CuPy operation.
    """

    name = "cupy"
    xp = cupy
    is_gpu = True

    def __init__(self, device_id: int | None = None):
        if cupy is None:
            raise BackendError(f"the CuPy backend needs CuPy: {_CUPY_IMPORT_ERROR}")
        ok, why = gpu_available()
        if not ok:
            raise BackendError(f"the CuPy backend needs a GPU: {why}")
        if device_id is not None:
            # More workers than visible GPUs on a node share them round-robin; with one GPU
            # per task (Slurm --gpus-per-task) every worker sees exactly its own as device 0.
            count = cupy.cuda.runtime.getDeviceCount()
            cupy.cuda.Device(int(device_id) % count).use()  # this rank's GPU from now on
        self.device_id = cupy.cuda.runtime.getDevice()
        props = cupy.cuda.runtime.getDeviceProperties(self.device_id)
        self._max_blocks = max(1, int(props["multiProcessorCount"]) * _BLOCKS_PER_SM)
        _kernels_for_device(self.device_id)  # compile now: errors at start-up, not mid-run
        self._sumsq = None

    def __repr__(self) -> str:
        return f"CupyBackend(device_id={self.device_id})"

    # ---- memory -------------------------------------------------------------------------------
    def zeros(self, n: int):
        return cupy.zeros(int(n), dtype=cupy.float32)

    def asarray(self, a):
        return cupy.ascontiguousarray(cupy.asarray(a, dtype=cupy.float32))

    def to_host(self, a, out: np.ndarray | None = None) -> np.ndarray:
        """Device → host; returns when the data is in ``out`` (a new array when None)."""
        self._check_device_array("to_host", "a", a)
        if out is None:
            return cupy.asnumpy(a)
        self.to_host_async(a, out)
        self.synchronize()
        return out

    def from_host(self, host: np.ndarray, out):
        """Host → device into ``out``; returns when ``host`` may be reused."""
        if not (isinstance(host, np.ndarray) and host.dtype == np.float32):
            host = np.ascontiguousarray(host, dtype=np.float32)  # like np.copyto's casting
        self.from_host_async(host, out)
        self.synchronize()
        return out

    def to_host_async(self, a, out: np.ndarray) -> np.ndarray:
        """Enqueue device → host on the current stream; ``out`` is valid after synchronize().

        Truly asynchronous only when ``out`` is pinned (:meth:`host_empty`).
        """
        self._check_device_array("to_host", "a", a)
        self._check_host_array("to_host", "out", out, a.size)
        if a.size:
            a.data.copy_to_host_async(ctypes.c_void_p(out.ctypes.data), a.nbytes)
        return out

    def from_host_async(self, host: np.ndarray, out):
        """Enqueue host → device on the current stream; keep ``host`` unchanged until
        synchronize(). Truly asynchronous only when ``host`` is pinned (:meth:`host_empty`)."""
        self._check_device_array("from_host", "out", out)
        self._check_host_array("from_host", "host", host, out.size)
        if out.size:
            out.data.copy_from_host_async(ctypes.c_void_p(host.ctypes.data), out.nbytes)
        return out

    def host_empty(self, n: int) -> np.ndarray:
        """A NumPy float32 array in pinned (page-locked) host memory, for MPI staging.

        Pinned memory makes H2D/D2H copies run at full PCIe/NVLink speed and lets them be
        asynchronous. The array keeps its pinned allocation alive.
        """
        import cupyx  # noqa: PLC0415 - part of CuPy; only needed here

        return cupyx.empty_pinned((int(n),), dtype=np.float32)

    def synchronize(self) -> None:
        """Wait for everything enqueued on the current stream (kernels and copies)."""
        cupy.cuda.get_current_stream().synchronize()

    def staging_pipeline(self) -> StreamStaging:
        """Chunk staging with the copies on their own streams (see :class:`StreamStaging`)."""
        return StreamStaging()

    def sum_squares(self, a) -> float:
        """Σ a², accumulated in float64 (more accurate than the reference's float32 dot)."""
        if self._sumsq is None:
            self._sumsq = cupy.ReductionKernel(
                "float32 v",
                "float64 s",
                "(double)v * (double)v",
                "a + b",
                "s = a",
                "0.0",
                "easgd_sum_squares",
            )
        return float(self._sumsq(a))

    def all_finite(self, a) -> bool:
        return bool(cupy.isfinite(a).all())

    def scale(self, a, s) -> None:
        """a ← s·a"""
        self._launch("scale", a, s)

    # ---- fused updates (formulas: NumpyBackend, kernels/easgd.cuh) ----------------------------
    def sgd_step(self, x, g, lr, wd) -> None:
        """x ← x − η(g + λx)"""
        self._launch("sgd_step", x, g, lr, wd)

    def exchange(self, x, c, e, alpha) -> None:
        """e ← α(x − c);  x ← x − e"""
        self._launch("exchange", x, c, e, alpha)

    def exchange_sgd_step(self, x, c, g, e, alpha, lr, wd) -> None:
        """e ← α(x − c);  x ← (x − e) − η(g + λx)   (gradient taken at the old x)"""
        self._launch("exchange_sgd_step", x, c, g, e, alpha, lr, wd)

    def nesterov_lookahead(self, x, v, delta, y) -> None:
        """y ← x + δv"""
        self._launch("nesterov_lookahead", x, v, delta, y)

    def nesterov_step(self, x, v, g, lr, delta, wd) -> None:
        """v ← δv − η(g + λ(x + δv));  x ← x + v"""
        self._launch("nesterov_step", x, v, g, lr, delta, wd)

    def exchange_nesterov_step(self, x, v, c, g, e, alpha, lr, delta, wd) -> None:
        """e ← α(x − c);  v ← δv − η(g + λ(x + δv));  x ← (x − e) + v"""
        self._launch("exchange_nesterov_step", x, v, c, g, e, alpha, lr, delta, wd)

    def downpour_step(self, x, acc, g, lr, wd) -> None:
        """d ← −η(g + λx);  x ← x + d;  acc ← acc + d"""
        self._launch("downpour_step", x, acc, g, lr, wd)

    def sync_easgd_update(self, x, c, xmean, alpha, beta) -> None:
        """x ← x − α(x − c);  c ← (1 − β)c + β·x̄"""
        self._launch("sync_easgd_update", x, c, xmean, alpha, beta)

    # ---- compressed pushes (formulas: NumpyBackend.compress, kernels/easgd.cuh) ---------------
    def compress(self, e, r, codes, scales, codec: str, block: int) -> None:
        """Blockwise quantization with error feedback, in place (see NumpyBackend.compress)."""
        n = e.size
        self._check_device_array("compress", "e", e)
        if r is not None:
            self._check_device_array("compress", "r", r)
        blocks = -(-n // int(block))
        if not n:
            return
        if codes.size < n or scales.size < blocks:
            raise BackendError(f"compress: codes need {n} bytes and scales {blocks} floats")
        grid = min(self._max_blocks, math.ceil(blocks / _THREADS))
        kernel = _kernels_for_device(cupy.cuda.runtime.getDevice())[f"compress_{codec}"]
        r_arg = r if r is not None else np.uint64(0)  # a null pointer: no residual kept
        kernel((grid,), (_THREADS,), (e, r_arg, codes, scales, np.int64(block), np.int64(n)))

    def decompress(self, codes, scales, out, codec: str, block: int) -> None:
        """out ← value(codes) · scale of each element's block (see NumpyBackend.decompress)."""
        n = out.size
        self._check_device_array("decompress", "out", out)
        if not n:
            return
        grid = min(self._max_blocks, math.ceil(n / _THREADS))
        kernel = _kernels_for_device(cupy.cuda.runtime.getDevice())[f"decompress_{codec}"]
        kernel((grid,), (_THREADS,), (codes, scales, out, np.int64(block), np.int64(n)))

    # ---- plumbing -----------------------------------------------------------------------------
    def _launch(self, name: str, *args) -> None:
        spec = KERNELS[name]
        device = cupy.cuda.runtime.getDevice()
        n = None
        kargs = []
        for pname, value in zip(spec.params, args, strict=True):
            if pname in spec.scalars:
                kargs.append(np.float32(value))
                continue
            self._check_device_array(name, pname, value, device)
            if n is None:
                n = value.size
            elif value.size != n:
                raise BackendError(
                    f"{name}: {pname} has {value.size} elements, {spec.arrays[0]} has {n}; "
                    "all arrays of one update must have the same length"
                )
            kargs.append(value)
        if not n:
            return
        kargs.append(np.int64(n))
        blocks = min(self._max_blocks, math.ceil(n / (4 * _THREADS)))
        _kernels_for_device(device)[name]((blocks,), (_THREADS,), tuple(kargs))

    @staticmethod
    def _check_device_array(where: str, pname: str, a, device: int | None = None) -> None:
        if not isinstance(a, cupy.ndarray):
            raise BackendError(
                f"{where}: {pname} must be a cupy.ndarray, got {type(a).__module__}."
                f"{type(a).__name__}; move it to the GPU with backend.asarray()"
            )
        if a.dtype != cupy.float32:
            raise BackendError(f"{where}: {pname} has dtype {a.dtype}, expected float32")
        if not a.flags.c_contiguous:
            raise BackendError(
                f"{where}: {pname} is not contiguous (shape {a.shape}, strides {a.strides}); "
                "pass a contiguous slice of a flat buffer"
            )
        if device is None:
            device = cupy.cuda.runtime.getDevice()
        if a.device.id != device:
            raise BackendError(
                f"{where}: {pname} is on GPU {a.device.id} but the current device is GPU {device}"
            )

    @staticmethod
    def _check_host_array(where: str, pname: str, h, n: int) -> None:
        if not isinstance(h, np.ndarray) or h.dtype != np.float32 or not h.flags.c_contiguous:
            desc = f"{type(h).__name__} {getattr(h, 'dtype', '')}".strip()
            raise BackendError(
                f"{where}: {pname} must be a C-contiguous numpy float32 array, got {desc}"
            )
        if h.size != n:
            raise BackendError(f"{where}: {pname} has {h.size} elements, the device array {n}")
        if where == "to_host" and not h.flags.writeable:
            raise BackendError(f"{where}: {pname} is read-only")
