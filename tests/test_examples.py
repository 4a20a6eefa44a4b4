"""The examples/ scripts, run as a user runs them (a fresh interpreter, fast mode), judged on the
JSON summary each prints last."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_example(name: str, *args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("FUSEDCLIP_BACKEND", None)
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", name), "--fast", "--device", "cpu", *args],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return json.loads(result.stdout.strip().splitlines()[-1], parse_constant=_not_json)


def _not_json(constant: str):
    """Strict JSON: NaN and Infinity are Python's extension, which other readers refuse."""
    raise ValueError(f"the summary is not strict JSON: it holds {constant}")


def test_multilabel_bce():
    summary = run_example("multilabel_bce.py")
    assert summary["final_loss"] < 0.3 * summary["initial_loss"]
    assert summary["test_label_accuracy"] > 0.9 and summary["test_micro_f1"] > 0.85
    assert summary["clipped_fraction"] > 0.5  # max_norm 0.1 clips most steps


def test_cnn_value_and_norm_clipping():
    summary = run_example("cnn_clipping.py")
    for mode in ("value", "norm"):
        assert summary[mode]["final_loss"] < 0.2 * summary[mode]["initial_loss"], mode
        assert summary[mode]["test_accuracy"] > 0.9, mode


def test_divergence_without_clipping_and_training_with_it(tmp_path):
    png = tmp_path / "divergence.png"
    summary = run_example("divergence.py", "--png", str(png))
    unclipped, clipped = summary["unclipped"], summary["clipped"]
    assert unclipped["first_non_finite_step"] is not None  # diverged: the loss overflowed
    assert unclipped["final_loss"] in ("nan", "inf", "-inf")  # non-finite floats as strings
    assert unclipped["exploding_parameters_last_step"]  # the monitor flags the nan gradients
    assert clipped["first_non_finite_step"] is None
    assert clipped["final_loss"] < 0.1 * clipped["initial_loss"]
    assert clipped["max_grad_norm"] > 100  # clipping had something to do
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000
