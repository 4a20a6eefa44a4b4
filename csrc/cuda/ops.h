// Settings of the CUDA operators that fusedclip._C_cuda exposes to Python (csrc/cuda/module.cpp).
#pragma once

#include <cstdint>

namespace fusedclip::cuda {

// The fused clip_grad_norm_ runs as one cooperative launch (csrc/cuda/clip_single.cu) when its
// grads take at most this many bytes, and as two launches (norm, then scale) above. -1, the
// default, means the device's L2 size: grads that fit in L2 are then read from L2 by the scale.
// 0 never uses the single launch.
void set_single_launch_max_bytes(int64_t bytes);
int64_t single_launch_max_bytes();

// Whether this build's kernels run on CUDA device `device` (its architectures include the
// device's, or PTX the driver can compile for it). False where there is no such device (no GPU,
// no driver). Sets no device and leaves no error behind.
bool kernels_run_on(int device);

// The CUDA runtime version this library was compiled with (CUDART_VERSION, e.g. 13000); the
// runtime is linked statically, so it is also the version that runs.
int cuda_runtime_version();

}  // namespace fusedclip::cuda
