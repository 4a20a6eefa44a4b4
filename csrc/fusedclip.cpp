// Operator schemas of the fusedclip library.
//
// Every backend registers kernels for these schemas (CPU in csrc/cpu/); fake (meta)
// implementations live in fusedclip/_ops.py so torch.compile can trace the ops.
#include <torch/library.h>

TORCH_LIBRARY(fusedclip, m) {
  // The statistic of the p-norm before its root, over the concatenation of all tensors:
  // sum |x|^p (finite p != 0), max |x| (p = inf), min |x| (p = -inf), count of x != 0 (p = 0).
  // Accumulated in float32 (float64 when any tensor is float64 or complex128), which is also the
  // dtype of both results. The second result holds the per-tensor statistics when per_tensor is
  // true and is empty otherwise. The statistic of no elements is the reduction's identity
  // (0, or +inf for p = -inf), so statistics of disjoint shards combine exactly.
  m.def("multi_tensor_norm(Tensor[] tensors, float norm_type, bool per_tensor=False) -> (Tensor, Tensor)");
  // tensors *= coef in place, coef a 0-dim float tensor on the tensors' device, applied in float32
  // (float64 for float64 tensors). Writes nothing when coef >= 1.
  m.def("multi_tensor_scale_(Tensor(a!)[] tensors, Tensor coef) -> ()");
  // tensors = min(max(tensors, min), max) in place, one pass; nan stays nan.
  m.def("multi_tensor_clamp_(Tensor(a!)[] tensors, float min, float max) -> ()");
  // Norm, coefficient min(max_norm / (norm + 1e-6), 1) and scale in one call; returns the norm.
  m.def("clip_grad_norm_(Tensor(a!)[] tensors, float max_norm, float norm_type) -> Tensor");
  // Unit-wise adaptive gradient clipping (AGC) in place. Units are the rows (slices along dim 0)
  // of each tensor with more than one dimension, else the whole tensor. Per unit:
  // W* = clip_factor * max(||param||_2, eps); when not ||grad||_2 < W*, grad *= W* / max(||grad||_2,
  // 1e-6). grads[i] and params[i] have the same shape. Returns the sum of squares of the
  // gradients before clipping, in total and per tensor, accumulated as multi_tensor_norm does.
  m.def("multi_tensor_agc_(Tensor(a!)[] grads, Tensor[] params, float clip_factor, float eps) -> (Tensor, Tensor)");
  // tensors[i] *= coefs[i] in place, coefs a 1-dim float tensor on the tensors' device with one
  // coefficient per tensor, applied as multi_tensor_scale_ applies its coef; tensor i is not
  // written when coefs[i] >= 1.
  m.def("multi_tensor_scale_per_tensor_(Tensor(a!)[] tensors, Tensor coefs) -> ()");
  // clip_grad_norm_ that also returns each tensor's norm before clipping (0 for a tensor with no
  // elements), from the same read; both results in the dtype of multi_tensor_norm's.
  m.def("clip_grad_norm_with_norms_(Tensor(a!)[] tensors, float max_norm, float norm_type) -> (Tensor, Tensor)");
  // For a GradScaler: the statistic of multi_tensor_norm over x * inv_scale (inv_scale a one-element
  // float tensor on the tensors' device, the product in float32, float64 for float64 tensors) and
  // found_inf, a 0-dim float32 tensor: 1 when any element of the tensors is inf or nan, else 0.
  m.def("multi_tensor_unscale_norm(Tensor[] tensors, Tensor inv_scale, float norm_type) -> (Tensor, Tensor)");
  // GradientMonitor's per-step update (fusedclip.reference.monitor_update_ defines the math): per
  // entry of norms (float32 or float64, one norm per parameter), updates in place the running
  // mean and var (norms' dtype), the int64 counts of finite norms (count), of consecutive norms
  // below vanish_eps (below) and of steps flagged exploding (explosions), and writes this step's
  // flags into exploding and vanishing (bool).
  m.def("monitor_update_(Tensor norms, Tensor(a!) mean, Tensor(b!) var, Tensor(c!) count, Tensor(d!) below, Tensor(e!) explosions, Tensor(f!) exploding, Tensor(g!) vanishing, float alpha, int warmup_steps, float z_threshold, float? explode_threshold, float vanish_eps, int vanish_steps) -> ()");
}

