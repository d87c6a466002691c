"""Compressed pushes with error feedback (docs/ARCHITECTURE.md §2.16), in one process.

The NumPy reference of the codecs against their definition (int8: nearest multiple of the
block's scale; fp8: PyTorch's float8_e4m3fn conversion, an independent implementation), the
decoder against the coder, the special blocks (zeros, NaN, infinity), and error feedback through
the real update rules over many exchanges: what reached the center plus the residual equals the
sum of the uncompressed pushes to float32 rounding, and without the residual it does not.
"""

import numpy as np
import pytest

from easgd_mpi.algorithms import make_algorithm
from easgd_mpi.backend import NumpyBackend
from easgd_mpi.backend.numpy_backend import e4m3_decode, e4m3_encode
from easgd_mpi.compress import BLOCK, coded_bytes, decode_push
from easgd_mpi.config import Config
from easgd_mpi.data.sampling import worker_rng
from easgd_mpi.errors import ConfigError
from easgd_mpi.models import QuadraticProblem
from easgd_mpi.workerstate import WorkerState, encode_rng
from local_center import LocalCenter

B = NumpyBackend()
CODECS = ("int8", "fp8")


def _push(rng, n):
    """Values spread over several orders of magnitude, block to block and within blocks."""
    return (rng.standard_normal(n) * np.exp(2 * rng.standard_normal(n))).astype(np.float32)


def _compress(codec, e, r=None, block=BLOCK):
    e, r = e.copy(), None if r is None else r.copy()
    codes = np.full(e.size, 0xAB, np.uint8)
    scales = np.full(-(-e.size // block), np.nan, np.float32)
    B.compress(e, r, codes, scales, codec, block)
    return e, r, codes, scales


@pytest.mark.parametrize("n", [1, 255, 256, 257, 3 * 256 + 100])
def test_int8_is_the_nearest_multiple_of_the_block_scale(n):
    rng = np.random.default_rng(n)
    e, r = _push(rng, n), _push(rng, n) * np.float32(0.01)
    d, r_out, codes, scales = _compress("int8", e, r)
    v = (e + r).astype(np.float64)
    q = codes.view(np.int8).astype(np.float64)
    for b, s in enumerate(scales):
        part = slice(b * BLOCK, (b + 1) * BLOCK)
        assert s == np.float32(np.abs(e[part] + r[part]).max()) / np.float32(127)
        assert np.abs(q[part]).max() == 127  # the largest magnitude takes the largest code
        assert np.all(np.abs(v[part] / s - q[part]) <= 0.5 + 1e-5)  # nearest
    np.testing.assert_array_equal(d, (q * np.repeat(scales, BLOCK)[:n]).astype(np.float32))
    np.testing.assert_array_equal(r_out.astype(np.float64), v - d)  # exact: no rounding


def test_fp8_codes_agree_with_pytorch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    every = e4m3_decode(np.arange(256, dtype=np.uint8))
    finite = np.isfinite(every) & (np.abs(every) <= 448)
    ordered = np.unique(every[finite])
    midpoints = (ordered[:-1] + np.diff(ordered) / 2).astype(np.float32)  # ties: to even
    y = np.concatenate(
        [rng.uniform(-448, 448, 50_000), 1e-3 * rng.standard_normal(50_000), midpoints]
    ).astype(np.float32)
    want = torch.from_numpy(y).to(torch.float8_e4m3fn).float().numpy()
    got = e4m3_decode(e4m3_encode(y))
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    codes = np.arange(256, dtype=np.uint8)[finite]
    byte = torch.from_numpy(codes.copy()).view(torch.float8_e4m3fn).float().numpy()
    np.testing.assert_array_equal(every[finite], byte)


@pytest.mark.parametrize("codec", CODECS)
def test_the_codes_decode_to_what_the_center_receives(codec):
    rng = np.random.default_rng(3)
    n = 5 * BLOCK + 17
    d, _, codes, scales = _compress(codec, _push(rng, n), _push(rng, n) * np.float32(0.1))
    out = np.full(n, np.nan, np.float32)
    decode_push(B, codes, scales, out, codec)
    np.testing.assert_array_equal(out.view(np.uint32), d.view(np.uint32))
    assert coded_bytes(n, codec) == n + 4 * 6 and coded_bytes(n, "none") == 4 * n


@pytest.mark.parametrize("codec", CODECS)
def test_special_blocks(codec):
    n = 4 * BLOCK
    e = np.ones(n, np.float32)
    e[:BLOCK] = 0.0  # block 0: nothing to send
    e[BLOCK + 5] = np.nan  # block 1: a NaN
    e[2 * BLOCK + 9] = -np.inf  # block 2: an infinity
    r = np.zeros(n, np.float32)
    d, r_out, codes, scales = _compress(codec, e, r)
    assert scales[0] == 0 and not codes[:BLOCK].any() and not d[:BLOCK].any()
    assert not r_out[:BLOCK].any()
    for b in (1, 2):  # every element of a non-finite block is non-finite: the chunk is dropped
        part = slice(b * BLOCK, (b + 1) * BLOCK)
        assert not np.isfinite(scales[b]) and np.isnan(d[part]).all() and not codes[part].any()
    np.testing.assert_array_equal(d[3 * BLOCK :], 1.0)  # a block's neighbours are untouched
    assert not r_out[3 * BLOCK :].any()


@pytest.mark.parametrize("codec", CODECS)
def test_without_residual_nothing_is_kept(codec):
    rng = np.random.default_rng(5)
    e = _push(rng, 1000)
    with_r, _, codes_r, scales_r = _compress(codec, e, np.zeros_like(e))
    without, r, codes, scales = _compress(codec, e, None)
    assert r is None
    np.testing.assert_array_equal(with_r, without)
    np.testing.assert_array_equal(codes_r, codes)
    np.testing.assert_array_equal(scales_r, scales)


# ---- error feedback through the real rules ---------------------------------------------------

DIM = 700  # three blocks of 256, the last one short; chunks of 300 cut blocks anywhere


def make_config(algorithm, compress, error_feedback=True, tau=1, steps=300) -> Config:
    cfg = Config()
    rng = np.random.default_rng(11)
    values = {
        "algorithm": algorithm,
        "lr": 0.05,
        "tau": tau,
        "steps": steps,
        "momentum": 0.9 if algorithm == "eamsgd" else 0.0,
        "model.name": "quadratic",
        "quadratic.dim": DIM,
        "quadratic.curvature": rng.uniform(0.2, 2.0, DIM).round(3).tolist(),
        "quadratic.optimum": (rng.standard_normal(DIM) * np.exp(rng.standard_normal(DIM)))
        .round(4)
        .tolist(),
        "quadratic.noise": 0.5,
        "compress": compress,
        "error_feedback": error_feedback,
    }
    if algorithm != "downpour":
        values["alpha"] = 0.3
    for key, value in values.items():
        cfg.set(key, value)
    return cfg.validate(workers=1)


class RecordingCenter(LocalCenter):
    """LocalCenter that also sums, in float64, everything that reached it."""

    def __init__(self, initial, chunk):
        super().__init__(initial, chunk)
        self.reached = np.zeros(self.n)

    def exchange(self, compute):
        def recorded(lo, hi, c, e):
            finish = compute(lo, hi, c, e)
            if finish is not None:
                finish()
            self.reached[lo:hi] += e
            return None

        return super().exchange(recorded)

    def add(self, delta):
        super().add(delta)
        self.reached += delta


def start(cfg, center=None, chunk=300):
    problem = QuadraticProblem(cfg.quadratic)
    if center is None:
        x0 = problem.layout.zeros()
        problem.init_params(x0, cfg.seed)
        center = RecordingCenter(x0, chunk)
    rng = worker_rng(cfg.seed, 0)
    algo = make_algorithm(cfg, problem, NumpyBackend(), center, cfg.resolve_alpha(1), rng)
    algo.pull_center()
    return algo, center, rng


def train_recording_pushes(cfg):
    """Run ``cfg.steps`` steps at p = 1; returns (Σ uncompressed pushes, Σ reached, Σ half an
    ulp of each v = e + r: the rounding error error feedback may leave, algo)."""
    algo, center, _ = start(cfg)
    pushed = np.zeros(algo.x.size)
    rounding = np.zeros(algo.x.size)
    compress = algo.compressor.compress

    def recording(lo, hi, e):  # the push as the rule hands it over, before it is coded
        pushed[lo:hi] += e
        r = algo.compressor.residual
        v = e if r is None else e.astype(np.float64) + r[lo:hi]
        rounding[lo:hi] += 2.0**-24 * np.abs(v)  # v = e + r rounds once to float32
        return compress(lo, hi, e)

    algo.compressor.compress = recording
    for t in range(cfg.steps):
        algo.step(t)
    return pushed, center.reached, rounding, algo


@pytest.mark.parametrize(
    "algorithm, codec, tau",
    [("easgd", "int8", 1), ("eamsgd", "fp8", 2), ("downpour", "int8", 3), ("easgd", "fp8", 1)],
)
def test_error_feedback_loses_nothing(algorithm, codec, tau):
    cfg = make_config(algorithm, codec, tau=tau)
    pushed, reached, rounding, algo = train_recording_pushes(cfg)
    residual = algo.compressor.residual.astype(np.float64)
    assert algo.exchanges >= 100 and algo.resets == 0
    # v = e + r is the one rounded operation (r = v − d is exact, and every push's d reached
    # the center): per element at most half an ulp of |v| per push.
    defect = np.abs(reached + residual - pushed)
    assert np.all(defect <= rounding * (1 + 1e-9)), np.max(defect / rounding)
    assert np.abs(residual).max() > 10 * rounding.max()  # the residual carries a real amount


@pytest.mark.parametrize("algorithm, codec", [("easgd", "int8"), ("downpour", "fp8")])
def test_without_error_feedback_what_the_codes_miss_is_lost(algorithm, codec):
    with_ef = make_config(algorithm, codec)
    pushed, reached, rounding, algo = train_recording_pushes(with_ef)
    kept = np.abs(reached + algo.compressor.residual - pushed).max()

    without = make_config(algorithm, codec, error_feedback=False)
    assert "residual" not in without.state_rows
    pushed, reached, _, algo = train_recording_pushes(without)
    assert algo.compressor.residual is None
    lost = np.abs(reached - pushed).max()
    assert kept <= rounding.max()
    assert lost > 1000 * rounding.max(), (lost, kept)


def test_uncompressed_pushes_count_four_bytes_per_element():
    cfg = make_config("easgd", "none", steps=10)
    algo, _, _ = start(cfg)
    for t in range(cfg.steps):
        algo.step(t)
    assert algo.compressor is None
    assert algo.push_bytes == 10 * 4 * algo.x.size and algo.bytes == 2 * algo.push_bytes
    coded = make_config("easgd", "int8", steps=10)
    algo, _, _ = start(coded)
    for t in range(coded.steps):
        algo.step(t)
    # chunks of 300: blocks restart at every chunk (300 → 2 blocks, the last 100 → 1 block)
    assert algo.push_bytes == 10 * (algo.x.size + 4 * (2 + 2 + 1))


@pytest.mark.parametrize("algorithm, cut", [("easgd", 37), ("eamsgd", 41), ("downpour", 38)])
def test_restoring_the_residual_continues_bit_identical(algorithm, cut):
    cfg = make_config(algorithm, "int8", tau=3, steps=60)
    assert cfg.state_rows[-1] == "residual"
    ref, ref_center, _ = start(cfg)
    for t in range(cfg.steps):
        ref.step(t)

    first, first_center, first_rng = start(cfg)
    for t in range(cut):
        first.step(t)
    saved = [np.array(r, copy=True) for r in first.saved_rows()]
    rows = dict(zip(cfg.state_rows, saved, strict=True))
    assert np.abs(rows["residual"]).max() > 0
    second, second_center, _ = start(cfg, RecordingCenter(first_center.value.copy(), 300))
    second.restore(
        WorkerState(
            steps=cut,
            exchanges=first.exchanges,
            resets=first.resets,
            rng_words=encode_rng(first_rng),
            rows=rows,
        )
    )
    second.rng.bit_generator.state = first_rng.bit_generator.state
    for t in range(cut, cfg.steps):
        second.step(t)
    assert np.array_equal(second_center.value.view(np.uint32), ref_center.value.view(np.uint32))
    for got, want in zip(second.saved_rows(), ref.saved_rows(), strict=True):
        assert np.array_equal(np.asarray(got).view(np.uint32), np.asarray(want).view(np.uint32))


@pytest.mark.parametrize("algorithm", ["easgd", "downpour"])
def test_a_non_finite_push_reaches_nothing_and_resets_the_residual(algorithm):
    cfg = make_config(algorithm, "int8", tau=1, steps=20)
    algo, center, _ = start(cfg)
    for t in range(10):
        algo.step(t)
    assert np.abs(algo.compressor.residual).max() > 0
    before = center.value.copy()
    algo.x[5] = np.nan  # the next push is not finite
    algo.step(10)
    assert algo.resets == 1 and not algo.compressor.residual.any()
    if algorithm == "easgd":  # the chunk with the NaN added zero, the others their codes
        np.testing.assert_array_equal(center.value[:300], before[:300])
    assert np.isfinite(center.value).all() and np.isfinite(algo.x).all()


@pytest.mark.parametrize("algorithm", ["sync-easgd", "allreduce-sgd", "localsgd", "diloco"])
def test_compression_is_refused_for_the_all_reduce_rules(algorithm):
    cfg = Config()
    cfg.set("algorithm", algorithm)
    cfg.set("compress", "int8")
    with pytest.raises(ConfigError, match="compress = 'int8' cannot be used with algorithm"):
        cfg.validate()


@pytest.mark.parametrize("algorithm", ["mdownpour", "adownpour", "mvadownpour", "async-diloco"])
def test_a_center_that_computes_takes_coded_pushes_without_push_lag(algorithm):
    cfg = Config()
    cfg.set("algorithm", algorithm)
    cfg.set("compress", "int8")
    cfg.validate()
    assert cfg.state_rows[-1] == "residual"
    cfg.set("push_lag", 2)
    with pytest.raises(ConfigError, match="push_lag = 2 cannot be used with compress = 'int8'"):
        cfg.validate()


def test_error_feedback_off_needs_compression():
    cfg = Config()
    cfg.set("error_feedback", False)
    with pytest.raises(ConfigError, match="error_feedback = false only applies"):
        cfg.validate()
    cfg.set("compress", "int4")
    with pytest.raises(ConfigError, match="compress = 'int4' is not one of none, int8, fp8"):
        cfg.validate()
