#!/usr/bin/env python3
"""A center that computes: what one server core sustains, and what its latency costs a worker.

For each rule, model size n and worker count p, one launch of ``mpiexec -n S+p`` runs the real
pieces of training (docs/ARCHITECTURE.md §3.11): the servers poll their inboxes and apply the
rule between the tests of the end-of-run barrier (``comm.keep_progress`` with
``CenterServer.poll``, the idle servers' loop in training); each worker pushes an update,
waits until the servers applied it (or all but ``--lag`` of its pushes), notes the counters and
pulls the center, ``--pushes`` times, after ``--work-ms`` of simulated local steps each time
(a sleep: the worker's compute, which leaves the core to the servers).

Reported per configuration: the worker's exchange rate and the share of its time spent waiting
for the center (what the center's loop costs a worker), the pushes one apply merged, and the
servers' apply time per apply and per float (what one core sustains: floats applied per
second of apply work).

    python bench/bench_center.py [--sizes 1e5,1e6] [--workers 1,3] [--rules mdownpour,async-diloco]
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

RULES = ("mdownpour", "adownpour", "mvadownpour", "async-diloco")


def child(args) -> None:
    from mpi4py import MPI

    from easgd_mpi.center import CenterWindow
    from easgd_mpi.center_server import SERVER_POLL, ActiveCenter
    from easgd_mpi.comm import keep_progress
    from easgd_mpi.config import Config

    comm = MPI.COMM_WORLD
    rank, servers = comm.Get_rank(), args.servers
    p, n = comm.Get_size() - servers, args.size
    cfg = Config()
    cfg.set("algorithm", args.rule)
    window = CenterWindow(
        comm,
        n,
        initial=np.zeros(n, np.float32) if rank == 0 else None,
        chunk=args.chunk,
        servers=servers,
    )
    active = ActiveCenter(cfg, window, p, n)
    comm.Barrier()
    if rank < servers:
        cpu = time.process_time()
        served = keep_progress(comm, poll=SERVER_POLL, work=active.server.poll)
        mine = {
            "rank": rank,
            "applies": active.server.applies,
            "busy_s": active.server.busy_s,
            "wall_s": served["wall_s"],
            "cpu_s": time.process_time() - cpu,
        }
    else:
        update = np.full(n, 1e-6, np.float32)
        center = np.empty(n, np.float32)
        waited, tickets = 0.0, None
        start = time.perf_counter()
        for _ in range(args.pushes):
            if args.work_ms:
                time.sleep(args.work_ms / 1e3)
            tickets = active.inbox.push(update)
            waited += active.inbox.wait_applied(tickets, args.lag)
            active.inbox.counters()
            window.read(center)
        waited += active.inbox.wait_applied(tickets, 0)
        elapsed = time.perf_counter() - start
        mine = {"rank": rank, "elapsed_s": elapsed, "wait_s": waited}
        comm.Ibarrier().Wait()
    everyone = comm.gather(mine, root=0)
    active.close()
    window.close()
    if rank == 0:
        srv = [e for e in everyone if "applies" in e]
        wrk = [e for e in everyone if "elapsed_s" in e]
        applies = sum(s["applies"] for s in srv) / len(srv)
        busy = max(s["busy_s"] for s in srv)
        result = {
            "rule": args.rule,
            "n": n,
            "workers": p,
            "servers": servers,
            "lag": args.lag,
            "work_ms": args.work_ms,
            "pushes_per_worker": args.pushes,
            "exchanges_per_s_per_worker": round(
                float(np.mean([args.pushes / w["elapsed_s"] for w in wrk])), 1
            ),
            "wait_share": round(float(np.mean([w["wait_s"] / w["elapsed_s"] for w in wrk])), 4),
            "wait_ms_per_push": round(
                1e3 * float(np.mean([w["wait_s"] / args.pushes for w in wrk])), 3
            ),
            "pushes_per_apply": round(p * args.pushes / max(applies, 1), 2),
            "apply_ms": round(1e3 * busy / max(applies, 1), 3),
            "floats_per_core_s": round(applies * (n / servers) / max(busy, 1e-9) / 1e6, 1),
            "server_cpu_share": round(max(s["cpu_s"] / s["wall_s"] for s in srv), 3),
        }
        print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1e5,1e6")
    ap.add_argument("--workers", default="1,3")
    ap.add_argument("--servers", default="1")
    ap.add_argument("--rules", default=",".join(RULES))
    ap.add_argument("--lags", default="0,1")
    ap.add_argument("--work-ms", default="0,5")
    ap.add_argument("--pushes", type=int, default=100)
    ap.add_argument("--chunk", type=int, default=1 << 18)
    ap.add_argument("--out", default="bench/results/center.json")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--size", type=int)
    ap.add_argument("--rule")
    ap.add_argument("--lag", type=int)
    args = ap.parse_args()
    if args.child:
        args.servers = int(args.servers)
        args.work_ms = float(args.work_ms)
        return child(args)
    sys.path.insert(0, str(Path(__file__).parent))
    from benchlib import cpu_name, launcher

    results = []
    for rule in args.rules.split(","):
        for n in (int(float(s)) for s in args.sizes.split(",")):
            for p in (int(w) for w in args.workers.split(",")):
                for s in (int(x) for x in args.servers.split(",")):
                    for lag in (int(x) for x in args.lags.split(",")):
                        for work in (float(x) for x in args.work_ms.split(",")):
                            cmd = [
                                launcher(),
                                "-n",
                                str(s + p),
                                sys.executable,
                                __file__,
                                "--child",
                                f"--size={n}",
                                f"--rule={rule}",
                                f"--servers={s}",
                                f"--lag={lag}",
                                f"--work-ms={work}",
                                f"--pushes={args.pushes}",
                                f"--chunk={args.chunk}",
                            ]
                            out = subprocess.run(
                                cmd, capture_output=True, text=True, timeout=900, env=os.environ
                            )
                            line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT")]
                            if not line:
                                raise SystemExit(out.stdout + out.stderr)
                            result = json.loads(line[0][len("RESULT ") :])
                            results.append(result)
                            print(json.dumps(result), flush=True)
    report = {
        "machine": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
        },
        "load_average_at_end": os.getloadavg(),
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
