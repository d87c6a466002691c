"""Your own PyTorch training loop with elastic averaging: easgd-mpi around the loop you write.

    mpiexec -n 5 python examples/own_loop.py                    # rank 0 serves, 4 workers
    mpiexec -n 5 python examples/own_loop.py --resume auto --set run_dir=runs/digits
    mpiexec -n 5 python examples/own_loop.py --set algorithm=sync-easgd --set tau=8

Every rank runs this script. Rank 0 holds the center and evaluates it with the function below;
the other ranks train with an ordinary PyTorch loop: a small residual network, AdamW with a
one-cycle schedule, gradient clipping, bf16 autocast (on the CPU, and on the GPU of a worker
that has one), a DataLoader with worker processes over ``run.sampler`` (each worker its share
of every epoch). ``elastic.step()`` after each optimizer step makes every τ-th step an elastic
exchange with the center. The master checkpoints everything, each worker's optimizer,
schedule, sampler position and scaler included, every ``checkpoint.interval`` seconds and at
the end; SIGTERM or SIGUSR1 (Slurm's warning) stops the run with a final checkpoint
(``PREEMPTED``, exit 0), and ``--resume auto`` continues it exactly where it was.

The data: scikit-learn's 8×8 handwritten digits (shipped with it), as 1×8×8 images.
"""

import argparse

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import easgd_mpi.torch as et
from easgd_mpi.config import DataConfig
from easgd_mpi.data import load_dataset


class Block(torch.nn.Module):
    """conv-BN-ReLU-conv-BN plus the input: the residual unit."""

    def __init__(self, channels):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(channels)
        self.conv2 = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(channels)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(y)))


class ResNet(torch.nn.Module):
    def __init__(self, channels=16, classes=10):
        super().__init__()
        self.stem = torch.nn.Sequential(
            torch.nn.Conv2d(1, channels, 3, padding=1, bias=False),
            torch.nn.BatchNorm2d(channels),
            torch.nn.ReLU(),
        )
        self.blocks = torch.nn.Sequential(Block(channels), Block(channels))
        self.head = torch.nn.Linear(channels, classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.head(x.mean(dim=(2, 3)))


def digits():
    data = load_dataset(DataConfig(name="digits"))
    images = lambda x: torch.from_numpy(x).reshape(-1, 1, 8, 8)  # noqa: E731
    train = TensorDataset(images(data.x_train), torch.from_numpy(data.y_train))
    test = (images(data.x_test), torch.from_numpy(data.y_test))
    return train, test


def build_model(seed):
    torch.manual_seed(seed)  # the first worker's model is the center every worker starts from
    return ResNet()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="a TOML config file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--resume", help="a checkpoint, a run folder, or auto")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--loader-workers", type=int, default=2)
    args = parser.parse_args()
    config = {"steps": 600, "tau": 4, "checkpoint.interval": 30}  # this example's defaults
    config.update(pair.split("=", 1) for pair in args.set)
    if args.config:
        from easgd_mpi import Config  # noqa: PLC0415

        config = Config.from_toml(args.config, overrides=config)

    run = et.init(config, resume=args.resume)
    train_set, (x_test, y_test) = digits()

    if run.serves:  # rank 0: hold the center, evaluate it, checkpoint
        model = build_model(run.cfg.seed)

        def evaluate(state_dict):
            model.load_state_dict(state_dict)
            model.eval()
            with torch.no_grad():
                logits = model(x_test)
            return {
                "loss": F.cross_entropy(logits, y_test).item(),
                "error": (logits.argmax(1) != y_test).float().mean().item(),
            }

        run.serve(evaluate=evaluate)  # returns when the workers are done
    else:
        device = run.device
        model = build_model(run.cfg.seed).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=run.steps)
        # Binds the parameters and buffers to the flat buffers (no copies); restores a resumed
        # worker's optimizer, schedule and sampler.
        elastic = et.ElasticAveraging(model, opt, run, schedulers=sched)
        loader = DataLoader(
            train_set,
            batch_size=args.batch,
            sampler=run.sampler(train_set),
            num_workers=args.loader_workers,
            persistent_workers=args.loader_workers > 0,
            generator=torch.Generator().manual_seed(run.worker),
        )
        for _epoch in run.epochs():  # from the saved epoch on a resume
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    logits = model(x)
                    loss = F.cross_entropy(logits, y)
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                accuracy = (logits.argmax(1) == y).float().mean()
                elastic.step(loss=loss, accuracy=accuracy)  # every τ-th: the exchange
                if run.should_stop:  # SIGTERM/SIGUSR1, the master's stop, or the budget
                    break
    center = run.finish()  # the master: the center as a state_dict (also center.pt)
    if center is not None:
        summary = run.summary
        print(
            f"own_loop: {summary['steps']} worker steps, center error "
            f"{100 * summary['center_error']:.2f}%; the model: {run.run_dir / et.CENTER_FILE}"
        )


if __name__ == "__main__":
    main()
