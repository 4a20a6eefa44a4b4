"""Builds fusedclip._C, the C++ operator library with its CPU kernels.

Environment:
  FUSEDCLIP_CPU_ARCH   "avx2" or "default": the at::vec instruction set of the CPU kernels
                       (default: avx2 when the building machine has AVX2, FMA and F16C). The
                       kernels run only on CPUs with the instruction set they were built for.
"""

import glob
import os
import platform

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

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


def _extensions():
    compile_args, link_args = _cpu_flags()
    sources = ["csrc/fusedclip.cpp", "csrc/python_module.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    return [
        CppExtension(
            name="fusedclip._C",
            sources=sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": compile_args},
            extra_link_args=link_args,
        )
    ]


setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildExtension.with_options(use_ninja=False)})
