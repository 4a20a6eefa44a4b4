"""A multi-label classifier trained with BCE-with-logits, Adam and global-norm clipping.

Synthetic data, nothing downloaded: 8 labels over 20 features, label j on when a fixed random
linear function of the features, plus noise, is positive (so the labels are learnable but not
exactly separable). Every step clips the global gradient norm with fusedclip.clip_grad_norm_,
whose returned norm stays on the device until the end of training.

    python examples/multilabel_bce.py            # a few seconds on a CPU
    python examples/multilabel_bce.py --fast     # a few seconds (what the tests run)

The last line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import fusedclip

FEATURES, LABELS = 20, 8


def make_data(n: int, generator: torch.Generator, device: torch.device):
    weights = torch.randn(FEATURES, LABELS, generator=torch.Generator().manual_seed(1234))
    x = torch.randn(n, FEATURES, generator=generator)
    logits = x @ weights + 0.3 * torch.randn(n, LABELS, generator=generator)
    return x.to(device), (logits > 0).float().to(device)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="fewer steps (for tests)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--max-norm", type=float, default=0.1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (a model this small runs best on one)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps = args.steps or (150 if args.fast else 600)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    x_train, y_train = make_data(4096, generator, device)
    x_test, y_test = make_data(1024, generator, device)

    model = torch.nn.Sequential(
        torch.nn.Linear(FEATURES, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
        torch.nn.Linear(64, LABELS),
    ).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    losses, norms = [], []
    start = time.perf_counter()
    for step in range(steps):
        index = torch.randint(0, x_train.shape[0], (128,), generator=generator).to(device)
        loss = loss_fn(model(x_train[index]), y_train[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norms.append(fusedclip.clip_grad_norm_(model.parameters(), max_norm=args.max_norm))
        optimizer.step()
        losses.append(loss.detach())
        if (step + 1) % max(steps // 5, 1) == 0:
            print(f"step {step + 1:5d}  loss {loss.item():.4f}  grad norm {norms[-1].item():.3f}")
    seconds = time.perf_counter() - start

    with torch.no_grad():
        predicted = model(x_test) > 0
        truth = y_test.bool()
        true_positives = (predicted & truth).sum().item()
        f1 = 2 * true_positives / max(predicted.sum().item() + truth.sum().item(), 1)
        accuracy = (predicted == truth).float().mean().item()
    losses = torch.stack(losses).tolist()
    norms = torch.stack(norms).tolist()
    summary = {
        "example": "multilabel_bce",
        "device": str(device),
        "steps": steps,
        "initial_loss": sum(losses[:10]) / 10,
        "final_loss": sum(losses[-10:]) / 10,
        "test_label_accuracy": accuracy,
        "test_micro_f1": f1,
        "clipped_fraction": sum(n > args.max_norm for n in norms) / steps,
        "seconds": seconds,
    }
    print(f"test label accuracy {accuracy:.3f}, micro-F1 {f1:.3f}; clipped on "
          f"{summary['clipped_fraction']:.0%} of the steps; {seconds:.1f} s")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
