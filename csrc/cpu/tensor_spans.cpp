// fusedclip::tensor_spans (schema in fusedclip/operators.py): what backend "triton" keys its
// cached operands on (fusedclip/triton/tables.py, key_of), read in one pass instead of five Python
// calls a tensor. Two int64 words a tensor: the address of its first element, and
// numel << 16 | dtype << 8 | dense, dtype being the stable ABI's dtype code and dense whether its
// elements fill one block of memory (any order of dimensions). It reads metadata only, so one
// kernel serves every device (CompositeExplicitAutograd).
#include <cstdint>

#include "../tensor_checks.h"

namespace fusedclip::cpu {
namespace {

Tensor tensor_spans(TensorListArg& tensors) {
  const int64_t count = static_cast<int64_t>(tensors.size());
  Tensor spans = torch::stable::empty({count, 2}, ScalarType::Long);
  auto* out = static_cast<int64_t*>(spans.mutable_data_ptr());
  for (int64_t i = 0; i < count; ++i) {
    const AtenTensorHandle h = tensors.handles()[i];
    int32_t dtype = 0;
    TensorMeta m;
    void* data = nullptr;
    STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_dtype(h, &dtype));
    STD_TORCH_CHECK(read_shape(h, &m.dim, &m.sizes, &m.strides), "tensor_spans: tensor ", i, " has no shape");
    STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_data_ptr(h, &data));
    int64_t numel = 1;
    for (int64_t d = 0; d < m.dim; ++d) numel *= m.sizes[d];
    out[2 * i] = static_cast<int64_t>(reinterpret_cast<uintptr_t>(data));
    out[2 * i + 1] = numel << 16 | int64_t{dtype & 0xff} << 8 | (non_overlapping_and_dense(m) ? 1 : 0);
  }
  return spans;
}

void tensor_spans_boxed(StableIValue* stack, uint64_t num_args, uint64_t num_outputs) {
  STD_TORCH_CHECK(num_args == 1 && num_outputs == 1, "tensor_spans: unexpected arity");
  TensorListArg tensors(stack[0]);
  stack[0] = torch::stable::detail::from(tensor_spans(tensors));
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(fusedclip, CompositeExplicitAutograd, m) {
  m.impl("tensor_spans", &tensor_spans_boxed);
}

}  // namespace fusedclip::cpu
