"""The sampler of a user's own loop (easgd_mpi.torch.ElasticSampler): the workers' shares of an
epoch, reshuffled per epoch from the seed; its place in the epoch counted in steps (not in the
indices a DataLoader takes ahead), so a resumed epoch continues at the next unseen batch."""

import pytest

torch = pytest.importorskip("torch", reason="the torch extra is installed by `make test`")

from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from easgd_mpi.torch import ElasticSampler  # noqa: E402

N = 53
DATA = TensorDataset(torch.arange(N))


def order(sampler, epoch):
    sampler.set_epoch(epoch)
    return list(sampler)


def test_the_workers_share_each_epoch_and_it_is_reshuffled_from_the_seed():
    shares = [ElasticSampler(DATA, workers=3, worker=i, seed=4) for i in range(3)]
    for epoch in (0, 1):
        drawn = [order(s, epoch) for s in shares]
        assert [len(d) for d in drawn] == [18, 18, 18]  # padded to equal shares, as DDP's
        assert set().union(*map(set, drawn)) == set(range(N))
    again = ElasticSampler(DATA, workers=3, worker=1, seed=4)
    assert order(again, 1) == order(shares[1], 1) != order(shares[1], 0)
    assert order(ElasticSampler(DATA, workers=3, worker=1, seed=5), 1) != order(again, 1)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_resumed_epoch_continues_at_the_next_batch_not_taken_ahead(num_workers):
    sampler = ElasticSampler(DATA, workers=2, worker=0, seed=0)
    loader = DataLoader(DATA, batch_size=5, sampler=sampler, num_workers=num_workers)
    sampler.set_epoch(3)
    batches = [b[0].tolist() for b in loader]
    trained = iter(loader)  # a DataLoader with workers takes indices batches ahead
    for _ in range(3):
        next(trained)
        sampler.advance()  # what ElasticAveraging.step() does
    state = sampler.state_dict()
    assert state == {"epoch": 3, "position": 15}
    del trained

    resumed = ElasticSampler(DATA, workers=2, worker=0, seed=0)
    resumed.load_state_dict(state)
    resumed.set_epoch(3)  # what run.epochs() does: the same epoch goes on
    again = DataLoader(DATA, batch_size=5, sampler=resumed, num_workers=num_workers)
    assert [b[0].tolist() for b in again] == batches[3:]
    resumed.set_epoch(4)  # the next epoch starts at its beginning
    assert [b[0].tolist() for b in again][0] == [i for i in order(sampler, 4)[:5]]


def test_a_spent_epoch_is_followed_by_the_next_one():
    sampler = ElasticSampler(DATA, workers=2, worker=1, seed=0)
    loader = DataLoader(DATA, batch_size=9, sampler=sampler)
    for _ in loader:
        sampler.advance()
    assert sampler.spent and sampler.state_dict() == {"epoch": 0, "position": 27}
    second = [i for b in loader for i in b[0].tolist()]  # no set_epoch: a new shuffle
    assert sampler.epoch == 1
    assert second == order(ElasticSampler(DATA, workers=2, worker=1, seed=0), 1)
