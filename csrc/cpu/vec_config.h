// Which at::vec instruction set the CPU kernels are built for. setup.py defines CPU_CAPABILITY
// (the namespace ATen's vector types live in) and CPU_CAPABILITY_AVX2 when the build machine has
// AVX2 and FMA; the same names select ATen's own vectorized code paths.
#pragma once

#ifndef CPU_CAPABILITY
#error "CPU_CAPABILITY must be defined by the build (DEFAULT or AVX2); see setup.py"
#endif

#if defined(CPU_CAPABILITY_AVX2)
#define FUSEDCLIP_CPU_CAPABILITY_NAME "AVX2"
#else
#define FUSEDCLIP_CPU_CAPABILITY_NAME "DEFAULT"
#endif
