// Picks the instruction set of the CPU kernels once, when the library loads: the widest one this
// build has that the running CPU supports (AVX-512 needs F, BW, VL and DQ; AVX2 needs FMA and
// F16C too), or a lower one named by FUSEDCLIP_CPU_ISA ("baseline", "avx2", "avx512"). A name the
// CPU cannot run, or that is unknown, is ignored for the widest supported one (the module reports
// the choice, and fusedclip warns: see fusedclip/_backends.py).
#include "isa.h"

#include <cstdlib>
#include <cstring>

#include "segment_kernels.h"

namespace fusedclip::cpu {
namespace {

// The tables this CPU can run, widest first.
int supported(const SegmentKernels* out[3]) {
  int n = 0;
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    out[n++] = &isa_avx512::kernels();
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    out[n++] = &isa_avx2::kernels();
  }
#endif
  out[n++] = &isa_baseline::kernels();
  return n;
}

struct Choice {
  const SegmentKernels* kernels;
  const char* widest;
  bool request_ignored;  // FUSEDCLIP_CPU_ISA named something this CPU or build does not have
};

Choice choose() {
  const SegmentKernels* tables[3];
  const int n = supported(tables);
  const char* requested = std::getenv("FUSEDCLIP_CPU_ISA");
  if (requested == nullptr || requested[0] == '\0') return {tables[0], tables[0]->isa, false};
  for (int i = 0; i < n; ++i) {
    if (std::strcmp(tables[i]->isa, requested) == 0) return {tables[i], tables[0]->isa, false};
  }
  return {tables[0], tables[0]->isa, true};
}

const Choice& choice() {
  static const Choice chosen = choose();
  return chosen;
}

}  // namespace

const SegmentKernels& segment_kernels() { return *choice().kernels; }

const char* chosen_isa() { return choice().kernels->isa; }
const char* widest_isa() { return choice().widest; }
bool isa_request_ignored() { return choice().request_ignored; }

}  // namespace fusedclip::cpu
