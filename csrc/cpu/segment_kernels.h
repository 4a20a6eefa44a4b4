// The per-segment vector kernels that the CPU operators share, over one Segment (a run of elements
// of one tensor): defined in csrc/cpu/isa/segment_kernels.cpp, compiled once per instruction set
// (baseline x86-64, AVX2, AVX-512; setup.py), the build the running CPU supports picked when the
// library loads (csrc/cpu/isa.cpp). The types are plain C++, no torch: the per-instruction-set
// objects include them too; the declarations below are for the glue.
#pragma once

#include <cstdint>

#include "../numerics.h"

namespace fusedclip::cpu {

// The dtypes the kernels read and write: a complex tensor arrives as its real view.
enum class DType : int8_t { kFloat32, kFloat64, kFloat16, kBFloat16 };

struct Segment {
  void* data;      // first element of this piece
  int64_t numel;   // elements in this piece
  int64_t tensor;  // index of its tensor in the caller's list
  DType dtype;
};

// Each reads (or writes) one segment, accumulates in float32 (float64 for float64 segments, and
// always for p other than 0, 1, 2 and inf) and returns the statistic of the norm kind in float64.
//
// sum |x|^p (kSquareSum, kAbsSum, kPowerSum), max |x|, min |x| or the count of x != 0; max and min
// propagate nan.
using StatisticKernel = double(NormKind kind, const Segment& segment, double p);
// The statistic of x * inv_scale (the product rounded to the accumulator type), and whether any x
// itself is inf or nan (*non_finite set, never cleared).
using UnscaledStatisticKernel = double(NormKind kind, const Segment& segment, double p, double inv_scale,
                                       bool* non_finite);
// x *= coef, in the accumulator type, rounded once.
using ScaleKernel = void(const Segment& segment, double coef);
// x = min(max(x, lo), hi) in place; nan stays nan.
using ClampKernel = void(const Segment& segment, double lo, double hi);

}  // namespace fusedclip::cpu

#ifndef FUSEDCLIP_ISA  // the glue: each kernel's builds, and the one the running CPU runs
#include "isa.h"

namespace fusedclip::cpu {
FUSEDCLIP_ISA_KERNEL(StatisticKernel, statistic)
FUSEDCLIP_ISA_KERNEL(UnscaledStatisticKernel, unscaled_statistic)
FUSEDCLIP_ISA_KERNEL(ScaleKernel, scale)
FUSEDCLIP_ISA_KERNEL(ClampKernel, clamp)
}  // namespace fusedclip::cpu
#endif
