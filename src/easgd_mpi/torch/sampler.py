"""The sampler of a user's own loop: PyTorch's ``DistributedSampler`` over the *workers* (the
master and the other servers hold no data), reshuffled every epoch from the run's seed, whose
place in the epoch is part of the worker's saved state (docs/ARCHITECTURE.md §8.4).

Its place is counted in steps, not in indices handed out: a ``DataLoader`` with worker
processes takes indices several batches ahead of the step that trains on them. Each step
(``ElasticAveraging.step``) consumes one batch; the batch size is the one of the
``BatchSampler`` that iterates this sampler (the ``DataLoader``'s, seen when it starts an
epoch), ``batch_size`` when given, else 1 (a loop that iterates the sampler itself, one index
per step). A resumed epoch skips the samples its saved state had consumed.
"""

from __future__ import annotations

import sys

from torch.utils.data import BatchSampler, DistributedSampler

__all__ = ["ElasticSampler"]


class ElasticSampler(DistributedSampler):
    """``DistributedSampler(dataset, num_replicas=p, rank=worker, seed=cfg.seed)``, which
    also knows how far into its epoch the training is."""

    def __init__(
        self,
        dataset,
        workers: int,
        worker: int,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = False,
        batch_size: int | None = None,
    ):
        super().__init__(
            dataset,
            num_replicas=workers,
            rank=worker,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
        )
        self._given_batch = batch_size
        self._batch = batch_size or 1
        self._start = 0  # samples of this epoch consumed before the steps counted below
        self._steps = 0  # steps (batches) trained on in this epoch

    @property
    def position(self) -> int:
        """Samples of this worker's share of the epoch trained on so far."""
        return min(self.num_samples, self._start + self._steps * self._batch)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` (a new one starts at its beginning; the epoch a resumed worker
        stopped in continues where it stopped)."""
        if epoch != self.epoch:
            self._start = self._steps = 0
        super().set_epoch(epoch)

    def __iter__(self):
        caller = sys._getframe(1).f_locals.get("self")  # the BatchSampler that batches us
        if self._given_batch is None:
            self._batch = caller.batch_size if isinstance(caller, BatchSampler) else 1
        if self.position >= self.num_samples > 0:
            # This epoch is spent (a loop that does not call set_epoch): the next one, shuffled
            # anew, as DistributedSampler's user would want (it would repeat the order).
            self.set_epoch(self.epoch + 1)
        indices = list(super().__iter__())
        # An epoch begins (again): what was trained on stays counted, the rest is handed out.
        self._start, self._steps = self.position, 0
        return iter(indices[self._start :])

    @property
    def spent(self) -> bool:
        """Whether every sample of this epoch has been trained on."""
        return self.position >= self.num_samples

    def advance(self) -> None:
        """One step has trained on one batch."""
        self._steps += 1

    def state_dict(self) -> dict:
        return {"epoch": int(self.epoch), "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        super().set_epoch(int(state["epoch"]))
        self._start, self._steps = int(state["position"]), 0
