// The input checks of every operator, CPU and CUDA: each runs before anything is written and
// refuses with a TypeError (a tensor the kernels do not take) or a ValueError (a value or layout
// they cannot write); see csrc/stable.h. What the stable ABI cannot ask of a tensor (an inference
// tensor, a lazily conjugated or negated view, a tensor subclass) the Python layer asks before the
// call (fusedclip/_core.py).
#pragma once

#include "stable.h"

namespace fusedclip {

// Each tensor is defined, strided, on a device of type device_type (all on tensor 0's device),
// and float32, float64, float16, bfloat16 or complex. op names the operator in the messages.
void check_tensors(const TensorList& tensors, const char* op, DeviceType device_type);

// check_tensors, and no tensor has internally overlapping memory (elements that share memory: an
// expanded tensor, an as_strided view): each can be written in place.
void check_writable(const TensorList& tensors, const char* op, DeviceType device_type);

// Whether t's elements fill one block of memory with no gap and no overlap, in any order of its
// dimensions (contiguous, transposed, channels-last).
bool non_overlapping_and_dense(const Tensor& t);

// multi_tensor_agc_'s arguments: as many params as grads; grads writable (check_writable), real;
// each param a real float tensor (float32, float64, float16, bfloat16; it may differ from its
// grad's) of its grad's shape, on the grads' device; clip_factor and eps >= 0.
void check_agc_arguments(const TensorList& grads, const TensorList& params, double clip_factor, double eps,
                         DeviceType device_type);

// monitor_update_'s tensors: norms a float32 or float64 1-dim tensor on a device of device_type;
// mean and var of its dtype, count, below and explosions int64, exploding and vanishing bool,
// each contiguous, of its size and on its device.
void check_monitor_state(const Tensor& norms, const Tensor& mean, const Tensor& var, const Tensor& count,
                         const Tensor& below, const Tensor& explosions, const Tensor& exploding,
                         const Tensor& vanishing, DeviceType device_type);

// norm_type is a number (not nan): every p, inf and -inf included, names a norm.
void check_norm_type(double norm_type);

// t is a one-element floating-point tensor: a scalar argument such as a coefficient or an inverse
// loss scale (on any device: the kernels say where they read it).
void check_scalar(const Tensor& t, const char* op, const char* arg_name);

// True when two tensors of the list may share memory (the same grad twice, a grad and its view).
// In-place kernels then run tensor by tensor in list order, as torch's per-tensor ops do, instead
// of in parallel, where two threads or blocks would read-modify-write the same bytes.
bool any_memory_shared(const TensorList& tensors);

// What the checks and the CPU tables need of one tensor, read once. Every accessor of a stable
// tensor is a call into libtorch (and scalar_type(), device() and layout() a chain of them):
// reading these few fields once, instead of asking each check and each pass again, is most of a
// small tensor's host cost.
struct TensorMeta {
  void* data = nullptr;              // first element, storage offset included (null unless with_data)
  const int64_t* sizes = nullptr;    // borrowed from the tensor: valid while it lives, unresized
  const int64_t* strides = nullptr;  // borrowed likewise
  int64_t dim = 0;
  int64_t numel = 0;
  int64_t element_size = 0;
  ScalarType dtype = ScalarType::Float;
  int32_t device_index = -1;
};
using TensorMetaList = std::vector<TensorMeta>;

// check_tensors, or check_writable when writable, in one pass that also returns each tensor's
// metadata (its data pointer too when with_data; read as mutable_data_ptr does, for a tensor with
// elements). It refuses exactly as those checks do: any tensor the one pass does not clear (a
// refusal, or an accessor that fails) sends the whole list through the tensor-by-tensor checks.
TensorMetaList checked_meta(const TensorList& tensors, const char* op, DeviceType device_type, bool writable,
                            bool with_data);

// A Tensor[] argument of a boxed kernel as the calling convention hands it over: the handles of
// its tensors, owned, and deleted with this. TORCH_BOX makes a torch::stable::Tensor of each, a
// shared_ptr with an allocation and a free of its own (about 40 us of a 1,000-tensor call); the
// one-pass paths read the handles, and tensors() makes the stable tensors for the paths that need
// them (once; they then own the handles).
class TensorListArg {
 public:
  // Takes over the list (a StableListHandle) and its tensors.
  explicit TensorListArg(StableIValue list);
  ~TensorListArg();
  TensorListArg(const TensorListArg&) = delete;
  TensorListArg& operator=(const TensorListArg&) = delete;

  size_t size() const { return handles_.size(); }
  const AtenTensorHandle* handles() const { return handles_.data(); }
  const TensorList& tensors();

 private:
  std::vector<AtenTensorHandle> handles_;
  TensorList tensors_;  // tensors_[i] owns handles_[i]; the handles past its end are owned here
};

// checked_meta of a list argument, from its handles; its tensors() are made only for a refusal
// (or an accessor that fails).
TensorMetaList checked_meta(TensorListArg& tensors, const char* op, DeviceType device_type, bool writable,
                            bool with_data);

// The shape of a tensor through the raw shim (three calls, no stable tensor); false when a call
// fails. The arrays are borrowed from the tensor: valid while it lives, unresized.
bool read_shape(AtenTensorHandle h, int64_t* dims, const int64_t** sizes, const int64_t** strides);

// non_overlapping_and_dense of a tensor from its metadata.
bool non_overlapping_and_dense(const TensorMeta& t);

// any_memory_shared of tensors from their metadata (read with_data).
bool any_memory_shared(const TensorMetaList& tensors);

}  // namespace fusedclip
