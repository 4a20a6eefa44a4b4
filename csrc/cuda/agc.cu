// Unit-wise adaptive gradient clipping (multi_tensor_agc_): the units are rows (table.cuh,
// AgcTable). One block per item reduces the item's rows (gradient and parameter sums of squares)
// and clips those it holds whole; the items' gradient sums go through the norm's machinery (chunk
// partials, the last block's finish) into the total and per-tensor outputs. Rows longer than a
// chunk are reduced piece by piece; a second launch clips them, each block combining its row's
// piece partials in a fixed order. Everything is combined in a fixed order: the same bits run to
// run. The kernels, their launcher, and the operator's stable-ABI glue and registration.
#include <algorithm>
#include <optional>
#include <tuple>

#include "device.cuh"
#include "glue.h"

namespace fusedclip::cuda {
namespace {

// multi_tensor_agc_ (table.cuh: AgcTable): the norm's machinery sums the items' sums of squares
// of the gradients into the outputs (norm.kind is kSquareSum, norm.chunk_partials are by item).
struct AgcParams {
  NormParams norm;
  double clip_factor;
  double eps;
  double* piece_grad_sq;     // by item: the sums of squares of the pieces of long rows, or null
  double* piece_param_sq;    // when the call has no long row
};

static_assert(sizeof(AgcParams) <= kParamBytesBesidesTable, "the scalar arguments do not fit beside the table");

// The item's rows of at most kAgcGroupRowLimit elements: a group of lanes per row (the smallest
// power of two >= row_numel, at most 32; the groups of a warp take consecutive rows), which sums
// the row's squares in a fixed order (lane-strided, then a butterfly: the same bits in every lane
// of the group) and clips the row when it must. Returns the sum of the rows' gradient sums of
// squares, in a fixed order, to every thread.
template <typename TG, typename TP>
__device__ double clip_short_rows(TG* grad, const TP* param, int rows, int row_numel, const AgcParams& params) {
  int group = 32;
  while (group / 2 >= row_numel) group /= 2;
  const int lane = threadIdx.x % 32;
  const int sub = lane % group;
  const int rows_per_warp = 32 / group;
  double sum = 0;  // the rows of this lane's groups (lanes with sub == 0), in order
  // base is the same in every lane of a warp: each lane takes part in every shuffle.
  for (int base = threadIdx.x / 32 * rows_per_warp; base < rows; base += blockDim.x / group) {
    const int row = base + lane / group;
    const bool active = row < rows;
    const int64_t first = static_cast<int64_t>(active ? row : 0) * row_numel;
    acc_t<TG> grad_sq = 0;
    acc_t<TP> param_sq = 0;
    if (active) {
#pragma unroll 4
      for (int e = sub; e < row_numel; e += group) {
        const acc_t<TG> x = to_acc(grad[first + e]);
        const acc_t<TP> w = to_acc(param[first + e]);
        grad_sq = fma(x, x, grad_sq);
        param_sq = fma(w, w, param_sq);
      }
    }
    grad_sq = group_sum(grad_sq, group);
    param_sq = group_sum(param_sq, group);
    double coef;
    if (active && agc_scales(grad_sq, param_sq, params.clip_factor, params.eps, &coef)) {
      const ScaleOp op = scale_op(coef);
      for (int e = sub; e < row_numel; e += group) grad[first + e] = from_acc<TG>(op(to_acc(grad[first + e])));
    }
    if (active && sub == 0) sum += grad_sq;
  }
  return block_reduce<NormKind::kSquareSum, double>(sum);
}

// An item of a row longer than kAgcGroupRowLimit: the whole row, which the block clips, or a piece
// of a row longer than a chunk, whose sums go to the piece partials. Returns the gradient sum of
// squares, to every thread.
template <typename TG, typename TP>
__device__ double reduce_row_item(const AgcItem& item, TG* grad, const TP* param, const AgcParams& params) {
  const double grad_sq = block_statistic<NormKind::kSquareSum>(grad, item.numel, 2.0).value;
  const double param_sq = block_statistic<NormKind::kSquareSum>(param, item.numel, 2.0).value;
  double coef;
  if (item.items_per_row > 1) {
    if (threadIdx.x == 0) {
      params.piece_grad_sq[item.index] = grad_sq;
      params.piece_param_sq[item.index] = param_sq;
    }
  } else if (agc_scales(grad_sq, param_sq, params.clip_factor, params.eps, &coef)) {
    walk(grad, item.numel, scale_op(coef));
  }
  return grad_sq;
}

// What clip_item needs of an item and its table slot. clip_item is not inlined and takes the
// same view from every tier's kernel, so the code of the 16 dtype pairs is optimized once, not
// once per tier (a third of the compile time, and no stack frame: ptxas checks).
struct ItemView {
  AgcItem item;
  void* grad;          // the item's first element
  const void* param;
  DType grad_dtype;
  DType param_dtype;
};

template <typename Table>
__device__ __forceinline__ ItemView item_view(const Table& table, int c) {
  const AgcItem item = agc_item(table, c);
  const DType grad_dtype = table.grads.dtype[item.tensor], param_dtype = table.param_dtype[item.tensor];
  return {item, static_cast<char*>(table.grads.data[item.tensor]) + item.offset * element_size(grad_dtype),
          static_cast<const char*>(table.params[item.tensor]) + item.offset * element_size(param_dtype), grad_dtype,
          param_dtype};
}

__device__ __noinline__ double clip_item(const ItemView view, const AgcParams& params) {
  return with_dtype(view.grad_dtype, [&](auto grad_type) {
    return with_dtype(view.param_dtype, [&](auto param_type) {
      using TG = typename decltype(grad_type)::type;
      using TP = typename decltype(param_type)::type;
      TG* grad = static_cast<TG*>(view.grad);
      const TP* param = static_cast<const TP*>(view.param);
      if (view.item.row_numel <= kAgcGroupRowLimit) {
        return clip_short_rows(grad, param, view.item.rows, static_cast<int>(view.item.row_numel), params);
      }
      return reduce_row_item(view.item, grad, param, params);
    });
  });
}

template <typename Table>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSm)
    agc_kernel(const __grid_constant__ Table table, const __grid_constant__ AgcParams params) {
  const int c = blockIdx.x;
  if (c < table.grads.num_chunks) {  // a launch of zero-size tensors has one block and no item
    const double sum = clip_item(item_view(table, c), params);
    if (threadIdx.x == 0) params.norm.chunk_partials[table.grads.first_chunk + c] = sum;
  }
  if (is_last_block(params.norm)) finish_launch<NormKind::kSquareSum>(table.grads, params.norm);
}

// Pieces of long rows (a table of those tensors only, see long_rows_of), once every piece is
// reduced: each block sums its row's piece partials in a fixed order, so every block of a row
// takes the same decision, and clips its piece.
template <typename Table>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSm)
    agc_long_rows_kernel(const __grid_constant__ Table table, const __grid_constant__ AgcParams params) {
  const AgcItem item = agc_item(table, blockIdx.x);
  double grad_sq = 0, param_sq = 0;
  for (int64_t i = threadIdx.x; i < item.items_per_row; i += blockDim.x) {
    grad_sq += params.piece_grad_sq[item.unit_first + i];
    param_sq += params.piece_param_sq[item.unit_first + i];
  }
  grad_sq = block_reduce<NormKind::kSquareSum, double>(grad_sq);
  param_sq = block_reduce<NormKind::kSquareSum, double>(param_sq);
  double coef;
  if (!agc_scales(grad_sq, param_sq, params.clip_factor, params.eps, &coef)) return;
  const DType dtype = table.grads.dtype[item.tensor];
  transform(static_cast<char*>(table.grads.data[item.tensor]) + item.offset * element_size(dtype), item.numel,
            dtype, scale_op(coef));
}

// AGC of one table: reduces every item, clips the rows that fit an item and writes the outputs as
// launch_norm does; then, when the table has long rows, a second launch clips those.
cudaError_t launch_agc(const FullAgcTable& full, const AgcParams& params, cudaStream_t stream) {
  const cudaError_t error = with_smallest_tier(full, [&](const auto& table) {
    const unsigned int blocks = table.grads.num_chunks > 0 ? table.grads.num_chunks : 1;
    agc_kernel<<<blocks, kBlockThreads, 0, stream>>>(table, params);
    return cudaGetLastError();
  });
  FullAgcTable long_rows;
  if (error != cudaSuccess || !long_rows_of(full, long_rows)) return error;
  return with_smallest_tier(long_rows, [&](const auto& table) {
    agc_long_rows_kernel<<<table.grads.num_chunks, kBlockThreads, 0, stream>>>(table, params);
    return cudaGetLastError();
  });
}

// --- the operator ------------------------------------------------------------------------------

// AGC of one list in one pass (a launch per table, and one more for a table with long rows):
// total and per receive the sums of squares of the gradients before clipping. Units are rows of
// the row-major layout: other layouts go through contiguous temporaries, written back after.
void agc_list(const TensorList& grads, const TensorList& params, double clip_factor, double eps, bool acc_double,
              const Tensor& total, const Tensor& per, cudaStream_t stream) {
  TensorList row_major;  // (grad, param) per tensor: the temporaries live until queued
  TableList<FullAgcTable> list;
  bool long_rows = false;
  for (size_t i = 0; i < grads.size(); ++i) {
    const Tensor grad = torch::stable::contiguous(grads[i]);
    const Tensor param = torch::stable::contiguous(params[i]);
    row_major.push_back(grad);
    row_major.push_back(param);
    const int64_t numel = grad.numel();
    const int64_t row_numel = numel == 0 ? 0 : numel / (grad.dim() > 1 ? grad.size(0) : 1);
    long_rows = long_rows || (numel > 0 && agc_geometry(row_numel).items_per_row > 1);
    if (!list.append_agc(numel > 0 ? grad.data_ptr() : nullptr, numel > 0 ? param.data_ptr() : nullptr, numel,
                         row_numel, dtype_of(grad.scalar_type()), dtype_of(param.scalar_type()))) {
      fail("too many elements for one call");
    }
  }
  AgcParams agc{};
  agc.norm.kind = NormKind::kSquareSum;
  agc.norm.p = 2.0;
  agc.norm.acc_double = acc_double;
  agc.norm.statistic = total.data_ptr();
  agc.norm.per_tensor = per.data_ptr();
  agc.norm.num_launches = static_cast<int32_t>(list.tables.size());
  agc.clip_factor = clip_factor;
  agc.eps = eps;
  const Tensor& like = grads[0];
  NormScratch scratch(list.num_chunks, agc.norm.num_launches, like, stream, agc.norm);
  Tensor pieces;
  if (long_rows) {
    pieces = empty_on(like, {2 * list.num_chunks}, ScalarType::Double);
    agc.piece_grad_sq = static_cast<double*>(pieces.data_ptr());
    agc.piece_param_sq = agc.piece_grad_sq + list.num_chunks;
  }
  for (size_t l = 0; l < list.tables.size(); ++l) {
    agc.norm.launch = static_cast<int32_t>(l);
    FUSEDCLIP_CUDA_CHECK(launch_agc(list.tables[l], agc, stream));
  }
  // A grad that contiguous() returned as it is (the same data) was written in place; a copy is
  // written back.
  for (size_t i = 0; i < grads.size(); ++i) {
    Tensor grad = grads[i];
    if (grad.numel() > 0 && row_major[2 * i].data_ptr() != grad.data_ptr()) {
      torch::stable::copy_(grad, row_major[2 * i]);
    }
  }
}

std::tuple<Tensor, Tensor> multi_tensor_agc_(TensorList grads, TensorList params, double clip_factor, double eps) {
  check_not_empty(grads, "multi_tensor_agc_");
  check_agc_arguments(grads, params, clip_factor, eps, DeviceType::CUDA);
  const DeviceOf device(grads[0]);
  const bool acc_double = std::any_of(grads.begin(), grads.end(),
                                      [](const Tensor& g) { return g.scalar_type() == ScalarType::Double; });
  const ScalarType acc = acc_dtype(acc_double);
  const auto num_tensors = static_cast<int64_t>(grads.size());
  Tensor per = empty_on(grads[0], {num_tensors}, acc);
  if (!any_memory_shared(grads)) {
    Tensor total = empty_on(grads[0], {}, acc);
    agc_list(grads, params, clip_factor, eps, acc_double, total, per, device.stream);
    return {total, per};
  }
  // Gradients that share memory are clipped one tensor at a time in list order, as torch's
  // per-tensor loop clips them: each write-back lands before the next tensor is read, so a later
  // occurrence sees the earlier clips. The total then sums the per-tensor results in order.
  for (int64_t i = 0; i < num_tensors; ++i) {
    const auto at = static_cast<size_t>(i);
    agc_list(TensorList{grads[at]}, TensorList{params[at]}, clip_factor, eps, acc_double, empty_on(grads[0], {}, acc),
             torch::stable::narrow(per, 0, i, 1), device.stream);
  }
  return {torch::stable::to(torch::stable::sum(per, std::nullopt, false, ScalarType::Double), acc), per};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(fusedclip, CUDA, m) {
  m.impl("multi_tensor_agc_", TORCH_BOX(&multi_tensor_agc_));
}

}  // namespace fusedclip::cuda
