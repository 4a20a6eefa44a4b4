"""The native CPU library as it is built and loaded: on PyTorch's stable ABI only (no C++ symbol
of torch, neither libtorch_python nor pybind11), its instruction set chosen at load and forced
lower by FUSEDCLIP_CPU_ISA, the operator contracts under each instruction set this CPU runs, and
the fallback when the library cannot load."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import fusedclip
from fusedclip import _backends, _ops, operators

pytestmark = pytest.mark.skipif(_backends._C is None, reason="fusedclip._C is not built")

HERE = os.path.dirname(os.path.abspath(__file__))
ISAS = ("baseline", "avx2", "avx512")
# Subprocesses import the fusedclip this process imported (the source tree's, or an installed wheel's).
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(fusedclip.__file__)))


def _env(**env) -> dict:
    path = os.pathsep.join(p for p in (PACKAGE_PARENT, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **env}


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=_env(**env), cwd=HERE)


def _library_path() -> str:
    return _backends._C.__file__


def _supported_isas() -> list[str]:
    """The instruction sets this CPU runs, as the library decided at load (widest and below)."""
    widest = _backends._C.widest_cpu_isa
    return list(ISAS[: ISAS.index(widest) + 1])


@pytest.mark.skipif(shutil.which("nm") is None or shutil.which("readelf") is None, reason="binutils not installed")
def test_the_library_imports_only_the_stable_c_shim_of_torch():
    """Every torch function the library calls is a C function of the stable shim (aoti_torch_*,
    torch_*): no C++ symbol of c10, ATen or torch, so the library loads under any torch whose
    shim has those functions (2.10 and newer)."""
    undefined = subprocess.run(["nm", "-D", "--undefined-only", _library_path()], capture_output=True, text=True,
                               check=True).stdout.split()
    symbols = [s.split("@")[0] for s in undefined if s not in ("U", "w", "v")]
    torch_cpp = [s for s in symbols if re.match(r"_ZN?K?(3c10|2at|5torch|8pybind11)", s) or "THP" in s]
    assert torch_cpp == []
    assert any(s.startswith("aoti_torch_") for s in symbols)
    needed = subprocess.run(["readelf", "-d", _library_path()], capture_output=True, text=True, check=True).stdout
    assert "libtorch_python" not in needed and "libpython" not in needed
    assert "pybind11" not in open(_library_path(), "rb").read().decode("latin-1")


@pytest.mark.skipif(shutil.which("readelf") is None, reason="binutils not installed")
def test_the_release_library_carries_no_debug_information():
    sections = subprocess.run(["readelf", "-S", _library_path()], capture_output=True, text=True, check=True).stdout
    assert ".debug_info" not in sections
    assert os.path.getsize(_library_path()) < 2 * 1024 * 1024


def test_the_instruction_set_is_the_widest_the_cpu_runs_unless_forced():
    assert _backends._C.cpu_isa in ISAS
    default = _run_python("from fusedclip import _backends; print(_backends._C.cpu_isa)", FUSEDCLIP_CPU_ISA="")
    assert default.stdout.strip() == _backends._C.widest_cpu_isa
    for isa in _supported_isas():
        chosen = _run_python("from fusedclip import _backends; print(_backends._C.cpu_isa)", FUSEDCLIP_CPU_ISA=isa)
        assert chosen.returncode == 0, chosen.stderr
        assert chosen.stdout.strip() == isa


def test_an_instruction_set_the_cpu_cannot_run_is_ignored_with_a_warning():
    result = _run_python("from fusedclip import _backends; print(_backends._C.cpu_isa)", FUSEDCLIP_CPU_ISA="sse9")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == _backends._C.widest_cpu_isa
    assert "FUSEDCLIP_CPU_ISA='sse9'" in result.stderr


def test_info_prints_the_instruction_set():
    result = subprocess.run([sys.executable, "-m", "fusedclip", "info"], capture_output=True, text=True, timeout=300,
                            env=_env(FUSEDCLIP_CPU_ISA="baseline"), cwd=HERE)
    assert result.returncode == 0, result.stderr
    assert "CPU kernels for baseline" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("isa", ISAS)
def test_operator_contracts_under_each_instruction_set(isa):
    """The CPU operators' contracts (test_ops.py, test_operator_contracts.py, on backend "cpu")
    with the kernels of each instruction set this CPU runs."""
    if isa not in _supported_isas():
        pytest.skip(f"this CPU does not run {isa}")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "cpu and not triton",
         os.path.join(HERE, "test_ops.py"), os.path.join(HERE, "test_operator_contracts.py")],
        capture_output=True, text=True, timeout=1200, env=_env(FUSEDCLIP_CPU_ISA=isa), cwd=HERE)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout


def test_on_an_older_torch_import_warns_once_and_uses_the_other_backends():
    """The version check forced: torch reports 2.9 before fusedclip is imported."""
    code = ("import torch; torch.__version__ = '2.9.1'; import fusedclip; from fusedclip import _backends; "
            "p = torch.nn.Parameter(torch.ones(3)); p.grad = torch.full((3,), 4.0); "
            "print(_backends.backend_status()['cpu']); print(fusedclip.available_backends()); "
            "print(float(fusedclip.clip_grad_norm_([p], 1.0)))")
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert "need torch 2.10 or newer" in lines[0] and "2.9.1" in lines[0]
    assert "'cpu'" not in lines[1] and "'torch'" in lines[1]
    assert float(lines[2]) == pytest.approx(48 ** 0.5)
    assert result.stderr.count("need torch 2.10 or newer") == 1


def test_an_older_torch_is_refused_with_the_reason(monkeypatch):
    """On a torch older than 2.10 the libraries are not loaded: the reason names the versions."""
    monkeypatch.setattr(_backends.torch, "__version__", "2.9.1+cpu")
    module, reason = _backends._load("_C")
    assert module is None
    assert "2.10" in reason and "2.9.1" in reason


@pytest.mark.skipif(torch.version.cuda is None, reason="the CUDA library loads only under a torch with CUDA")
def test_the_cuda_library_registers_every_operator_under_a_cuda_torch():
    """Under a CUDA torch (with or without a GPU) fusedclip._C_cuda loads, registers a CUDA kernel
    for every operator, and says whether its kernels run on a device without failing."""
    if _backends._C_CUDA is None:
        pytest.skip(f"fusedclip._C_cuda is not available: {_backends._CUDA_ERROR}")
    for name in operators.NAMES:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedclip::{name}", "CUDA"), name
    assert "cuda" in _ops.NATIVE_BACKENDS["clip_grad_norm_"]
    assert _backends._C_CUDA.cuda_version > 0
    if not torch.cuda.is_available():
        assert _backends._C_CUDA.kernels_run_on(0) is False
        assert "cuda" in fusedclip.available_backends()


def test_tensor_spans_reads_each_tensors_address_size_dtype_and_density():
    """fusedclip::tensor_spans (backend "triton"'s table-cache key, csrc/cpu/tensor_spans.cpp):
    one kernel for every device, registered by the CPU library; two int64 words a tensor."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fusedclip::tensor_spans", "CompositeExplicitAutograd")
    z = torch.randn(8)
    tensors = [torch.randn(3, 4).t(), z[::2], torch.empty(0), torch.randn(5).to(torch.bfloat16)]
    spans = torch.ops.fusedclip.tensor_spans.default(tensors)
    assert spans.dtype == torch.int64 and spans.shape == (4, 2)
    assert [int(a) for a in spans[:, 0]] == [tensors[0].data_ptr(), z.data_ptr(), 0, tensors[3].data_ptr()]
    words = [int(w) for w in spans[:, 1]]
    assert [w >> 16 for w in words] == [12, 4, 0, 5]  # numel
    assert [w & 1 for w in words] == [1, 0, 1, 1]  # dense: one block of memory, any strides
    assert len({(w >> 8) & 0xFF for w in words}) == 2  # float32 and bfloat16 codes
    assert (words[0] >> 8) & 0xFF == (words[1] >> 8) & 0xFF
