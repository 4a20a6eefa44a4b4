"""A small CNN trained twice: once with value clipping, once with norm clipping.

Synthetic images, nothing downloaded: 16x16 grey images holding one bar, horizontal, vertical or
on either diagonal, at a random place, in noise; the class is the bar's orientation. The same
initial weights and batches are trained with fusedclip.clip_grad_value_ (every gradient element
clamped to [-clip_value, clip_value], one pass) and with fusedclip.clip_grad_norm_ (the global
norm scaled down to max_norm), and the test accuracies are compared.

    python examples/cnn_clipping.py            # 10-20 s on a CPU
    python examples/cnn_clipping.py --fast     # a few seconds (what the tests run)

The last line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

import fusedclip

SIZE, CLASSES = 16, 4


def make_images(n: int, generator: torch.Generator, device: torch.device):
    labels = torch.randint(0, CLASSES, (n,), generator=generator)
    images = 0.3 * torch.randn(n, 1, SIZE, SIZE, generator=generator)
    starts = torch.randint(2, SIZE - 9, (n, 2), generator=generator)
    steps = torch.tensor([[0, 1], [1, 0], [1, 1], [1, -1]])  # (row, column) per orientation
    for i in range(n):
        dr, dc = steps[labels[i]].tolist()
        r, c = starts[i].tolist()
        c = c + 7 if dc < 0 else c
        for k in range(7):
            images[i, 0, r + dr * k, c + dc * k] += 1.5
    return images.to(device), labels.to(device)


def make_model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveMaxPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(16, CLASSES),
    )


def train(model, clip, data, steps: int, seed: int) -> dict:
    x_train, y_train, x_test, y_test = data
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(seed)  # the same batches for both runs
    losses, norms = [], []
    for _ in range(steps):
        index = torch.randint(0, x_train.shape[0], (64,), generator=generator).to(x_train.device)
        loss = torch.nn.functional.cross_entropy(model(x_train[index]), y_train[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norms.append(clip(model.parameters()))
        optimizer.step()
        losses.append(loss.detach())
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    losses = torch.stack(losses).tolist()
    return {"initial_loss": sum(losses[:10]) / 10, "final_loss": sum(losses[-10:]) / 10,
            "test_accuracy": accuracy, "grad_norm_median": float(torch.stack(norms).median())}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="fewer steps (for tests)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--clip-value", type=float, default=0.05)
    parser.add_argument("--max-norm", type=float, default=1.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps = args.steps or (150 if args.fast else 600)
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(args.seed)
    data = (*make_images(2048, generator, device), *make_images(512, generator, device))
    torch.manual_seed(args.seed)
    initial = make_model().to(device)

    def clip_value(parameters):
        # clip_grad_value_ returns nothing; the norm is taken only to report it
        parameters = list(parameters)
        fusedclip.clip_grad_value_(parameters, args.clip_value)
        return fusedclip.get_total_norm([p.grad for p in parameters])

    runs = {
        "value": clip_value,
        "norm": lambda parameters: fusedclip.clip_grad_norm_(parameters, args.max_norm),
    }
    summary = {"example": "cnn_clipping", "device": str(device), "steps": steps}
    start = time.perf_counter()
    for name, clip in runs.items():
        result = train(copy.deepcopy(initial), clip, data, steps, args.seed)
        summary[name] = result
        print(f"{name:>5} clipping: loss {result['initial_loss']:.3f} -> {result['final_loss']:.3f}, "
              f"test accuracy {result['test_accuracy']:.3f}")
    summary["seconds"] = time.perf_counter() - start
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
