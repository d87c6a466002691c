"""The ``easgd`` command: train | check | inspect | plot.

Every subcommand is a thin layer over the public API. Errors caused by input print one line
and exit with code 2; any other exception on one rank aborts the whole MPI job.
"""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .comm import AgreedError, run_or_abort
from .errors import ConfigError, EasgdError

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="easgd", description="Elastic Averaging SGD on MPI (rank 0 = master, 1..p = workers)."
    )
    parser.add_argument("--version", action="version", version=f"easgd-mpi {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = sub.add_parser(
        "train", help="train (launch with mpiexec -n P, P >= 2)",
        description="Train with the master/worker layout. Launch with `mpiexec -n P easgd "
        "train` or `srun`; P-1 ranks become workers.",
    )
    train.add_argument("--config", "-c", metavar="FILE.toml", help="TOML config file")
    train.add_argument(
        "--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one config key (dotted for tables: data.name=synthetic); repeatable",
    )
    train.add_argument("--quiet", "-q", action="store_true", help="no progress lines")
    train.set_defaults(func=_cmd_train)

    check = sub.add_parser(
        "check", help="print what each rank would use (MPI, GPU, CuPy, kernels)",
        description="Report MPI library and version, world size, GPU model and memory (or "
        "'no GPU'), CuPy version, CUDA-aware mode and whether the kernels compile, per rank. "
        "Run it the way you run training: `mpiexec -n P easgd check`.",
    )
    check.add_argument("--json", action="store_true", help="print JSON instead of text")
    check.set_defaults(func=_cmd_check)
    return parser


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


def _cmd_train(args) -> int:
    def run() -> int:
        from mpi4py import MPI  # noqa: PLC0415

        from .comm import agree_or_fail  # noqa: PLC0415
        from .config import Config  # noqa: PLC0415
        from .training import train  # noqa: PLC0415

        world = MPI.COMM_WORLD

        def load():
            return Config.from_toml(args.config, overrides=_parse_overrides(args.overrides))

        if world.Get_size() < 2:
            cfg = load()  # a config error is the more useful message, so it goes first
        else:
            cfg = agree_or_fail(world, load)
        out = (lambda line: None) if args.quiet else (lambda line: print(line, flush=True))
        try:
            train(cfg, comm=world, out=out)
        except EasgdError as exc:
            if world.Get_size() < 2:
                raise AgreedError(str(exc)) from None
            raise
        return 0

    return run_or_abort(run)


def _cmd_check(args) -> int:
    def run() -> int:
        import json  # noqa: PLC0415

        from mpi4py import MPI  # noqa: PLC0415

        from .diagnostics import describe_rank, format_report  # noqa: PLC0415

        world = MPI.COMM_WORLD
        infos = world.gather(describe_rank(world), root=0)
        if world.Get_rank() == 0:
            print(json.dumps(infos, indent=2) if args.json else format_report(infos), flush=True)
        return 0

    return run_or_abort(run)


if __name__ == "__main__":
    sys.exit(main())
