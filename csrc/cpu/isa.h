// The instruction set of the CPU kernels, chosen once when the library loads (csrc/cpu/isa.cpp),
// and FUSEDCLIP_ISA_KERNEL, which declares a kernel of csrc/cpu/isa/ for the code that calls it.
// Included by the glue only: the per-instruction-set objects of csrc/cpu/isa/ never include it
// (its inline definitions, compiled with AVX-512 flags there, could stand in for the baseline ones
// at link time).
#pragma once

#ifdef FUSEDCLIP_ISA
#error "csrc/cpu/isa.h is for the glue, not for the per-instruction-set objects of csrc/cpu/isa/"
#endif

namespace fusedclip::cpu {

// The instruction sets, in the order of IsaKernel::builds.
enum class Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

Isa chosen_isa_level();       // the instruction set the kernels run
const char* chosen_isa();     // its name: "baseline", "avx2" or "avx512"
const char* widest_isa();     // the widest one this CPU and build support
bool isa_request_ignored();   // FUSEDCLIP_CPU_ISA named one this CPU or build cannot run

// A kernel compiled once per instruction set, and the build the running CPU runs.
template <typename Fn>
struct IsaKernel {
  Fn* builds[3];
  Fn* chosen() const { return builds[static_cast<int>(chosen_isa_level())]; }
};

}  // namespace fusedclip::cpu

// Declares, in namespace fusedclip::cpu, the kernel `name` of function type Fn that a file of
// csrc/cpu/isa/ defines once per instruction set (as isa_baseline::name, isa_avx2::name and
// isa_avx512::name), and `name##_kernel`, its IsaKernel: `statistic_kernel.chosen()` is the build
// to call. Where only the baseline is built (not x86-64), every entry is the baseline build.
#if defined(__x86_64__) || defined(_M_X64)
#define FUSEDCLIP_ISA_KERNEL(Fn, name)         \
  namespace isa_baseline { Fn name; }          \
  namespace isa_avx2 { Fn name; }              \
  namespace isa_avx512 { Fn name; }            \
  inline constexpr IsaKernel<Fn> name##_kernel{{&isa_baseline::name, &isa_avx2::name, &isa_avx512::name}};
#else
#define FUSEDCLIP_ISA_KERNEL(Fn, name) \
  namespace isa_baseline { Fn name; }  \
  inline constexpr IsaKernel<Fn> name##_kernel{{&isa_baseline::name, &isa_baseline::name, &isa_baseline::name}};
#endif
