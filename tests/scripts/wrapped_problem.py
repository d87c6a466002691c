"""The built-in problem wrapped, for the fault-injection scripts beside this file."""

import easgd_mpi as ea


class WrappedProblem:
    """Delegates everything to the built-in problem of the config; subclasses override what
    they want to break."""

    def __init__(self, cfg, xp):
        self.inner = ea.make_problem(cfg, xp)
        self.layout = self.inner.layout
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)
