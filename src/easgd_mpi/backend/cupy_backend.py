"""The CuPy backend: NumpyBackend's interface on a GPU, one fused CUDA kernel per update.

The kernels are ``kernels/easgd.cu`` (grid-stride loops, float4 loads) over the per-element math
of ``kernels/easgd.cuh``; both are compiled at run time by CuPy's NVRTC, once per device and
process. The source is found as package data (``easgd_mpi/kernels/``) or, in an editable install,
in the repository's ``kernels/`` (:func:`kernel_source_dir`).

The per-element formulas round exactly like NumpyBackend (no FMA contraction), so results match
the reference bit for bit, except that CuPy always compiles with ``-ftz=true`` (appended after
any options we pass): subnormal inputs and results (|v| < 1.2e-38) become 0. The tests allow a
relative error of 1e-6 plus an absolute error of the smallest normal float32.

Host staging (docs/ARCHITECTURE.md §3.7): the MPI window lives in host memory, so a worker moves
the center and the elastic difference through pinned buffers from :meth:`CupyBackend.host_empty`.
:meth:`~CupyBackend.to_host` and :meth:`~CupyBackend.from_host` are synchronous like NumPy's (the
host buffer may be used or reused when they return). ``to_host_async``/``from_host_async`` only
enqueue the copy on the current stream (call :meth:`synchronize` before MPI touches the host
buffer); the exchange's overlap of neighbouring chunks is :class:`StreamStaging`'s, with its
own copy streams and events.

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
    "StagingSlot",
    "StreamStaging",
    "describe",
    "gpu_available",
    "kernel_source",
    "kernel_source_dir",
    "use_compute_stream",
]

_KERNEL_FILES = ("easgd.cu", "easgd.cuh")
_INCLUDE_LINE = '#include "easgd.cuh"'
_THREADS = 256
_BLOCKS_PER_SM = 32  # enough resident warps to saturate HBM; the grid-stride loop does the rest


# ---- the kernels: one table shared by the backend, the tests and the benchmark ----------------
class StagingSlot:
    """What one chunk in flight holds on the device, made once and reused by later chunks:
    the center's chunk ``c`` and the difference ``e`` (``chunk`` floats each), Σ e² on the
    device (float64) and its pinned host copy, and the three events that order the chunk's
    copy in, kernel and copy out."""

    def __init__(self, n: int):
        import cupyx  # noqa: PLC0415 - part of CuPy; only needed here

        self.c = cupy.zeros(int(n), dtype=cupy.float32)
        self.e = cupy.zeros(int(n), dtype=cupy.float32)
        self.sq = cupy.zeros((), dtype=cupy.float64)
        self.sq_host = cupyx.empty_pinned((1,), dtype=np.float64)
        self.copied_in = cupy.cuda.Event(disable_timing=True)
        self.computed = cupy.cuda.Event(disable_timing=True)
        self.copied_out = cupy.cuda.Event(disable_timing=True)


class StreamStaging:
    """One chunk of an exchange through pinned host buffers, overlapped with the others.

    ``start`` enqueues host → device on a copy-in stream, then on the worker's compute stream
    (its current stream, which PyTorch shares: :func:`compute_stream`) the kernel and Σ e² after
    that copy's event, then device → host of e and of Σ e² on a copy-out stream after the
    kernel's event. The copy in waits for nothing on the compute stream: a reused slot was last
    read by a kernel that has finished (the chunk that used it was waited for before its slot
    was handed back), and a new slot's zeroing is waited for once, when it is made. So chunk
    k's copy in runs during kernel k−1 (and chunk 0's during the backward pass), kernel k−1 and
    chunk k−2's copy out run at once on a GPU with separate copy engines, and MPI on the host
    reads k+1 and accumulates k−1 meanwhile. ``input_consumed`` says without waiting whether
    the chunk's host buffer c may be refilled (its copy in is done: the exchange then issues
    the next read into it before it waits for this chunk's difference); ``wait`` blocks until
    the chunk's e and Σ e² are on the host and returns Σ e² (one synchronisation per chunk).
    Kernels stay in order on the compute stream, after everything the worker enqueued there
    before (its gradient, the look-ahead point). Streams and events are made once and reused.
    """

    def __init__(self, backend):
        self._backend = backend
        self._copy_in = cupy.cuda.Stream(non_blocking=True)
        self._copy_out = cupy.cuda.Stream(non_blocking=True)
        self._made = cupy.cuda.Event(disable_timing=True)

    def slot(self, n: int) -> StagingSlot:
        """Device buffers and events for one more chunk in flight (made on first need)."""
        slot = StagingSlot(n)
        # Its buffers were zeroed on the compute stream: the copy-in stream waits for that once.
        self._made.record(cupy.cuda.get_current_stream())
        self._copy_in.wait_event(self._made)
        return slot

    def start(self, slot: StagingSlot, c_host, kernel, e_host) -> None:
        k = c_host.shape[0]
        c_dev, e_dev = slot.c[:k], slot.e[:k]
        compute = cupy.cuda.get_current_stream()
        if k:
            c_dev.data.copy_from_host_async(
                ctypes.c_void_p(c_host.ctypes.data), c_dev.nbytes, self._copy_in
            )
        slot.copied_in.record(self._copy_in)
        compute.wait_event(slot.copied_in)
        kernel(c_dev, e_dev)  # enqueued on the compute stream
        self._backend.sum_squares_into(e_dev, slot.sq)
        slot.computed.record(compute)
        self._copy_out.wait_event(slot.computed)
        if k:
            e_dev.data.copy_to_host_async(
                ctypes.c_void_p(e_host.ctypes.data), e_dev.nbytes, self._copy_out
            )
        slot.sq.data.copy_to_host_async(
            ctypes.c_void_p(slot.sq_host.ctypes.data), 8, self._copy_out
        )
        slot.copied_out.record(self._copy_out)

    @staticmethod
    def input_consumed(slot: StagingSlot) -> bool:
        """Whether the chunk's copy in is done (an event query: never waits)."""
        return bool(slot.copied_in.done)

    @staticmethod
    def wait(slot: StagingSlot) -> float:
        """Block until the chunk's e and Σ e² are on the host; Σ e² (float64; inf or nan when
        e holds a non-finite value)."""
        slot.copied_out.synchronize()
        return float(slot.sq_host[0])


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


#: The kernels of compressed pushes (docs/ARCHITECTURE.md §2.16), per codec: ``compress``
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
                    f"{device_id}: {exc.__class__.__name__}: {_first_line(exc)}"
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


# ---- the compute stream, one per device ---------------------------------------------------------
_STREAMS: dict[int, object] = {}
_STREAMS_LOCK = threading.Lock()


def use_compute_stream(device_id: int):
    """The stream on which this process runs its work on GPU ``device_id``: made current for
    CuPy in the calling thread, and returned (PyTorch is pointed at it by the torch adapter).

    Created once per device and process, and a real stream: CuPy's default stream is not one
    (under ``CUPY_CUDA_PER_THREAD_DEFAULT_STREAM=1`` its handle means a different stream in
    every thread, and PyTorch's autograd runs the backward pass in a thread of its own). With
    the module's backward pass and the fused kernels on this one stream they are ordered by
    the order they are issued in, without events. It synchronises with the legacy default
    stream (``non_blocking=False``), so work that a library leaves there is ordered too.
    """
    with _STREAMS_LOCK:
        stream = _STREAMS.get(device_id)
        if stream is None:
            with cupy.cuda.Device(device_id):
                stream = cupy.cuda.Stream(non_blocking=False)
            _STREAMS[device_id] = stream
    with cupy.cuda.Device(device_id):
        stream.use()
    return stream


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


def _first_line(exc) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].strip() if text else "no message"


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
        self.stream = use_compute_stream(self.device_id)
        self._sumsq = None
        _kernels_for_device(self.device_id)  # compile now: errors at start-up, not mid-run
        self._self_test()

    def _self_test(self) -> None:
        """One launch of a fused kernel, checked against NumPy: a kernel that compiles but
        cannot be loaded or run on this device (a driver older than NVRTC's PTX, no image for
        the architecture) fails here, at start-up, not at the first exchange."""
        rng = np.random.default_rng(0)
        x, g = rng.standard_normal((2, 1024)).astype(np.float32)
        want = x.copy()
        from .numpy_backend import NumpyBackend  # noqa: PLC0415

        NumpyBackend().sgd_step(want, g, 0.5, 0.25)
        try:
            x_dev = cupy.asarray(x)
            self.sgd_step(x_dev, cupy.asarray(g), 0.5, 0.25)
            got = cupy.asnumpy(x_dev)  # waits for the launch
        except Exception as exc:  # noqa: BLE001 - any CUDA failure is this reason
            raise BackendError(
                f"the CUDA kernels do not run on GPU {self.device_id}: "
                f"{exc.__class__.__name__}: {_first_line(exc)}"
            ) from exc
        if not np.allclose(got, want, rtol=1e-6, atol=1e-30):
            raise BackendError(
                f"the CUDA kernels give wrong results on GPU {self.device_id} (sgd_step "
                f"differs from NumPy by up to {float(np.max(np.abs(got - want))):.3g})"
            )

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
        return StreamStaging(self)

    def sum_squares(self, a) -> float:
        """Σ a², accumulated in float64 (more accurate than the reference's float32 dot)."""
        return float(self._sum_squares_kernel()(a))

    def sum_squares_into(self, a, out) -> None:
        """out ← Σ a² (float64, a 0-d device array), enqueued: nothing waits for it."""
        self._sum_squares_kernel()(a, out=out)

    def _sum_squares_kernel(self):
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
        return self._sumsq

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
