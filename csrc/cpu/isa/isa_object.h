// What every file of csrc/cpu/isa/ includes first. setup.py compiles each of those files once per
// instruction set (baseline x86-64, AVX2, AVX-512), each with its own flags and FUSEDCLIP_ISA
// naming it. Everything such a file defines lives in namespace FUSEDCLIP_ISA_NAMESPACE
// (fusedclip::cpu::isa_<FUSEDCLIP_ISA>), and it includes nothing of torch and calls no inline
// function that an object of another instruction set also defines (compiler builtins instead of
// <cmath>; vec.h inside that namespace), so the AVX2 and AVX-512 objects cannot lend code to the
// baseline one at link time. The glue declares each kernel with FUSEDCLIP_ISA_KERNEL
// (csrc/cpu/isa.h), which picks the build the running CPU supports.
#pragma once

#ifndef FUSEDCLIP_ISA
#error "FUSEDCLIP_ISA must name the instruction set of this object (setup.py defines it)"
#endif

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__AVX512F__) || defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

#include "../segment_kernels.h"

#define FUSEDCLIP_ISA_NAMESPACE_OF_(name) isa_##name
#define FUSEDCLIP_ISA_NAMESPACE_OF(name) FUSEDCLIP_ISA_NAMESPACE_OF_(name)
#define FUSEDCLIP_ISA_NAMESPACE fusedclip::cpu::FUSEDCLIP_ISA_NAMESPACE_OF(FUSEDCLIP_ISA)
