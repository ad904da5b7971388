"""A deep-equilibrium (fixed-point) classifier for scikit-learn's digits, trained two ways.

The hidden state ``z`` of an 8x8 digit image ``x`` is the fixed point

    z = T(z, u) = tanh(W z + u),    u = encoder(x),

with ``W`` rescaled to Frobenius norm at most ``gamma < 1`` so that ``T`` is a
contraction (``tanh`` is 1-Lipschitz): the fixed point exists, is unique, and Anderson
acceleration finds it. A linear head maps ``z`` to the ten classes.

The same model is trained with Jacobian-free backprop (``backward="jfb"``: the backward
pass is one application of ``T``) and with the exact implicit gradient
(``backward="ift"``: one linear solve with ``I - dT/dz``). For each the script prints
the test accuracy, the time per epoch and the peak memory of one training step. On CPU
that peak is measured with the torch profiler's allocation events; on CUDA with
``torch.cuda.max_memory_allocated``.

Run ``python examples/deq_digits.py`` (about a minute on two CPU cores);
``--help`` lists the options. The data set ships with scikit-learn: nothing is
downloaded.
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Dict, List, Optional

# The profiler's tracing backend logs to stderr by default; keep the example's output clean.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

from declarative.implicit_layers import FixedPointLayer  # noqa: E402


class ContractiveCell(nn.Module):
    """``T(z, u) = tanh(W z + u)`` with ``||W||_2 <= ||W||_F <= gamma``; ``z, u``: ``(B, hidden)``."""

    def __init__(self, hidden: int, gamma: float = 0.9):
        super().__init__()
        self.gamma = gamma
        self.weight = nn.Parameter(torch.randn(hidden, hidden) / hidden ** 0.5)

    def forward(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        # The rescaling lives inside T, so the implicit gradient flows through it too.
        norm = torch.linalg.matrix_norm(self.weight).clamp_min(1.0)
        return torch.tanh(z @ (self.gamma * self.weight / norm).T + u)


class DEQClassifier(nn.Module):
    """Images ``(B, 64)`` -> logits ``(B, 10)`` through one fixed-point layer."""

    def __init__(self, hidden: int = 64, backward: str = "jfb", gamma: float = 0.9,
                 tol: float = 1e-4, max_iter: int = 50):
        super().__init__()
        self.encoder = nn.Linear(64, hidden)
        self.cell = ContractiveCell(hidden, gamma)
        self.equilibrium = FixedPointLayer(self.cell, solver="anderson", backward=backward, tol=tol,
                                           max_iter=max_iter, state_shape=(hidden,))
        self.head = nn.Linear(hidden, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.equilibrium(self.encoder(images)))


def load_data(device: torch.device, train_subset: Optional[int] = None, seed: int = 0):
    """Standardized digits split 80/20, as float32 tensors on ``device``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data, digits.target, test_size=0.2, random_state=seed, stratify=digits.target)
    if train_subset is not None:
        x_train, y_train = x_train[:train_subset], y_train[:train_subset]
    mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1.0
    tensors = [torch.as_tensor((x - mean) / std, dtype=torch.float32, device=device) for x in (x_train, x_test)]
    labels = [torch.as_tensor(y, dtype=torch.long, device=device) for y in (y_train, y_test)]
    return tensors[0], labels[0], tensors[1], labels[1]


def peak_step_memory(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> int:
    """Peak bytes allocated during one forward + backward, beyond what existed before."""
    def step():
        loss = nn.functional.cross_entropy(model(images), labels)
        loss.backward()

    model.zero_grad(set_to_none=True)
    for module in model.modules():
        if isinstance(module, FixedPointLayer):
            module.info = None  # so that no older tensor is released inside the measurement
    if images.is_cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        current = peak = 0
        # Allocation (+) and release (-) events in time order; their running sum is the
        # memory in use, its maximum the peak.
        for event in sorted(prof.events(), key=lambda e: e.time_range.start):
            current += event.self_cpu_memory_usage
            peak = max(peak, current)
    model.zero_grad(set_to_none=True)
    return int(peak)


def train(backward: str, *, epochs: int, batch_size: int, lr: float, hidden: int, seed: int,
          data, progress: bool = True) -> Dict[str, float]:
    """Train one model; return its test accuracy, seconds per epoch and peak step memory."""
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    model = DEQClassifier(hidden=hidden, backward=backward).to(x_train.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    epoch_times: List[float] = []
    epoch_losses: List[float] = []
    iterations: List[float] = []
    bar = tqdm(range(epochs), desc=f"{backward:>4}", disable=not progress, leave=True)
    for _ in bar:
        start = time.perf_counter()
        order = torch.randperm(x_train.shape[0], generator=generator).to(x_train.device)
        model.train()
        for begin in range(0, x_train.shape[0], batch_size):
            batch = order[begin: begin + batch_size]
            loss = nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            iterations.append(float(model.equilibrium.info.iterations.float().mean()))
        epoch_times.append(time.perf_counter() - start)
        epoch_losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}", fp_iters=f"{iterations[-1]:.1f}")
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(dim=1) == y_test).float().mean().item()
    contraction = model.equilibrium.info.contraction_factor
    memory = peak_step_memory(model, x_train[:batch_size], y_train[:batch_size])
    return {
        "accuracy": accuracy,
        "seconds_per_epoch": sum(epoch_times) / len(epoch_times),
        "peak_memory_bytes": memory,
        "mean_forward_iterations": sum(iterations) / len(iterations),
        "max_contraction": float(contraction.max()) if contraction is not None else float("nan"),
        "epoch_losses": epoch_losses,
    }


def save_loss_plot(results: Dict[str, Dict[str, float]], path: str) -> None:
    """Training loss per epoch for each backward mode, as a PNG (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written")
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for mode, r in results.items():
        ax.plot(range(1, len(r["epoch_losses"]) + 1), r["epoch_losses"],
                label=f"{mode} (test acc {r['accuracy']:.3f})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss (last batch)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"loss curves written to {path}")


def main(argv: Optional[List[str]] = None) -> Dict[str, Dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--train-subset", type=int, default=None,
                        help="use only the first N training images (quick runs)")
    parser.add_argument("--modes", nargs="+", default=["jfb", "ift"], choices=["jfb", "ift", "unroll"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument("--plot", default="deq_digits.png", help="PNG of the loss curves ('' for none)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    data = load_data(device, args.train_subset, args.seed)
    print(f"digits: {data[0].shape[0]} training / {data[2].shape[0]} test images, device {device}")
    results = {}
    for mode in args.modes:
        results[mode] = train(mode, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                              hidden=args.hidden, seed=args.seed, data=data, progress=not args.no_progress)
    print(f"{'backward':>8} {'test acc':>9} {'s/epoch':>8} {'peak MiB':>9} {'fwd iters':>9} {'max Lip':>8}")
    for mode, r in results.items():
        print(f"{mode:>8} {r['accuracy']:>9.3f} {r['seconds_per_epoch']:>8.2f} "
              f"{r['peak_memory_bytes'] / 2 ** 20:>9.2f} {r['mean_forward_iterations']:>9.1f} "
              f"{r['max_contraction']:>8.3f}")
    if args.plot:
        save_loss_plot(results, args.plot)
    return results


if __name__ == "__main__":
    main()
