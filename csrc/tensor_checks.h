// The input checks, overlap detection and version bumps of every kernel's ATen glue, CPU and CUDA.
//
// Every check here runs before anything is written and raises TypeError (a tensor the kernels do
// not take) or ValueError (a value or layout they cannot write), never RuntimeError: the Python
// layer takes such a refusal as "nothing written" and falls back to its general path.
#pragma once

#include <ATen/ATen.h>

namespace fusedclip {

// Each tensor is defined, strided, on a device of type device_type (all on tensor 0's device),
// and float32, float64, float16, bfloat16 or complex. op names the operator in the messages.
void check_tensors(at::TensorList tensors, const char* op, c10::DeviceType device_type);

// check_tensors, and each tensor can be modified in place: no internal overlap (an expanded
// tensor) and no inference tensor outside inference mode.
void check_writable(at::TensorList tensors, const char* op, c10::DeviceType device_type);

// multi_tensor_agc_'s arguments: as many params as grads; grads writable (check_writable), real;
// each param a real float tensor (float32, float64, float16, bfloat16; it may differ from its
// grad's) of its grad's shape, on the grads' device; clip_factor and eps >= 0.
void check_agc_arguments(at::TensorList grads, at::TensorList params, double clip_factor, double eps,
                         c10::DeviceType device_type);

// monitor_update_'s tensors: norms a float32 or float64 1-dim tensor on a device of device_type;
// mean and var of its dtype, count, below and explosions int64, exploding and vanishing bool,
// each contiguous, of its size and on its device.
void check_monitor_state(const at::Tensor& norms, const at::Tensor& mean, const at::Tensor& var,
                         const at::Tensor& count, const at::Tensor& below, const at::Tensor& explosions,
                         const at::Tensor& exploding, const at::Tensor& vanishing, c10::DeviceType device_type);

// norm_type is a number (not nan): every p, inf and -inf included, names a norm.
void check_norm_type(double norm_type);

// t is a one-element floating-point tensor: a scalar argument such as a coefficient or an
// inverse loss scale.
void check_scalar(const at::Tensor& t, const char* op, const char* arg_name);

// True when two tensors of the list may share memory (the same grad twice, a grad and its view).
// In-place kernels then run tensor by tensor in list order, as torch's per-tensor ops do, instead
// of in parallel, where two threads or blocks would read-modify-write the same bytes.
bool any_memory_shared(at::TensorList tensors);

// Marks tensors as modified in place before a kernel writes them: a custom op gets no autograd
// in-place kernel to do it, and optimizers and autograd read the version counter.
void bump_versions(at::TensorList tensors);

}  // namespace fusedclip
