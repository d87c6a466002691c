"""Configuration: the dataclasses, their defaults, where each value comes from, validation.

Reading and writing the values as text (TOML, ``--set``, ``EASGD_*``, type checks) is
config_io.py's job; the stability region that validation checks once the number of workers is
known is stability.py's.

Precedence (one rule, in :meth:`Config.from_toml`): ``--set`` on the command line > config file
> ``EASGD_*`` environment variables > a resumed checkpoint's config > defaults. Every key is
documented in README.md ("Config reference").

The elastic strength is given as exactly one of ``rho`` (α = ηρ), ``alpha`` or ``beta``
(α = β/p); which one the user chose is kept, because α can only be resolved once the number of
workers p is known at launch.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config_io import (
    apply_mapping,
    dotted_keys,
    drop_none,
    dump_toml,
    environment_values,
    flatten,
    load_toml,
    parse_value,
    read_toml,
    show_value,
)
from .errors import ConfigError
from .stability import check_center_stability, check_elastic_stability, check_local_stability

__all__ = [
    "Config",
    "DataConfig",
    "ModelConfig",
    "QuadraticConfig",
    "CheckpointConfig",
    "ALGORITHMS",
    "ASYNC_ALGORITHMS",
    "SYNC_ALGORITHMS",
    "LOOP_ALGORITHMS",
    "DOWNPOUR_ALGORITHMS",
    "BUILTIN_ALGORITHMS",
    "RESIZABLE_ALGORITHMS",
    "ELASTIC_ALGORITHMS",
    "MOMENTUM_ALGORITHMS",
    "OPTIONAL_MOMENTUM_ALGORITHMS",
    "ACTIVE_ALGORITHMS",
    "OUTER_ALGORITHMS",
    "STALENESS_SCALES",
    "TORCH_MODELS",
    "LOCK_MODES",
    "COMPRESS",
    "COMPRESS_ALGORITHMS",
    "DEVICES",
]

#: Algorithms the package's own loop knows (docs/ARCHITECTURE.md §2).
ALGORITHMS = (
    "easgd",
    "eamsgd",
    "sync-easgd",
    "downpour",
    "allreduce-sgd",
    "mdownpour",
    "adownpour",
    "mvadownpour",
    "localsgd",
    "diloco",
    "async-diloco",
)
#: Algorithms whose center computes: workers push into the servers' inboxes and the servers
#: apply the rule to their slices (docs/ARCHITECTURE.md §3.11). The others leave it passive.
ACTIVE_ALGORITHMS = ("mdownpour", "adownpour", "mvadownpour", "async-diloco")
#: Algorithms that exchange through the RMA window without a collective.
ASYNC_ALGORITHMS = ("easgd", "eamsgd", "downpour", *ACTIVE_ALGORITHMS)
#: Algorithms whose workers move in lockstep through an all-reduce among the workers.
SYNC_ALGORITHMS = ("sync-easgd", "allreduce-sgd", "localsgd", "diloco")
#: Algorithms of a user's own PyTorch loop (easgd_mpi.torch): the user's optimizer steps, the
#: rule exchanges (EAMSGD there is "easgd" around SGD with Nesterov momentum; "localsgd"
#: averages as PyTorch's PeriodicModelAverager does; "diloco" and "async-diloco" take their
#: outer step after every H = tau of the optimizer's steps). The other rules are refused there
#: (docs/ARCHITECTURE.md §8): DOWNPOUR's push is the sum of the package's own SGD steps.
LOOP_ALGORITHMS = ("easgd", "sync-easgd", "localsgd", "diloco", "async-diloco")
#: DOWNPOUR and its master-side variants: the worker pushes the sum of its SGD updates
#: −η Σ (g + λx) (docs/ARCHITECTURE.md §2.7, §2.10-2.12), steps of the package's own kernels.
DOWNPOUR_ALGORITHMS = ("downpour", "mdownpour", "adownpour", "mvadownpour")
#: Algorithms the package's own loop runs: every one.
BUILTIN_ALGORITHMS = ALGORITHMS
#: Algorithms whose resume may change the number of workers: their resume is not exact anyway
#: (the interleaving of exchanges is the scheduler's), so new workers start at the center.
RESIZABLE_ALGORITHMS = ("easgd", "eamsgd")
#: Algorithms with an elastic force, i.e. that use rho / alpha / beta.
ELASTIC_ALGORITHMS = ("easgd", "eamsgd", "sync-easgd")
#: Algorithms that keep a velocity v per worker.
MOMENTUM_ALGORITHMS = ("eamsgd",)
#: Algorithms that keep a velocity (Nesterov) only when momentum > 0; see Config.keeps_velocity.
OPTIONAL_MOMENTUM_ALGORITHMS = ("sync-easgd", "allreduce-sgd", "localsgd", "diloco")
#: Algorithms whose center takes an outer Nesterov step on the workers' pseudo-gradients.
OUTER_ALGORITHMS = ("diloco", "async-diloco")
#: How async-diloco scales a pseudo-gradient by its staleness s (docs/ARCHITECTURE.md §2.15).
STALENESS_SCALES = ("inverse", "none")
#: The keys of the center's own optimizer: each is used by these algorithms only, and its
#: default (None in the dataclass) is the rule's (:meth:`Config.resolve_center`).
CENTER_KEYS = {
    "outer_lr": ("diloco", "async-diloco", "adownpour"),
    "outer_momentum": ("diloco", "async-diloco"),
    "outer_eps": ("adownpour",),
    "moving_rate": ("mvadownpour",),
    "staleness_scale": ("async-diloco",),
}
#: The rule's default of each center key.
_CENTER_DEFAULTS = {
    "outer_lr": {"diloco": 0.7, "async-diloco": 0.7, "adownpour": 0.01},
    "outer_momentum": {"diloco": 0.9, "async-diloco": 0.9},
    "outer_eps": {"adownpour": 1e-8},
    "moving_rate": {"mvadownpour": 0.01},
    "staleness_scale": {"async-diloco": "inverse"},
}
#: The center-side vectors each rule keeps (checkpointed with the center, docs/CHECKPOINT.md).
CENTER_ROWS = {
    "mdownpour": ("velocity",),
    "adownpour": ("adagrad_sum",),
    "mvadownpour": ("average",),
    "diloco": ("outer_momentum",),
    "async-diloco": ("outer_momentum", "outer_buffer"),
}
#: How workers lock the center's window (``lock_mode``); the window itself (center.py) takes them
#: from here, so this module imports nothing that touches MPI (docs/ARCHITECTURE.md §1.1).
LOCK_MODES = ("shared", "exclusive")
#: How a worker codes what it pushes to the center (``compress``, docs/ARCHITECTURE.md §2.16).
COMPRESS = ("none", "int8", "fp8")
#: The rules whose workers push a difference to the center, which compression can carry (the
#: passive window receives it decoded; a center that computes decodes it: §2.16, §3.11).
COMPRESS_ALGORITHMS = ("easgd", "eamsgd", "downpour", *ACTIVE_ALGORITHMS)

#: Default exchange chunks (floats): CPU workers overlap small chunks best; a GPU worker pays one
#: stream synchronisation per chunk, so it takes large ones.
CPU_CHUNK = 1 << 18
GPU_CHUNK = 1 << 22

#: The ``device`` settings (backend.select_backend says what each does).
DEVICES = ("auto", "gpu", "cpu-fallback", "off")
DATASETS = ("digits", "synthetic", "file", "cifar10", "mnist")
#: Data sets read from files named by data.path.
FILE_DATASETS = ("file", "cifar10", "mnist")
MODELS = ("mlp", "softmax", "quadratic", "cifar-convnet", "torch")
#: Models built with PyTorch (the torch extra).
TORCH_MODELS = ("cifar-convnet", "torch")
ACTIVATIONS = ("tanh", "relu")


@dataclass
class DataConfig:
    name: str = "digits"
    #: Seed of the train/test split and of the synthetic data (fixed across runs so that
    #: runs with different training seeds are evaluated on the same held-out set).
    seed: int = 0
    #: Fraction of the data set held out for the master's evaluation of the center.
    test_fraction: float = 0.2
    #: Synthetic data set (name = "synthetic"): Gaussian classes.
    samples: int = 2000
    features: int = 20
    classes: int = 4
    #: Distance of the class means from the origin, in units of the noise (higher = easier).
    separation: float = 2.0
    #: Your own data (name = "file"): an .npz or HDF5 file with features and integer labels;
    #: CIFAR-10 (name = "cifar10"): the cifar-10-batches-py folder or cifar-10-python.tar.gz;
    #: MNIST (name = "mnist"): the folder of the four IDX files (gzipped or not).
    path: str = ""
    #: Square crop of image data for PyTorch models: random for training, centred for the
    #: held-out set (0 = no crop; model "cifar-convnet" uses the paper's 28 when 0).
    crop: int = 0
    #: Names of the arrays in it; "<x_key>_test" and "<y_key>_test", when present, are the
    #: held-out split (otherwise test_fraction of the samples is held out).
    x_key: str = "x"
    y_key: str = "y"


@dataclass
class ModelConfig:
    name: str = "mlp"
    hidden: list = field(default_factory=lambda: [64])
    activation: str = "tanh"
    #: Scale of the initial weights relative to Glorot-uniform.
    init_scale: float = 1.0
    #: model.name = "torch": "module:function"; function(cfg) returns a torch.nn.Module.
    factory: str = ""
    #: Held-out samples per forward pass when the master evaluates a PyTorch model.
    eval_batch: int = 1000


@dataclass
class QuadraticConfig:
    """f(x) = ½ Σ_j h_j (x_j − m_j)², gradients with Gaussian noise σ (σ = 0: exact)."""

    dim: int = 16
    #: Curvatures h_j: one number for all, or a list of length dim.
    curvature: Any = 1.0
    #: Optimum m_j: one number or a list.
    optimum: Any = 1.0
    #: Start point x_0 (the center's initial value): one number or a list.
    start: Any = 0.0
    noise: float = 0.0


@dataclass
class CheckpointConfig:
    #: Seconds between checkpoints of the master (0 = only at the end).
    interval: float = 60.0
    #: How many checkpoints to keep in the run folder.
    keep: int = 3
    #: Store every worker's x (and v): resume continues each worker exactly. Off: only the
    #: center and counters are stored, and resumed workers start from the center.
    worker_states: bool = True
    #: Seconds the master waits for every worker's state before it writes a checkpoint with
    #: the states at hand (a stopped or hung worker then keeps its older saved state). Also
    #: bounds a stop: after SIGTERM/SIGUSR1 the final checkpoint is written within this wait
    #: plus the time of one write, even while a worker is stopped (docs/CHECKPOINT.md).
    state_wait: float = 5.0


@dataclass
class Config:
    algorithm: str = "easgd"
    lr: float = 0.05
    #: Elastic strength: exactly one of rho, alpha, beta (default beta = 0.9, the paper's).
    rho: float | None = None
    alpha: float | None = None
    beta: float | None = None
    tau: int = 4
    momentum: float = 0.0
    batch_size: int = 128
    #: Local steps per worker.
    steps: int = 20000
    weight_decay: float = 0.0
    seed: int = 0
    #: Seconds between evaluations of the center (and progress lines) on the master.
    eval_interval: float = 2.0
    #: Folder under which each run gets its own folder.
    output: str = "runs"
    #: Explicit run folder (default: <output>/<timestamp>).
    run_dir: str = ""
    lock_mode: str = "shared"
    #: Ranks 0..servers−1 hold the center in contiguous slices (rank 0 is also the master);
    #: the workers are the other ranks. 1: rank 0 holds all of it.
    servers: int = 1
    #: Floats per RMA transfer in the pipelined exchange; 0 = auto: 262144 (1 MiB) on a CPU
    #: worker, 4194304 (16 MiB) on a GPU worker, where each chunk costs one synchronisation.
    chunk: int = 0
    #: The center's own optimizer (docs/ARCHITECTURE.md §2.10-2.15); unset = the rule's default.
    #: Outer learning rate: diloco and async-diloco (0.7), adownpour's Adagrad at the master (0.01).
    outer_lr: float | None = None
    #: Outer Nesterov momentum of diloco and async-diloco (0.9).
    outer_momentum: float | None = None
    #: adownpour: ε of the master's Adagrad step u/(√G + ε) (1e-8).
    outer_eps: float | None = None
    #: mvadownpour: the rate ν of the center's moving average z ← (1 − ν)z + νx̃ (0.01).
    moving_rate: float | None = None
    #: async-diloco: "inverse" scales a pseudo-gradient of staleness s by 1/(1 + s); "none".
    staleness_scale: str | None = None
    #: Rules whose center computes: how many of a worker's own pushes may still wait in the
    #: servers' inboxes when it pulls the center (0: every pull includes its last push).
    push_lag: int = 0
    #: How each worker codes its pushes to the center: "none" (float32), "int8" or "fp8"
    #: (one byte per element and a float32 scale per block of 256; docs/ARCHITECTURE.md §2.16).
    compress: str = "none"
    #: With compress: each worker keeps what its codes could not carry (the residual) and adds
    #: it to its next push. Off only to measure what that buys.
    error_feedback: bool = True
    #: Where workers compute (``DEVICES``): "auto" a GPU when CuPy sees one (one that cannot
    #: run the kernels stops the run), "gpu" a GPU or stop, "cpu-fallback" a GPU when it
    #: works and NumPy otherwise, "off" always NumPy.
    device: str = "auto"
    #: BLAS threads per rank (0 = this node's cores divided by its ranks).
    threads: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    quadratic: QuadraticConfig = field(default_factory=QuadraticConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "config") -> Config:
        """Build from a nested mapping (as TOML gives it); unknown keys are errors."""
        cfg = cls()
        apply_mapping(cfg, values, source)
        return cfg

    @classmethod
    def from_toml(
        cls,
        path: str | os.PathLike | None = None,
        overrides: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
        base_toml: str | None = None,
    ) -> Config:
        """The one precedence rule, lowest first: defaults, ``base_toml`` (a resumed
        checkpoint's config), ``EASGD_*`` environment, the TOML file, then ``overrides``.

        Everything the user states for this launch wins over what the checkpoint recorded; the
        checkpoint wins over the defaults. ``overrides`` maps dotted keys (``"data.name"``) to
        values, or to strings as they come from ``--set key=value`` (parsed as TOML values,
        falling back to plain strings). Which layer set each key is kept for
        :meth:`changes_from`.
        """
        cfg = cls()
        layers = []
        if base_toml is not None:
            base = load_toml(base_toml, "the checkpoint's config")
            layers.append(("the checkpoint", lambda: apply_mapping(cfg, base, "checkpoint config")))
        env = os.environ if environ is None else environ
        layers.append(("the environment", lambda: _apply_environment(cfg, env)))
        if path is not None:
            layers.append((str(path), lambda: _apply_file(cfg, Path(path))))
        layers.append(
            (
                "--set",
                lambda: [
                    cfg.set(k, v, source="--set") or k.strip() for k, v in (overrides or {}).items()
                ],
            )
        )
        sources: dict[str, str] = {}
        given: dict[str, str] = {}
        for name, apply in layers:
            before = flatten(cfg.to_dict())
            keys = apply()
            after = flatten(cfg.to_dict())
            sources.update(
                {k: name for k in after.keys() | before.keys() if after.get(k) != before.get(k)}
            )
            if name != "the checkpoint":  # what this launch states, even where it equals the base
                given.update({k: name for k in keys or ()})
        cfg._sources = sources
        cfg._given = given
        cfg.validate()
        return cfg

    def changes_from(self, base_toml: str) -> list[str]:
        """What this config changes of a checkpoint's (``key old → new (where from)``), for the
        start-up line of a resumed run."""
        base_values = load_toml(base_toml, "the checkpoint's config")
        base = flatten(Config.from_dict(base_values, "checkpoint config").to_dict())
        mine = flatten(self.to_dict())
        sources = getattr(self, "_sources", {})
        return [
            f"{key} {show_value(base[key]) if key in base else 'unset'} → "
            f"{show_value(mine[key]) if key in mine else 'unset'}"
            f" ({sources.get(key, 'this launch')})"
            for key in sorted(base.keys() | mine.keys())
            if base.get(key) != mine.get(key)
        ]

    def given_keys(self) -> dict[str, str]:
        """The keys this launch states, each with where it came from (environment, file,
        ``--set``): for a config built in code, every key that differs from the default.
        On resume these win over the checkpoint's config (:meth:`over_checkpoint`)."""
        given = getattr(self, "_given", None)
        if given is not None:
            return dict(given)
        default, mine = flatten(Config().to_dict()), flatten(self.to_dict())
        return {
            k: "the script" for k in default.keys() | mine.keys() if default.get(k) != mine.get(k)
        }

    def over_checkpoint(self, base_toml: str) -> Config:
        """The config of a resumed run, by the one precedence rule (defaults < the checkpoint's
        config < environment < file < ``--set``): the checkpoint's config with the keys this
        launch states (:meth:`given_keys`) set over it. The CLI and ``train()`` both use it."""
        given = self.given_keys()
        merged = Config.from_toml(environ={}, base_toml=base_toml)
        mine = flatten(self.to_dict())
        nested: dict = {}
        for key in given.keys() & mine.keys():  # (a key left unset here has nothing to give)
            *parents, last = key.split(".")
            cursor = nested
            for part in parents:
                cursor = cursor.setdefault(part, {})
            cursor[last] = mine[key]
        apply_mapping(merged, nested, "this launch")
        merged._sources = {**merged._sources, **given}
        merged._given = given
        merged.validate()
        return merged

    def set(self, dotted_key: str, value: Any, source: str = "--set") -> None:
        """Set one key by its dotted name; strings are parsed as TOML values."""
        if isinstance(value, str):
            value = parse_value(value)
        parts = dotted_key.strip().split(".")
        nested: dict = {}
        cursor = nested
        for part in parts[:-1]:
            cursor = cursor.setdefault(part, {})
        cursor[parts[-1]] = value
        apply_mapping(self, nested, source)

    # ---- derived values -----------------------------------------------------------------
    @property
    def elastic_given(self) -> list[str]:
        """Which of rho / alpha / beta the user set (valid configs: at most one)."""
        return [k for k in ("rho", "alpha", "beta") if getattr(self, k) is not None]

    @property
    def elastic_key(self) -> str:
        """The one of rho / alpha / beta that sets α ("beta" when none was given)."""
        given = self.elastic_given
        return given[0] if given else "beta"

    def resolve_alpha(self, workers: int) -> float:
        """The moving rate α for ``workers`` workers (α = ηρ = β/p)."""
        key = self.elastic_key
        if key == "rho":
            return self.lr * self.rho
        if key == "alpha":
            return self.alpha
        beta = 0.9 if self.beta is None else self.beta
        return beta / workers

    def resolve_chunk(self, on_gpu: bool) -> int:
        """Floats per exchange transfer: ``chunk``, or the default of the worker's device."""
        if self.chunk:
            return self.chunk
        return GPU_CHUNK if on_gpu else CPU_CHUNK

    def resolve_beta(self, workers: int) -> float:
        return self.resolve_alpha(workers) * workers

    def resolve_center(self, key: str):
        """The value of a center key (:data:`CENTER_KEYS`) for this algorithm: as given, or
        the rule's default; None for an algorithm that does not use it."""
        value = getattr(self, key)
        if value is not None:
            return value
        return _CENTER_DEFAULTS[key].get(self.algorithm)

    @property
    def is_active(self) -> bool:
        """Whether the center computes (the servers apply the rule to pushed updates)."""
        return self.algorithm in ACTIVE_ALGORITHMS

    @property
    def keeps_velocity(self) -> bool:
        """Whether each worker of this run keeps a velocity v (checkpoints must store it)."""
        return self.algorithm in MOMENTUM_ALGORITHMS or (
            self.algorithm in (*OPTIONAL_MOMENTUM_ALGORITHMS, "async-diloco") and self.momentum > 0
        )

    @property
    def keeps_residual(self) -> bool:
        """Whether each worker keeps the residual of its compressed pushes (error feedback)."""
        return self.compress != "none" and self.error_feedback

    @property
    def state_rows(self) -> tuple[str, ...]:
        """The vectors each worker saves in a checkpoint: x, then v (a velocity) and/or pending
        (DOWNPOUR and its master-side variants: the update sum not yet pushed, with the buffers'
        base after the trainable part; async-diloco: the center it last pulled), then the
        residual of compressed pushes not yet carried to the center.
        """
        rows = ("x", "v") if self.keeps_velocity else ("x",)
        if self.algorithm in ("downpour", *ACTIVE_ALGORITHMS):
            rows += ("pending",)
        return (*rows, "residual") if self.keeps_residual else rows

    @property
    def center_rows(self) -> tuple[str, ...]:
        """The center-side vectors of the rule (momentum, Adagrad sums, moving average, outer
        optimizer state), stored in checkpoints next to the center."""
        return CENTER_ROWS.get(self.algorithm, ())

    # ---- validation ---------------------------------------------------------------------
    def validate(self, workers: int | None = None) -> Config:
        """Check types and ranges; with ``workers`` also the stability region. Returns self."""
        _check_choice("algorithm", self.algorithm, ALGORITHMS)
        _check_positive("lr", self.lr)
        given = self.elastic_given
        if len(given) > 1:
            raise ConfigError(
                f"config: give exactly one of rho, alpha, beta for the elastic strength "
                f"(got {', '.join(given)})"
            )
        for key in given:
            _check_positive(key, getattr(self, key))
        _check_int("tau", self.tau, low=1)
        if not (0.0 <= self.momentum < 1.0):
            raise ConfigError(f"config: momentum = {self.momentum} must be in [0, 1)")
        if self.algorithm == "downpour" and self.momentum != 0.0:
            raise ConfigError(
                f"config: momentum = {self.momentum} is not supported by algorithm 'downpour' "
                f"(it sums plain SGD updates; the paper's momentum variant keeps the velocity "
                f"on the master: algorithm = 'mdownpour'): set momentum = 0"
            )
        # mdownpour's momentum is the master's (the paper's δ); async-diloco's the workers'.
        with_momentum = (
            *MOMENTUM_ALGORITHMS,
            *OPTIONAL_MOMENTUM_ALGORITHMS,
            "mdownpour",
            "async-diloco",
        )
        if self.algorithm not in with_momentum and self.momentum != 0.0:
            raise ConfigError(
                f"config: momentum = {self.momentum} is not used by algorithm "
                f"'{self.algorithm}' (use {', '.join(with_momentum)} for momentum, "
                f"or set momentum = 0)"
            )
        self._validate_algorithm_keys(given)
        _check_int("batch_size", self.batch_size, low=1)
        _check_int("steps", self.steps, low=1)
        self._validate_schedule()
        if self.weight_decay < 0:
            raise ConfigError(f"config: weight_decay = {self.weight_decay} must be >= 0")
        _check_int("seed", self.seed, low=0)
        _check_positive("eval_interval", self.eval_interval)
        _check_choice("lock_mode", self.lock_mode, LOCK_MODES)
        _check_int("servers", self.servers, low=1)
        _check_choice("device", self.device, DEVICES)
        self._validate_compress()
        if self.chunk != 0:
            _check_int("chunk", self.chunk, low=1024)
        _check_int("threads", self.threads, low=0)
        if not self.output:
            raise ConfigError("config: output must name a folder")

        _check_choice("data.name", self.data.name, DATASETS)
        if not (0.0 < self.data.test_fraction < 1.0):
            raise ConfigError(
                f"config: data.test_fraction = {self.data.test_fraction} must be in (0, 1)"
            )
        _check_int("data.seed", self.data.seed, low=0)
        _check_int("data.samples", self.data.samples, low=10)
        _check_int("data.features", self.data.features, low=1)
        _check_int("data.classes", self.data.classes, low=2)
        _check_positive("data.separation", self.data.separation)
        if self.data.name in FILE_DATASETS and not self.data.path:
            what = {
                "file": "an .npz or HDF5 file with a feature array and an integer label array, "
                "see data.x_key / data.y_key",
                "cifar10": "the cifar-10-batches-py folder or the cifar-10-python.tar.gz archive",
                "mnist": "the folder holding the four MNIST IDX files, gzipped or not",
            }[self.data.name]
            raise ConfigError(f"config: data.name = '{self.data.name}' needs data.path ({what})")
        _check_int("data.crop", self.data.crop, low=0)

        _check_choice("model.name", self.model.name, MODELS)
        if not isinstance(self.model.hidden, list) or not all(
            isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in self.model.hidden
        ):
            raise ConfigError(
                f"config: model.hidden = {self.model.hidden!r} must be a list of positive "
                f"integers (layer widths), e.g. [64] or [128, 64]"
            )
        if self.model.name == "mlp" and not self.model.hidden:
            raise ConfigError(
                "config: model.hidden = [] gives model.name = 'mlp' no hidden layer: use "
                "model.name = 'softmax' for the model without one, or give layer widths, e.g. [64]"
            )
        _check_choice("model.activation", self.model.activation, ACTIVATIONS)
        _check_positive("model.init_scale", self.model.init_scale)
        _check_int("model.eval_batch", self.model.eval_batch, low=1)
        if self.model.name == "torch" and not self.model.factory:
            raise ConfigError(
                "config: model.name = 'torch' needs model.factory = 'module:function' (a "
                "function that takes the config and returns a torch.nn.Module)"
            )
        if self.model.factory and self.model.name != "torch":
            raise ConfigError(
                f"config: model.factory is only used with model.name = 'torch' (model.name is "
                f"'{self.model.name}')"
            )
        if self.model.name == "cifar-convnet" and self.data.name not in ("cifar10", "mnist"):
            raise ConfigError(
                f"config: model.name = 'cifar-convnet' needs image data (data.name = 'cifar10' "
                f"or 'mnist'), not '{self.data.name}'"
            )

        self._validate_synthetic_split()

        q = self.quadratic
        _check_int("quadratic.dim", q.dim, low=1)
        for key in ("curvature", "optimum", "start"):
            _check_vector(f"quadratic.{key}", getattr(q, key), q.dim)
        if any(h <= 0 for h in _as_list(q.curvature, q.dim)):
            raise ConfigError("config: quadratic.curvature must be > 0 everywhere")
        if q.noise < 0:
            raise ConfigError(f"config: quadratic.noise = {q.noise} must be >= 0")

        if self.checkpoint.interval < 0:
            raise ConfigError(
                f"config: checkpoint.interval = {self.checkpoint.interval} must be >= 0"
            )
        _check_int("checkpoint.keep", self.checkpoint.keep, low=1)
        wait = self.checkpoint.state_wait
        if not (isinstance(wait, (int, float)) and 0 < wait <= 600):
            raise ConfigError(
                f"config: checkpoint.state_wait = {wait} must be > 0 and <= 600 (seconds)"
            )

        if workers is not None:
            # The stability region (docs/STABILITY.md), as far as it can be known.
            if self.algorithm in ELASTIC_ALGORITHMS:
                check_elastic_stability(self, workers)
            else:
                check_local_stability(self)
            if self.algorithm in (*OUTER_ALGORITHMS, "mdownpour", "mvadownpour"):
                check_center_stability(self, workers)
        return self

    def _validate_schedule(self) -> None:
        """τ > steps cannot be meant: no exchange of the schedule would ever happen in the run.

        The elastic rules exchange at t ≡ 0 (mod τ), t = 0..steps − 1; with τ > steps only the
        exchange at t = 0 remains, where every worker still equals the center, so the center
        never moves. DOWNPOUR pushes after each τ-th step and all-reduce SGD mirrors the
        workers into the window every τ steps: with τ > steps both happen once, after the last
        step (τ = steps does the same, explicitly).
        """
        if self.tau <= self.steps:
            return
        pushes_once = (
            "each worker would push its updates to the center only once, after its last step"
        )
        why = {
            **{a: pushes_once for a in ("downpour", *ACTIVE_ALGORITHMS)},
            "localsgd": "the workers would average their parameters only once (after the last "
            "step; in your own loop, after the first, as PyTorch's PeriodicModelAverager does)",
            "diloco": "the workers would average their parameters only once, after the last step",
            "allreduce-sgd": "the master would see the workers' parameters only after the last "
            "step (tau = steps does that explicitly)",
        }.get(
            self.algorithm,
            "the only exchange would be the one at t = 0, when every worker still equals the "
            "center, so the center would never move",
        )
        raise ConfigError(
            f"config: tau = {self.tau} is larger than steps = {self.steps}: {why}; set tau <= steps"
        )

    def _validate_synthetic_split(self) -> None:
        """The synthetic set's size is known here: both splits must be usable.

        The same rounding as the split itself (data/builtin.py): round(samples × fraction) held
        out. The training split must hold a whole minibatch: the samplers would otherwise draw
        fewer than batch_size samples without saying so. (Other data sets are sized when they
        are read; see DataError.)
        """
        d = self.data
        if d.name != "synthetic" or self.model.name == "quadratic":
            return
        if d.samples < d.classes:
            raise ConfigError(
                f"config: data.samples = {d.samples} is fewer than data.classes = {d.classes}: "
                f"the synthetic set needs at least one sample per class"
            )
        n_test = int(round(d.samples * d.test_fraction))
        n_train = d.samples - n_test
        held = f"round(data.samples*data.test_fraction) = round({d.samples}*{d.test_fraction:g})"
        if n_test < 1:
            raise ConfigError(
                f"config: the synthetic set holds out {held} = {n_test} samples: the master "
                f"would have nothing to evaluate; raise data.samples or data.test_fraction"
            )
        if n_train < 1:
            raise ConfigError(
                f"config: the synthetic set holds out {held} = {n_test} of its {d.samples} "
                f"samples, leaving none to train on; lower data.test_fraction"
            )
        if n_train < self.batch_size:
            raise ConfigError(
                f"config: the synthetic set's training split has {n_train} samples "
                f"(data.samples = {d.samples} minus {held} = {n_test} held out), fewer than "
                f"batch_size = {self.batch_size}; lower batch_size or raise data.samples"
            )

    def _validate_compress(self) -> None:
        """Compression codes a difference pushed to the center; the synchronous rules push
        none (docs/ARCHITECTURE.md §2.16 says why their all-reduce is not compressed)."""
        _check_choice("compress", self.compress, COMPRESS)
        if self.compress != "none" and self.algorithm not in COMPRESS_ALGORITHMS:
            raise ConfigError(
                f"config: compress = '{self.compress}' cannot be used with algorithm = "
                f"'{self.algorithm}' (its workers average through an all-reduce, which sums "
                f"float32 and cannot add codes of different scales; compression applies to "
                f"{', '.join(COMPRESS_ALGORITHMS)}): set compress = 'none'"
            )
        if self.compress != "none" and self.is_active and self.push_lag:
            raise ConfigError(
                f"config: push_lag = {self.push_lag} cannot be used with compress = "
                f"'{self.compress}' (each worker's coded push waits in a slot of its own until "
                f"the center applied it, so the next push waits for it): set push_lag = 0 or "
                f"compress = 'none'"
            )
        if not self.error_feedback and self.compress == "none":
            raise ConfigError(
                "config: error_feedback = false only applies to compressed pushes (compress = "
                "'int8' or 'fp8'); with compress = 'none' nothing is lost: remove it"
            )

    def _validate_algorithm_keys(self, elastic_given: list[str]) -> None:
        """Keys that the chosen algorithm cannot use are errors, not silently ignored."""
        if self.algorithm not in ELASTIC_ALGORITHMS and elastic_given:
            raise ConfigError(
                f"config: {elastic_given[0]} is not used by algorithm '{self.algorithm}' "
                f"(no elastic force; rho/alpha/beta apply to {', '.join(ELASTIC_ALGORITHMS)}): "
                f"remove it"
            )
        self._validate_center_keys()
        if self.algorithm in SYNC_ALGORITHMS and self.lock_mode == "exclusive":
            raise ConfigError(
                f"config: lock_mode = 'exclusive' cannot be used with algorithm = "
                f"'{self.algorithm}' (the workers move together through an all-reduce and one "
                f"of them mirrors the center into the window; there is no read-modify-write to "
                f"lock): set lock_mode = 'shared'"
            )

    def _validate_center_keys(self) -> None:
        """The center's optimizer keys: only for the rules that use them, each in its range."""
        for key, users in CENTER_KEYS.items():
            if getattr(self, key) is not None and self.algorithm not in users:
                raise ConfigError(
                    f"config: {key} is not used by algorithm '{self.algorithm}' (only by "
                    f"{', '.join(users)}): remove it"
                )
        _check_int("push_lag", self.push_lag, low=0)
        if self.push_lag and not self.is_active:
            raise ConfigError(
                f"config: push_lag = {self.push_lag} is not used by algorithm "
                f"'{self.algorithm}' (its center does not compute; push_lag applies to "
                f"{', '.join(ACTIVE_ALGORITHMS)}): remove it"
            )
        if self.is_active and self.lock_mode == "exclusive":
            raise ConfigError(
                f"config: lock_mode = 'exclusive' cannot be used with algorithm = "
                f"'{self.algorithm}' (its servers apply the pushed updates themselves; no worker "
                f"reads, modifies and writes the center): set lock_mode = 'shared'"
            )
        lr, mom = self.resolve_center("outer_lr"), self.resolve_center("outer_momentum")
        if lr is not None:
            _check_positive("outer_lr", lr)
        if mom is not None and not (0.0 <= mom < 1.0):
            raise ConfigError(f"config: outer_momentum = {mom} must be in [0, 1)")
        eps = self.resolve_center("outer_eps")
        if eps is not None:
            _check_positive("outer_eps", eps)
        rate = self.resolve_center("moving_rate")
        if rate is not None and not (0.0 < rate <= 1.0):
            raise ConfigError(
                f"config: moving_rate = {rate} must be in (0, 1] (the weight of the newest "
                f"center in the moving average; 1 is plain DOWNPOUR)"
            )
        scale = self.resolve_center("staleness_scale")
        if scale is not None:
            _check_choice("staleness_scale", scale, STALENESS_SCALES)

    # ---- output -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Nested plain dict; keys left unset (None) are omitted."""
        return drop_none(dataclasses.asdict(self))

    def to_toml(self) -> str:
        """The resolved config as TOML text (what every run records)."""
        return dump_toml(self.to_dict())


# ---------------------------------------------------------------------------------------------
# Helpers


def _apply_environment(cfg: Config, environ: Mapping[str, str]) -> list[str]:
    """``EASGD_TAU=8``, ``EASGD_DATA__NAME=synthetic``: parsed as ``--set`` values are.
    Returns the keys set."""
    keys = []
    for key, value, name in environment_values(environ, dotted_keys(cfg)):
        cfg.set(key, value, source=f"environment variable {name}")
        keys.append(key)
    return keys


def _apply_file(cfg: Config, path: Path) -> list[str]:
    """A TOML config file's keys over ``cfg``; returns the keys it gives."""
    values = read_toml(path)
    apply_mapping(cfg, values, str(path))
    return list(flatten(values))


def _check_choice(key: str, value: str, choices) -> None:
    if value not in choices:
        hint = difflib.get_close_matches(str(value), choices, n=1)
        suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise ConfigError(
            f"config: {key} = '{value}' is not one of {', '.join(choices)}{suggestion}"
        )


def _check_positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"config: {key} = {value} must be > 0")


def _check_int(key: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"config: {key} = {value} must be >= {low}")


def _check_vector(key: str, value: Any, dim: int) -> None:
    if isinstance(value, list) and len(value) != dim:
        raise ConfigError(f"config: {key} has {len(value)} entries but quadratic.dim = {dim}")


def _as_list(value: Any, dim: int) -> list[float]:
    return list(value) if isinstance(value, list) else [float(value)] * dim
