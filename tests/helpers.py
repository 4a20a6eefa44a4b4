"""Shared helpers of the fusedclip test suite (plain functions and constants; the fixtures and
hooks are in conftest.py). Test modules import them as ``from helpers import ...``.

The oracle of every norm is the float64 norm of all gradients concatenated into one vector
(``|z|`` first for complex grads); norm type 0 counts the nonzero elements of that vector, which
is fusedclip's documented definition (torch counts tensors). Everything else (in-place results,
return types, warnings, errors) is compared with ``torch.nn.utils``.

Data is random with a fixed seed; nothing is tested on zeros or ones alone. CUDA is never queried
at import time: tests that need a GPU carry the ``cuda`` marker and are skipped at setup.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import pytest
import torch

# Triton's interpreter runs the Triton kernels on CPU tensors; it must be chosen (TRITON_INTERPRET=1)
# before triton is imported, so a process either interprets or compiles, never both.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class Backend:
    """A backend under test (the value of the ``backend`` fixture): its name, the ``backend=``
    argument of fusedclip and fusedclip._ops, and the device its tensors must live on."""

    name: str
    device: torch.device

    def on(self, tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
        """Copies of tensors on the backend's device (new tensors on the CPU too, so the
        originals stay as they were)."""
        return [t.to(self.device, copy=True) for t in tensors]

    def tensor(self, data, **kwargs) -> torch.Tensor:
        """torch.tensor(data) on the backend's device."""
        return torch.tensor(data, device=self.device, **kwargs)


def cpu(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors on the CPU (the same tensors when they are there already)."""
    return [t.cpu() for t in tensors]


# The backends of the tests that run on CPU tensors only (the public API beside the operators):
# the two that run them in any process. The operator contracts take the `backend` fixture
# (conftest.py) instead, which adds "triton" and "cuda".
CPU_BACKENDS = ("cpu", "torch")

# Elements per chunk of each backend's kernels (a chunk never spans two tensors): sizes on both
# sides of them are the boundary cases. TRITON_CHUNK is fusedclip/triton/tables.py's CHUNK.
CPU_CHUNK = 32768
TRITON_CHUNK = 16384
CUDA_CHUNK = 65536

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# Every norm type of the spec. Negative finite p is checked against the same oracle.
NORM_TYPES = (1.0, 2.0, 3.5, 0.5, math.inf, -math.inf, 0.0, "inf", -2.0)


def norm_id(p) -> str:
    return f"p={p!r}" if isinstance(p, str) else f"p={p:g}"


# (dtype, relative tolerance of the total norm against the float64 oracle). fp16, bf16 and fp32
# all accumulate in float32; the data is generated in the grad dtype, so the oracle sees the same
# rounded values and only the float32 accumulation error remains.
DTYPE_RTOL = [
    pytest.param(torch.float32, 1e-5, id="float32"),
    pytest.param(torch.float64, 1e-10, id="float64"),
    pytest.param(torch.float16, 1e-5, id="float16"),
    pytest.param(torch.bfloat16, 1e-5, id="bfloat16"),
]

# One ulp (relative) of each dtype, used for values rounded to the dtype, and an absolute floor
# for fp16 subnormals.
ULP = {
    torch.float32: 2.0**-23,
    torch.float64: 2.0**-52,
    torch.float16: 2.0**-10,
    torch.bfloat16: 2.0**-7,
    torch.complex64: 2.0**-23,
    torch.complex128: 2.0**-52,
}
ATOL = {torch.float16: 6e-8}


def norm_rtol(dtype_rtol: float, norm_type, dtype: Optional[torch.dtype] = None) -> float:
    """The tolerance of a total norm: general p (std::pow, then a root) is looser in float32."""
    p = float(norm_type)
    if dtype in (torch.float64, torch.complex128):
        return max(dtype_rtol, 1e-10)
    if p in (0.0, 1.0, 2.0) or math.isinf(p):
        return dtype_rtol
    return max(dtype_rtol, 1e-4)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand_tensor(shape, dtype: torch.dtype, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """Random normal data of any dtype (complex included), generated in float64 then rounded."""
    if dtype.is_complex:
        real_dtype = torch.float32 if dtype == torch.complex64 else torch.float64
        re = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
        im = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
        return torch.complex(re.to(real_dtype), im.to(real_dtype))
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def make_grads(shapes: Sequence, dtypes, seed: int = 0, scale: float = 1.0) -> list[torch.Tensor]:
    """Random grads: ``dtypes`` is one dtype or one per shape."""
    gen = seeded(seed)
    if isinstance(dtypes, torch.dtype):
        dtypes = [dtypes] * len(shapes)
    return [rand_tensor(s, d, gen, scale) for s, d in zip(shapes, dtypes)]


def params_with(grads: Iterable[Optional[torch.Tensor]]) -> list[torch.Tensor]:
    """Parameters (leaf tensors) carrying these grads; a None grad makes a parameter without one."""
    params = []
    for g in grads:
        if g is None:
            params.append(torch.nn.Parameter(torch.randn(3)))
            continue
        p = torch.nn.Parameter(torch.empty(g.shape, dtype=g.dtype, device=g.device))
        p.grad = g
        params.append(p)
    return params


def clone_all(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [t.clone() for t in tensors]


def same_bits(a: torch.Tensor, e: torch.Tensor, any_nan: bool = False) -> bool:
    """Bitwise equality (-0 != +0; nan in the same places with the same bits). any_nan: every
    nan equals every nan (a nan's sign and payload are not specified by the computation)."""
    if a.dtype != e.dtype or a.shape != e.shape or a.layout != e.layout:
        return False
    if a.is_sparse:
        a, e = a.coalesce(), e.coalesce()
        return torch.equal(a.indices(), e.indices()) and same_bits(a.values(), e.values(), any_nan)
    if a.is_complex():
        a, e = torch.view_as_real(a), torch.view_as_real(e)
    if not a.is_floating_point():
        return torch.equal(a, e)
    a, e = a.contiguous(), e.contiguous()
    if any_nan:
        nan = a.isnan()
        if not torch.equal(nan, e.isnan()):
            return False
        a, e = a[~nan], e[~nan]
    view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.view(view), e.view(view))


def assert_bitwise_equal(actual: Sequence[torch.Tensor], expected: Sequence[torch.Tensor],
                         any_nan: bool = False) -> None:
    """Every tensor the same dtype, shape and bits, element by element (see same_bits)."""
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == e.dtype and a.shape == e.shape, (i, a.dtype, e.dtype, a.shape, e.shape)
        if not a.is_sparse and (a.is_floating_point() or a.is_complex()):
            assert torch.equal(a.isnan(), e.isnan()), f"tensor {i}: nan positions differ"
        assert same_bits(a, e, any_nan), f"tensor {i} differs bitwise"


def oracle_vector(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """All grads as one float64 vector (|z| for complex)."""
    parts = [(g.abs() if g.is_complex() else g).double().flatten() for g in grads]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def oracle_norm(grads: Sequence[torch.Tensor], norm_type) -> float:
    """The float64 norm of the concatenation; type 0 counts nonzero elements; no elements -> 0."""
    p = float(norm_type)
    v = oracle_vector(grads)
    if v.numel() == 0:
        return 0.0
    if p == 0.0:
        return float(torch.count_nonzero(v))
    return float(torch.linalg.vector_norm(v, p))


def oracle_statistic(t: torch.Tensor, norm_type) -> float:
    """The per-tensor statistic before the root: sum |x|^p, max, min (+inf when empty), count."""
    p = float(norm_type)
    v = oracle_vector([t]).abs()
    if p == math.inf:
        return float(v.max()) if v.numel() else 0.0
    if p == -math.inf:
        return float(v.min()) if v.numel() else math.inf
    if p == 0.0:
        return float(torch.count_nonzero(v))
    return float(v.pow(p).sum())


def oracle_coef(total: float, max_norm: float) -> float:
    return min(max_norm / (total + 1e-6), 1.0)


def expected_dtype(dtypes: Iterable[torch.dtype]) -> torch.dtype:
    """The dtype of the returned norm: float64 when any grad is float64/complex128, else float32."""
    return (
        torch.float64
        if any(d in (torch.float64, torch.complex128) for d in dtypes)
        else torch.float32
    )


def scaled_by_returned_norm(grads: Sequence[torch.Tensor], total: torch.Tensor, max_norm: float):
    """What fusedclip writes, given the norm it returned: torch's coefficient formula computed in
    the norm's dtype, applied in float32 (float64 for float64 grads) and rounded once; grads are
    left alone when the coefficient is 1."""
    coef = ((total + 1e-6).reciprocal() * max_norm).clamp(max=1.0)
    if bool(coef >= 1.0):
        return [g.clone() for g in grads]
    return scaled_by_coef(grads, coef)


def scaled_by_coef(grads: Sequence[torch.Tensor], coef: torch.Tensor) -> list[torch.Tensor]:
    """grads * coef applied in float32 (float64 for float64 grads), rounded once; complex grads
    as (re, im) pairs."""
    out = []
    for g in grads:
        real = torch.view_as_real(g) if g.is_complex() else g
        acc = torch.float64 if real.dtype == torch.float64 else torch.float32
        scaled = (real.to(acc) * coef.to(acc)).to(real.dtype)
        out.append(torch.view_as_complex(scaled) if g.is_complex() else scaled)
    return out


def assert_scaled_like_oracle(actual, originals, oracle_total: float, max_norm: float, rtol: float):
    """Scaled grads against the float64 oracle-scaled values rounded to the dtype (1 ulp)."""
    coef = oracle_coef(oracle_total, max_norm)
    for i, (a, g) in enumerate(zip(actual, originals)):
        expected = g.to(torch.complex128 if g.is_complex() else torch.float64) * coef
        tol = max(rtol, 2 * ULP[g.dtype])
        torch.testing.assert_close(
            a.to(expected.dtype),
            expected.to(g.dtype).to(expected.dtype),
            rtol=tol,
            atol=ATOL.get(g.dtype, 0.0),
            msg=lambda m: f"grad {i}: {m}",
        )


def patch_operator(monkeypatch, name: str, replacement) -> None:
    """Routes the calls of operator `name` through fusedclip._ops.run to replacement(backend, *args)
    for the test's duration; the calls of the other operators run as before."""
    from fusedclip import _ops

    run = _ops.run

    def routed(op: str, *args):
        return replacement(*args) if op == name else run(op, *args)

    monkeypatch.setattr(_ops, "run", routed)


def operator(name: str):
    """Operator `name` as (backend, *args) -> result, through fusedclip._ops.run as it is now (a
    patch_operator replacement wraps it to reach the operator)."""
    from fusedclip import _ops

    run = _ops.run
    return lambda *args: run(name, *args)


class OpsSpy:
    """Counts the calls of one operator through fusedclip._ops.run (patched for the test's duration)."""

    def __init__(self, monkeypatch, name: str):
        self.calls = 0
        original = operator(name)

        def counted(*args):
            self.calls += 1
            return original(*args)

        patch_operator(monkeypatch, name, counted)


def assert_norm_close(actual: torch.Tensor, expected: float, rtol: float) -> None:
    value = float(actual)
    if math.isnan(expected):
        assert math.isnan(value), value
    elif math.isinf(expected):
        assert value == expected, (value, expected)
    else:
        assert value == pytest.approx(expected, rel=rtol, abs=1e-30), (value, expected)


@dataclass
class PoisonedBuffer:
    """Contiguous tensors carved from one buffer that is nan everywhere else: a kernel that reads
    past a tensor's end makes a norm nan, one that writes past it changes the poison."""

    buffer: torch.Tensor  # on the device under test
    inside: torch.Tensor  # bool, on the CPU: the elements that belong to a tensor
    spans: list  # (offset, length) of each tensor

    def tensors(self) -> list[torch.Tensor]:
        return [self.buffer[offset:offset + n] for offset, n in self.spans]

    def poison_intact(self) -> bool:
        return bool(self.buffer.cpu()[~self.inside].isnan().all())


def poisoned_buffer(sizes: Sequence[int], dtype: torch.dtype, seed: int, device=None, gap: int = 19,
                    scale: float = 3.0) -> PoisonedBuffer:
    """Tensors of these sizes, random values (rand_tensor, one generator in order), ``gap``
    poisoned elements before, between and after them, in one buffer on ``device``."""
    buffer = torch.full((sum(n + gap for n in sizes) + gap,), float("nan"), dtype=dtype)
    inside = torch.zeros(buffer.numel(), dtype=torch.bool)
    gen, offset, spans = seeded(seed), gap, []
    for n in sizes:
        buffer[offset:offset + n] = rand_tensor((n,), dtype, gen, scale=scale)
        inside[offset:offset + n] = True
        spans.append((offset, n))
        offset += n + gap
    return PoisonedBuffer(buffer.to(device or "cpu"), inside, spans)


# --- the interpreted Triton suite, in a subprocess ---------------------------------------------------


class InterpretedSuite:
    """Every ``triton_interpreter`` case of tests/ in a subprocess started with TRITON_INTERPRET=1
    (which must be set before triton is imported). conftest.py starts it as soon as a run is known
    to include test_triton.py::test_interpreted_suite and to run tests (not with --collect-only),
    so it runs beside the rest of the suite (the interpreter is single-threaded Python); the test
    waits for its result.

    Nothing of it outlives the run: conftest.py stops it when the session finishes and at
    unconfigure (the end of a run, an -x stop, Ctrl-C, an internal error), an atexit handler at the
    interpreter's exit, and on Linux the subprocess asks the kernel to kill it when its parent dies
    (PR_SET_PDEATHSIG), for a run killed outright. It runs in a session of its own, whose processes
    stop() ends together."""

    _process: Optional[subprocess.Popen] = None
    _output: Optional[tuple] = None  # files for its stdout and stderr (a pipe could fill and block it)
    TIMEOUT_S = 1500

    # What the subprocess runs: PR_SET_PDEATHSIG (1) with SIGKILL, then pytest unless its parent
    # (whose pid it is given) died before that.
    _BOOT = (
        "import ctypes, os, signal, sys\n"
        "parent = int(sys.argv.pop(1))\n"
        "if sys.platform.startswith('linux'):\n"
        "    try:\n"
        "        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)\n"
        "    except (OSError, AttributeError):\n"
        "        pass\n"
        "if os.getppid() != parent:\n"
        "    sys.exit('the interpreted suite: its parent process is gone')\n"
        "import pytest\n"
        "sys.exit(pytest.main(sys.argv[1:]))\n"
    )

    @classmethod
    def pytest_args(cls) -> list[str]:
        """The subprocess's pytest arguments."""
        return ["-q", "-p", "no:cacheprovider", "-m", "triton_interpreter", os.path.dirname(os.path.abspath(__file__))]

    @classmethod
    def start(cls) -> None:
        import atexit

        if cls._process is None:
            cls._output = (tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+"))
            atexit.register(cls.stop)
            cls._process = subprocess.Popen(
                [sys.executable, "-c", cls._BOOT, str(os.getpid()), *cls.pytest_args()],
                env=dict(os.environ, TRITON_INTERPRET="1"), stdout=cls._output[0], stderr=cls._output[1],
                text=True, start_new_session=True,
            )

    @classmethod
    def stop(cls) -> None:
        """Kills the subprocess and its session if it still runs (idempotent); its result stays."""
        import signal

        process = cls._process
        if process is None or process.poll() is not None:
            return
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError, AttributeError):  # AttributeError: no killpg
            process.kill()
        process.wait()

    @classmethod
    def result(cls) -> tuple[int, str, str]:
        """(return code, stdout, stderr) of the subprocess, started now if it was not."""
        cls.start()
        try:
            cls._process.wait(timeout=cls.TIMEOUT_S)
        except subprocess.TimeoutExpired:
            cls.stop()
        stdout, stderr = cls._output
        stdout.seek(0)
        stderr.seek(0)
        return cls._process.returncode, stdout.read(), stderr.read()


# --- the five operators of AGC, per-tensor clipping, gradient health and AMP ---------------------------


def operator_of(backend, name: str):
    """The backend's operator for name (its OpOverload), for opcheck: what fusedclip._ops calls
    through the dispatcher. Backend "torch" runs reference.py's functions."""
    from fusedclip import _ops

    namespace = {"cpu": "fusedclip", "cuda": "fusedclip", "triton": "fusedclip_triton"}.get(backend.name)
    if namespace is None or backend.name not in _ops.NATIVE_BACKENDS[name]:
        pytest.skip(f"backend {backend.name!r} runs {name} as a Python function (reference.py): no "
                    "operator to opcheck")
    return getattr(getattr(torch.ops, namespace), name).default


def monitor_state(size: int, dtype: torch.dtype, device=None) -> list[torch.Tensor]:
    """Zeroed (mean, var, count, below, explosions, exploding, vanishing)."""
    return [torch.zeros(size, dtype=d, device=device or "cpu")
            for d in [dtype] * 2 + [torch.int64] * 3 + [torch.bool] * 2]


class AtenCount:
    """Counts the ATen operators a call issues, those inside fusedclip and fusedclip_triton
    operators included: a TorchDispatchMode sees such an operator, records it and runs its kernel
    with the mode still on. A Triton launch is no ATen operator: what the interpreter does to
    launch one (host copies of the arguments) is not counted (``paused``, set around
    launch.run_kernel). Built by count_aten."""

    FUSED = ("fusedclip", "fusedclip_triton")

    @staticmethod
    def mode():
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        class Mode(TorchDispatchMode):
            def __init__(self):
                super().__init__()
                self.aten: list[str] = []
                self.fused: list[str] = []  # the fusedclip operators it saw, by name
                self.paused = 0

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func.namespace in AtenCount.FUSED:
                    self.fused.append(func.__name__.split(".")[0])
                    tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
                    key = torch._C.DispatchKey.CUDA if tensors[0].is_cuda else torch._C.DispatchKey.CPU
                    with self:
                        return func.redispatch(torch._C.DispatchKeySet(key), *args, **kwargs)
                if not self.paused:
                    self.aten.append(str(func))
                return func(*args, **kwargs)

        return Mode()


def count_aten(monkeypatch, fn):
    """The AtenCount mode after running fn() under it (see AtenCount)."""
    mode = AtenCount.mode()
    with monkeypatch.context() as m:
        try:
            from fusedclip.triton import launch
        except ImportError:  # no Triton: nothing to pause
            launch = None
        if launch is not None:
            run_kernel = launch.run_kernel

            def uncounted(*args, **kwargs):
                mode.paused += 1
                try:
                    run_kernel(*args, **kwargs)
                finally:
                    mode.paused -= 1

            m.setattr(launch, "run_kernel", uncounted)
        with mode:
            fn()
    return mode
