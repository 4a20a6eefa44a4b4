"""The CUDA sources compile without a GPU: scripts/check_cuda.py's checks under pytest.

nvcc compiles every csrc/cuda/*.cu for sm_80 and sm_90 with -Xptxas -v and -Werror all-warnings,
against nothing of torch; a register spill, a stack frame or a warning fails. The ATen glue gets a
g++ syntax check against the installed torch's headers. Skipped, saying why, without nvcc.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile

import pytest

_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "check_cuda.py")
_spec = importlib.util.spec_from_file_location("check_cuda", _SCRIPT)
check_cuda = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_cuda)

NVCC = check_cuda.find_nvcc()
needs_nvcc = pytest.mark.skipif(
    NVCC is None, reason="nvcc not found ($NVCC, $CUDA_HOME/bin, PATH, /usr/local/cuda/bin): CUDA sources not compiled"
)


def test_there_are_cuda_sources():
    names = {os.path.basename(p) for p in check_cuda.cu_sources()}
    assert {"norm.cu", "elementwise.cu", "clip_single.cu"} <= names


def test_cu_files_include_only_cuda_runtime_std_and_project_headers():
    assert check_cuda.include_violations() == []


def test_include_check_catches_torch_headers(tmp_path, monkeypatch):
    (tmp_path / "bad.cu").write_text('#include <ATen/ATen.h>\n#include <cstdint>\n#include "missing.cuh"\n')
    monkeypatch.setattr(check_cuda, "CUDA_DIR", str(tmp_path))
    problems = check_cuda.include_violations()
    assert len(problems) == 2 and "<ATen/ATen.h" in problems[0] and '"missing.cuh' in problems[1]


def test_ptxas_parser_flags_spills_and_stack():
    output = """\
ptxas info    : Compiling entry function '_Z4goodv' for 'sm_80'
ptxas info    : Function properties for _Z4goodv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers
ptxas info    : Compiling entry function '_Z5spillv' for 'sm_90'
ptxas info    : Function properties for _Z5spillv
    8 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
"""
    problems = check_cuda.ptxas_problems(output)
    assert problems == ["_Z5spillv (sm_90): 8 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads"]
    assert check_cuda.ptxas_problems(output.split("ptxas info    : Compiling entry function '_Z5")[0]) == []


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
