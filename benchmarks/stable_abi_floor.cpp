// The least a stable-ABI operator taking a Tensor[] can cost: floor::read_dtypes reads each
// tensor's dtype and nothing else. benchmarks/host_cost.py builds it at run time and calls it
// through torch.ops with the list fusedclip's operators get, so the difference between the two
// rows is what fusedclip's own checks and tables cost, and this row is what the route costs
// (Python's list to IValues, the dispatcher, the stable ABI's handle per tensor).
#include <torch/csrc/stable/c/shim.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/stableivalue_conversions.h>

namespace {

void read_dtypes(StableIValue* stack, uint64_t, uint64_t) {
  const auto list = torch::stable::detail::to<StableListHandle>(stack[0]);
  size_t size = 0;
  torch_list_size(list, &size);
  int64_t sum = 0;
  for (size_t i = 0; i < size; ++i) {
    StableIValue element;
    torch_list_get_item(list, i, &element);
    const auto tensor = torch::stable::detail::to<AtenTensorHandle>(element);
    int32_t dtype = 0;
    aoti_torch_get_dtype(tensor, &dtype);
    sum += dtype;
    aoti_torch_delete_tensor_object(tensor);
  }
  torch_delete_list(list);
  stack[0] = torch::stable::detail::from(sum);
}

}  // namespace

STABLE_TORCH_LIBRARY(fusedclip_floor, m) { m.def("read_dtypes(Tensor[] tensors) -> int"); }
STABLE_TORCH_LIBRARY_IMPL(fusedclip_floor, CPU, m) { m.impl("read_dtypes", &read_dtypes); }
