"""A user's own loop that uses the API wrongly in one way, as the CLI tests launch it:

    mpiexec -n P python own_loop_misuse.py CASE RUN_DIR

Cases: ``no-serves-check`` (every rank builds a model and binds it, the master too),
``serve-everywhere`` (every rank serves), ``epochs-before-binding``, ``finish-before-binding``,
``models-differ`` (the second worker's model is wider), ``half-parameters`` (float16
parameters), ``added-after-binding`` (a layer added after binding), ``step-after-stop`` (steps
after run.should_stop), ``no-finish`` (a worker ends without run.finish()).
"""

import sys

import torch
import torch.nn.functional as F

import easgd_mpi.torch as et

CASE, RUN_DIR = sys.argv[1], sys.argv[2]


def build(hidden=8):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(4, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 2)
    )


def train(run, model, opt, elastic, steps=None):
    g = torch.Generator().manual_seed(0)
    done = 0
    while steps is not None or not run.should_stop:
        if steps is not None and done == steps:
            break
        x, y = torch.randn(8, 4, generator=g), torch.randint(0, 2, (8,), generator=g)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        elastic.step(loss=loss)
        done += 1


run = et.init({"run_dir": RUN_DIR, "steps": 20, "tau": 2, "eval_interval": 0.1})

if CASE == "no-serves-check":
    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    elastic = et.ElasticAveraging(model, opt, run)
elif CASE == "serve-everywhere":
    run.serve()
elif run.serves:
    run.serve()
elif CASE == "epochs-before-binding":
    for _ in run.epochs():
        pass
elif CASE == "finish-before-binding":
    run.finish()
else:
    model = build(16 if CASE == "models-differ" and run.worker == 1 else 8)
    if CASE == "half-parameters":
        model = model.half()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    elastic = et.ElasticAveraging(model, opt, run)
    if CASE == "added-after-binding":
        train(run, model, opt, elastic, steps=3)
        model.append(torch.nn.Linear(2, 2))  # a parameter the flat buffer does not hold
    if CASE == "step-after-stop":
        train(run, model, opt, elastic)
        train(run, model, opt, elastic, steps=1)
    train(run, model, opt, elastic)
    if CASE == "no-finish":
        sys.exit(0)  # the others would wait for this worker forever
run.finish()
