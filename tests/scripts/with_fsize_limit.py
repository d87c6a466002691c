"""`easgd` under a file-size limit (RLIMIT_FSIZE), as a cluster's `ulimit -f` imposes it.

Usage: mpiexec -n P python with_fsize_limit.py BYTES train --set ...

The limit is set in each rank right after MPI has started: MPICH's and UCX's shared-memory files
(about 4.5 MB here) are made under the same limit, so a limit set on mpiexec itself would have
to exceed them, and the test would need checkpoints of many MB. SIGXFSZ is ignored (CPython
does it at start-up as well), so a write past the limit fails with EFBIG instead of killing.
"""

import resource
import signal
import sys

from mpi4py import MPI  # noqa: F401  (MPI_Init: its shared-memory files come first)

from easgd_mpi.cli import main

limit = int(sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.exit(main(sys.argv[2:]))
