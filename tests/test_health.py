"""Per-tensor norms (fusedclip.get_norms, clip_grad_norm_with_norms_) and GradientMonitor, against
the float64 oracle and a plain implementation of the monitor's statistics written here. The
operators behind them (clip_grad_norm_with_norms_, monitor_update_) have their contracts in
test_operator_contracts.py."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

import fusedclip
from helpers import (
    CPU_BACKENDS,
    assert_bitwise_equal,
    clone_all,
    make_grads,
    norm_id,
    oracle_norm,
    params_with,
    seeded,
)

SHAPES = [(33,), (0,), (4, 257), (1,), (70001,), (2, 0, 3), (5, 6, 7)]


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.5, math.inf, -math.inf, 0.0, -2.0], ids=norm_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_get_norms_total_and_per_tensor(backend, dtype, norm_type):
    grads = make_grads(SHAPES, dtype, seed=1)
    grads[0][::4] = 0
    originals = clone_all(grads)
    total, per = fusedclip.get_norms(grads, norm_type, backend=backend)
    assert total.dtype == per.dtype and per.shape == (len(grads),)
    rtol = 1e-10 if dtype == torch.float64 else (1e-5 if norm_type in (0.0, 1.0, 2.0) or math.isinf(norm_type) else 1e-4)
    for i, (value, g) in enumerate(zip(per.tolist(), originals)):
        assert value == pytest.approx(oracle_norm([g], norm_type), rel=rtol, abs=0), i  # 0 when empty
    assert torch.equal(total, fusedclip.get_total_norm(originals, norm_type, backend=backend))
    assert_bitwise_equal(grads, originals)


def test_get_norms_mixed_devices():
    """The results land on the first tensor's device (meta first: a meta norm cannot be copied)."""
    grads = [torch.empty(6, device="meta")] + make_grads([(3,), (4,)], torch.float32, seed=2)
    grads.insert(2, torch.empty(2, device="meta", dtype=torch.float64))
    total, per = fusedclip.get_norms(grads, backend="torch")
    assert total.device.type == per.device.type == "meta"
    assert per.shape == (4,) and per.dtype == total.dtype == torch.float64


def test_get_norms_empty_and_errors():
    total, per = fusedclip.get_norms([])
    assert float(total) == 0.0 and per.shape == (0,)
    with pytest.raises(ValueError):
        fusedclip.get_norms([torch.randn(3)], float("nan"))
    with pytest.raises(TypeError, match="gradient 1"):
        fusedclip.get_norms([torch.randn(3), torch.ones(3, dtype=torch.int64)])


@pytest.mark.parametrize("max_norm", [0.5, 1e6], ids=["clips", "no-clip"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_clip_with_norms_is_clip_grad_norm_plus_per_tensor(backend, dtype, max_norm):
    grads = make_grads(SHAPES, dtype, seed=3)
    expected = clone_all(grads)
    want_total = fusedclip.clip_grad_norm_(params_with(expected), max_norm, backend=backend)
    originals = clone_all(grads)
    params = params_with(grads[:3] + [None] + grads[3:])  # a parameter without a gradient
    total, per = fusedclip.clip_grad_norm_with_norms_(params, max_norm, backend=backend)
    assert torch.equal(total, want_total)
    assert_bitwise_equal(grads, expected)
    want_per = [oracle_norm([g], 2.0) for g in originals]
    want_per.insert(3, 0.0)
    assert per.tolist() == pytest.approx(want_per, rel=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_clip_with_norms_refuses_before_writing(backend):
    grads = make_grads([(5,), (6,)], torch.float32, seed=4)
    originals = clone_all(grads)
    sparse = torch.nn.Parameter(torch.zeros(3))
    sparse.grad = torch.zeros(3).to_sparse()
    with pytest.raises(TypeError, match="layout"):
        fusedclip.clip_grad_norm_with_norms_(params_with(grads) + [sparse], 0.1, backend=backend)
    expanded = torch.nn.Parameter(torch.zeros(4))
    expanded.grad = torch.ones(1).expand(4)
    with pytest.raises(ValueError, match="overlapping"):
        fusedclip.clip_grad_norm_with_norms_(params_with(grads) + [expanded], 0.1, backend=backend)
    for max_norm in (-1.0, float("nan")):
        with pytest.raises(ValueError):
            fusedclip.clip_grad_norm_with_norms_(params_with(grads), max_norm, backend=backend)
    assert_bitwise_equal(grads, originals)


# --- GradientMonitor ------------------------------------------------------------------------------


class ReferenceMonitor:
    """The monitor's statistics for one parameter, in float64."""

    def __init__(self, z_threshold, alpha, warmup_steps, vanish_eps, vanish_steps, explode_threshold=None):
        self.z_threshold, self.alpha, self.warmup = z_threshold, alpha, warmup_steps
        self.vanish_eps, self.vanish_steps, self.explode_threshold = vanish_eps, vanish_steps, explode_threshold
        self.values, self.mean, self.var, self.below = [], 0.0, 0.0, 0

    def update(self, n):
        finite = math.isfinite(n)
        exploding = not finite
        if len(self.values) >= self.warmup and finite:
            z = (n - self.mean) / math.sqrt(self.var + 1e-12)
            exploding = z > self.z_threshold
        if self.explode_threshold is not None and n > self.explode_threshold:
            exploding = True
        if finite:
            if len(self.values) < self.warmup:
                self.values.append(n)
                self.mean = sum(self.values) / len(self.values)
                self.var = sum((v - self.mean) ** 2 for v in self.values) / len(self.values)
            else:
                self.values.append(n)
                self.mean = self.alpha * self.mean + (1 - self.alpha) * n
                self.var = self.alpha * self.var + (1 - self.alpha) * (n - self.mean) ** 2
        self.below = self.below + 1 if n < self.vanish_eps else 0
        return exploding, self.below >= self.vanish_steps


def monitored_step(step, params):
    """Gradients of one step: "a" spikes at step 8; "b" is zero from step 3; "c" is nan at step 6."""
    gen = seeded(10 + step)
    a, b, c = params
    a.grad = torch.randn(a.shape, generator=gen) * (100.0 if step == 8 else 1.0)
    b.grad = torch.zeros(b.shape) if step >= 3 else torch.randn(b.shape, generator=gen)
    c.grad = torch.randn(c.shape, generator=gen)
    if step == 6:
        c.grad[0, 1] = float("nan")


@pytest.mark.parametrize("via", ["clip", "observe", "record"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_monitor_flags_against_reference(backend, via):
    params = [torch.nn.Parameter(torch.zeros(s)) for s in [(50,), (3, 4), (6, 7)]]
    names = ["a", "b", "c"]
    settings = dict(z_threshold=3.0, alpha=0.9, warmup_steps=4, vanish_eps=1e-8, vanish_steps=3)
    monitor = fusedclip.GradientMonitor(zip(names, params), backend=backend, **settings)
    references = [ReferenceMonitor(**settings) for _ in names]
    flagged = {"exploding": set(), "vanishing": set()}
    for step in range(14):
        monitored_step(step, params)
        originals = [p.grad.clone() for p in params]
        norms = [oracle_norm([g], 2.0) for g in originals]
        if via == "clip":
            total = monitor.clip_grad_norm_(1e9)  # does not clip: the norms are checked as given
        elif via == "observe":
            total = monitor.observe()
        else:
            total, per = fusedclip.get_norms([p.grad for p in params], backend=backend)
            monitor.record(total, per)
        if math.isfinite(oracle_norm(originals, 2.0)):
            assert float(total) == pytest.approx(oracle_norm(originals, 2.0), rel=1e-5)
        want = [ref.update(n) for ref, n in zip(references, norms)]
        assert monitor.exploding() == [n for n, (e, _) in zip(names, want) if e], step
        assert monitor.vanishing() == [n for n, (_, v) in zip(names, want) if v], step
        flagged["exploding"].update(monitor.exploding())
        flagged["vanishing"].update(monitor.vanishing())
    assert flagged == {"exploding": {"a", "c"}, "vanishing": {"b"}}
    state = monitor._state
    for i, ref in enumerate(references):
        assert float(state["mean"][i]) == pytest.approx(ref.mean, rel=1e-5, abs=1e-12)
        assert float(state["var"][i]) == pytest.approx(ref.var, rel=1e-4, abs=1e-12)
    history = monitor.history()
    assert history["step"] == list(range(1, 15)) and history["per_parameter"].shape == (14, 3)
    assert history["names"] == names
    table = monitor.summary()
    assert all(name in table for name in names) and "VANISHING" in table and "14 steps" in table


def test_monitor_explode_threshold_and_clipping():
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    monitor = fusedclip.GradientMonitor(model, explode_threshold=0.5)
    model(torch.randn(4, 6, generator=seeded(5))).pow(2).sum().mul(10).backward()
    expected = [p.grad.clone() for p in model.parameters()]
    want_total = fusedclip.clip_grad_norm_(params_with(expected), 1.0)
    per = [oracle_norm([g], 2.0) for g in [p.grad for p in model.parameters()]]
    total = monitor.clip_grad_norm_(1.0)
    assert torch.equal(total, want_total)
    assert_bitwise_equal([p.grad for p in model.parameters()], expected)
    names = [name for name, _ in model.named_parameters()]
    assert monitor.exploding() == [n for n, v in zip(names, per) if v > 0.5]
    assert monitor.history()["per_parameter"][0].tolist() == pytest.approx(per, rel=1e-5)
    assert len(monitor.summary(top=2).splitlines()) == 4


def test_monitor_history_is_bounded_and_bad_arguments_raise():
    p = torch.nn.Parameter(torch.zeros(3))
    monitor = fusedclip.GradientMonitor([("p", p)], history_size=3)
    for step in range(5):
        p.grad = torch.full((3,), float(step + 1))
        monitor.observe()
    assert monitor.history()["step"] == [3, 4, 5]
    assert monitor.history()["total"].tolist() == pytest.approx([3 * 3**0.5, 4 * 3**0.5, 5 * 3**0.5])
    with pytest.raises(ValueError, match="per_parameter"):
        monitor.record(torch.tensor(1.0), torch.ones(2))
    with pytest.raises(ValueError, match="writer"):
        monitor.log()
    for kwargs in ({"warmup_steps": 0}, {"vanish_steps": -1}, {"alpha": 1.0}, {"explode_threshold": -1.0},
                   {"history_size": 1.5}, {"z_threshold": float("nan")}):
        with pytest.raises(ValueError):
            fusedclip.GradientMonitor([("p", p)], **kwargs)
    with pytest.raises(TypeError, match="named_parameters"):
        fusedclip.GradientMonitor([p])
    # a name given twice would log two parameters under one tag (tied weights appear once in
    # named_parameters(), and under two names with remove_duplicate=False)
    with pytest.raises(ValueError, match="named_parameters gives the name 'w' twice"):
        fusedclip.GradientMonitor([("w", p), ("b", torch.nn.Parameter(torch.zeros(1))),
                                   ("w", torch.nn.Parameter(torch.zeros(2)))])
    frozen = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
    with pytest.raises(ValueError, match="requires grad"):
        fusedclip.GradientMonitor([("frozen", frozen)])


def test_monitor_of_a_model_with_tied_weights():
    """Tied weights are one parameter under one name in named_parameters(): the monitor takes the
    model, and clips as clip_grad_norm_ of model.parameters() does."""
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(11, 4)
            self.head = torch.nn.Linear(4, 11, bias=False)
            self.head.weight = self.embed.weight

    model, reference = Tied(), Tied()
    reference.load_state_dict(model.state_dict())
    for m in (model, reference):
        m.head(m.embed(torch.arange(11))).square().sum().backward()
    monitor = fusedclip.GradientMonitor(model)
    assert monitor.names == ["embed.weight"]
    total = monitor.clip_grad_norm_(0.5)
    expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
    torch.testing.assert_close(total, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(model.embed.weight.grad, reference.embed.weight.grad, rtol=1e-6, atol=0)


def test_monitor_logs_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    params = [torch.nn.Parameter(torch.zeros(s)) for s in [(50,), (3, 4), (6, 7)]]
    with SummaryWriter(log_dir=str(tmp_path)) as writer:
        monitor = fusedclip.GradientMonitor(zip("abc", params), writer=writer, log_every=4, warmup_steps=4)
        flag_counts = []
        for step in range(10):
            monitored_step(step, params)
            monitor.observe()
            flag_counts.append((len(monitor.exploding()), len(monitor.vanishing())))
        monitor.log()  # steps 9 and 10; steps 1-8 were logged at steps 4 and 8
        writer.flush()
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    history = monitor.history()
    totals = events.Scalars("grad_norm/total")
    assert [e.step for e in totals] == list(range(1, 11))
    assert [e.value for e in totals] == pytest.approx(history["total"].tolist(), rel=1e-6, nan_ok=True)
    assert math.isnan(totals[6].value)  # c is nan at step 7
    b = events.Scalars("grad_norm/b")
    assert [e.value for e in b] == pytest.approx(history["per_parameter"][:, 1].tolist(), rel=1e-6, abs=1e-12)
    assert [e.value for e in events.Scalars("grad_health/exploding")][6] >= 1  # c is nan at step 7
    # Each step's own flags, not the last step's.
    assert [e.value for e in events.Scalars("grad_health/exploding")] == [e for e, _ in flag_counts]
    assert [e.value for e in events.Scalars("grad_health/vanishing")] == [v for _, v in flag_counts]
    assert len(set(flag_counts)) > 1
    assert [e.step for e in events.Histograms("grad_norm/per_parameter")] == list(range(1, 11))


class RecordingWriter:
    """A writer that records what the monitor writes, and refuses to be closed by it (it is the
    caller's)."""

    def __init__(self):
        self.scalars, self.histograms, self.flushes = [], [], 0

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, step, value))

    def add_histogram(self, tag, values, step):
        self.histograms.append((tag, step))

    def flush(self):
        self.flushes += 1

    def close(self):
        raise AssertionError("the monitor closed the caller's writer")

    def steps(self, tag="grad_norm/total"):
        return [step for t, step, _ in self.scalars if t == tag]

    def values(self, tag):
        return [value for t, _, value in self.scalars if t == tag]


TAGS = ["grad_norm/total", "grad_norm/a", "grad_norm/b", "grad_norm/c", "grad_health/exploding",
        "grad_health/vanishing"]


@pytest.mark.parametrize("finish", ["flush", "close", "with"])
def test_monitor_flush_writes_the_steps_since_the_last_log_once(tmp_path, finish):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    def written():
        events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "histograms": 0})
        events.Reload()
        scalars = {tag: [e.step for e in events.Scalars(tag)] for tag in TAGS}
        return scalars, [e.step for e in events.Histograms("grad_norm/per_parameter")]

    params = [torch.nn.Parameter(torch.zeros(s)) for s in [(50,), (3, 4), (6, 7)]]
    writer = SummaryWriter(log_dir=str(tmp_path))
    monitor = fusedclip.GradientMonitor(zip("abc", params), writer=writer, log_every=10, warmup_steps=4)
    with monitor if finish == "with" else contextlib.nullcontext() as entered:
        assert entered is (monitor if finish == "with" else None)
        for step in range(25):
            monitored_step(step, params)
            monitor.observe()
    if finish != "with":
        getattr(monitor, finish)()
    # Read back while the writer is open (the flush of the writer itself: the RecordingWriter tests).
    scalars, histograms = written()
    assert scalars == {tag: list(range(1, 26)) for tag in TAGS}  # steps 21-25 too, each once
    assert histograms == list(range(1, 26))
    totals = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    totals.Reload()
    assert [e.value for e in totals.Scalars("grad_norm/total")] == pytest.approx(
        monitor.history()["total"].tolist(), rel=1e-6, nan_ok=True)
    monitor.flush()  # nothing left to write
    monitor.close()
    writer.flush()
    assert written() == (scalars, histograms)
    writer.close()


def test_monitor_flush_writes_each_step_once_and_leaves_the_writer_open():
    params = [torch.nn.Parameter(torch.zeros(s)) for s in [(50,), (3, 4), (6, 7)]]
    writer = RecordingWriter()
    monitor = fusedclip.GradientMonitor(zip("abc", params), writer=writer, log_every=10)
    for step in range(25):
        monitored_step(step, params)
        monitor.observe()
    assert writer.steps() == list(range(1, 21)) and writer.flushes == 0  # logged at steps 10 and 20
    monitor.flush()
    assert writer.steps() == list(range(1, 26)) and writer.flushes == 1
    assert [step for _, step in writer.histograms] == list(range(1, 26))
    written = (list(writer.scalars), list(writer.histograms))
    monitor.flush()
    monitor.close()  # flushes; does not close the caller's writer (RecordingWriter.close raises)
    assert (writer.scalars, writer.histograms) == written and writer.flushes == 3
    monitored_step(25, params)
    monitor.observe()  # still usable after close(): step 26 waits for step 30 or the next flush
    assert writer.steps() == list(range(1, 26))
    monitor.flush()
    assert writer.steps() == list(range(1, 27))


def test_monitor_resumed_with_global_step_logs_at_the_run_steps():
    params = [torch.nn.Parameter(torch.zeros(s)) for s in [(50,), (3, 4), (6, 7)]]
    whole = RecordingWriter()
    with fusedclip.GradientMonitor(zip("abc", params), writer=whole, log_every=10) as monitor:
        for step in range(25):
            monitored_step(step, params)
            monitor.observe()
    # The same 25 steps, stopped after 13 and resumed from the saved step.
    first, second = RecordingWriter(), RecordingWriter()
    with fusedclip.GradientMonitor(zip("abc", params), writer=first, log_every=10) as before:
        for step in range(13):
            monitored_step(step, params)
            before.observe()
    resumed = fusedclip.GradientMonitor(zip("abc", params), writer=second, log_every=10, global_step=before.step)
    assert resumed.step == 13 and resumed.history()["step"] == []
    for step in range(13, 25):
        monitored_step(step, params)
        resumed.observe()
        if resumed.step == 20:  # logged at the run's step 20, not after 10 steps of this monitor
            assert second.steps() == list(range(14, 21))
    assert second.steps() == list(range(14, 21))
    resumed.close()
    assert resumed.history()["step"] == list(range(14, 26)) and "25 steps" in resumed.summary()
    for tag in TAGS:
        assert first.steps(tag) + second.steps(tag) == whole.steps(tag) == list(range(1, 26)), tag
    for tag in TAGS[:4]:  # the norms (the flags depend on statistics, which restart with the monitor)
        assert first.values(tag) + second.values(tag) == pytest.approx(whole.values(tag), nan_ok=True), tag
    assert [s for _, s in first.histograms + second.histograms] == [s for _, s in whole.histograms]


def test_monitor_context_manager_writes_the_rest_when_the_loop_raises():
    params = [torch.nn.Parameter(torch.zeros(s)) for s in [(50,), (3, 4), (6, 7)]]
    writer = RecordingWriter()
    with pytest.raises(RuntimeError, match="diverged"):
        with fusedclip.GradientMonitor(zip("abc", params), writer=writer, log_every=10) as monitor:
            for step in range(7):
                monitored_step(step, params)
                monitor.observe()
            raise RuntimeError("diverged")
    # The steps before the error are written (and the writer flushed, not closed).
    assert writer.steps() == list(range(1, 8)) and writer.flushes == 1
    # Without a writer there is nothing to write: flush(), close() and the with block do nothing.
    with fusedclip.GradientMonitor(zip("abc", params)) as monitor:
        monitored_step(0, params)
        monitor.observe()
        monitor.flush()
    monitor.close()
    assert monitor.step == 1


@pytest.mark.parametrize("bad", [-1, 2.0, True, "3", None, torch.tensor(3)], ids=repr)
def test_monitor_bad_global_step_raises(bad):
    p = torch.nn.Parameter(torch.zeros(3))
    writer = RecordingWriter()
    with pytest.raises(ValueError, match="global_step must be a non-negative int"):
        fusedclip.GradientMonitor([("p", p)], writer=writer, global_step=bad)
    assert writer.scalars == [] and writer.flushes == 0
    assert fusedclip.GradientMonitor([("p", p)], global_step=0).step == 0


# --- the monitor's update on each backend (monitor_update_'s contract: test_operator_contracts.py) ---


def test_monitor_backends_agree_bitwise():
    params = [torch.nn.Parameter(torch.zeros(s)) for s in [(50,), (3, 4), (6, 7)]]
    monitors = {b: fusedclip.GradientMonitor(zip("abc", params), alpha=0.9, warmup_steps=4, vanish_steps=3,
                                             backend=b) for b in CPU_BACKENDS}
    assert monitors["cpu"]._backend_of_update(torch.device("cpu")) == "cpu"
    assert monitors["torch"]._backend_of_update(torch.device("cpu")) == "torch"
    flagged = {"exploding": set(), "vanishing": set()}
    for step in range(14):
        monitored_step(step, params)
        total, per = fusedclip.get_norms([p.grad for p in params])  # the same norms for both
        for b in CPU_BACKENDS:
            monitors[b].record(total, per)
        assert monitors["cpu"].exploding() == monitors["torch"].exploding()
        flagged["exploding"].update(monitors["cpu"].exploding())
        flagged["vanishing"].update(monitors["cpu"].vanishing())
    states = [monitors[b]._state for b in CPU_BACKENDS]
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    assert flagged == {"exploding": {"a", "c"}, "vanishing": {"b"}}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_monitor_records_strided_and_mixed_dtype_norms(backend):
    monitor = fusedclip.GradientMonitor([("a", torch.nn.Parameter(torch.zeros(2))),
                                         ("b", torch.nn.Parameter(torch.zeros(2)))], warmup_steps=2, backend=backend)
    monitor.record(torch.tensor(2.0), torch.tensor([1.0, 0.0, 3.0, 0.0])[::2])  # strided float32
    monitor.record(torch.tensor(2.0, dtype=torch.float64), torch.tensor([2.0, 5.0], dtype=torch.float64))
    monitor.record(torch.tensor(2.0, dtype=torch.float16), torch.tensor([3.0, 4.0], dtype=torch.float16))
    state = monitor._state
    assert state["mean"].dtype == torch.float64  # a float64 step makes the statistics float64
    assert state["count"].tolist() == [3, 3]
    # Warm-up of 2 (Welford), then an EMA step with alpha 0.97.
    assert state["mean"].tolist() == pytest.approx([0.97 * 1.5 + 0.03 * 3.0, 0.97 * 4.0 + 0.03 * 4.0])
