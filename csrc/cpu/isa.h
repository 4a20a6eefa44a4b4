// What csrc/cpu/isa.cpp chose, for the Python module (csrc/cpu/module.cpp).
#pragma once

namespace fusedclip::cpu {

const char* chosen_isa();     // the instruction set the kernels run: "baseline", "avx2" or "avx512"
const char* widest_isa();     // the widest one this CPU and build support
bool isa_request_ignored();   // FUSEDCLIP_CPU_ISA named one this CPU or build cannot run

}  // namespace fusedclip::cpu
