"""``ea.train`` from a user's script, launched as users launch one (``mpiexec -n P python
api_train.py [--resume SPEC] [--log MODE] KEY=VALUE ...``): the keys are the script's own
config, built in code; ``--log`` picks what the script does with the ``easgd_mpi`` logger:
``none`` (nothing configured: the package's console), ``quiet`` (level WARNING) or ``format``
(the script's own handler and format on stdout)."""

import logging
import sys

import easgd_mpi as ea


def main() -> int:
    args = sys.argv[1:]
    resume, log = None, "none"
    pairs = []
    while args:
        head = args.pop(0)
        if head == "--resume":
            resume = args.pop(0)
        elif head == "--log":
            log = args.pop(0)
        else:
            pairs.append(head)
    if log == "quiet":
        logging.getLogger("easgd_mpi").setLevel(logging.WARNING)
    elif log == "format":
        logging.basicConfig(
            stream=sys.stdout, level=logging.INFO, format="MINE %(name)s %(message)s"
        )
    cfg = ea.Config()  # built in code: every key that differs from the default is stated
    for pair in pairs:
        key, _, value = pair.partition("=")
        cfg.set(key, value, source="the script")
    ea.train(cfg, resume=resume)
    return 0


ea.run(main)
