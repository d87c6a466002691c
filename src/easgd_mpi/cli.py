"""The ``easgd`` command: train | check | inspect | export | plot.

Every subcommand is a thin layer over the public API. Errors caused by input print one line
and exit with code 2; any other exception on one rank aborts the whole MPI job.
"""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .comm import run_or_abort
from .errors import AgreedError, ConfigError, EasgdError

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="easgd",
        description="Elastic Averaging SGD on MPI (rank 0 = master; with servers = S, ranks "
        "0..S-1 hold the center in slices; the other ranks are the workers).",
    )
    parser.add_argument("--version", action="version", version=f"easgd-mpi {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = sub.add_parser(
        "train",
        help="train (launch with mpiexec -n P, P >= 2)",
        description="Train with the master/worker layout. Launch with `mpiexec -n P easgd "
        "train` or `srun`; P-S ranks become workers (S = servers, default 1).",
    )
    _config_options(train)
    train.add_argument(
        "--resume",
        metavar="PATH|auto",
        help="continue from a checkpoint file, the newest valid checkpoint of a run folder, "
        "or 'auto' (the newest valid one in run_dir; a fresh start if there is none). The "
        "checkpoint's config is the base; --config and --set override it",
    )
    train.add_argument("--quiet", "-q", action="store_true", help="no progress lines")
    train.set_defaults(func=_cmd_train)

    check = sub.add_parser(
        "check",
        help="print what each rank would use (MPI, GPU, CuPy, kernels)",
        description="Report MPI library and version, world size, GPU model and memory (or "
        "'no GPU'), CuPy version, CUDA-aware mode and whether the kernels compile, per rank, "
        "and with servers > 1 which slice of the center each server holds. Run it the way "
        "you run training: `mpiexec -n P easgd check [--config ...] [--set ...]`.",
    )
    _config_options(check)
    check.add_argument("--json", action="store_true", help="print JSON instead of text")
    check.set_defaults(func=_cmd_check)

    inspect = sub.add_parser(
        "inspect",
        help="summarize a checkpoint file (or a run folder's newest valid checkpoint)",
        description="Print a checkpoint's format version, config, algorithm and p, counters, "
        "each tensor (shape, norm, min/max), worker-to-center distances and the last metrics. "
        "A run folder stands for its newest valid checkpoint, as with `train --resume`.",
    )
    inspect.add_argument("file", metavar="FILE.h5|RUN_DIR")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text")
    inspect.set_defaults(func=_cmd_inspect)

    export = sub.add_parser(
        "export",
        help="write a checkpoint's center as a PyTorch state_dict (.pt) or arrays (.npz)",
        description="Write the center of a checkpoint (or of a run folder's newest valid "
        "checkpoint, as with `train --resume`), named as the model names its parameters and "
        "buffers: FILE.pt is a state_dict that model.load_state_dict(torch.load(FILE.pt, "
        "weights_only=True)) accepts (needs PyTorch); FILE.npz holds plain arrays.",
    )
    export.add_argument("file", metavar="CHECKPOINT.h5|RUN_DIR")
    export.add_argument("-o", "--output", required=True, metavar="OUT.pt|OUT.npz")
    export.set_defaults(func=_cmd_export)

    plot = sub.add_parser(
        "plot",
        help="plot runs' center error and loss against time and steps",
        description="Overlay runs (run folders or their metrics.jsonl): center test error and "
        "loss against wall time and against worker steps, labelled by algorithm and tau from "
        "each run's config.toml. One process, no MPI; needs matplotlib (the plot extra).",
    )
    plot.add_argument("runs", nargs="+", metavar="RUN_OR_METRICS")
    plot.add_argument(
        "-o",
        "--output",
        default="easgd-plot.png",
        metavar="FIG.png",
        help="image to write (default: easgd-plot.png)",
    )
    plot.add_argument("--title", help="figure title")
    plot.set_defaults(func=_cmd_plot)
    return parser


def _config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", metavar="FILE.toml", help="TOML config file")
    parser.add_argument(
        "--set",
        "-s",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key (dotted for tables: data.name=synthetic); repeatable",
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


def _parse_overrides(pairs: list[str]) -> dict:
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE, got '{pair}'")
        overrides[key.strip()] = value.strip()
    return overrides


def _bind_gpu_before_mpi(args) -> None:
    """Narrow CUDA_VISIBLE_DEVICES to this rank's GPU (none for the servers, the master among
    them) before mpi4py is imported: a CUDA-aware MPI opens a context on every visible GPU at
    MPI_Init. Opt out with EASGD_BIND_GPUS=0; never fails (src/easgd_mpi/gpu_binding.py)."""
    from .gpu_binding import bind_gpu  # noqa: PLC0415

    bind_gpu(servers=_servers_before_mpi(args))


def _servers_before_mpi(args) -> int | None:
    """The config's ``servers`` read without MPI (None when the config has an error: it is
    reported once MPI is up, on every rank)."""
    from .config import Config  # noqa: PLC0415  (imports nothing that starts MPI)

    try:
        return Config.from_toml(args.config, overrides=_parse_overrides(args.overrides)).servers
    except EasgdError:
        return None


def _cmd_train(args) -> int:
    _bind_gpu_before_mpi(args)  # run_or_abort imports mpi4py: this must come first
    from .log import console  # noqa: PLC0415

    console(quiet=args.quiet)

    def run() -> int:
        from .comm import agree_or_fail, rank_and_size, world_comm  # noqa: PLC0415
        from .config import Config  # noqa: PLC0415
        from .training import train  # noqa: PLC0415

        world = world_comm()
        size = rank_and_size(world)[1]
        # The launch's own config (file, environment, --set); on resume train() puts what it
        # states over the checkpoint's config, the same rule as for a script's train().
        cfg = agree_or_fail(
            world,
            lambda: Config.from_toml(args.config, overrides=_parse_overrides(args.overrides)),
        )
        try:
            train(cfg, comm=world, resume=args.resume)
        except EasgdError as exc:
            if size < 2:
                raise AgreedError(str(exc)) from None
            raise
        return 0

    return run_or_abort(run)


def _cmd_inspect(args) -> int:
    import json  # noqa: PLC0415

    from .checkpoint import format_summary, summarize  # noqa: PLC0415
    from .export import read_checkpoint  # noqa: PLC0415
    from .log import console  # noqa: PLC0415

    console(notes_to_stderr=True)  # a damaged checkpoint skipped: a note beside the result
    try:
        path, data = read_checkpoint(args.file)
        summary = summarize(data, path)
    except EasgdError as exc:
        sys.stderr.write(f"easgd: error: {exc}\n")
        return exc.exit_code
    _print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


def _cmd_export(args) -> int:
    from .export import export_checkpoint  # noqa: PLC0415
    from .log import console  # noqa: PLC0415

    console(notes_to_stderr=True)  # a damaged checkpoint skipped: a note beside the result
    try:
        path = export_checkpoint(args.file, args.output)
    except EasgdError as exc:
        sys.stderr.write(f"easgd: error: {exc}\n")
        return exc.exit_code
    _print(f"wrote {path}")
    return 0


def _cmd_plot(args) -> int:
    from .plot import plot_runs  # noqa: PLC0415  (matplotlib only when plotting)

    try:
        path = plot_runs(args.runs, args.output, title=args.title)
    except EasgdError as exc:
        sys.stderr.write(f"easgd: error: {exc}\n")
        return exc.exit_code
    print(f"wrote {path}")
    return 0


def _cmd_check(args) -> int:
    _bind_gpu_before_mpi(args)  # as `easgd train` does, so the report shows what training gets

    def run() -> int:
        import json  # noqa: PLC0415
        import os  # noqa: PLC0415

        from .comm import (  # noqa: PLC0415
            agree_or_fail,
            check_layout,
            cuda_mpi_mode,
            gather_to_master,
            rank_and_size,
            world_comm,
        )
        from .config import Config  # noqa: PLC0415
        from .diagnostics import center_slices, describe_rank, format_report  # noqa: PLC0415
        from .gpu_binding import RECORD_VAR  # noqa: PLC0415

        world = world_comm()
        rank, size = rank_and_size(world)
        agree_or_fail(world, cuda_mpi_mode)  # a bad EASGD_CUDA_MPI: one line per rank, exit 2
        cfg = agree_or_fail(
            world,
            lambda: Config.from_toml(args.config, overrides=_parse_overrides(args.overrides)),
        )
        if size > 1:  # one rank alone is reported as it is (no training layout)
            agree_or_fail(world, lambda: check_layout(size, cfg.servers))
        info = describe_rank(world, servers=cfg.servers)
        info["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")  # None: unset
        info["gpu_binding"] = os.environ.get(RECORD_VAR, "")
        infos = gather_to_master(world, info)
        if infos is not None:
            slices = center_slices(cfg, infos)
            text = json.dumps(infos, indent=2) if args.json else format_report(infos, slices)
            print(text, flush=True)
        return 0

    return run_or_abort(run)


def _print(text: str) -> None:
    """Print, tolerating a closed pipe (``easgd inspect FILE | head``)."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        sys.stdout = None  # nothing more can be written; avoid a second error at exit


# Last: `python -m easgd_mpi.cli` runs main() here, so everything it calls must be defined.
if __name__ == "__main__":
    sys.exit(main())
