"""Configuration: one dataclass, defaults, TOML files, environment, CLI overrides, validation.

Precedence (DESIGN.md §7): ``--set`` on the command line > config file > ``EASGD_*`` environment
variables > defaults. Every key is documented in README.md ("Config reference").

The elastic strength is given as exactly one of ``rho`` (α = ηρ), ``alpha`` or ``beta``
(α = β/p); which one the user chose is kept, because α can only be resolved once the number of
workers p is known at launch.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .center import LOCK_MODES
from .errors import ConfigError

__all__ = [
    "Config",
    "DataConfig",
    "ModelConfig",
    "QuadraticConfig",
    "CheckpointConfig",
    "ALGORITHMS",
    "ASYNC_ALGORITHMS",
    "SYNC_ALGORITHMS",
    "ELASTIC_ALGORITHMS",
    "MOMENTUM_ALGORITHMS",
    "OPTIONAL_MOMENTUM_ALGORITHMS",
    "TORCH_MODELS",
]

#: Algorithms the worker loop knows (DESIGN.md §2).
ALGORITHMS = ("easgd", "eamsgd", "sync-easgd", "downpour", "allreduce-sgd")
#: Algorithms that exchange through the RMA window without a collective.
ASYNC_ALGORITHMS = ("easgd", "eamsgd", "downpour")
#: Algorithms whose workers move in lockstep through an all-reduce among the workers.
SYNC_ALGORITHMS = ("sync-easgd", "allreduce-sgd")
#: Algorithms with an elastic force, i.e. that use rho / alpha / beta.
ELASTIC_ALGORITHMS = ("easgd", "eamsgd", "sync-easgd")
#: Algorithms that keep a velocity v per worker.
MOMENTUM_ALGORITHMS = ("eamsgd",)
#: Algorithms that keep a velocity (Nesterov) only when momentum > 0; see Config.keeps_velocity.
OPTIONAL_MOMENTUM_ALGORITHMS = ("sync-easgd", "allreduce-sgd")

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
    #: Floats per RMA transfer in the pipelined exchange.
    chunk: int = 262144
    #: Use a GPU on workers that have one ("auto") or never ("off").
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
        _apply_mapping(cfg, values, source, prefix="")
        return cfg

    @classmethod
    def from_toml(
        cls,
        path: str | os.PathLike | None = None,
        overrides: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
        base_toml: str | None = None,
    ) -> Config:
        """Defaults, then ``EASGD_*`` environment, then ``base_toml`` (a resumed checkpoint's
        config), then the TOML file, then ``overrides``.

        ``overrides`` maps dotted keys (``"data.name"``) to values, or to strings as they come
        from ``--set key=value`` (parsed as TOML values, falling back to plain strings).
        """
        cfg = cls()
        _apply_environment(cfg, os.environ if environ is None else environ)
        if base_toml is not None:
            try:
                _apply_mapping(cfg, tomllib.loads(base_toml), "checkpoint config", prefix="")
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"the checkpoint's config is not valid TOML: {exc}") from None
        if path is not None:
            _apply_mapping(cfg, _read_toml(Path(path)), str(path), prefix="")
        for key, value in (overrides or {}).items():
            cfg.set(key, value, source="--set")
        cfg.validate()
        return cfg

    def set(self, dotted_key: str, value: Any, source: str = "--set") -> None:
        """Set one key by its dotted name; strings are parsed as TOML values."""
        if isinstance(value, str):
            value = _parse_value(value)
        parts = dotted_key.strip().split(".")
        nested: dict = {}
        cursor = nested
        for part in parts[:-1]:
            cursor = cursor.setdefault(part, {})
        cursor[parts[-1]] = value
        _apply_mapping(self, nested, source, prefix="")

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

    def resolve_beta(self, workers: int) -> float:
        return self.resolve_alpha(workers) * workers

    @property
    def keeps_velocity(self) -> bool:
        """Whether each worker of this run keeps a velocity v (checkpoints must store it)."""
        return self.algorithm in MOMENTUM_ALGORITHMS or (
            self.algorithm in OPTIONAL_MOMENTUM_ALGORITHMS and self.momentum > 0
        )

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
                f"on the master, which is not implemented): set momentum = 0"
            )
        with_momentum = MOMENTUM_ALGORITHMS + OPTIONAL_MOMENTUM_ALGORITHMS
        if self.algorithm not in with_momentum and self.momentum != 0.0:
            raise ConfigError(
                f"config: momentum = {self.momentum} is not used by algorithm "
                f"'{self.algorithm}' (use {', '.join(with_momentum)} for momentum, "
                f"or set momentum = 0)"
            )
        self._validate_algorithm_keys(given)
        _check_int("batch_size", self.batch_size, low=1)
        _check_int("steps", self.steps, low=1)
        if self.weight_decay < 0:
            raise ConfigError(f"config: weight_decay = {self.weight_decay} must be >= 0")
        _check_int("seed", self.seed, low=0)
        _check_positive("eval_interval", self.eval_interval)
        _check_choice("lock_mode", self.lock_mode, LOCK_MODES)
        _check_choice("device", self.device, ("auto", "off"))
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

        if workers is not None:
            self._validate_stability(workers)
        return self

    def _validate_algorithm_keys(self, elastic_given: list[str]) -> None:
        """Keys that the chosen algorithm cannot use are errors, not silently ignored."""
        if self.algorithm not in ELASTIC_ALGORITHMS and elastic_given:
            raise ConfigError(
                f"config: {elastic_given[0]} is not used by algorithm '{self.algorithm}' "
                f"(no elastic force; rho/alpha/beta apply to {', '.join(ELASTIC_ALGORITHMS)}): "
                f"remove it"
            )
        if self.algorithm in SYNC_ALGORITHMS and self.lock_mode == "exclusive":
            raise ConfigError(
                f"config: lock_mode = 'exclusive' cannot be used with algorithm = "
                f"'{self.algorithm}' (the workers move together through an all-reduce and one "
                f"of them mirrors the center into the window; there is no read-modify-write to "
                f"lock): set lock_mode = 'shared'"
            )

    def _validate_stability(self, workers: int) -> None:
        """The paper's stability region (DESIGN.md §2), as far as it can be known here."""
        if self.algorithm not in ELASTIC_ALGORITHMS:
            self._validate_sgd_stability()
            return
        alpha = self.resolve_alpha(workers)
        how = {
            "rho": f"alpha = lr*rho = {self.lr}*{self.rho}",
            "alpha": "alpha",
            "beta": f"alpha = beta/p = {self.resolve_beta(workers):g}/{workers}",
        }[self.elastic_key]
        if self.elastic_key == "beta":
            beta = self.resolve_beta(workers)
            if not (0.0 < beta < 2.0):
                raise ConfigError(
                    f"config: beta = {beta:g} is outside the stable range 0 < beta < 2"
                )
        elif self.algorithm == "sync-easgd":
            # The sync center update x̃ ← (1 − β)x̃ + β·mean(x^i) needs |1 − β| < 1.
            beta = self.resolve_beta(workers)
            if not (0.0 < beta < 2.0):
                raise ConfigError(
                    f"config: beta = p*alpha = {workers}*{alpha:g} = {beta:g} (from {how}) is "
                    f"outside the stable range 0 < beta < 2 of sync-easgd's center update"
                )
        # Without knowing the curvature, ηh → 0 gives the loosest bound: 0 < α ≤ 1.
        if not (0.0 < alpha <= 1.0):
            raise ConfigError(
                f"config: {how} = {alpha:g} is outside the stability region 0 < alpha <= 1"
            )
        eta_h = self._validate_sgd_stability()
        if eta_h is not None:
            bound = (4.0 - 2.0 * eta_h) / (4.0 - eta_h)
            if alpha > bound + 1e-12:
                raise ConfigError(
                    f"config: {how} = {alpha:g} is outside the stability region "
                    f"alpha <= (4 - 2*lr*h)/(4 - lr*h) = {bound:.4g} for lr*h = {eta_h:g}"
                )

    def _validate_sgd_stability(self) -> float | None:
        """Plain gradient descent on the quadratic needs ηh ≤ 2; returns ηh (None: no h)."""
        if self.model.name != "quadratic":
            return None
        h_max = max(_as_list(self.quadratic.curvature, self.quadratic.dim))
        eta_h = self.lr * h_max
        if eta_h > 2.0:
            raise ConfigError(
                f"config: lr*h = {self.lr}*{h_max:g} = {eta_h:g} is outside the stability "
                f"region lr*h <= 2 (h = largest quadratic.curvature)"
            )
        return eta_h

    # ---- output -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Nested plain dict; keys left unset (None) are omitted."""
        return _drop_none(dataclasses.asdict(self))

    def to_toml(self) -> str:
        """The resolved config as TOML text (what every run records)."""
        return _dump_toml(self.to_dict())


# ---------------------------------------------------------------------------------------------
# Loading helpers


def _read_toml(path: Path) -> dict:
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    try:
        return tomllib.loads(text.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _apply_environment(cfg: Config, environ: Mapping[str, str]) -> None:
    """``EASGD_TAU=8``, ``EASGD_DATA__NAME=synthetic``; other EASGD_* variables are not keys."""
    known = set(_all_keys(cfg))
    for name, value in sorted(environ.items()):
        if not name.startswith("EASGD_"):
            continue
        key = name[len("EASGD_") :].lower().replace("__", ".")
        if key in known:
            cfg.set(key, value, source=f"environment variable {name}")


def _all_keys(obj, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            keys.extend(_all_keys(value, prefix + f.name + "."))
        else:
            keys.append(prefix + f.name)
    return keys


def _apply_mapping(obj, values: Mapping[str, Any], source: str, prefix: str) -> None:
    by_name = {f.name: f for f in fields(obj)}
    for key, value in values.items():
        full = prefix + key
        if key not in by_name:
            candidates = [prefix + n for n in by_name]
            hint = difflib.get_close_matches(full, candidates + _all_keys(Config()), n=1)
            suggestion = f"; did you mean '{hint[0]}'?" if hint else ""
            raise ConfigError(f"{source}: unknown key '{full}'{suggestion}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source}: '{full}' must be a table of keys, not {value!r}")
            _apply_mapping(current, value, source, prefix=full + ".")
        else:
            setattr(obj, key, _coerce(full, by_name[key], value, source))


def _coerce(full: str, f: dataclasses.Field, value: Any, source: str) -> Any:
    """Check a value against the field's declared type; ints are accepted for floats."""
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))

    def bad(expected: str):
        return ConfigError(f"{source}: '{full}' must be {expected}, got {value!r}")

    if kind in ("float", "float | None"):
        if value is None and kind.endswith("None"):
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        if not math.isfinite(value):
            raise bad("a finite number")
        return float(value)
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if kind == "list":
        if not isinstance(value, list):
            raise bad("a list")
        return value
    if kind == "Any":  # number or list of numbers
        items = value if isinstance(value, list) else [value]
        if not items or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in items):
            raise bad("a number or a list of numbers")
        return [float(v) for v in value] if isinstance(value, list) else float(value)
    raise AssertionError(f"unhandled config type {kind} for {full}")


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


# ---------------------------------------------------------------------------------------------
# TOML output (the config only holds tables, numbers, strings and lists of numbers)


def _drop_none(d: dict) -> dict:
    return {k: (_drop_none(v) if isinstance(v, dict) else v) for k, v in d.items() if v is not None}


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def _dump_toml(d: dict) -> str:
    lines = [f"{k} = {_toml_value(v)}" for k, v in d.items() if not isinstance(v, dict)]
    for k, v in d.items():
        if isinstance(v, dict):
            lines.append("")
            lines.append(f"[{k}]")
            lines.extend(f"{kk} = {_toml_value(vv)}" for kk, vv in v.items())
    return "\n".join(lines) + "\n"
