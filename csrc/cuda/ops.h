// Settings of the CUDA operators that fusedclip._C exposes (csrc/python_module.cpp).
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
// device's, or PTX the driver can compile for it). Sets no device and leaves no error behind.
bool kernels_run_on(int device);

}  // namespace fusedclip::cuda
