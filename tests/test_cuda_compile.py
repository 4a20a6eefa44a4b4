"""The CUDA sources compile without a GPU: scripts/check_cuda.py's checks under pytest.

nvcc compiles every csrc/cuda/*.cu to an object (host launch code included) for sm_80 and sm_90
with -Xptxas -v and -Werror all-warnings, against the installed torch's stable-ABI headers only
(each .cu holds its operators' glue); a register spill, a stack frame, a warning, or a kernel that
fits fewer than two 512-thread blocks per SM fails. The shared glue gets a g++ syntax check
against the same headers, and the host test of the
table arithmetic (tests/cuda_table_test.cpp) is built and run. Skipped, saying why, without nvcc.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile

import pytest

_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "check_cuda.py")
_spec = importlib.util.spec_from_file_location("check_cuda", _SCRIPT)
check_cuda = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("check_cuda", check_cuda)  # dataclasses look their module up there
_spec.loader.exec_module(check_cuda)

NVCC = check_cuda.find_nvcc()
needs_nvcc = pytest.mark.skipif(
    NVCC is None, reason="nvcc not found ($NVCC, $CUDA_HOME/bin, PATH, /usr/local/cuda/bin): CUDA sources not compiled"
)


def test_there_are_cuda_sources():
    names = {os.path.basename(p) for p in check_cuda.cu_sources()}
    assert {"norm.cu", "elementwise.cu", "clip_single.cu", "agc.cu", "monitor.cu"} <= names


def test_every_kernel_has_the_launch_bounds():
    assert check_cuda.launch_bounds_violations() == []
    assert (check_cuda.kernel_constant("kBlockThreads"), check_cuda.kernel_constant("kMinBlocksPerSm")) == (512, 2)


def test_launch_bounds_check_catches_a_bare_kernel(tmp_path, monkeypatch):
    (tmp_path / "bad.cu").write_text(
        "__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSm) good() {}\n"
        "__global__ void __launch_bounds__(kBlockThreads) one_block() {}\n"
        "__global__ void bare() {}\n"
    )
    monkeypatch.setattr(check_cuda, "CUDA_DIR", str(tmp_path))
    assert len(check_cuda.launch_bounds_violations()) == 2


def test_cu_files_include_only_cuda_runtime_std_and_project_headers():
    assert check_cuda.include_violations() == []


def test_include_check_catches_torch_headers(tmp_path, monkeypatch):
    (tmp_path / "bad.cu").write_text('#include <ATen/ATen.h>\n#include <cstdint>\n#include "missing.cuh"\n')
    monkeypatch.setattr(check_cuda, "CUDA_DIR", str(tmp_path))
    problems = check_cuda.include_violations()
    assert len(problems) == 2 and "<ATen/ATen.h" in problems[0] and '"missing.cuh' in problems[1]


PTXAS_OUTPUT = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z4goodv' for 'sm_80'
ptxas info    : Function properties for _Z4goodv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 404 bytes smem
ptxas info    : Compile time = 12.000 ms
ptxas info    : Function properties for __internal_accurate_pow
    0 bytes stack frame, 16 bytes spill stores, 16 bytes spill loads
ptxas info    : Compiling entry function '_Z5spillv' for 'sm_90'
ptxas info    : Function properties for _Z5spillv
    8 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 65 registers, used 0 barriers, 8 bytes cumulative stack size
ptxas info    : Compiling entry function '_Z6sharedv' for 'sm_90'
ptxas info    : Function properties for _Z6sharedv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers, 120000 bytes smem
"""


def test_ptxas_parser_flags_spills_and_stack():
    problems = check_cuda.ptxas_problems(PTXAS_OUTPUT)
    assert problems == [
        "__internal_accurate_pow (sm_80): 0 bytes stack frame, 16 bytes spill stores, 16 bytes spill loads",
        "_Z5spillv (sm_90): 8 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads",
    ]
    assert check_cuda.ptxas_problems(PTXAS_OUTPUT.split("ptxas info    : Compile time")[0]) == []


def test_ptxas_parser_reads_registers_and_shared_memory():
    kernels, _ = check_cuda.parse_ptxas(PTXAS_OUTPUT)
    assert [(k.name, k.arch, k.registers, k.smem) for k in kernels] == [
        ("_Z4goodv", "sm_80", 64, 404), ("_Z5spillv", "sm_90", 65, 0), ("_Z6sharedv", "sm_90", 32, 120000)]


def test_occupancy_two_blocks_of_512_threads():
    kernel = check_cuda.Kernel
    # 64 registers: 2048 per warp, 32768 per block of 16 warps: two blocks in 65536 registers.
    assert check_cuda.blocks_per_sm(kernel("k", "sm_80", 64, 404), 512) == 2
    # 65 registers round up to 2304 per warp (units of 256): one block.
    assert check_cuda.blocks_per_sm(kernel("k", "sm_90", 65, 0), 512) == 1
    # Few registers: the 2048 threads of an SM bound it.
    assert check_cuda.blocks_per_sm(kernel("k", "sm_90", 16, 0), 512) == 4
    # 100 KB of shared memory: two blocks on sm_90 (228 KB), one on sm_80 (164 KB).
    assert check_cuda.blocks_per_sm(kernel("k", "sm_90", 32, 100 * 1024), 512) == 2
    assert check_cuda.blocks_per_sm(kernel("k", "sm_80", 32, 100 * 1024), 512) == 1
    kernels, _ = check_cuda.parse_ptxas(PTXAS_OUTPUT)
    problems = check_cuda.occupancy_problems(kernels, 512, 2)
    # 65 registers; 120000 bytes of shared memory (two blocks would take 2 * (120000 + 1024)).
    assert [p.split(":")[0] for p in problems] == ["_Z5spillv (sm_90)", "_Z6sharedv (sm_90)"]


@needs_nvcc
@pytest.mark.parametrize("arch", check_cuda.ARCHS)
@pytest.mark.parametrize("source", check_cuda.cu_sources(), ids=os.path.basename)
def test_cu_compiles_without_spills(source, arch):
    with tempfile.TemporaryDirectory() as out_dir:
        assert check_cuda.check_cu(NVCC, source, arch, out_dir) == []


@needs_nvcc
def test_aten_glue_syntax():
    with tempfile.TemporaryDirectory() as out_dir:
        problems = check_cuda.check_glue(out_dir)
    if problems is None:
        pytest.skip("g++, torch's headers or the CUDA toolkit's headers not found: glue not checked")
    assert problems == []


@needs_nvcc
def test_host_table_arithmetic():
    """tests/cuda_table_test.cpp: every chunk and AGC item maps to the right tensor and offset
    (tensors past 2^31 elements, zero-size tensors anywhere, lists past a table), the call's
    chunk limit, the tiers, the AGC rule."""
    with tempfile.TemporaryDirectory() as out_dir:
        problems = check_cuda.check_host_test(out_dir)
    if problems is None:
        pytest.skip("g++ or the CUDA toolkit's headers not found: host test not built")
    assert problems == []
