#!/usr/bin/env python3
"""Compile-checks the CUDA sources without a GPU: ``python scripts/check_cuda.py``.

1. Every csrc/cuda/*.cuh includes only the CUDA toolkit's runtime headers, the C++ standard
   library and torch-free project headers (the host test builds them with no torch). Every
   csrc/cuda/*.cu, whose operators' glue is on torch's stable ABI, may also include the stable
   ABI (torch/csrc/stable, torch/headeronly, the C shim) and the project headers that wrap it
   (csrc/cuda/glue.h, csrc/stable.h, csrc/tensor_checks.h, held to the same rule): no ATen or c10
   C++ header, so a CPU-only torch's headers build them. Every kernel is declared with
   __launch_bounds__(kBlockThreads, kMinBlocksPerSm).
2. nvcc compiles every csrc/cuda/*.cu to an object (``nvcc -c``: the host code too, launches and
   stable-ABI glue, with the host compiler's -Wall -Wextra -Werror) for each architecture (sm_80
   and sm_90 by default) with ``-Xptxas -v`` and ``-Werror all-warnings``, against the installed
   torch's headers (as system headers, at setup.py's TORCH_TARGET_VERSION); any warning, any
   register spill and any stack frame fails the check.
3. From ptxas's register and shared-memory figures, every kernel fits kMinBlocksPerSm blocks of
   kBlockThreads threads (csrc/cuda/kernels.cuh: two of 512) on one SM of each architecture
   (65536 registers, allocated per warp in units of 256; the SM's shared memory, 1 KB of it
   reserved per block); ``--report`` prints the figures of every kernel.
4. The shared stable-ABI glue and the Python module (csrc/cuda/*.cpp) pass ``g++ -fsyntax-only -Wall -Wextra`` against the
   installed torch's headers and the CUDA toolkit's, when both are present. A CPU-only torch ships
   c10/cuda but not its generated cuda_cmake_macros.h; an empty stand-in is written for that one
   (in a temporary folder, like every other output of this script).
5. The host test of the table arithmetic (tests/cuda_table_test.cpp: which tensor and offset
   every chunk and AGC item maps to, tensors past 2^31 elements, zero-size tensors anywhere, the
   tiers) is built with g++ and run.

The compiles run in parallel. Exit status 0 when everything passes, 1 otherwise; 2 when nvcc is
not found. tests/test_cuda_compile.py runs the same checks under pytest.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import glob
import os
import re
import shutil
import subprocess
import sysconfig
import sys
import tempfile
import time
from typing import Callable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
HOST_TEST = os.path.join(ROOT, "tests", "cuda_table_test.cpp")
ARCHS = ("sm_80", "sm_90")

# The CUDA toolkit headers a .cu may include: the runtime, half/bfloat16 types, cooperative groups.
ALLOWED_SYSTEM_HEADERS = {"cuda_runtime.h", "cuda_fp16.h", "cuda_bf16.h", "cooperative_groups.h"}
_INCLUDE = re.compile(r'^\s*#\s*include\s*([<"])([^>"]+)[>"]', re.MULTILINE)
_STD_HEADER = re.compile(r"^[a-z_]+$")  # <cstdint>, <atomic>, ...: the C++ standard library
_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
_PROPERTIES = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


@dataclasses.dataclass(frozen=True)
class SmLimits:
    """What one SM of an architecture holds (CUDA C Programming Guide, compute capabilities)."""

    registers: int = 65536
    register_unit: int = 256       # registers are allocated per warp in units of this many
    threads: int = 2048
    shared: int = 0                # shared memory per SM, bytes
    shared_reserved: int = 1024    # reserved per resident block (sm_80 and newer)


SM_LIMITS = {
    "sm_80": SmLimits(shared=164 * 1024),
    "sm_90": SmLimits(shared=228 * 1024),
}


@dataclasses.dataclass
class Kernel:
    """ptxas's figures for one entry function on one architecture."""

    name: str
    arch: str
    registers: int = 0
    smem: int = 0


def kernel_constant(name: str) -> int:
    """An integer constant of csrc/cuda/kernels.cuh (kBlockThreads, kMinBlocksPerSm)."""
    with open(os.path.join(CUDA_DIR, "kernels.cuh")) as f:
        match = re.search(rf"constexpr int {name} = (\d+);", f.read())
    if match is None:
        raise ValueError(f"csrc/cuda/kernels.cuh defines no {name}")
    return int(match.group(1))


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


# Torch-free headers shared by the CPU and CUDA kernels (the numeric rules): a .cuh may include
# them, and they are held to the same rule.
SHARED_HEADERS = (os.path.join(ROOT, "csrc", "numerics.h"),)
# The project headers of torch's stable ABI that a .cu may include (csrc/cuda/glue.h, the shared
# glue, and the two headers of every operator file it includes), held to the .cu rule.
STABLE_HEADERS = (os.path.join(ROOT, "csrc", "stable.h"), os.path.join(ROOT, "csrc", "tensor_checks.h"))
# torch's stable ABI: its header-only wrappers and the C shim (no ATen or c10 C++ symbol).
_STABLE_ABI_HEADER = re.compile(r"^torch/(csrc/stable|headeronly|csrc/inductor/aoti_torch/c)/[\w/]+\.h$")


def include_violations() -> list[str]:
    """Includes of the .cu/.cuh files (and the headers they may include) that are neither CUDA
    runtime, standard library nor project; of the .cu files and the stable-ABI headers, also
    torch's stable ABI."""
    problems = []
    glue_headers = sorted(glob.glob(os.path.join(CUDA_DIR, "*.h"))) + list(STABLE_HEADERS)
    torch_free = sorted(glob.glob(os.path.join(CUDA_DIR, "*.cuh"))) + list(SHARED_HEADERS)
    on_stable_abi = sorted(glob.glob(os.path.join(CUDA_DIR, "*.cu"))) + glue_headers
    for path in sorted(torch_free + on_stable_abi):
        stable = path in on_stable_abi
        with open(path) as f:
            text = f.read()
        for kind, name in _INCLUDE.findall(text):
            if kind == '"':
                target = os.path.normpath(os.path.join(os.path.dirname(path), name))
                in_cuda_dir = name.endswith(".cuh") and os.path.dirname(target) == CUDA_DIR
                ok = os.path.isfile(target) and (in_cuda_dir or target in SHARED_HEADERS or
                                                 (stable and target in glue_headers))
            else:
                ok = (name in ALLOWED_SYSTEM_HEADERS or bool(_STD_HEADER.match(name)) or
                      (stable and bool(_STABLE_ABI_HEADER.match(name))))
            if not ok:
                problems.append(f"{os.path.relpath(path, ROOT)} includes {kind}{name}")
    return problems


_GLOBAL = re.compile(r"__global__\s+void\s+(__launch_bounds__\(([^)]*)\))?")


def launch_bounds_violations() -> list[str]:
    """Kernels of csrc/cuda/*.cu declared without __launch_bounds__(kBlockThreads,
    kMinBlocksPerSm): the bounds make ptxas keep to the registers that kMinBlocksPerSm blocks
    leave each thread, and the occupancy check assumes blocks of kBlockThreads."""
    problems = []
    for path in cu_sources():
        with open(path) as f:
            for match in _GLOBAL.finditer(f.read()):
                if (match.group(2) or "").replace(" ", "") != "kBlockThreads,kMinBlocksPerSm":
                    problems.append(f"{os.path.relpath(path, ROOT)}: a kernel without "
                                    "__launch_bounds__(kBlockThreads, kMinBlocksPerSm)")
    return problems


def parse_ptxas(output: str) -> tuple[list[Kernel], list[str]]:
    """The kernels of nvcc's -Xptxas -v output, and every function (kernel or subroutine, such as
    libdevice's pow) that spills registers or uses a stack frame."""
    kernels: list[Kernel] = []
    problems = []
    function, arch = None, None
    for line in output.splitlines():
        match = _ENTRY.search(line)
        if match:
            kernels.append(Kernel(match.group(1), match.group(2)))
            function, arch = match.groups()
            continue
        match = _PROPERTIES.search(line)
        if match:
            function = match.group(1)
            continue
        match = _FRAME.search(line)
        if match:
            stack, stores, loads = map(int, match.groups())
            if stores or loads or stack:
                problems.append(f"{function} ({arch}): {stack} bytes stack frame, {stores} bytes spill stores, "
                                f"{loads} bytes spill loads")
            continue
        match = _USED.search(line)
        if match and kernels:
            kernels[-1].registers = int(match.group(1))
            smem = _SMEM.search(line)
            kernels[-1].smem = int(smem.group(1)) if smem else 0
    return kernels, problems


def ptxas_problems(output: str) -> list[str]:
    """Every function of nvcc's -Xptxas -v output that spills registers or uses a stack frame."""
    return parse_ptxas(output)[1]


def blocks_per_sm(kernel: Kernel, threads: int) -> int:
    """How many blocks of `threads` threads of the kernel one SM holds at once (registers, shared
    memory and threads; no other limit binds at these sizes)."""
    limits = SM_LIMITS[kernel.arch]
    warps = -(-threads // 32)
    per_warp = -(-max(kernel.registers, 1) * 32 // limits.register_unit) * limits.register_unit
    by_registers = limits.registers // (warps * per_warp)
    by_shared = limits.shared // (kernel.smem + limits.shared_reserved)
    return min(by_registers, by_shared, limits.threads // threads)


def occupancy_problems(kernels: list[Kernel], threads: int, min_blocks: int) -> list[str]:
    """The kernels that fit fewer than min_blocks blocks of `threads` threads per SM."""
    return [f"{k.name} ({k.arch}): {k.registers} registers and {k.smem} bytes smem fit "
            f"{blocks_per_sm(k, threads)} blocks of {threads} threads per SM, fewer than {min_blocks}"
            for k in kernels if blocks_per_sm(k, threads) < min_blocks]


# The flags torch.utils.cpp_extension gives nvcc for every extension (COMMON_NVCC_FLAGS), so the
# check sees what the real build sees: no implicit half/bfloat16 conversions or operators.
TORCH_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
                    "--expt-relaxed-constexpr"]


# The stable ABI of torch 2.10 (setup.py's TORCH_TARGET_VERSION).
TORCH_TARGET_VERSION = "-DTORCH_TARGET_VERSION=0x020a000000000000"


def torch_include_paths() -> Optional[list[str]]:
    """The installed torch's include folders, or None without torch."""
    try:
        import torch.utils.cpp_extension as cpp_extension
    except ImportError:
        return None
    return cpp_extension.include_paths()


def compile_cu(nvcc: str, source: str, arch: str, out_dir: str) -> tuple[int, str]:
    """nvcc's exit status and output for one source and architecture: an object file, host code
    included (as the real build compiles it)."""
    includes = torch_include_paths()
    if includes is None:
        return 1, "torch is not installed: the .cu files include its stable ABI (csrc/cuda/glue.h)"
    out = os.path.join(out_dir, f"{os.path.basename(source)}.{arch}.o")
    command = [nvcc, "-std=c++17", "-O3", *TORCH_NVCC_FLAGS, TORCH_TARGET_VERSION, "-I", os.path.join(ROOT, "csrc")]
    for path in includes:
        command += ["-isystem", path]  # torch's own headers warn under -Wextra
    command += ["-c", f"-arch={arch}", "-Xptxas", "-v", "-Werror", "all-warnings", "-Xcompiler",
                "-Wall,-Wextra,-Werror", "-o", out, source]
    result = subprocess.run(command, capture_output=True, text=True)
    return result.returncode, result.stdout + result.stderr


def check_cu(nvcc: str, source: str, arch: str, out_dir: str,
             kernels: Optional[list[Kernel]] = None) -> list[str]:
    """The problems of one source and architecture: errors, warnings, spills, stack frames, fewer
    than kMinBlocksPerSm blocks per SM; [] when clean. kernels, when given, receives ptxas's
    figures."""
    returncode, output = compile_cu(nvcc, source, arch, out_dir)
    name = f"{os.path.relpath(source, ROOT)} for {arch}"
    if returncode != 0:
        return [f"{name}: nvcc failed ({returncode}):\n{output}"]
    found, problems = parse_ptxas(output)
    if not found:
        return [f"{name}: no kernel in nvcc's -Xptxas -v output:\n{output}"]
    if kernels is not None:
        kernels.extend(found)
    problems += occupancy_problems(found, kernel_constant("kBlockThreads"), kernel_constant("kMinBlocksPerSm"))
    return [f"{name}: {problem}" for problem in problems]


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
    includes = torch_include_paths()
    if cxx is None or nvcc is None or includes is None:
        return None
    cuda_include = cuda_include_dir(nvcc)
    if cuda_include is None:
        return None
    # The stable ABI (TORCH_TARGET_VERSION) and the limited C API.
    command = [cxx, "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-fvisibility=hidden",
               TORCH_TARGET_VERSION, "-DPy_LIMITED_API=0x030a0000",
               "-I", os.path.join(ROOT, "csrc")]
    for path in includes + [cuda_include, sysconfig.get_paths()["include"]]:
        command += ["-isystem", path]  # torch's own headers warn under -Wextra
    return command + sorted(glob.glob(os.path.join(CUDA_DIR, "*.cpp")))


def check_glue(out_dir: str) -> Optional[list[str]]:
    """The glue's compiler errors; [] when clean; None when it cannot be checked here."""
    command = glue_command(out_dir)
    if command is None:
        return None
    result = subprocess.run(command, capture_output=True, text=True)
    return [] if result.returncode == 0 else [f"csrc/cuda/*.cpp: g++ failed:\n{result.stdout}{result.stderr}"]


def host_test_command(out_dir: str) -> Optional[list[str]]:
    """g++ building tests/cuda_table_test.cpp, or None without g++ or the CUDA headers."""
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    nvcc = find_nvcc()
    cuda_include = cuda_include_dir(nvcc) if nvcc else None
    if cxx is None or cuda_include is None:
        return None
    return [cxx, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-I", os.path.join(ROOT, "csrc"),
            "-isystem", cuda_include, HOST_TEST, "-o", os.path.join(out_dir, "cuda_table_test")]


def check_host_test(out_dir: str) -> Optional[list[str]]:
    """The host test's build errors or failures; [] when it passes; None when it cannot run here."""
    command = host_test_command(out_dir)
    if command is None:
        return None
    build = subprocess.run(command, capture_output=True, text=True)
    if build.returncode != 0:
        return [f"tests/cuda_table_test.cpp: g++ failed:\n{build.stdout}{build.stderr}"]
    run = subprocess.run([command[-1]], capture_output=True, text=True, timeout=600)
    if run.returncode != 0 or run.stdout.strip() != "ok":
        return [f"tests/cuda_table_test.cpp: failed ({run.returncode}):\n{run.stdout}{run.stderr}"]
    return []


def demangled(names: list[str]) -> list[str]:
    """names through c++filt when it is installed."""
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None:
        return names
    result = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True)
    lines = result.stdout.splitlines()
    return lines if result.returncode == 0 and len(lines) == len(names) else names


def print_report(kernels: list[Kernel]) -> None:
    threads = kernel_constant("kBlockThreads")
    names = demangled([k.name for k in kernels])
    for kernel, name in sorted(zip(kernels, names), key=lambda pair: (pair[1], pair[0].arch)):
        name = re.sub(r"\(anonymous namespace\)::|fusedclip::cuda::", "", name)
        print(f"  {kernel.arch} {kernel.registers:3d} registers {kernel.smem:5d} bytes smem "
              f"{blocks_per_sm(kernel, threads)} blocks/SM  {name}")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", default=list(ARCHS), help="default: sm_80 sm_90")
    parser.add_argument("--report", action="store_true", help="print every kernel's registers and shared memory")
    args = parser.parse_args(argv)
    problems = include_violations() + launch_bounds_violations()
    nvcc = find_nvcc()
    if nvcc is None:
        print("nvcc not found ($NVCC, $CUDA_HOME/bin, PATH, /usr/local/cuda/bin): nothing compiled")
        for problem in problems:
            print(problem)
        return 2
    kernels: list[Kernel] = []
    with tempfile.TemporaryDirectory(prefix="fusedclip-cuda-check-") as out_dir:
        # (label, check): each check returns its problems, or None when it cannot run here.
        checks: list[tuple[str, Callable[[], Optional[list[str]]]]] = [
            (f"{os.path.relpath(source, ROOT)} {arch}", lambda s=source, a=arch: check_cu(nvcc, s, a, out_dir, kernels))
            for source in cu_sources() for arch in args.arch
        ]
        checks.append(("csrc/cuda/*.cpp g++ -fsyntax-only", lambda: check_glue(out_dir)))
        checks.append(("tests/cuda_table_test.cpp (host)", lambda: check_host_test(out_dir)))

        def timed(check: Callable[[], Optional[list[str]]]) -> tuple[Optional[list[str]], float]:
            start = time.perf_counter()
            return check(), time.perf_counter() - start

        with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            futures = [pool.submit(timed, check) for _, check in checks]
            for (label, _), future in zip(checks, futures):
                found, seconds = future.result()
                if found is None:
                    print(f"{label}: not checked (needs g++, torch and the CUDA headers)")
                    continue
                print(f"{label}: {'ok' if not found else 'FAILED'} ({seconds:.1f} s)")
                problems += found
    if args.report:
        print_report(kernels)
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
