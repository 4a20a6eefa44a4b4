"""fusedclip.numerics is the one Python home of the numeric rules; the backends agree with it."""

from __future__ import annotations

import math

import pytest
import torch

import fusedclip
from fusedclip import numerics
from helpers import params_with

# norms from tiny to huge, with max_norm below, at and above each
NORMS = [1e-7, 3e-4, 0.5, 1.0 - 2**-24, 1.0, 7.0710678, 12345.678, 3.4e18]
FACTORS = [1e-3, 0.5, 1.0, 2.0]


def test_norm_kinds():
    assert [numerics.norm_kind(p) for p in (2.0, 1.0, 3.5, math.inf, -math.inf, 0.0, -2.0)] == [
        numerics.NormKind.SQUARE_SUM, numerics.NormKind.ABS_SUM, numerics.NormKind.POWER_SUM,
        numerics.NormKind.MAX, numerics.NormKind.MIN, numerics.NormKind.COUNT, numerics.NormKind.POWER_SUM,
    ]


def test_triton_kinds_are_the_numerics_kinds():
    pytest.importorskip("triton")
    from fusedclip.triton import kernels

    for kind in numerics.NormKind:
        assert getattr(kernels, kind.name).value == kind.value


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_coefficient_bitwise_the_same_on_every_cpu_backend_and_torch(dtype):
    """The coefficient applied by the C++ kernels, by reference.py and by torch.nn.utils gives
    the same bits, over norms of every magnitude and max_norm below, at and above them."""
    for norm in NORMS:
        # one element of value `norm`: every backend's norm is exactly it (sqrt of the rounded
        # square), so only the coefficient can differ
        grads = [torch.tensor([norm], dtype=dtype)]
        for factor in FACTORS:
            max_norm = norm * factor
            results = {}
            for name, fn in (("torch.nn.utils", torch.nn.utils.clip_grad_norm_),
                             ("cpu", lambda ps, m: fusedclip.clip_grad_norm_(ps, m, backend="cpu")),
                             ("torch", lambda ps, m: fusedclip.clip_grad_norm_(ps, m, backend="torch"))):
                params = params_with([g.clone() for g in grads])
                total = fn(params, max_norm)
                results[name] = (total, [p.grad for p in params])
            theirs_total, theirs = results["torch.nn.utils"]
            for name in ("cpu", "torch"):
                total, clipped = results[name]
                assert torch.equal(total, theirs_total), (name, norm, factor)
                for a, b in zip(clipped, theirs):
                    assert torch.equal(a, b), (name, norm, factor, a, b)
            coef = numerics.clip_coefficient(theirs_total, max_norm)
            assert torch.equal(theirs[0], grads[0] * coef) or float(coef) == 1.0


@pytest.mark.parametrize("backend", ["auto", "cpu", "torch"])
@pytest.mark.parametrize("max_dtype", [torch.float32, torch.float64, torch.int64, torch.bfloat16])
@pytest.mark.parametrize("norm_dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_tensor_max_norm_scales_as_torch_bitwise(backend, max_dtype, norm_dtype):
    """torch reads a tensor max_norm as a float; fusedclip keeps it on the device, and must still
    give torch's bits, whatever the dtype of the norm it is given (a float16 or bfloat16 norm
    multiplies the float in float32, not max_norm rounded to the norm's dtype)."""
    gen = torch.Generator().manual_seed(80)
    for _ in range(60):
        grads = [(torch.randn(7, generator=gen) * 10).to(norm_dtype), torch.randn(3, 2, generator=gen)]
        total = (torch.rand((), generator=gen) * 100 + 1).to(norm_dtype)
        max_norm = (torch.rand((), generator=gen, dtype=torch.float64) * 50 + 1).to(max_dtype)
        ours, theirs = params_with([g.clone() for g in grads]), params_with([g.clone() for g in grads])
        fusedclip.clip_grads_with_norm_(ours, max_norm, total, backend=backend)
        torch.nn.utils.clip_grads_with_norm_(theirs, max_norm, total)
        for a, b in zip(ours, theirs):
            assert torch.equal(a.grad, b.grad), (max_norm, total)
        ours, theirs = params_with([g.clone() for g in grads]), params_with([g.clone() for g in grads])
        n_ours = fusedclip.clip_grad_norm_(ours, max_norm, backend=backend)
        n_theirs = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
        coef = numerics.clip_coefficient(n_theirs, float(max_norm))
        for a, g in zip(ours, grads):  # our norm, torch's coefficient formula of it
            assert torch.equal(a.grad, g * numerics.clip_coefficient(n_ours, float(max_norm))), coef


@pytest.mark.parametrize("backend", ["auto", "cpu", "torch"])
def test_square_root_correctly_rounded(backend):
    """The 2-norm is the correctly rounded square root of the statistic (as torch's): ATen's
    float32 sqrt of a scalar is 1 ulp off for some values, 75 among them. Integer data: every
    backend's sum of squares is exact."""
    for values in ([3.0, 4.0, 1.0, 7.0], [1.0] * 3, [2.0, 5.0, 11.0], [6.0, 1.0, 2.0], [9.0, 13.0]):
        g = torch.tensor(values)
        ours = fusedclip.get_total_norm([g], backend=backend)
        exact = torch.tensor(math.sqrt(float((g.double() ** 2).sum().float())), dtype=torch.float32)
        assert torch.equal(ours, exact), (values, ours, exact)
        assert torch.equal(ours, torch.nn.utils.get_total_norm([g])), values


@pytest.fixture(scope="module")
def numerics_h(tmp_path_factory):
    """tests/numerics_test.cpp, csrc/numerics.h's rules behind stdin, built with g++ (no torch,
    no CUDA): a function of queries to answers."""
    import os
    import shutil
    import subprocess

    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("g++ is not installed: csrc/numerics.h cannot be built on the host")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    binary = str(tmp_path_factory.mktemp("numerics") / "numerics_test")
    subprocess.run([compiler, "-std=c++17", "-O2", "-I", os.path.join(root, "csrc"),
                    os.path.join(root, "tests", "numerics_test.cpp"), "-o", binary], check=True)

    def ask(queries: list[str]) -> list[str]:
        run = subprocess.run([binary], input="\n".join(queries) + "\n", capture_output=True, text=True, check=True)
        return run.stdout.split()

    return ask


def _hex(x: float) -> str:
    return float(x).hex()


def _bits_equal(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))


SPECIAL_NORMS = NORMS + [0.0, 5e-45, 1e-30, 3.4e38, math.inf, math.nan]


@pytest.mark.parametrize("dtype,op", [(torch.float32, "coef32"), (torch.float64, "coef64")])
def test_numerics_h_coefficient_is_the_python_rule(numerics_h, dtype, op):
    """csrc/numerics.h's clip_coefficient (the CPU and CUDA kernels') gives the bits of
    fusedclip.numerics.clip_coefficient (torch's), the clamp to 1 included."""
    cases = [(total, max_norm) for total in SPECIAL_NORMS
             for max_norm in [total * f for f in FACTORS if math.isfinite(total * f)] + [0.0, 1.0, 1e30]]
    answers = numerics_h([f"{op} {_hex(t)} {_hex(m)}" for t, m in cases])
    assert len(answers) == len(cases)
    clamped = 0
    for (total, max_norm), answer in zip(cases, answers):
        expected = float(numerics.clip_coefficient(torch.tensor(total, dtype=dtype), max_norm))
        assert _bits_equal(float.fromhex(answer), expected), (total, max_norm, answer, expected)
        clamped += expected == 1.0 and max_norm > total
    assert clamped > 10  # the clamp is exercised


@pytest.mark.parametrize("dtype,op", [(torch.float32, "root32"), (torch.float64, "root64")])
def test_numerics_h_root_is_the_python_rule(numerics_h, dtype, op):
    statistics = [0.0, 1e-30, 0.25, 2.0, 50.0, 7.0710678, 3.4e38, math.inf]
    cases = [(p, s, empty) for p in (2.0, 1.0, 3.5, 0.5, -2.0, math.inf, -math.inf, 0.0)
             for s in statistics for empty in (False, True)]
    queries = [f"{op} {int(numerics.norm_kind(p))} {_hex(s)} {_hex(p)} {int(e)}" for p, s, e in cases]
    answers = numerics_h(queries)
    assert len(answers) == len(cases)
    for (p, s, empty), answer in zip(cases, answers):
        expected = float(numerics.total_norm_from_statistic(torch.tensor(s, dtype=dtype), p, empty))
        answer = float.fromhex(answer)
        if dtype == torch.float64 and numerics.norm_kind(p) == numerics.NormKind.POWER_SUM and not empty:
            # libm's pow and ATen's are each within an ulp of the truth, not always the same ulp
            # (1e-30 ** -0.5); rounded to float32 they agree.
            assert answer == expected or abs(answer - expected) <= math.ulp(expected), (p, s, answer, expected)
        else:
            assert _bits_equal(answer, expected), (p, s, empty, answer, expected)


def test_numerics_h_kinds_and_rescale_are_the_python_rules(numerics_h):
    ps = [2.0, 1.0, 0.0, math.inf, -math.inf, 3.5, -2.0, 0.5, 1e6]
    assert [int(a) for a in numerics_h([f"kind {_hex(p)}" for p in ps])] == [int(numerics.norm_kind(p)) for p in ps]
    norms = [0.0, 1e-30, 3.0, math.inf, math.nan]
    again = numerics_h([f"again {_hex(n)} {_hex(p)}" for p in ps for n in norms])
    assert [a == "1" for a in again] == [numerics.norm_out_of_range(n, p) for p in ps for n in norms]
    assert sum(a == "1" for a in again) == 12  # inf and 0 for each of the six sums
    pivots = numerics_h([f"pivot {_hex(p)}" for p in ps if numerics.norm_kind(p) in numerics.SUM_KINDS])
    assert [float.fromhex(a) for a in pivots] == [
        numerics.pivot_norm_type(p) for p in ps if numerics.norm_kind(p) in numerics.SUM_KINDS
    ]
    cases = [(1e20, 1.0, 2.0), (3e38, 2.0, 2.0), (300.0, 1.0, 1e6), (7e19, 1003.5, 2.0), (2.5, 17.25, 1.0),
             (1e13, 39999.0, 3.5), (3.0, 1.0, -400.0), (1e-20, 2.5, -2.0)]
    answers = numerics_h([f"rescaled {_hex(m)} {_hex(s)} {_hex(p)}" for m, s, p in cases])
    assert len(answers) == len(cases)
    for (m, s, p), answer in zip(cases, answers):
        expected = float(numerics.rescaled_norm(torch.tensor(m, dtype=torch.float64), torch.tensor(s, dtype=torch.float64), p,
                                                torch.float64))
        assert _bits_equal(float.fromhex(answer), expected), (m, s, p, answer, expected)
