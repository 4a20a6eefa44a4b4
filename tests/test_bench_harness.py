"""The benchmark harness and command: the timing loop's rotation and counts, torch's unpatched
baselines, grads drawn on the device, backends timed side by side, the targets, the files the
command writes, and benchmarks/host_cost.py."""

from __future__ import annotations

import pytest
import torch

from fusedclip.bench import harness


def test_interleave_rotates_the_order_and_drops_the_warmup():
    order, events = [], []
    calls = {name: (lambda n=name: order.append(n)) for name in ("a", "b", "c")}
    times = harness.interleave(calls, torch.device("cpu"), repeats=4, warmup=2,
                               before=lambda name: events.append(("before", name)),
                               after=lambda: events.append(("after",)),
                               between=lambda: events.append(("between",)))
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert {name: len(ts) for name, ts in times.items()} == {"a": 4, "b": 4, "c": 4}
    assert all(t >= 0 for ts in times.values() for t in ts)
    assert events[:4] == [("before", "a"), ("after",), ("before", "b"), ("after",)]
    assert events.count(("between",)) == 6


def test_torch_baselines_are_torchs_own_functions():
    """The baselines are torch's functions even while fusedclip patches torch.nn.utils."""
    import fusedclip

    with fusedclip.patch_torch():
        assert harness.TORCH["clip_grad_norm_"].__module__.startswith("torch.")
        assert harness.TORCH["clip_grad_norm_"] is not torch.nn.utils.clip_grad_norm_


def test_host_cost_script_ends_with_its_json_rows():
    """benchmarks/host_cost.py runs without a GPU and its last line is a JSON object of its rows
    (triton_api_us among them), as CI and the GPU job read it."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "host_cost.py"), "--params", "20"],
                            capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", "")))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(result.stdout.strip().splitlines()[-1])
    assert rows["params"] == 20
    for key in ("triton_api_us", "triton_operator_us", "collect_us", "cpu_api_us", "torch_cpu_us"):
        assert rows[key] > 0, (key, rows)


def _small_workloads(monkeypatch):
    """Two small workloads in place of the real ones: one with a bandwidth floor, one host-bound."""
    monkeypatch.setitem(harness.WORKLOADS, "test-small", lambda: [
        harness.Workload("test-small", torch.float32, ((64, 3), (5,), (0,))),
    ])
    monkeypatch.setitem(harness.WORKLOADS, "test-host", lambda: [
        harness.Workload("test-host", torch.float32, ((8,),) * 20, bandwidth_bound=False),
    ])


def test_make_parameters_draws_the_same_grads_for_a_seed():
    workload = harness.Workload("w", torch.bfloat16, ((3, 4), (7,)))
    a = harness.make_parameters(workload, torch.device("cpu"), seed=3)
    b = harness.make_parameters(workload, torch.device("cpu"), seed=3)
    c = harness.make_parameters(workload, torch.device("cpu"), seed=4)
    assert [p.grad.dtype for p in a] == [torch.bfloat16] * 2 and [p.grad.shape for p in a] == [(3, 4), (7,)]
    assert all(torch.equal(x.grad, y.grad) for x, y in zip(a, b))
    assert not torch.equal(a[0].grad, c[0].grad)


def test_backends_are_timed_side_by_side_against_one_torch_time(monkeypatch):
    """Each backend gets a row per workload and mode, all timed in one interleaved loop, so the
    rows of one mode share torch's time; a host-bound row also has its back-to-back time."""
    import fusedclip.bench as bench

    _small_workloads(monkeypatch)
    report = bench.run(torch.device("cpu"), ["test-small", "test-host"], repeats=2, warmup=1, log=lambda _: None,
                       backends=["cpu", "torch"])
    rows = report["results"]
    assert report["backends"] == ["cpu", "torch"]
    assert [(r["workload"], r["mode"], r["backend"]) for r in rows] == [
        (w, m, b) for w in ("test-small float32", "test-host float32") for m in ("clip", "noclip")
        for b in ("cpu", "torch")]
    for first, second in zip(rows[::2], rows[1::2]):
        assert first["torch_ms"] == second["torch_ms"] and first["fusedclip_ms"] != second["fusedclip_ms"]
    small, host = rows[0], rows[4]
    assert small["percent_of_copy"] > 0 and small["back_to_back_us"] is None
    assert host["percent_of_copy"] is None and host["back_to_back_us"] > 0 and host["torch_back_to_back_us"] > 0
    assert all(r["norm_relative_difference"] < 1e-5 for r in rows)


def test_target_rows_say_what_is_met():
    import fusedclip.bench as bench

    def row(workload, mode, **values):
        return {"workload": workload, "mode": mode, "backend": "cuda", "speedup": 1.0, "percent_of_copy": None,
                "back_to_back_us": None, **values}

    report = {"results": [
        row("gpt2-124m float32", "clip", percent_of_copy=90.0),
        row("llama-1b bfloat16", "clip", percent_of_copy=80.0),
        row("gpt2-124m float32", "noclip", speedup=2.4),
        row("tiny-10k float32", "clip", speedup=12.0),
        row("host-1k float32", "noclip", back_to_back_us=40.0),
        row("many-small float16", "noclip", speedup=3.5),
    ]}
    got = {(r["workload"], r["mode"]): (r["met"], r["goal"]) for r in bench.target_rows(report)}
    assert got == {
        ("gpt2-124m float32", "clip"): (True, ">= 85"),
        ("llama-1b bfloat16", "clip"): (False, ">= 85"),
        ("gpt2-124m float32", "noclip"): (False, ">= 2.5"),
        ("tiny-10k float32", "clip"): (True, ">= 10"),
        ("host-1k float32", "noclip"): (True, "<= 150"),
        ("many-small float16", "noclip"): (True, ">= 3"),
    }
    assert "| x torch, not clipping | gpt2-124m float32 | noclip | cuda | 2.4 | >= 2.5 | no |" in (
        bench.targets_table(bench.target_rows(report)))


def test_bench_command_writes_json_markdown_and_chart(monkeypatch, tmp_path):
    import json

    from fusedclip.__main__ import main

    _small_workloads(monkeypatch)
    assert main(["bench", "--device", "cpu", "--workloads", "test-small", "test-host", "--backends", "cpu",
                 "--training", "--no-health", "--repeats", "2", "--output", str(tmp_path)]) == 0
    stem = f"{__import__('datetime').date.today().isoformat()}-{harness.device_slug(harness.device_name(torch.device('cpu')))}"
    report = json.loads((tmp_path / f"{stem}.json").read_text())
    assert {r["backend"] for r in report["results"]} == {"cpu"} and "targets" in report
    markdown = (tmp_path / f"{stem}.md").read_text()
    assert "| test-small float32 | clip | cpu |" in markdown and "Targets:" in markdown
    files = {p.name for p in tmp_path.iterdir()}
    assert files <= {f"{stem}.json", f"{stem}.md", f"{stem}.png"} and len(files) >= 2


def test_device_slug():
    assert harness.device_slug("NVIDIA H200") == "nvidia-h200"
    assert harness.device_slug("AMD EPYC 7B13 64-Core Processor (2 cores)") == "amd-epyc-7b13-64-core-processor-2-cores"
    assert harness.device_slug("  Ünïcode--GPU  ") == "n-code-gpu"


@pytest.mark.cuda
def test_make_parameters_and_time_call_on_the_gpu():
    """On a GPU the grads are drawn there and a call is timed between events."""
    device = torch.device("cuda")
    params = harness.make_parameters(harness.Workload("w", torch.float16, ((1000, 10),)), device)
    assert params[0].grad.device.type == "cuda" and params[0].grad.dtype == torch.float16
    assert params[0].grad.float().std() == pytest.approx(1.0, rel=0.1)
    seconds = harness.time_call(lambda: torch.cuda._sleep(1_000_000), device)
    assert 0 < seconds < 1.0


def test_a_failing_backend_is_left_out_and_reported(monkeypatch, tmp_path):
    """One backend raising on a workload leaves the other backends' rows, is recorded in the
    report and its Markdown, and makes the command exit 1."""
    import fusedclip
    import fusedclip.bench as bench
    from fusedclip.__main__ import main

    _small_workloads(monkeypatch)
    real = fusedclip.clip_grad_norm_

    def clip(params, max_norm, *args, backend="auto", **kwargs):
        if backend == "torch":
            raise RuntimeError("kernel exploded")
        return real(params, max_norm, *args, backend=backend, **kwargs)

    monkeypatch.setattr(fusedclip, "clip_grad_norm_", clip)
    report = bench.run(torch.device("cpu"), ["test-small"], repeats=1, warmup=1, log=lambda _: None,
                       backends=["cpu", "torch"])
    assert {r["backend"] for r in report["results"]} == {"cpu"}
    assert report["errors"] == [{"workload": "test-small float32", "backend": "torch",
                                 "error": "RuntimeError: kernel exploded"}]
    assert main(["bench", "--device", "cpu", "--workloads", "test-small", "--backends", "cpu", "torch",
                 "--training", "--no-health", "--repeats", "1", "--output", str(tmp_path)]) == 1
    markdown = next(tmp_path.glob("*.md")).read_text()
    assert "FAILED: backend torch on test-small float32: RuntimeError: kernel exploded" in markdown


def test_training_rows_time_the_fold_and_the_scale_pass_on_clipping_and_other_steps(monkeypatch):
    """The "adamw" training rows: a clipping and a non-clipping step, each with fold=True and
    fold=False, the row fold="auto" takes on the device marked, and the share of clipping steps
    above which the fold is the faster, below the rows (on CPU here, small shapes)."""
    from fusedclip.bench import training

    monkeypatch.setattr(harness, "gpt2_small_shapes", lambda: ((64, 3), (5,), (0,)))
    lines = []
    rows = training.run(torch.device("cpu"), ["adamw"], repeats=2, warmup=1, log=lines.append)
    assert [(r["mode"], r["fold"]) for r in rows] == [("clip", True), ("clip", False), ("noclip", True),
                                                      ("noclip", False)]
    # On a CPU "auto" folds: the fold=True rows are its.
    assert [r["benchmark"] for r in rows] == [
        "clip + fused AdamW, fold=True (auto)", "clip + fused AdamW, fold=False",
        "noclip + fused AdamW, fold=True (auto)", "noclip + fused AdamW, fold=False"]
    assert all(r["fusedclip_ms"] > 0 and r["torch_ms"] > 0 for r in rows)
    f = training.fold_break_even(rows)
    assert 0.0 <= f <= 1.0
    assert lines[-1].startswith("fold=True is ") and lines[-1] in training.markdown_table(rows)

    def timed(clip_fold, clip_scale, noclip_fold, noclip_scale):
        return [{"mode": m, "fold": fold, "fusedclip_ms": ms}
                for (m, fold), ms in zip([("clip", True), ("clip", False), ("noclip", True), ("noclip", False)],
                                         (clip_fold, clip_scale, noclip_fold, noclip_scale))]

    # Folding gains 1 ms on a clipping step and loses 3 on another: it pays past 3/4 of steps clipping.
    assert training.fold_break_even(timed(10.0, 11.0, 9.0, 6.0)) == pytest.approx(0.75)
    assert training.fold_break_even(timed(10.0, 11.0, 6.0, 6.0)) == 0.0  # loses nothing: always
    assert training.fold_break_even(timed(11.0, 10.0, 7.0, 6.0)) == 1.0  # gains nothing: never
    assert training.fold_break_even(rows[:3]) is None
    assert "more than 75% of steps clip" in training._break_even_line(timed(10.0, 11.0, 9.0, 6.0))


def test_bench_command_writes_no_file_unless_asked(monkeypatch, tmp_path, capsys):
    """Without --output the tables are printed and nothing is written, neither in the working
    directory nor in the source tree's benchmarks/results (scripts/bench.sh asks for that one)."""
    import os

    from fusedclip.__main__ import main

    results = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "results")
    before = set(os.listdir(results))
    _small_workloads(monkeypatch)
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--device", "cpu", "--workloads", "test-small", "--backends", "cpu",
                 "--training", "--no-health", "--repeats", "1"]) == 0
    assert list(tmp_path.iterdir()) == []
    assert set(os.listdir(results)) == before
    assert "no files written" in capsys.readouterr().out
