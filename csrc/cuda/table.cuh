// The tensor tables of the CUDA kernels and their arithmetic: how a list of tensors is cut into
// chunks and launches, which tensor owns a chunk, where the chunk starts and how long it is.
//
// Plain C++: no CUDA and no torch header (FUSEDCLIP_HOST_DEVICE functions), so the host builds
// the tables with the code the kernels read them with, and a host program tests that code
// (tests/cuda_table_test.cpp, run by tests/test_cuda_compile.py and scripts/check_cuda.py).
//
// Each tensor is cut into chunks of kChunkElements; one block reduces or transforms one chunk.
// Chunk boundaries depend only on the tensors' sizes, so results reduced chunk by chunk in a fixed
// order are the same run to run and for any grid. AGC cuts its tensors into items of whole rows
// instead (see AgcTable).
#pragma once

#include <cstdint>
#include <vector>

#include "../numerics.h"

namespace fusedclip::cuda {

// 64K elements: 256 KB of float32 per block, as torch's multi-tensor apply; a multiple of every
// vector width, so a chunk is 16-byte aligned wherever its tensor is.
constexpr int64_t kChunkElements = int64_t{1} << 16;

// The chunks of one call, at most: chunk indices are int32 in the kernels, and loops over chunks
// step by up to a few thousand past their end, which stays below INT32_MAX. (2^30 chunks are
// 2^46 elements, far beyond any device's memory.)
constexpr int64_t kMaxCallChunks = int64_t{1} << 30;

enum class DType : uint8_t { kFloat32, kFloat64, kFloat16, kBFloat16 };

FUSEDCLIP_HOST_DEVICE constexpr int element_size(DType dtype) {
  return dtype == DType::kFloat64 ? 8 : dtype == DType::kFloat32 ? 4 : 2;
}

FUSEDCLIP_HOST_DEVICE constexpr int64_t chunks_of(int64_t numel) {
  return (numel + kChunkElements - 1) / kChunkElements;
}

// The tensors of one launch, dense and real (the glue makes contiguous copies of the others and
// real views of complex ones). Tensor i owns chunks [chunk_start[i], chunk_start[i + 1]) of this
// launch; zero-size tensors own none but keep their slot, so per-tensor results need no index map.
// Kernels take the table by value as their argument; the capacity is a template parameter so that
// a launch of a few tensors passes a few hundred bytes, not the whole 32 KB (see kernels.cuh).
template <int kCapacityValue>
struct TensorTable {
  static constexpr int kCapacity = kCapacityValue;
  template <int kOther> using WithCapacity = TensorTable<kOther>;
  int32_t num_tensors;
  int32_t num_chunks;
  int32_t first_tensor;  // index of tensor 0 in the caller's list (per-tensor outputs and coefs)
  int32_t first_chunk;   // index of chunk 0 among the chunks of every launch (chunk partials)
  void* data[kCapacity];
  int64_t numel[kCapacity];
  int32_t chunk_start[kCapacity + 1];
  DType dtype[kCapacity];
};

// ---------------------------------------------------------------------------------------------
// AGC: units are rows (slices along dim 0) of tensors with more than one dimension, else whole
// tensors. A tensor's items (its "chunks" in the table) are runs of whole rows of at most
// kChunkElements elements when its rows have at most kAgcGroupRowLimit elements (a block clips
// them on its own: a group of lanes per row), else pieces of kChunkElements of one row: one item
// when the row fits a chunk (the block clips it), several for a long row (one block per piece
// reduces it; a second launch clips the pieces once every piece is reduced).
// ---------------------------------------------------------------------------------------------

constexpr int64_t kAgcGroupRowLimit = 4096;

template <int kCapacityValue>
struct AgcTable {
  static constexpr int kCapacity = kCapacityValue;
  template <int kOther> using WithCapacity = AgcTable<kOther>;
  TensorTable<kCapacity> grads;  // chunks are items
  const void* params[kCapacity];
  int64_t row_numel[kCapacity];  // elements per unit
  int32_t item_base[kCapacity];  // index of the tensor's first item among the call's items
  DType param_dtype[kCapacity];
};

template <int kCapacity>
FUSEDCLIP_HOST_DEVICE TensorTable<kCapacity>& tensors_of(TensorTable<kCapacity>& table) { return table; }
template <int kCapacity>
FUSEDCLIP_HOST_DEVICE const TensorTable<kCapacity>& tensors_of(const TensorTable<kCapacity>& table) { return table; }
template <int kCapacity>
FUSEDCLIP_HOST_DEVICE TensorTable<kCapacity>& tensors_of(AgcTable<kCapacity>& table) { return table.grads; }
template <int kCapacity>
FUSEDCLIP_HOST_DEVICE const TensorTable<kCapacity>& tensors_of(const AgcTable<kCapacity>& table) {
  return table.grads;
}

// Rows per item and items per row of an AGC tensor with rows of row_numel > 0 elements: one of
// them is 1.
struct AgcGeometry {
  int64_t rows_per_item;
  int64_t items_per_row;
};

FUSEDCLIP_HOST_DEVICE inline AgcGeometry agc_geometry(int64_t row_numel) {
  if (row_numel <= kAgcGroupRowLimit) return {kChunkElements / row_numel, 1};
  return {1, chunks_of(row_numel)};
}

// The items of an AGC tensor of numel elements in rows of row_numel.
FUSEDCLIP_HOST_DEVICE inline int64_t agc_items_of(int64_t numel, int64_t row_numel) {
  if (numel == 0) return 0;
  const AgcGeometry g = agc_geometry(row_numel);
  const int64_t rows = numel / row_numel;
  return g.items_per_row == 1 ? (rows + g.rows_per_item - 1) / g.rows_per_item : rows * g.items_per_row;
}

// ---------------------------------------------------------------------------------------------
// Lookups, on the host and the device.
// ---------------------------------------------------------------------------------------------

// The tensor that owns chunk c (0 <= c < num_chunks): the last tensor whose first chunk is <= c
// (zero-size tensors, which own no chunk, share their first chunk with the next tensor and lose
// to it).
template <int kCapacity>
FUSEDCLIP_HOST_DEVICE int tensor_of_chunk(const TensorTable<kCapacity>& table, int c) {
  int lo = 0, hi = table.num_tensors - 1;
  while (lo < hi) {
    const int mid = lo + (hi - lo + 1) / 2;
    if (table.chunk_start[mid] <= c) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

// Chunk c of a table: its tensor, its first element's offset in that tensor, its length.
struct ChunkSpan {
  int tensor;
  int64_t offset;  // elements
  int numel;
};

template <int kCapacity>
FUSEDCLIP_HOST_DEVICE ChunkSpan chunk_span(const TensorTable<kCapacity>& table, int c) {
  const int t = tensor_of_chunk(table, c);
  const int64_t offset = static_cast<int64_t>(c - table.chunk_start[t]) * kChunkElements;
  const int64_t remaining = table.numel[t] - offset;
  return {t, offset, static_cast<int>(remaining < kChunkElements ? remaining : kChunkElements)};
}

// Item c of an AGC table.
struct AgcItem {
  int tensor;
  int64_t offset;          // elements from the tensor's start
  int numel;               // elements in the item
  int rows;                // whole rows in the item (1 for a piece of a long row)
  int64_t row_numel;
  int64_t items_per_row;   // > 1: the item is piece `piece` of a long row
  int64_t piece;
  int64_t index;           // the item's index among the call's items
  int64_t unit_first;      // the index of the first item of the item's row (long rows)
};

template <int kCapacity>
FUSEDCLIP_HOST_DEVICE AgcItem agc_item(const AgcTable<kCapacity>& table, int c) {
  const int t = tensor_of_chunk(table.grads, c);
  const int64_t local = c - table.grads.chunk_start[t];
  const int64_t row_numel = table.row_numel[t];
  const AgcGeometry g = agc_geometry(row_numel);
  const int64_t unit = local / g.items_per_row;  // the item's first row / rows_per_item
  const int64_t piece = local % g.items_per_row;
  const int64_t first_row = unit * g.rows_per_item;
  const int64_t rows_left = table.grads.numel[t] / row_numel - first_row;
  const int64_t rows = rows_left < g.rows_per_item ? rows_left : g.rows_per_item;
  const int64_t piece_left = row_numel - piece * kChunkElements;
  const int64_t numel = g.items_per_row == 1 ? rows * row_numel
                                             : (piece_left < kChunkElements ? piece_left : kChunkElements);
  const int64_t base = table.item_base[t];
  return {t, first_row * row_numel + piece * kChunkElements, static_cast<int>(numel), static_cast<int>(rows),
          row_numel, g.items_per_row, piece, base + local, base + unit * g.items_per_row};
}

// ---------------------------------------------------------------------------------------------
// Building tables (host).
// ---------------------------------------------------------------------------------------------

// The tables of one call, in list order, each full before the next opens; chunk numbering runs on
// across them.
template <typename Table>
struct TableList {
  std::vector<Table> tables;
  int64_t num_chunks = 0;  // of the whole call
  int32_t num_tensors = 0;

  // first_tensor: the index of the first tensor to come in the caller's list.
  explicit TableList(int32_t first_tensor = 0) : num_tensors(first_tensor) {}

  // Appends a tensor that owns `chunks` chunks; returns its slot in tables.back(), or -1 (and
  // appends nothing) when the call would pass kMaxCallChunks.
  int append(void* data, int64_t numel, DType dtype, int64_t chunks) {
    if (chunks < 0 || chunks > kMaxCallChunks - num_chunks) return -1;
    if (tables.empty() || tensors_of(tables.back()).num_tensors == Table::kCapacity) {
      tables.emplace_back();  // value-initialized: zero counts
      TensorTable<Table::kCapacity>& fresh = tensors_of(tables.back());
      fresh.first_tensor = num_tensors;
      fresh.first_chunk = static_cast<int32_t>(num_chunks);
    }
    TensorTable<Table::kCapacity>& table = tensors_of(tables.back());
    const int n = table.num_tensors++;
    table.data[n] = data;
    table.numel[n] = numel;
    table.dtype[n] = dtype;
    table.chunk_start[n] = table.num_chunks;
    table.num_chunks += static_cast<int32_t>(chunks);
    table.chunk_start[n + 1] = table.num_chunks;
    num_chunks += chunks;
    ++num_tensors;
    return n;
  }

  // A tensor in chunks of kChunkElements.
  bool append_tensor(void* data, int64_t numel, DType dtype) {
    return append(data, numel, dtype, chunks_of(numel)) >= 0;
  }

  // An AGC gradient in rows of row_numel elements (row_numel > 0 unless numel is 0), with its
  // parameter (Table is an AgcTable).
  bool append_agc(void* grad, const void* param, int64_t numel, int64_t row_numel, DType grad_dtype,
                  DType param_dtype) {
    const int64_t first_item = num_chunks;
    const int n = append(grad, numel, grad_dtype, agc_items_of(numel, row_numel));
    if (n < 0) return false;
    Table& table = tables.back();
    table.params[n] = param;
    table.row_numel[n] = row_numel;
    table.item_base[n] = static_cast<int32_t>(first_item);
    table.param_dtype[n] = param_dtype;
    return true;
  }
};

// The first from.num_tensors slots of a table in a table of another capacity (large enough).
template <int kTo, int kFrom>
void copy_prefix(TensorTable<kTo>& to, const TensorTable<kFrom>& from) {
  to.num_tensors = from.num_tensors;
  to.num_chunks = from.num_chunks;
  to.first_tensor = from.first_tensor;
  to.first_chunk = from.first_chunk;
  for (int i = 0; i < from.num_tensors; ++i) {
    to.data[i] = from.data[i];
    to.numel[i] = from.numel[i];
    to.dtype[i] = from.dtype[i];
  }
  for (int i = 0; i <= from.num_tensors; ++i) to.chunk_start[i] = from.chunk_start[i];
}

template <int kTo, int kFrom>
void copy_prefix(AgcTable<kTo>& to, const AgcTable<kFrom>& from) {
  copy_prefix(to.grads, from.grads);
  for (int i = 0; i < from.grads.num_tensors; ++i) {
    to.params[i] = from.params[i];
    to.row_numel[i] = from.row_numel[i];
    to.item_base[i] = from.item_base[i];
    to.param_dtype[i] = from.param_dtype[i];
  }
}

// The tensors of an AGC table whose rows are long (more than one item per row), with their items
// numbered from 0 and their item_base kept: the table of the launch that clips long rows once
// every piece is reduced. Returns false when there are none.
template <int kCapacity>
bool long_rows_of(const AgcTable<kCapacity>& table, AgcTable<kCapacity>& out) {
  TableList<AgcTable<kCapacity>> list(table.grads.first_tensor);
  for (int t = 0; t < table.grads.num_tensors; ++t) {
    const int64_t numel = table.grads.numel[t];
    if (numel == 0 || agc_geometry(table.row_numel[t]).items_per_row == 1) continue;
    list.append_agc(table.grads.data[t], table.params[t], numel, table.row_numel[t], table.grads.dtype[t],
                    table.param_dtype[t]);
    list.tables.back().item_base[list.tables.back().grads.num_tensors - 1] = table.item_base[t];
  }
  if (list.tables.empty()) return false;
  out = list.tables.front();  // a subset of one table fits one table
  return true;
}

}  // namespace fusedclip::cuda
