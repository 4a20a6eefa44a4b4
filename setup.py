"""Builds fusedclip's native libraries on PyTorch's stable ABI: one build loads under every torch
from 2.10 on (TORCH_TARGET_VERSION) and every CPython from 3.10 on (the limited API, abi3).

  fusedclip._C       the CPU kernels (csrc/cpu/). Their vector code is compiled three times, for
                     baseline x86-64, AVX2 (+FMA, F16C) and AVX-512, each in its own object with
                     its own flags; csrc/cpu/isa.cpp picks one when the library loads (on other
                     machines: the baseline build only).
  fusedclip._C_cuda  the CUDA kernels (csrc/cuda/), when nvcc is found and either torch has CUDA or
                     FUSEDCLIP_CUDA=1 (no GPU is needed to build; the library loads only where
                     torch has CUDA).

Environment:
  FUSEDCLIP_CUDA        "1" builds the CUDA library (an error without nvcc), "0" does not; unset:
                        built when torch.version.cuda is set and nvcc is found.
  TORCH_CUDA_ARCH_LIST  the GPU architectures (e.g. "8.0;9.0"); default "8.0;9.0" (A100,
                        H100/H200) plus PTX for newer GPUs.
  FUSEDCLIP_DEBUG       "1" builds with -g (release builds carry no debug information).
"""

import glob
import os
import platform
import subprocess
import sys

from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))

# torch 2.10: the oldest stable ABI the libraries call (torch/headeronly/version.h's encoding).
TARGET_VERSION = "0x020a000000000000"
# CPython 3.10: the oldest Python the abi3 libraries load in.
LIMITED_API = "0x030a0000"

X86_64 = platform.machine().lower() in ("x86_64", "amd64")

# The instruction sets of the files of csrc/cpu/isa/: (name, compiler flags). The name is the one
# FUSEDCLIP_CPU_ISA and `python -m fusedclip info` use.
ISA_BUILDS = (
    [
        ("baseline", ["-march=x86-64", "-mtune=generic"]),
        ("avx2", ["-march=x86-64", "-mavx2", "-mfma", "-mf16c", "-mtune=haswell"]),
        ("avx512", ["-march=x86-64", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                    "-mtune=skylake-avx512"]),
    ]
    if X86_64
    else [("baseline", [])]
)

DEBUG = os.environ.get("FUSEDCLIP_DEBUG", "") == "1"
# No contraction into FMA outside the vector kernels: the host-side rules (csrc/numerics.h) must give
# fusedclip.numerics' bits. The vector kernels contract (a later flag wins).
COMMON_CXX = ["-O3", "-std=c++17", "-fvisibility=hidden", "-ffp-contract=off"] + (["-g"] if DEBUG else [])
# (torch.utils.cpp_extension defines Py_LIMITED_API for py_limited_api extensions.)
STABLE_ABI = [f"-DTORCH_TARGET_VERSION={TARGET_VERSION}"]


def _build_cuda() -> bool:
    """FUSEDCLIP_CUDA, else whether torch has CUDA and nvcc is found (no GPU probe)."""
    setting = os.environ.get("FUSEDCLIP_CUDA", "").strip()
    if setting not in ("", "0", "1"):
        raise ValueError(f"FUSEDCLIP_CUDA must be '0' or '1', got {setting!r}")
    if setting:  # "1": _cuda_extension finds the toolkit, or says why not
        return setting == "1"
    return torch.version.cuda is not None and CUDA_HOME is not None


def _cuda_arch_flags() -> list:
    """-gencode flags for TORCH_CUDA_ARCH_LIST (torch's own handling), else sm_80 and sm_90."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return []  # torch.utils.cpp_extension turns it into -gencode flags
    return [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90",
    ]


def _cpu_extension() -> CppExtension:
    sources = ["csrc/tensor_checks.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    return CppExtension(
        name="fusedclip._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": COMMON_CXX + STABLE_ABI},
        extra_link_args=[] if DEBUG else ["-s"],
        py_limited_api=True,
    )


def _cuda_extension() -> CppExtension:
    """fusedclip._C_cuda, linked against nothing of torch's CUDA: a CppExtension (libc10, libtorch,
    libtorch_cpu, which every torch has; the linker keeps only what the library calls), not a
    CUDAExtension, which links libc10_cuda, libtorch_cuda and libcudart. The one CUDA entry of the
    shim the kernels call is looked up in the loaded libtorch_cuda (csrc/cuda/glue.cpp). The CUDA
    runtime is linked statically (no libcudart soname to match), its symbols kept inside the library
    (--exclude-libs): the library's calls cannot bind to torch's libcudart, loaded RTLD_GLOBAL."""
    import shutil

    from torch.utils import cpp_extension

    # The CUDA toolkit: $CUDA_HOME or $CUDA_PATH, torch's, nvcc's on the PATH, /usr/local/cuda; the
    # first with nvcc and the runtime's headers (a /usr/local/bin/nvcc that is a wrapper script
    # names /usr/local). BuildExtension compiles the .cu sources with its CUDA_HOME's nvcc, so it
    # gets the same (torch without CUDA leaves it unset).
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), CUDA_HOME,
                  os.path.dirname(os.path.dirname(nvcc)) if nvcc else None, "/usr/local/cuda"]
    cuda_home = next(
        (home for home in candidates
         if home and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h"))
         and os.path.isfile(os.path.join(home, "bin", "nvcc"))),
        None,
    )
    if cuda_home is None:
        raise RuntimeError(f"no CUDA toolkit (bin/nvcc, include/cuda_runtime.h) in any of {candidates}: "
                           "set CUDA_HOME")
    cpp_extension.CUDA_HOME = cuda_home
    cuda_lib = next(
        (d for d in (os.path.join(cuda_home, "lib64"), os.path.join(cuda_home, "lib"),
                     os.path.join(cuda_home, "targets", f"{platform.machine()}-linux", "lib"))
         if os.path.isfile(os.path.join(d, "libcudart_static.a"))),
        os.path.join(cuda_home, "lib64"),
    )

    sources = ["csrc/tensor_checks.cpp"] + sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu"))
    return CppExtension(
        name="fusedclip._C_cuda",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc"), os.path.join(cuda_home, "include")],
        library_dirs=[cuda_lib],
        # librt, libdl, libpthread: what the static runtime needs (part of libc from glibc 2.34 on,
        # where the linker drops them).
        libraries=["cudart_static", "rt", "dl", "pthread"],
        extra_compile_args={
            "cxx": COMMON_CXX + STABLE_ABI,
            # The host code of the .cu files (each operator's glue) contracts no multiply-add, as the
            # rest of the host code (COMMON_CXX); the device code keeps nvcc's own rule.
            "nvcc": ["-O3", "-std=c++17", "-Xcompiler", "-fvisibility=hidden", "-Xcompiler", "-ffp-contract=off"]
            + STABLE_ABI + _cuda_arch_flags(),
        },
        extra_link_args=["-Wl,--exclude-libs,libcudart_static.a"] + ([] if DEBUG else ["-s"]),
        py_limited_api=True,
    )


class BuildWithIsaObjects(BuildExtension):
    """torch's BuildExtension, plus the per-instruction-set objects of fusedclip._C: each file of
    csrc/cpu/isa/ compiled with each ISA_BUILDS flag set (setuptools gives all sources of an
    extension the same flags), linked into the library beside the rest."""

    def run(self):
        # A library of the build before the stable ABI (fusedclip/_C.cpython-*.so) would be imported
        # instead of _C.abi3.so (its suffix comes first): an in-place build removes it.
        if self.inplace:
            for stale in glob.glob(os.path.join(ROOT, "fusedclip", "_C.cpython-*.so")):
                os.remove(stale)
        super().run()

    def build_extension(self, ext):
        if ext.name == "fusedclip._C":
            ext.extra_objects = self._isa_objects()
        super().build_extension(ext)

    def _isa_objects(self) -> list:
        isa_dir = os.path.join(ROOT, "csrc", "cpu", "isa")
        sources = sorted(glob.glob(os.path.join(isa_dir, "*.cpp")))
        # What every one of them includes: a change there rebuilds them all.
        headers = glob.glob(os.path.join(isa_dir, "*.h")) + [
            os.path.join(ROOT, "csrc", "cpu", "segment_kernels.h"), os.path.join(ROOT, "csrc", "numerics.h")]
        newest_shared = max(os.path.getmtime(p) for p in [__file__] + headers)
        out_dir = os.path.join(os.path.abspath(self.build_temp), "isa")
        os.makedirs(out_dir, exist_ok=True)
        compiler = os.environ.get("CXX", "c++")
        objects = []
        for source in sources:
            stem = os.path.splitext(os.path.basename(source))[0]
            newest_input = max(newest_shared, os.path.getmtime(source))
            for name, flags in ISA_BUILDS:
                obj = os.path.join(out_dir, f"{stem}_{name}.o")
                if not os.path.exists(obj) or os.path.getmtime(obj) < newest_input:
                    command = [compiler, "-c", source, "-o", obj, "-fPIC", f"-I{os.path.join(ROOT, 'csrc')}",
                               f"-DFUSEDCLIP_ISA={name}"] + COMMON_CXX + flags + ["-ffp-contract=fast"]
                    print(" ".join(command), file=sys.stderr)
                    subprocess.check_call(command)
                objects.append(obj)
        return objects


def _extensions() -> list:
    extensions = [_cpu_extension()]
    if _build_cuda():
        extensions.append(_cuda_extension())
    return extensions


# ninja compiles the sources in parallel and, on a rebuild, only those that changed (torch falls
# back to one file at a time, with a warning, where ninja is not installed).
setup(
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildWithIsaObjects},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
