// Picks the instruction set of the CPU kernels once, when the library loads: the widest one this
// build has that the running CPU supports (AVX-512 needs F, BW, VL and DQ; AVX2 needs FMA and
// F16C too), or a lower one named by FUSEDCLIP_CPU_ISA ("baseline", "avx2", "avx512"). A name the
// CPU cannot run, or that is unknown, is ignored for the widest supported one (the module reports
// the choice, and fusedclip warns: see fusedclip/_backends.py).
#include "isa.h"

#include <cstdlib>
#include <cstring>

namespace fusedclip::cpu {
namespace {

constexpr const char* kNames[] = {"baseline", "avx2", "avx512"};

// The instruction sets this build has and this CPU can run, widest first.
int supported(Isa out[3]) {
  int n = 0;
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    out[n++] = Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    out[n++] = Isa::kAvx2;
  }
#endif
  out[n++] = Isa::kBaseline;
  return n;
}

const char* name_of(Isa isa) { return kNames[static_cast<int>(isa)]; }

struct Choice {
  Isa isa;
  const char* widest;
  bool request_ignored;  // FUSEDCLIP_CPU_ISA named something this CPU or build does not have
};

Choice choose() {
  Isa isas[3];
  const int n = supported(isas);
  const char* requested = std::getenv("FUSEDCLIP_CPU_ISA");
  if (requested == nullptr || requested[0] == '\0') return {isas[0], name_of(isas[0]), false};
  for (int i = 0; i < n; ++i) {
    if (std::strcmp(name_of(isas[i]), requested) == 0) return {isas[i], name_of(isas[0]), false};
  }
  return {isas[0], name_of(isas[0]), true};
}

const Choice& choice() {
  static const Choice chosen = choose();
  return chosen;
}

}  // namespace

Isa chosen_isa_level() { return choice().isa; }
const char* chosen_isa() { return name_of(choice().isa); }
const char* widest_isa() { return choice().widest; }
bool isa_request_ignored() { return choice().request_ignored; }

}  // namespace fusedclip::cpu
