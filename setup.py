"""Builds fusedclip._C, the C++ operator library with its CPU kernels, and its CUDA kernels
(csrc/cuda/) when torch was built with CUDA and nvcc is found.

Environment:
  FUSEDCLIP_CPU_ARCH   "avx2" or "default": the at::vec instruction set of the CPU kernels
                       (default: avx2 when the building machine has AVX2, FMA and F16C). The
                       kernels run only on CPUs with the instruction set they were built for.
  FUSEDCLIP_CUDA       "1" builds the CUDA kernels (an error without nvcc or a CUDA torch), "0"
                       does not; unset: built when torch.version.cuda is set and nvcc is found.
  TORCH_CUDA_ARCH_LIST the GPU architectures (e.g. "8.0;9.0"); default "8.0;9.0" (A100, H100/H200)
                       plus PTX for newer GPUs. No GPU is needed to build.
"""

import glob
import os
import platform

from setuptools import setup
import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _host_has_avx2() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return all(f" {flag}" in flags for flag in ("avx2", "fma", "f16c"))


def _cpu_arch() -> str:
    arch = os.environ.get("FUSEDCLIP_CPU_ARCH", "").strip().lower()
    if arch not in ("", "avx2", "default"):
        raise ValueError(f"FUSEDCLIP_CPU_ARCH must be 'avx2' or 'default', got {arch!r}")
    if not arch:
        arch = "avx2" if _host_has_avx2() else "default"
    return arch


def _cpu_flags() -> tuple[list[str], list[str]]:
    compile_args = ["-O3", "-std=c++17", "-fopenmp", "-fvisibility=hidden", "-Wno-unknown-pragmas"]
    if _cpu_arch() == "avx2":
        # ATen selects its 256-bit vector types with these macros; the namespace keeps them apart
        # from libtorch's own copies.
        compile_args += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    else:
        compile_args += ["-DCPU_CAPABILITY=DEFAULT"]
    return compile_args, ["-fopenmp"]


def _build_cuda() -> bool:
    """FUSEDCLIP_CUDA, else whether torch has CUDA and nvcc is found (no GPU probe)."""
    setting = os.environ.get("FUSEDCLIP_CUDA", "").strip()
    if setting not in ("", "0", "1"):
        raise ValueError(f"FUSEDCLIP_CUDA must be '0' or '1', got {setting!r}")
    found = torch.version.cuda is not None and CUDA_HOME is not None
    if setting == "1" and not found:
        raise RuntimeError(
            "FUSEDCLIP_CUDA=1, but "
            + ("this torch has no CUDA" if torch.version.cuda is None else "nvcc was not found (set CUDA_HOME)")
        )
    return found if setting == "" else setting == "1"


def _cuda_arch_flags() -> list[str]:
    """-gencode flags for TORCH_CUDA_ARCH_LIST (torch's own handling), else sm_80 and sm_90."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return []  # torch.utils.cpp_extension turns it into -gencode flags
    return [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90",
    ]


def _extensions():
    compile_args, link_args = _cpu_flags()
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    if _build_cuda():
        cuda_sources = sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu"))
        nvcc_args = ["-O3", "-std=c++17", "-DFUSEDCLIP_WITH_CUDA"] + _cuda_arch_flags()
        return [
            CUDAExtension(
                name="fusedclip._C",
                sources=sources + cuda_sources,
                include_dirs=[os.path.join(ROOT, "csrc")],
                extra_compile_args={"cxx": compile_args + ["-DFUSEDCLIP_WITH_CUDA"], "nvcc": nvcc_args},
                extra_link_args=link_args,
            )
        ]
    return [
        CppExtension(
            name="fusedclip._C",
            sources=sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": compile_args},
            extra_link_args=link_args,
        )
    ]


# ninja compiles the sources in parallel and, on a rebuild, only those that changed (torch falls
# back to one file at a time, with a warning, where ninja is not installed).
setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildExtension})
