// Host test of the CUDA kernels' table arithmetic (csrc/cuda/table.cuh, with the tiers of
// csrc/cuda/kernels.cuh): the tables the glue builds and the chunk and AGC-item lookups the
// kernels make, checked against an independent enumeration for every chunk and item. Tensors
// above 2^31 elements, zero-size tensors at every position, lists past a table's capacity, the
// call's chunk limit, the tier a launch takes, and the AGC rule of csrc/numerics.h.
//
// Built with g++ (no GPU, no torch; the CUDA headers for cuda_runtime.h) and run by
// tests/test_cuda_compile.py and scripts/check_cuda.py; prints "ok" and exits 0 when every check
// holds, else prints each failure and exits 1.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <type_traits>
#include <vector>

#include "cuda/kernels.cuh"

namespace fc = fusedclip::cuda;

namespace {

int failures = 0;

#define CHECK(condition, ...)                                                   \
  do {                                                                          \
    if (!(condition)) {                                                         \
      if (++failures <= 30) {                                                   \
        std::printf("%s:%d: %s: ", __FILE__, __LINE__, #condition);             \
        std::printf(__VA_ARGS__);                                               \
        std::printf("\n");                                                      \
      }                                                                         \
    }                                                                           \
  } while (0)

// A distinct fake address per tensor (never dereferenced).
void* fake_data(size_t i) { return reinterpret_cast<void*>(uintptr_t{0x100000} * (i + 1)); }

fc::DType dtype_of_index(size_t i) { return static_cast<fc::DType>(i % 4); }

// --- chunks -----------------------------------------------------------------------------------

struct ExpectedChunk {
  int64_t tensor;
  int64_t offset;
  int64_t numel;
};

std::vector<ExpectedChunk> enumerate_chunks(const std::vector<int64_t>& sizes, int64_t first_tensor) {
  std::vector<ExpectedChunk> chunks;
  for (size_t i = 0; i < sizes.size(); ++i) {
    for (int64_t offset = 0; offset < sizes[i]; offset += fc::kChunkElements) {
      const int64_t left = sizes[i] - offset;
      chunks.push_back({first_tensor + static_cast<int64_t>(i), offset, left < fc::kChunkElements ? left : fc::kChunkElements});
    }
  }
  return chunks;
}

// Every chunk of every table of sizes (in tables of Table's capacity) maps to the right tensor,
// offset and length; the tables are full but the last, and number tensors and chunks on.
template <typename Table>
void check_chunks(const std::vector<int64_t>& sizes, int32_t first_tensor) {
  fc::TableList<Table> list(first_tensor);
  for (size_t i = 0; i < sizes.size(); ++i) {
    CHECK(list.append_tensor(fake_data(i), sizes[i], dtype_of_index(i)), "tensor %zu rejected", i);
  }
  const std::vector<ExpectedChunk> expected = enumerate_chunks(sizes, first_tensor);
  CHECK(list.num_chunks == static_cast<int64_t>(expected.size()), "%lld chunks, expected %zu",
        static_cast<long long>(list.num_chunks), expected.size());
  const size_t want_tables = sizes.empty() ? 0 : (sizes.size() + Table::kCapacity - 1) / Table::kCapacity;
  CHECK(list.tables.size() == want_tables, "%zu tables, expected %zu", list.tables.size(), want_tables);
  int64_t next_tensor = first_tensor, next_chunk = 0;
  for (size_t l = 0; l < list.tables.size(); ++l) {
    const Table& table = list.tables[l];
    CHECK(table.first_tensor == next_tensor && table.first_chunk == next_chunk, "table %zu starts at %d, %d", l,
          table.first_tensor, table.first_chunk);
    CHECK(table.num_tensors == (l + 1 < list.tables.size() ? Table::kCapacity : table.num_tensors) &&
              table.num_tensors > 0,
          "table %zu holds %d tensors", l, table.num_tensors);
    CHECK(table.chunk_start[0] == 0 && table.chunk_start[table.num_tensors] == table.num_chunks,
          "table %zu chunk_start ends", l);
    for (int t = 0; t < table.num_tensors; ++t) {
      const size_t index = static_cast<size_t>(table.first_tensor - first_tensor + t);
      CHECK(table.chunk_start[t + 1] - table.chunk_start[t] == fc::chunks_of(sizes[index]) &&
                table.numel[t] == sizes[index] && table.data[t] == fake_data(index) &&
                table.dtype[t] == dtype_of_index(index),
            "slot %d of table %zu", t, l);
    }
    for (int c = 0; c < table.num_chunks; ++c) {
      const fc::ChunkSpan span = fc::chunk_span(table, c);
      const ExpectedChunk& want = expected[static_cast<size_t>(table.first_chunk) + c];
      CHECK(table.first_tensor + span.tensor == want.tensor && span.offset == want.offset && span.numel == want.numel,
            "chunk %d of table %zu: tensor %d offset %lld numel %d; expected %lld %lld %lld", c, l,
            table.first_tensor + span.tensor, static_cast<long long>(span.offset), span.numel,
            static_cast<long long>(want.tensor), static_cast<long long>(want.offset),
            static_cast<long long>(want.numel));
      // The kernels' address arithmetic: in int64 bytes, past 2^32 for large tensors.
      const int64_t byte_offset = span.offset * fc::element_size(table.dtype[span.tensor]);
      CHECK(byte_offset == want.offset * fc::element_size(dtype_of_index(static_cast<size_t>(want.tensor - first_tensor))),
            "byte offset of chunk %d", c);
    }
    next_tensor += table.num_tensors;
    next_chunk += table.num_chunks;
  }
}

// Sizes with zero-size tensors at the start, in the middle and at the end, tensors above 2^31
// elements, and sizes around the chunk boundary.
std::vector<std::vector<int64_t>> size_lists() {
  const int64_t big = (int64_t{1} << 31) + 12345;
  const int64_t k = fc::kChunkElements;
  std::vector<std::vector<int64_t>> lists = {
      {0},
      {0, 0, 0},
      {1},
      {k - 1, k, k + 1, 2 * k, 0},
      {0, 5, 0, 0, 7, 0},
      {big, 0, 3 * (int64_t{1} << 32) + 7, 1, 0},
      {0, big},
  };
  std::vector<int64_t> many;  // 3,500 tensors: three full-capacity tables, empties all along
  for (int i = 0; i < 3500; ++i) many.push_back(i % 7 == 0 ? 0 : (i * 7919) % (3 * k));
  lists.push_back(many);
  // Every position of a zero-size tensor in a list of 9 tensors.
  for (int position = 0; position < 9; ++position) {
    std::vector<int64_t> sizes = {k + 3, 17, 2 * k, 1, k, 4 * k - 1, 9, big, 33};
    sizes[position] = 0;
    lists.push_back(sizes);
  }
  return lists;
}

void test_chunks() {
  for (const std::vector<int64_t>& sizes : size_lists()) {
    check_chunks<fc::TensorTable<1>>(sizes, 0);
    check_chunks<fc::TensorTable<3>>(sizes, 5);
    check_chunks<fc::TensorTable<fc::kSmallTier>>(sizes, 0);
    check_chunks<fc::FullTable>(sizes, 0);
  }
  check_chunks<fc::FullTable>({}, 0);
}

// The call's chunk limit: a tensor that would pass it is refused and leaves the list unchanged.
void test_chunk_limit() {
  fc::TableList<fc::TensorTable<4>> list;
  const int64_t half = fc::kMaxCallChunks / 2 * fc::kChunkElements;
  CHECK(list.append_tensor(fake_data(0), half, fc::DType::kFloat32), "first half refused");
  CHECK(list.append_tensor(fake_data(1), half, fc::DType::kFloat32), "second half refused");
  CHECK(list.num_chunks == fc::kMaxCallChunks, "at the limit: %lld chunks", static_cast<long long>(list.num_chunks));
  CHECK(!list.append_tensor(fake_data(2), 1, fc::DType::kFloat32), "a chunk past the limit accepted");
  CHECK(list.append_tensor(fake_data(3), 0, fc::DType::kFloat32), "a zero-size tensor at the limit refused");
  CHECK(list.num_chunks == fc::kMaxCallChunks && list.num_tensors == 3 && list.tables[0].num_tensors == 3,
        "refusal changed the list");
  CHECK(!list.append_tensor(fake_data(4), std::numeric_limits<int64_t>::max() - fc::kChunkElements,
                            fc::DType::kFloat16),
        "an absurd tensor accepted");
  // Chunk indices and loops over them stay far from INT32_MAX.
  CHECK(fc::kMaxCallChunks + 64 * fc::kBlockThreads < std::numeric_limits<int32_t>::max(), "limit too close");
}

// --- tiers ------------------------------------------------------------------------------------

template <typename Full>
void check_tier(int num_tensors, int want_capacity) {
  fc::TableList<Full> list;
  for (int i = 0; i < num_tensors; ++i) {
    const int64_t numel = i % 5 == 0 ? 0 : 1000 * i + 70000;
    if constexpr (std::is_same_v<Full, fc::FullAgcTable>) {
      list.append_agc(fake_data(i), fake_data(i + 100000), numel, i % 2 == 0 ? numel : 100, fc::DType::kFloat32,
                      fc::DType::kBFloat16);
    } else {
      list.append_tensor(fake_data(i), numel, fc::DType::kFloat16);
    }
  }
  const Full& full = list.tables.front();
  int seen = -1;
  const cudaError_t status = fc::with_smallest_tier(full, [&](const auto& table) {
    seen = std::decay_t<decltype(table)>::kCapacity;
    const auto& a = fc::tensors_of(table);
    const auto& b = fc::tensors_of(full);
    bool same = a.num_tensors == b.num_tensors && a.num_chunks == b.num_chunks && a.first_tensor == b.first_tensor &&
                a.first_chunk == b.first_chunk;
    for (int c = 0; same && c < a.num_chunks; ++c) {
      const fc::ChunkSpan x = fc::chunk_span(a, c), y = fc::chunk_span(b, c);
      same = x.tensor == y.tensor && x.offset == y.offset && x.numel == y.numel && a.data[x.tensor] == b.data[y.tensor];
    }
    CHECK(same, "the tier-%d copy of %d tensors differs", seen, num_tensors);
    return cudaSuccess;
  });
  CHECK(status == cudaSuccess && seen == want_capacity, "%d tensors took tier %d, expected %d", num_tensors, seen,
        want_capacity);
}

void test_tiers() {
  for (int n : {1, 5, fc::kSmallTier}) check_tier<fc::FullTable>(n, fc::kSmallTier);
  for (int n : {fc::kSmallTier + 1, fc::kMediumTier}) check_tier<fc::FullTable>(n, fc::kMediumTier);
  for (int n : {fc::kMediumTier + 1, fc::kMaxTensors}) check_tier<fc::FullTable>(n, fc::kMaxTensors);
  check_tier<fc::FullAgcTable>(7, fc::kSmallTier);
  check_tier<fc::FullAgcTable>(fc::kMediumTier, fc::kMediumTier);
  check_tier<fc::FullAgcTable>(fc::kMaxAgcTensors, fc::kMaxAgcTensors);
  // What a launch of five tensors passes: under 1 KB of table.
  CHECK(sizeof(fc::TensorTable<fc::kSmallTier>) < 1024 && sizeof(fc::AgcTable<fc::kSmallTier>) < 2048,
        "small tier of %zu bytes", sizeof(fc::TensorTable<fc::kSmallTier>));
}

// --- AGC items --------------------------------------------------------------------------------

struct Shape {
  int64_t rows;       // units
  int64_t row_numel;  // elements per unit
};

// The items of an AGC list, enumerated from the rule in table.cuh's comment.
std::vector<fc::AgcItem> enumerate_items(const std::vector<Shape>& shapes) {
  std::vector<fc::AgcItem> items;
  for (size_t i = 0; i < shapes.size(); ++i) {
    const int64_t rows = shapes[i].rows, r = shapes[i].row_numel;
    if (rows * r == 0) continue;
    if (r <= fc::kAgcGroupRowLimit) {
      const int64_t per_item = fc::kChunkElements / r;
      for (int64_t first = 0; first < rows; first += per_item) {
        const int64_t n = rows - first < per_item ? rows - first : per_item;
        const auto index = static_cast<int64_t>(items.size());
        items.push_back({static_cast<int>(i), first * r, static_cast<int>(n * r), static_cast<int>(n), r, 1, 0, index,
                         index});
      }
    } else {
      const int64_t pieces = (r + fc::kChunkElements - 1) / fc::kChunkElements;
      for (int64_t row = 0; row < rows; ++row) {
        const auto unit_first = static_cast<int64_t>(items.size());
        for (int64_t piece = 0; piece < pieces; ++piece) {
          const int64_t left = r - piece * fc::kChunkElements;
          items.push_back({static_cast<int>(i), row * r + piece * fc::kChunkElements,
                           static_cast<int>(left < fc::kChunkElements ? left : fc::kChunkElements), 1, r, pieces, piece,
                           static_cast<int64_t>(items.size()), unit_first});
        }
      }
    }
  }
  return items;
}

bool same_item(const fc::AgcItem& a, const fc::AgcItem& b) {
  return a.tensor == b.tensor && a.offset == b.offset && a.numel == b.numel && a.rows == b.rows &&
         a.row_numel == b.row_numel && a.items_per_row == b.items_per_row && a.piece == b.piece && a.index == b.index &&
         a.unit_first == b.unit_first;
}

template <typename Table>
void check_agc(const std::vector<Shape>& shapes) {
  fc::TableList<Table> list;
  for (size_t i = 0; i < shapes.size(); ++i) {
    const int64_t numel = shapes[i].rows * shapes[i].row_numel;
    CHECK(list.append_agc(fake_data(i), fake_data(i + 1000), numel, numel == 0 ? 0 : shapes[i].row_numel,
                          dtype_of_index(i), dtype_of_index(i + 1)),
          "AGC tensor %zu refused", i);
  }
  const std::vector<fc::AgcItem> expected = enumerate_items(shapes);
  CHECK(list.num_chunks == static_cast<int64_t>(expected.size()), "%lld items, expected %zu",
        static_cast<long long>(list.num_chunks), expected.size());
  for (const Table& table : list.tables) {
    for (int c = 0; c < table.grads.num_chunks; ++c) {
      fc::AgcItem item = fc::agc_item(table, c);
      item.tensor += table.grads.first_tensor;
      const fc::AgcItem& want = expected[static_cast<size_t>(table.grads.first_chunk + c)];
      CHECK(same_item(item, want),
            "item %d: tensor %d offset %lld numel %d rows %d piece %lld index %lld first %lld; expected %d %lld %d %d "
            "%lld %lld %lld",
            c, item.tensor, static_cast<long long>(item.offset), item.numel, item.rows,
            static_cast<long long>(item.piece), static_cast<long long>(item.index),
            static_cast<long long>(item.unit_first), want.tensor, static_cast<long long>(want.offset), want.numel,
            want.rows, static_cast<long long>(want.piece), static_cast<long long>(want.index),
            static_cast<long long>(want.unit_first));
      CHECK(item.numel > 0 && item.numel <= fc::kChunkElements, "item %d of %d elements", c, item.numel);
    }
    // The second launch's table: the long-row tensors only, their items mapping to the same rows
    // and piece partials.
    Table long_rows;
    const bool any = fc::long_rows_of(table, long_rows);
    int want_long = 0;
    for (int t = 0; t < table.grads.num_tensors; ++t) {
      want_long += table.grads.numel[t] > 0 && table.row_numel[t] > fc::kChunkElements;
    }
    CHECK(any == (want_long > 0) && (!any || long_rows.grads.num_tensors == want_long), "%d long-row tensors",
          want_long);
    for (int c = 0; any && c < long_rows.grads.num_chunks; ++c) {
      const fc::AgcItem item = fc::agc_item(long_rows, c);
      const fc::AgcItem& want = expected[static_cast<size_t>(item.index)];
      CHECK(item.items_per_row > 1 && long_rows.grads.data[item.tensor] == table.grads.data[want.tensor - table.grads.first_tensor] &&
                long_rows.params[item.tensor] == table.params[want.tensor - table.grads.first_tensor] &&
                item.offset == want.offset && item.numel == want.numel && item.unit_first == want.unit_first,
            "long-row item %d", c);
    }
  }
}

void test_agc_items() {
  const int64_t k = fc::kChunkElements;
  const std::vector<std::vector<Shape>> lists = {
      {{1, 1}, {3, 1}, {70000, 1}, {5, 3}, {1000, 31}, {100, 32}, {33, 33}},
      {{16, 4096}, {17, 4097}, {3, k - 1}, {2, k}, {2, k + 1}, {1, 3 * k + 5}},
      {{0, 7}, {4, 0}, {1, 5}, {0, 0}, {2, 2 * k + 1}, {0, k + 1}},
      {{3, (int64_t{1} << 31) + 5}},          // rows above 2^31 elements: pieces with int64 offsets
      {{int64_t{1} << 26, 64}, {0, 1}},       // 2^32 elements in short rows
      {{(int64_t{1} << 19) + 1, 4097}},       // one item per row, past 2^31 elements
  };
  for (const std::vector<Shape>& shapes : lists) {
    check_agc<fc::AgcTable<2>>(shapes);
    check_agc<fc::FullAgcTable>(shapes);
  }
  // Every position of a zero-size tensor.
  for (int position = 0; position < 6; ++position) {
    std::vector<Shape> shapes = {{7, 100}, {1, 2 * k + 3}, {300, 5000}, {2, 1}, {1, 70000}, {9, 4096}};
    shapes[position].rows = 0;
    check_agc<fc::AgcTable<3>>(shapes);
    check_agc<fc::FullAgcTable>(shapes);
  }
}

// --- the AGC rule -----------------------------------------------------------------------------

void test_agc_rule() {
  double coef = -1;
  // ||g|| = 3 < W* = 0.5 * ||w|| (= 8): no clip.
  CHECK(!fusedclip::agc_scales(9.0, 256.0, 0.5, 1e-3, &coef), "clipped below the threshold");
  // ||g|| = 10 >= W* = 8: scaled by 0.8.
  CHECK(fusedclip::agc_scales(100.0, 256.0, 0.5, 1e-3, &coef) && coef == 8.0 / 10.0, "coef %g", coef);
  // ||g|| == W*: clipped (not ||g|| < W*).
  CHECK(fusedclip::agc_scales(64.0, 256.0, 0.5, 1e-3, &coef) && coef == 1.0, "at the threshold %g", coef);
  // A zero parameter: W* = clip_factor * eps.
  CHECK(fusedclip::agc_scales(1.0, 0.0, 0.5, 1e-3, &coef) && coef == 0.5 * 1e-3, "eps floor %g", coef);
  // A zero gradient with a zero W*: max(||g||, 1e-6) in the denominator.
  CHECK(fusedclip::agc_scales(0.0, 0.0, 0.0, 0.0, &coef) && coef == 0.0, "zero over 1e-6: %g", coef);
  // nan anywhere scales by nan.
  const double nan = std::numeric_limits<double>::quiet_NaN();
  CHECK(fusedclip::agc_scales(nan, 1.0, 0.5, 1e-3, &coef) && std::isnan(coef), "nan grad");
  CHECK(fusedclip::agc_scales(1.0, nan, 0.5, 1e-3, &coef) && std::isnan(coef), "nan param");
}

}  // namespace

int main() {
  test_chunks();
  test_chunk_limit();
  test_tiers();
  test_agc_items();
  test_agc_rule();
  if (failures != 0) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("ok\n");
  return 0;
}
