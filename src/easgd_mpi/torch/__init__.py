"""Your own PyTorch training loop with elastic averaging (docs/ARCHITECTURE.md §8).

Every rank runs the script (``mpiexec -n 5 python my_train.py``, or ``srun``)::

    import easgd_mpi.torch as et

    run = et.init("my.toml")                 # rank 0 serves the center; the others are workers
    if run.serves:
        run.serve(evaluate=my_eval)          # returns when the workers are done
    else:
        model = Net().to(run.device)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=run.steps)
        elastic = et.ElasticAveraging(model, opt, run, schedulers=sched)
        loader = DataLoader(train_set, batch_size=128, sampler=run.sampler(train_set))
        for epoch in run.epochs():
            for x, y in loader:
                loss = F.cross_entropy(model(x.to(run.device)), y.to(run.device))
                opt.zero_grad(); loss.backward(); opt.step(); sched.step()
                elastic.step(loss=loss)      # every τ-th step: the exchange with the center
                if run.should_stop:          # SIGTERM/SIGUSR1, the master's stop, the budget
                    break
    center = run.finish()                    # the master: the center as a state_dict

The rules (``algorithm``): ``easgd`` (async EASGD; EAMSGD is it around SGD with Nesterov
momentum), ``sync-easgd``, ``localsgd`` (periodic model averaging). A complete example:
examples/own_loop.py.
"""

from .elastic import ElasticAveraging
from .run import CENTER_FILE, RESUME_VAR, Run, init
from .sampler import ElasticSampler

__all__ = ["init", "Run", "ElasticAveraging", "ElasticSampler", "CENTER_FILE", "RESUME_VAR"]
