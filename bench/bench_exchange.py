#!/usr/bin/env python3
"""Exchange throughput: the project's RMA exchange against three baselines, in one run.

Per worker, for each size n (float32 elements) and worker count p, measures exchanges/s and
GB/s (8n bytes per exchange: n floats read from the center, n floats added to it) of:

- ``easgd``: ``CenterWindow.exchange`` with the NumPy exchange kernel (what training does);
- ``rma-floor``: the same Get_accumulate(NO_OP) + Accumulate(SUM) calls on the same chunks,
  with no other work: the bare MPI floor of this protocol;
- ``sendrecv``: a parameter-server loop with buffer-based Send/Recv (the master serves);
- ``pickle``: the same server with mpi4py's pickle-based send/recv, as often written.

With ``--servers S`` (a list: ``1,2``) the center is cut into S slices on ranks 0..S−1, as
``servers = S`` does in training, and the workers are ranks S..S+p−1; the ``sendrecv`` and
``pickle`` baselines keep their single server (rank 0) while the other servers idle. The servers
other than rank 0 run ``comm.keep_progress`` (the training's test-and-sleep loop) during the RMA
methods; its CPU use, as a share of one core over the loop's wall time, is reported as
``server_cpu``.

Run it as a plain script: it launches ``mpiexec -n S+p`` (the one next to this Python) for each
server and worker count, prints a table with ratios against the baselines and writes JSON.

    python bench/bench_exchange.py [--sizes 1e5,1e6,5e6,2.5e7] [--workers 1,2,4] [--servers 1,2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

METHODS = ("easgd", "rma-floor", "sendrecv", "pickle", "fused-step", "local-step")
_TAG_REQ, _TAG_CENTER, _TAG_DIFF, _TAG_DONE = 11, 12, 13, 14


# ---------------------------------------------------------------------------------------------
# The MPI child: one world of S+p ranks, every method and size.


def child(args) -> None:
    from mpi4py import MPI

    from easgd_mpi.backend import NumpyBackend
    from easgd_mpi.center import CenterWindow
    from easgd_mpi.comm import keep_progress

    comm = MPI.COMM_WORLD
    servers = args.servers[0]
    rank, p = comm.Get_rank(), comm.Get_size() - servers
    worker = rank >= servers
    backend = NumpyBackend()
    results = []
    for n in args.sizes:
        x = np.random.default_rng(rank).standard_normal(n).astype(np.float32)
        g = np.random.default_rng(rank + 100).standard_normal(n).astype(np.float32)
        for method in METHODS:
            comm.Barrier()
            served = None
            if method == "local-step":  # the SGD step alone, no MPI: what training does anyway
                rate = _timed(lambda: backend.sgd_step(x, g, 1e-6, 0.0), args) if worker else None
                if worker:
                    comm.Ibarrier().Wait()
                else:
                    _idle_master(comm)
            elif method in ("easgd", "rma-floor", "fused-step"):
                window = CenterWindow(
                    comm,
                    n,
                    initial=np.zeros(n, np.float32) if rank == 0 else None,
                    chunk=args.chunk,
                    servers=servers,
                )
                if rank == 0:
                    _idle_master(comm)
                    rate = None
                elif not worker:
                    served = keep_progress(comm)  # the training's idle-server loop, measured
                    rate = None
                elif method == "easgd":
                    rate = _timed(
                        lambda: window.exchange(
                            lambda lo, hi, c, e: backend.exchange(x[lo:hi], c, e, 0.01)
                        ),
                        args,
                    )
                    comm.Ibarrier().Wait()
                elif method == "fused-step":  # the training step: exchange fused with SGD
                    rate = _timed(
                        lambda: window.exchange(
                            lambda lo, hi, c, e: backend.exchange_sgd_step(
                                x[lo:hi], c, g[lo:hi], e, 0.01, 1e-6, 0.0
                            )
                        ),
                        args,
                    )
                    comm.Ibarrier().Wait()
                else:
                    rate = _timed(lambda: _floor_exchange(window, MPI), args)
                    comm.Ibarrier().Wait()
                window.close()
            else:
                pickled = method == "pickle"
                rate = None
                if rank == 0:
                    _serve(comm, n, p, pickled, MPI)
                elif worker:
                    c = np.empty(n, np.float32)
                    e = np.empty(n, np.float32)
                    rate = _timed(lambda: _server_exchange(comm, x, c, e, pickled, backend), args)
                    comm.send(None, dest=0, tag=_TAG_DONE)
                _idle_master(comm)  # the other servers sit this baseline out without spinning
            rates = comm.gather((rate, served), root=0)
            if rank == 0:
                mean = float(np.mean([r for r, _ in rates[servers:]]))
                loops = [s for _, s in rates if s is not None]
                cpu = max((s["cpu_s"] / s["wall_s"] for s in loops), default=None)
                results.append(
                    {
                        "method": method,
                        "n": n,
                        "workers": p,
                        "servers": servers,
                        "exchanges_per_s": mean,
                        "gb_per_s": mean * 8 * n / 1e9,
                        "server_cpu": cpu,
                    }
                )
                print(
                    f"# S={servers} p={p} n={n:.0e} {method:10s} {mean:10.1f} exch/s "
                    f"{mean * 8 * n / 1e9:7.2f} GB/s"
                    + ("" if cpu is None else f"  server loop {cpu:.1%} of a core"),
                    file=sys.stderr,
                    flush=True,
                )
    if rank == 0:
        print(json.dumps(results), flush=True)


def _timed(exchange, args) -> float:
    exchange()  # warm-up: page faults, MPI connection set-up
    count, start = 0, time.perf_counter()
    while True:
        exchange()
        count += 1
        elapsed = time.perf_counter() - start
        if elapsed >= args.seconds and count >= args.min_reps:
            return count / elapsed


def _floor_exchange(window, MPI) -> None:
    """The same RMA calls on the same chunks of the same slices as CenterWindow.exchange,
    nothing else."""
    win, noop = window._win, window._noop_origin
    for sh in window._shards:
        c = sh.c[0]
        for lo, hi in sh.chunks:
            k = hi - lo
            where = (lo - sh.lo, k, MPI.FLOAT)
            win.Get_accumulate(noop[:k], c[:k], sh.target, target=where, op=MPI.NO_OP)
            win.Accumulate(c[:k], sh.target, target=where, op=MPI.SUM)
    for sh in window._shards:
        win.Flush(sh.target)


def _idle_master(comm) -> None:
    done = comm.Ibarrier()
    while not done.Test():
        time.sleep(0.001)


def _serve(comm, n, p, pickled, MPI) -> None:
    """A parameter server: answer each request with the center, then add the difference."""
    center = np.zeros(n, np.float32)
    diff = np.empty(n, np.float32)
    status = MPI.Status()
    finished = 0
    while finished < p:
        msg = comm.recv(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=status)
        src, tag = status.Get_source(), status.Get_tag()
        if tag == _TAG_DONE:
            finished += 1
            continue
        del msg
        if pickled:
            comm.send(center, dest=src, tag=_TAG_CENTER)
            center += comm.recv(source=src, tag=_TAG_DIFF)
        else:
            comm.Send(center, dest=src, tag=_TAG_CENTER)
            comm.Recv(diff, source=src, tag=_TAG_DIFF)
            center += diff


def _server_exchange(comm, x, c, e, pickled, backend) -> None:
    comm.send(None, dest=0, tag=_TAG_REQ)
    if pickled:
        c = comm.recv(source=0, tag=_TAG_CENTER)
        backend.exchange(x, c, e, 0.01)
        comm.send(e, dest=0, tag=_TAG_DIFF)
    else:
        comm.Recv(c, source=0, tag=_TAG_CENTER)
        backend.exchange(x, c, e, 0.01)
        comm.Send(e, dest=0, tag=_TAG_DIFF)


# ---------------------------------------------------------------------------------------------
# The driver: launch one world per worker count, print the table, write JSON.


def driver(args) -> int:
    mpiexec = Path(sys.executable).parent / "mpiexec"
    if not mpiexec.exists():
        mpiexec = Path("mpiexec")
    rows = []
    for servers in args.servers:
        for p in args.workers:
            cmd = [
                str(mpiexec),
                "-n",
                str(servers + p),
                sys.executable,
                __file__,
                "--child",
                "--sizes",
                ",".join(str(n) for n in args.sizes),
                "--seconds",
                str(args.seconds),
                "--min-reps",
                str(args.min_reps),
                "--chunk",
                str(args.chunk),
                "--servers",
                str(servers),
            ]
            print(f"running {servers} server(s), {p} worker(s)...", file=sys.stderr, flush=True)
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=args.timeout)
            if proc.returncode != 0:
                print(
                    f"bench_exchange: the MPI run with {servers} servers and {p} workers failed "
                    f"(exit {proc.returncode})",
                    file=sys.stderr,
                )
                return 1
            rows += json.loads(proc.stdout.strip().splitlines()[-1])
    table = _ratios(rows)
    _print_table(table)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "exchange",
                "unit": "per worker; 8n bytes per exchange",
                "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
                "mpi": _mpi_version(),
                "chunk": args.chunk,
                "servers": args.servers,
                "seconds": args.seconds,
                "rows": table,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")
    return 0


def _ratios(rows):
    by_key = {(r["method"], r["n"], r["workers"], r["servers"]): r for r in rows}
    table = []
    for r in rows:
        if r["method"] != "easgd":
            continue
        key = (r["n"], r["workers"], r["servers"])
        floor = by_key[("rma-floor", *key)]["gb_per_s"]
        # What exchanging adds to a training step: the fused exchange+SGD step minus the SGD
        # step alone (both per worker, measured under the same load).
        fused_s = 1.0 / by_key[("fused-step", *key)]["exchanges_per_s"]
        local_s = 1.0 / by_key[("local-step", *key)]["exchanges_per_s"]
        added_gbps = 8 * r["n"] / max(fused_s - local_s, 1e-12) / 1e9
        table.append(
            {
                "n": r["n"],
                "workers": r["workers"],
                "servers": r["servers"],
                **{f"{m}_gb_per_s": by_key[(m, *key)]["gb_per_s"] for m in METHODS},
                "easgd_exchanges_per_s": r["exchanges_per_s"],
                "vs_floor": r["gb_per_s"] / floor,
                "vs_sendrecv": r["gb_per_s"] / by_key[("sendrecv", *key)]["gb_per_s"],
                "vs_pickle": r["gb_per_s"] / by_key[("pickle", *key)]["gb_per_s"],
                "fused_step_s": fused_s,
                "local_step_s": local_s,
                "added_by_exchange_gb_per_s": added_gbps,
                "added_vs_floor": added_gbps / floor,
                # The busiest idle server's loop during the exchange, as a share of one core.
                "server_cpu": r["server_cpu"],
            }
        )
    return table


def _print_table(table) -> None:
    head = (
        f"{'n':>9} {'S':>2} {'p':>2} {'exch/s':>9} {'easgd':>7} {'floor':>7} {'sendrecv':>8} "
        f"{'pickle':>7} {'vs floor':>8} {'vs s/r':>7} {'vs pickle':>9} "
        f"{'step ms':>8} {'+exch ms':>8} {'added/floor':>11} {'srv cpu':>7}"
    )
    print("per-worker GB/s (8n bytes per exchange)")
    print(head)
    print("-" * len(head))
    for r in table:
        cpu = "-" if r["server_cpu"] is None else f"{r['server_cpu']:.1%}"
        print(
            f"{r['n']:>9.1e} {r['servers']:>2} {r['workers']:>2} "
            f"{r['easgd_exchanges_per_s']:>9.1f} "
            f"{r['easgd_gb_per_s']:>7.2f} {r['rma-floor_gb_per_s']:>7.2f} "
            f"{r['sendrecv_gb_per_s']:>8.2f} {r['pickle_gb_per_s']:>7.2f} "
            f"{r['vs_floor']:>8.2f} {r['vs_sendrecv']:>7.2f} {r['vs_pickle']:>9.2f} "
            f"{1e3 * r['local_step_s']:>8.2f} {1e3 * r['fused_step_s']:>8.2f} "
            f"{r['added_vs_floor']:>11.2f} {cpu:>7}"
        )


def _mpi_version() -> str:
    try:
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                "from mpi4py import MPI; print(MPI.Get_library_version().splitlines()[0])",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", default="1e5,1e6,5e6,2.5e7", help="comma-separated element counts"
    )
    parser.add_argument("--workers", default="1,2,4", help="comma-separated worker counts")
    parser.add_argument(
        "--servers", default="1", help="comma-separated server counts (ranks holding the center)"
    )
    parser.add_argument("--seconds", type=float, default=1.0, help="time per measurement")
    parser.add_argument("--min-reps", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=262144, help="floats per RMA transfer")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--json", default="bench/results/exchange.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.sizes = [int(float(s)) for s in args.sizes.split(",")]
    args.workers = [int(w) for w in args.workers.split(",")]
    args.servers = [int(s) for s in args.servers.split(",")]
    if any(s < 1 for s in args.servers):
        parser.error("--servers: every count must be >= 1")
    if args.child:
        child(args)
        return 0
    return driver(args)


if __name__ == "__main__":
    sys.exit(main())
