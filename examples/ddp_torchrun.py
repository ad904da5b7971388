"""Data-parallel training of a model with an optimization layer (DistributedDataParallel).

The model maps features ``f`` to ``q = W f + c`` and returns

    x*(q, u) = argmin_x 1/2 ||x||^2 + q'x   s.t.  -1 <= x <= u,   u = softplus(r),

where the upper bound ``u`` is a learned parameter shared by every instance. Each
process trains on its own shard of the data (``DistributedSampler``); DDP all-reduces
the gradients, which reach ``W``, ``c`` and ``r`` through the layer's
implicit-function-theorem backward, so every replica stays identical. At the end the
script gathers the parameters of all ranks and checks that they agree.

Run on two CPU processes with the gloo backend::

    torchrun --standalone --nproc_per_node=2 examples/ddp_torchrun.py

or as a single process (world size 1, same code path)::

    python examples/ddp_torchrun.py

``--help`` lists the options. Takes a few seconds.
"""
from __future__ import annotations

import argparse
import datetime
import os
import socket
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from tqdm import tqdm

import declarative as dl


class BoxQPNet(torch.nn.Module):
    """``f -> x*(W f + c, softplus(r))``: a linear layer feeding a box-constrained QP layer."""

    def __init__(self, n_features: int, n_out: int):
        super().__init__()
        x = dl.Variable(n_out, name="x")
        q = dl.Parameter(n_out, name="q")
        u = dl.Parameter(n_out, name="u")
        prob = dl.Problem(dl.Minimize(0.5 * dl.sum_squares(x) + q @ x), [x >= -1, x <= u])
        self.linear = torch.nn.Linear(n_features, n_out)
        self.raw_upper = torch.nn.Parameter(torch.zeros(n_out))  # u = log 2
        self.layer = prob.to_torch()  # compiled once per process

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        q = self.linear(features)  # (B, n): one q per instance
        u = torch.nn.functional.softplus(self.raw_upper)  # (n,): shared by the batch
        return self.layer(q, u)


def make_data(n_samples: int, n_features: int, n_out: int, seed: int = 1234) -> TensorDataset:
    """Targets from a teacher of the same form (upper bound 0.5); identical on every rank."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n_samples, n_features, generator=g, dtype=torch.float64)
    W = torch.randn(n_out, n_features, generator=g, dtype=torch.float64) / n_features ** 0.5
    c = 0.3 * torch.randn(n_out, generator=g, dtype=torch.float64)
    targets = torch.clamp(-(features @ W.T + c), min=-1.0, max=0.5)
    return TensorDataset(features, targets)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> None:
    """Join the process group torchrun set up, or make a one-process group."""
    if "RANK" not in os.environ:  # plain `python examples/ddp_torchrun.py`
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1"
        )
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))


def flat_parameters(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16, help="per process")
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--features", type=int, default=6)
    parser.add_argument("--outputs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        torch.manual_seed(rank)  # different on purpose: DDP broadcasts rank 0's weights
        model = BoxQPNet(args.features, args.outputs).double()
        ddp = DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=args.lr)

        data = make_data(args.samples, args.features, args.outputs)
        sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0)
        loader = DataLoader(data, batch_size=args.batch_size, sampler=sampler)
        if rank == 0:
            print(f"world size {world}, {len(sampler)} samples per rank, layer: {model.layer}")

        first_epoch_loss = None
        for epoch in range(args.epochs):
            sampler.set_epoch(epoch)
            total, count = 0.0, 0
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=rank != 0,
                       leave=False, file=sys.stdout)
            for features, targets in bar:
                x = ddp(features)
                loss = (x - targets).square().mean()
                opt.zero_grad()
                loss.backward()  # implicit backward through the layer, then DDP's all-reduce
                opt.step()
                total += loss.item() * len(features)
                count += len(features)
                bar.set_postfix(loss=f"{loss.item():.4f}")
            # every rank's mean training loss of this epoch, printed by rank 0
            local = torch.tensor([total / count], dtype=torch.float64)
            per_rank = [torch.zeros_like(local) for _ in range(world)]
            dist.all_gather(per_rank, local)
            per_rank = [t.item() for t in per_rank]
            mean = sum(per_rank) / world
            first_epoch_loss = mean if first_epoch_loss is None else first_epoch_loss
            if rank == 0:
                shown = ", ".join(f"rank {r}: {v:.4f}" for r, v in enumerate(per_rank))
                tqdm.write(f"epoch {epoch + 1}: loss {shown} (mean {mean:.4f})", file=sys.stdout)

        # the final check: every replica holds exactly the same parameters
        mine = flat_parameters(ddp)
        gathered = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(gathered, mine)
        agree = all(torch.equal(g, gathered[0]) for g in gathered)
        status = model.layer.info.status
        print(f"rank {rank}: last epoch loss {per_rank[rank]:.4f}, "
              f"last batch statuses {sorted(set(status))}", flush=True)
        dist.barrier()
        if rank == 0:
            max_diff = max((g - gathered[0]).abs().max().item() for g in gathered)
            print(f"parameters agree across {world} rank(s): {agree} (max difference {max_diff:.1e})")
            print(f"mean loss: first epoch {first_epoch_loss:.4f} -> last epoch {mean:.4f}")
            print(f"learned upper bound u = softplus(r): "
                  f"{torch.nn.functional.softplus(model.raw_upper).detach().numpy().round(3)} "
                  f"(teacher: 0.5)")
        return 0 if agree else 1
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
