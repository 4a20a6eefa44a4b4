#!/usr/bin/env python3
"""Compile-checks the CUDA sources without a GPU: ``python scripts/check_cuda.py``.

1. Every csrc/cuda/*.cu and *.cuh includes only the CUDA toolkit's runtime headers, the C++
   standard library and project headers (so nvcc builds them against a CPU-only torch).
2. nvcc compiles every csrc/cuda/*.cu for each architecture (sm_80 and sm_90 by default) with
   ``-Xptxas -v`` and ``-Werror all-warnings``, without torch's include paths; any warning, any
   register spill and any stack frame fails the check.
3. The ATen glue (csrc/cuda/*.cpp) passes ``g++ -fsyntax-only -Wall -Wextra`` against the
   installed torch's headers and the CUDA toolkit's, when both are present. A CPU-only torch ships
   c10/cuda but not its generated cuda_cmake_macros.h; an empty stand-in is written for that one
   (in a temporary folder, like every other output of this script).

Exit status 0 when everything passes, 1 otherwise; 2 when nvcc is not found. tests/test_cuda_compile.py
runs the same checks under pytest.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sysconfig
import sys
import tempfile
import time
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
ARCHS = ("sm_80", "sm_90")

# The CUDA toolkit headers a .cu may include: the runtime, half/bfloat16 types, cooperative groups.
ALLOWED_SYSTEM_HEADERS = {"cuda_runtime.h", "cuda_fp16.h", "cuda_bf16.h", "cooperative_groups.h"}
_INCLUDE = re.compile(r'^\s*#\s*include\s*([<"])([^>"]+)[>"]', re.MULTILINE)
_STD_HEADER = re.compile(r"^[a-z_]+$")  # <cstdint>, <atomic>, ...: the C++ standard library
_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def find_nvcc() -> Optional[str]:
    """nvcc from $NVCC, $CUDA_HOME/bin, the PATH or /usr/local/cuda/bin; None when absent."""
    candidates = [os.environ.get("NVCC")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home:
            candidates.append(os.path.join(home, "bin", "nvcc"))
    candidates += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def cu_sources() -> list[str]:
    return sorted(glob.glob(os.path.join(CUDA_DIR, "*.cu")))


# Torch-free headers shared by the CPU and CUDA kernels (the numeric rules): a .cu may include
# them, and they are held to the same rule.
SHARED_HEADERS = (os.path.join(ROOT, "csrc", "numerics.h"),)


def include_violations() -> list[str]:
    """Includes of the .cu/.cuh files (and the shared headers) that are neither CUDA runtime,
    standard library nor project."""
    problems = []
    sources = glob.glob(os.path.join(CUDA_DIR, "*.cu")) + glob.glob(os.path.join(CUDA_DIR, "*.cuh"))
    for path in sorted(sources) + list(SHARED_HEADERS):
        with open(path) as f:
            text = f.read()
        for kind, name in _INCLUDE.findall(text):
            if kind == '"':
                target = os.path.normpath(os.path.join(os.path.dirname(path), name))
                in_cuda_dir = name.endswith(".cuh") and os.path.dirname(target) == CUDA_DIR
                ok = os.path.isfile(target) and (in_cuda_dir or target in SHARED_HEADERS)
            else:
                ok = name in ALLOWED_SYSTEM_HEADERS or bool(_STD_HEADER.match(name))
            if not ok:
                problems.append(f"{os.path.relpath(path, ROOT)} includes {kind}{name}")
    return problems


def ptxas_problems(output: str) -> list[str]:
    """Every kernel of nvcc's -Xptxas -v output that spills registers or uses a stack frame."""
    problems = []
    entry = None
    for line in output.splitlines():
        match = _ENTRY.search(line)
        if match:
            entry = f"{match.group(1)} ({match.group(2)})"
            continue
        match = _FRAME.search(line)
        if match:
            stack, stores, loads = map(int, match.groups())
            if stores or loads or stack:
                problems.append(f"{entry}: {stack} bytes stack frame, {stores} bytes spill stores, "
                                f"{loads} bytes spill loads")
    return problems


# The flags torch.utils.cpp_extension gives nvcc for every extension (COMMON_NVCC_FLAGS), so the
# check sees what the real build sees: no implicit half/bfloat16 conversions or operators.
TORCH_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
                    "--expt-relaxed-constexpr"]


def compile_cu(nvcc: str, source: str, arch: str, out_dir: str) -> tuple[int, str]:
    """nvcc's exit status and output for one source and architecture (device code only)."""
    out = os.path.join(out_dir, f"{os.path.basename(source)}.{arch}.cubin")
    command = [nvcc, "-std=c++17", "-O3", *TORCH_NVCC_FLAGS, "-I", os.path.join(ROOT, "csrc"), "--cubin",
               f"-arch={arch}", "-Xptxas", "-v", "-Werror", "all-warnings", "-o", out, source]
    result = subprocess.run(command, capture_output=True, text=True)
    return result.returncode, result.stdout + result.stderr


def check_cu(nvcc: str, source: str, arch: str, out_dir: str) -> list[str]:
    """The problems of one source and architecture: errors, warnings, spills; [] when clean."""
    returncode, output = compile_cu(nvcc, source, arch, out_dir)
    name = f"{os.path.relpath(source, ROOT)} for {arch}"
    if returncode != 0:
        return [f"{name}: nvcc failed ({returncode}):\n{output}"]
    if "Compiling entry function" not in output:
        return [f"{name}: no kernel in nvcc's -Xptxas -v output:\n{output}"]
    return [f"{name}: {problem}" for problem in ptxas_problems(output)]


def cuda_include_dir(nvcc: str) -> Optional[str]:
    """The CUDA toolkit's include folder: beside nvcc's bin, or of $CUDA_HOME or /usr/local/cuda
    (nvcc may be a wrapper script elsewhere)."""
    homes = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), os.environ.get("CUDA_HOME"),
             os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    for home in homes:
        if home and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
            return os.path.join(home, "include")
    return None


def glue_command(out_dir: str) -> Optional[list[str]]:
    """g++ -fsyntax-only over the glue, or None without g++, torch or the CUDA headers."""
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    nvcc = find_nvcc()
    try:
        import torch.utils.cpp_extension as cpp_extension
    except ImportError:
        return None
    if cxx is None or nvcc is None:
        return None
    cuda_include = cuda_include_dir(nvcc)
    if cuda_include is None:
        return None
    includes = cpp_extension.include_paths()
    if not any(os.path.isfile(os.path.join(p, "c10", "cuda", "impl", "cuda_cmake_macros.h")) for p in includes):
        stub = os.path.join(out_dir, "stub", "c10", "cuda", "impl")
        os.makedirs(stub, exist_ok=True)
        with open(os.path.join(stub, "cuda_cmake_macros.h"), "w") as f:
            f.write("#pragma once\n")
        includes = includes + [os.path.join(out_dir, "stub")]
    command = [cxx, "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-DFUSEDCLIP_WITH_CUDA",
               "-DCPU_CAPABILITY=DEFAULT",  # what python_module.cpp needs of the CPU build
               "-I", os.path.join(ROOT, "csrc")]
    for path in includes + [cuda_include, sysconfig.get_paths()["include"]]:
        command += ["-isystem", path]  # torch's own headers warn under -Wextra
    # python_module.cpp too: its CUDA entry points are compiled only with FUSEDCLIP_WITH_CUDA.
    python_module = os.path.join(ROOT, "csrc", "python_module.cpp")
    return command + sorted(glob.glob(os.path.join(CUDA_DIR, "*.cpp"))) + [python_module]


def check_glue(out_dir: str) -> Optional[list[str]]:
    """The glue's compiler errors; [] when clean; None when it cannot be checked here."""
    command = glue_command(out_dir)
    if command is None:
        return None
    result = subprocess.run(command, capture_output=True, text=True)
    return [] if result.returncode == 0 else [f"csrc/cuda/*.cpp: g++ failed:\n{result.stdout}{result.stderr}"]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", default=list(ARCHS), help="default: sm_80 sm_90")
    args = parser.parse_args(argv)
    problems = include_violations()
    nvcc = find_nvcc()
    if nvcc is None:
        print("nvcc not found ($NVCC, $CUDA_HOME/bin, PATH, /usr/local/cuda/bin): nothing compiled")
        for problem in problems:
            print(problem)
        return 2
    with tempfile.TemporaryDirectory(prefix="fusedclip-cuda-check-") as out_dir:
        for source in cu_sources():
            for arch in args.arch:
                start = time.perf_counter()
                found = check_cu(nvcc, source, arch, out_dir)
                status = "ok" if not found else "FAILED"
                print(f"{os.path.relpath(source, ROOT)} {arch}: {status} ({time.perf_counter() - start:.1f} s)")
                problems += found
        start = time.perf_counter()
        glue = check_glue(out_dir)
        if glue is None:
            print("csrc/cuda/*.cpp: not checked (needs g++, torch and the CUDA headers)")
        else:
            print(f"csrc/cuda/*.cpp g++ -fsyntax-only: {'ok' if not glue else 'FAILED'} "
                  f"({time.perf_counter() - start:.1f} s)")
            problems += glue
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
