// The vector kernels of the CPU operators, as a table of functions over one Segment (a run of
// elements of one tensor): csrc/cpu/isa_kernels.cpp is compiled once per instruction set
// (baseline x86-64, AVX2, AVX-512; setup.py), and csrc/cpu/isa.cpp picks the table the running
// CPU supports when the library loads. Plain C++, no torch: the instruction-set objects include
// nothing that another object could share (see isa_kernels.cpp).
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

// One instruction set's kernels. Each reads (or writes) one segment, accumulates in float32
// (float64 for float64 segments, and always for p other than 0, 1, 2 and inf) and returns the
// statistic of the norm kind in float64.
struct SegmentKernels {
  const char* isa;  // "baseline", "avx2" or "avx512"
  // sum |x|^p (kSquareSum, kAbsSum, kPowerSum), max |x|, min |x| or the count of x != 0; max and
  // min propagate nan.
  double (*statistic)(NormKind kind, const Segment& segment, double p);
  // statistic() of x * inv_scale (the product rounded to the accumulator type), and whether any
  // x itself is inf or nan (*non_finite set, never cleared).
  double (*unscaled_statistic)(NormKind kind, const Segment& segment, double p, double inv_scale, bool* non_finite);
  // x *= coef, in the accumulator type, rounded once.
  void (*scale)(const Segment& segment, double coef);
  // x = min(max(x, lo), hi) in place; nan stays nan.
  void (*clamp)(const Segment& segment, double lo, double hi);
};

// The tables of each instruction set this build has (isa_kernels.cpp, one object each).
namespace isa_baseline { const SegmentKernels& kernels(); }
#if defined(__x86_64__) || defined(_M_X64)
namespace isa_avx2 { const SegmentKernels& kernels(); }
namespace isa_avx512 { const SegmentKernels& kernels(); }
#endif

// The table chosen when the library loaded: the widest instruction set the CPU supports, or a
// lower one forced by FUSEDCLIP_CPU_ISA (csrc/cpu/isa.cpp).
const SegmentKernels& segment_kernels();

}  // namespace fusedclip::cpu
