"""A deep network that diverges without clipping and trains with it, watched by GradientMonitor.

An 8-layer ReLU MLP whose weights start twice as large as He initialisation (std 2/sqrt(fan_in))
regresses a smooth function of 32 features with plain SGD (lr 0.1). Its gradients start large
and grow with every step that follows one: without clipping, the first few updates throw the
weights where the loss overflows to inf and nan. The same model, data and batches with
fusedclip.clip_grad_norm_ (max_norm 1, through GradientMonitor.clip_grad_norm_, which records
the global and per-layer norms of the same read) train. The loss and gradient-norm histories of
both runs are plotted to a PNG from the monitors' data, and the monitor's summary table of the
clipped run is printed.

    python examples/divergence.py                     # about 10 s on a CPU
    python examples/divergence.py --fast              # a few seconds (what the tests run)
    python examples/divergence.py --png out.png

The last line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from typing import Optional

import torch

import fusedclip

FEATURES, WIDTH, DEPTH = 32, 64, 8


def make_data(n: int, generator: torch.Generator, device: torch.device):
    x = torch.randn(n, FEATURES, generator=generator)
    w = torch.randn(FEATURES, generator=generator)
    y = torch.sin(2.0 * x @ w / math.sqrt(FEATURES)).unsqueeze(1)
    return x.to(device), y.to(device)


def make_model() -> torch.nn.Module:
    layers = []
    for i in range(DEPTH):
        linear = torch.nn.Linear(FEATURES if i == 0 else WIDTH, WIDTH)
        torch.nn.init.normal_(linear.weight, std=2.0 / math.sqrt(linear.in_features))  # large
        layers += [linear, torch.nn.ReLU()]
    layers.append(torch.nn.Linear(WIDTH, 1))
    return torch.nn.Sequential(*layers)


def train(model, data, steps: int, seed: int, max_norm: Optional[float]):
    """Trains; returns (losses, the monitor). The monitor records every step either way: without
    clipping it only observes (max_norm None), with it it clips and records in one call."""
    x, y = data
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = fusedclip.GradientMonitor(model, warmup_steps=10, history_size=steps)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        index = torch.randint(0, x.shape[0], (64,), generator=generator).to(x.device)
        loss = torch.nn.functional.mse_loss(model(x[index]), y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_norm is None:
            monitor.observe()
        else:
            monitor.clip_grad_norm_(max_norm)
        optimizer.step()
        losses.append(loss.detach())
    return torch.stack(losses).double().cpu(), monitor


def plot(runs: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for name, (losses, monitor) in runs.items():
        history = monitor.history()
        steps = history["step"]
        top.plot(steps, losses.clamp(max=1e30).tolist(), label=name)  # inf would not plot
        bottom.plot(steps, history["total"].clamp(max=1e30).tolist(), label=f"{name}: global")
        if name == "clip_grad_norm_":
            per_layer = history["per_parameter"]
            first, last = 0, len(history["names"]) - 2  # the first and last weight matrices
            bottom.plot(steps, per_layer[:, first].tolist(), ":", label=f"{name}: {history['names'][first]}")
            bottom.plot(steps, per_layer[:, last].tolist(), ":", label=f"{name}: {history['names'][last]}")
    top.set_yscale("log")
    top.set_ylabel("training loss")
    top.legend(fontsize=8)
    bottom.set_yscale("log")
    bottom.set_ylabel("gradient norm before clipping")
    bottom.set_xlabel("step")
    bottom.legend(fontsize=7)
    fig.suptitle(f"{DEPTH}-layer ReLU MLP, large initial weights, SGD lr 0.1 (nan/inf steps are gaps)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _json_float(value) -> "float | str":
    """A float for strict JSON: non-finite values as the strings "nan", "inf" and "-inf"."""
    value = float(value)
    return value if math.isfinite(value) else str(value)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="fewer steps (for tests)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--max-norm", type=float, default=1.0)
    parser.add_argument("--png", default="divergence.png", help="where to write the plot")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps = args.steps or (150 if args.fast else 500)
    device = torch.device(args.device)
    data = make_data(2048, torch.Generator().manual_seed(args.seed), device)
    torch.manual_seed(args.seed)
    initial = make_model().to(device)

    start = time.perf_counter()
    runs = {
        "no clipping": train(copy.deepcopy(initial), data, steps, args.seed, None),
        "clip_grad_norm_": train(copy.deepcopy(initial), data, steps, args.seed, args.max_norm),
    }
    seconds = time.perf_counter() - start
    plot(runs, args.png)

    summary = {"example": "divergence", "device": str(device), "steps": steps, "seconds": seconds, "png": args.png}
    for key, (losses, monitor) in zip(("unclipped", "clipped"), runs.values()):
        finite = losses.isfinite()
        first_bad = int((~finite).nonzero()[0]) + 1 if not finite.all() else None
        summary[key] = {
            "initial_loss": _json_float(losses[0]),
            "final_loss": _json_float(losses[-10:].mean()),  # "nan" once the run has diverged
            "first_non_finite_step": first_bad,
            "max_grad_norm": _json_float(monitor.history()["total"].nan_to_num(nan=math.inf).max()),
            "exploding_parameters_last_step": monitor.exploding(),
        }
        print(f"{key:>9}: loss {float(summary[key]['initial_loss']):.3g} -> {float(summary[key]['final_loss']):.3g}, "
              f"first non-finite loss at step {first_bad}")
    print(runs["clip_grad_norm_"][1].summary())
    print(f"wrote {args.png}")
    print(json.dumps(summary, allow_nan=False))
    return summary


if __name__ == "__main__":
    main()
