// Fused lookup-reduce on CPU (spec §5 "Fused lookup-reduce"), built by umtrain/ops/fused_lookup_reduce.py.
//
// Each entry (t, k) reads its table row once, straight into the token's E x d_v accumulator (forward) or into
// one dot product per core slice (the scores' gradient); the [T, K, d_v] gathered tensor never exists. The
// table's gradient sums the row-sorted entries' d_pooled rows into each gradient row, written once. Source rows
// are random, so the next ones are prefetched to keep several DRAM reads in flight. Sums accumulate in opmath
// (fp32 for bf16/fp16 tables). Inputs are checked by the Python caller; here only layout and dtype.

#include <torch/extension.h>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace {

constexpr int64_t kPrefetchEntries = 8;  // rows ahead: enough reads in flight to cover DRAM latency
constexpr int64_t kCacheLine = 64;

template <typename scalar_t>
inline void prefetch_row(const scalar_t* row, int64_t width) {
  const char* bytes = reinterpret_cast<const char*>(row);
  for (int64_t offset = 0; offset < width * static_cast<int64_t>(sizeof(scalar_t)); offset += kCacheLine) {
    __builtin_prefetch(bytes + offset);
  }
}

struct Shape {
  int64_t tokens, k, cores, d_v, num_blocks;
  int64_t width() const { return d_v / cores; }
};

// pooled[t, p, slice_i] = sum_{k: blocks[t,k]=p} scores[i,t,k] * table[rows[t,k], slice_i]  (eqs. 15, 17)
template <typename scalar_t>
void pool_tokens(const int64_t* rows, const int64_t* blocks, const scalar_t* scores, const scalar_t* table,
                 scalar_t* pooled, const Shape& s, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> acc(s.num_blocks * s.d_v);
  const int64_t last_entry = end * s.k;
  for (int64_t t = begin; t < end; ++t) {
    std::fill(acc.begin(), acc.end(), acc_t(0));
    for (int64_t entry = t * s.k; entry < (t + 1) * s.k; ++entry) {
      if (entry + kPrefetchEntries < last_entry) {
        prefetch_row(table + rows[entry + kPrefetchEntries] * s.d_v, s.d_v);
      }
      const scalar_t* row = table + rows[entry] * s.d_v;
      acc_t* out = acc.data() + blocks[entry] * s.d_v;
      for (int64_t core = 0; core < s.cores; ++core) {
        const acc_t score = static_cast<acc_t>(scores[core * s.tokens * s.k + entry]);
        const scalar_t* src = row + core * s.width();
        acc_t* dst = out + core * s.width();
#pragma omp simd
        for (int64_t c = 0; c < s.width(); ++c) dst[c] += score * static_cast<acc_t>(src[c]);
      }
    }
    std::copy(acc.begin(), acc.end(), pooled + t * s.num_blocks * s.d_v);
  }
}

// grad_scores[i, t, k] = <grad_pooled[t, blocks[t,k], slice_i], table[rows[t,k], slice_i]>
template <typename scalar_t>
void score_grad_entries(const int64_t* rows, const int64_t* blocks, const scalar_t* table,
                        const scalar_t* grad_pooled, scalar_t* grad_scores, const Shape& s, int64_t begin,
                        int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t entry = begin; entry < end; ++entry) {
    if (entry + kPrefetchEntries < end) prefetch_row(table + rows[entry + kPrefetchEntries] * s.d_v, s.d_v);
    const scalar_t* row = table + rows[entry] * s.d_v;
    const scalar_t* grad = grad_pooled + ((entry / s.k) * s.num_blocks + blocks[entry]) * s.d_v;
    for (int64_t core = 0; core < s.cores; ++core) {
      const scalar_t* a = row + core * s.width();
      const scalar_t* b = grad + core * s.width();
      acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t c = 0; c < s.width(); ++c) sum += static_cast<acc_t>(a[c]) * static_cast<acc_t>(b[c]);
      grad_scores[core * s.tokens * s.k + entry] = static_cast<scalar_t>(sum);
    }
  }
}

// out[r, slice_i] = sum_{j in [ends[r-1], ends[r])} weights[i, j] * source[source_rows[j], slice_i]: the table's
// gradient with the entries sorted by row (source = grad_pooled viewed [T*E, d_v]). Each output row is written
// once, in order; the random source rows are prefetched.
template <typename scalar_t>
void segment_sum_rows(const int64_t* ends, const int64_t* source_rows, const scalar_t* weights,
                      const scalar_t* source, scalar_t* out, int64_t entries, int64_t cores, int64_t d,
                      int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t width = d / cores;
  std::vector<acc_t> acc(d);
  const int64_t last_entry = ends[end - 1];
  for (int64_t row = begin; row < end; ++row) {
    std::fill(acc.begin(), acc.end(), acc_t(0));
    for (int64_t j = row == 0 ? 0 : ends[row - 1]; j < ends[row]; ++j) {
      if (j + kPrefetchEntries < last_entry) prefetch_row(source + source_rows[j + kPrefetchEntries] * d, d);
      const scalar_t* src_row = source + source_rows[j] * d;
      for (int64_t core = 0; core < cores; ++core) {
        const acc_t weight = static_cast<acc_t>(weights[core * entries + j]);
        const scalar_t* src = src_row + core * width;
        acc_t* dst = acc.data() + core * width;
#pragma omp simd
        for (int64_t c = 0; c < width; ++c) dst[c] += weight * static_cast<acc_t>(src[c]);
      }
    }
    std::copy(acc.begin(), acc.end(), out + row * d);
  }
}

Shape check_and_shape(const torch::Tensor& rows, const torch::Tensor& blocks, const torch::Tensor& table,
                      int64_t cores, int64_t num_blocks) {
  TORCH_CHECK(rows.device().is_cpu() && table.device().is_cpu(), "fused lookup-reduce runs on CPU tensors");
  TORCH_CHECK(rows.is_contiguous() && blocks.is_contiguous() && table.is_contiguous(), "inputs must be contiguous");
  TORCH_CHECK(rows.scalar_type() == at::kLong && blocks.scalar_type() == at::kLong, "rows, blocks must be int64");
  return Shape{rows.size(0), rows.size(1), cores, table.size(1), num_blocks};
}

torch::Tensor forward(const torch::Tensor& rows, const torch::Tensor& blocks, const torch::Tensor& scores,
                      const torch::Tensor& table, int64_t num_blocks) {
  const Shape s = check_and_shape(rows, blocks, table, scores.size(0), num_blocks);
  TORCH_CHECK(scores.is_contiguous() && scores.scalar_type() == table.scalar_type(),
              "scores must be contiguous and in the table's dtype");
  torch::Tensor pooled = torch::empty({s.tokens, s.num_blocks, s.d_v}, table.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, table.scalar_type(), "lookup_reduce_forward", [&] {
    at::parallel_for(0, s.tokens, 16, [&](int64_t begin, int64_t end) {
      pool_tokens<scalar_t>(rows.data_ptr<int64_t>(), blocks.data_ptr<int64_t>(), scores.data_ptr<scalar_t>(),
                            table.data_ptr<scalar_t>(), pooled.data_ptr<scalar_t>(), s, begin, end);
    });
  });
  return pooled;
}

torch::Tensor score_grad(const torch::Tensor& rows, const torch::Tensor& blocks, const torch::Tensor& table,
                         const torch::Tensor& grad_pooled, int64_t cores) {
  const Shape s = check_and_shape(rows, blocks, table, cores, grad_pooled.size(1));
  TORCH_CHECK(grad_pooled.is_contiguous() && grad_pooled.scalar_type() == table.scalar_type(),
              "grad_pooled must be contiguous and in the table's dtype");
  torch::Tensor grad_scores = torch::empty({s.cores, s.tokens, s.k}, table.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, table.scalar_type(), "lookup_reduce_score_grad", [&] {
    at::parallel_for(0, s.tokens * s.k, 1024, [&](int64_t begin, int64_t end) {
      score_grad_entries<scalar_t>(rows.data_ptr<int64_t>(), blocks.data_ptr<int64_t>(), table.data_ptr<scalar_t>(),
                                   grad_pooled.data_ptr<scalar_t>(), grad_scores.data_ptr<scalar_t>(), s, begin,
                                   end);
    });
  });
  return grad_scores;
}

torch::Tensor segment_sum(const torch::Tensor& ends, const torch::Tensor& source_rows, const torch::Tensor& weights,
                          const torch::Tensor& source) {
  TORCH_CHECK(ends.is_contiguous() && source_rows.is_contiguous() && weights.is_contiguous() &&
                  source.is_contiguous(), "inputs must be contiguous");
  TORCH_CHECK(ends.scalar_type() == at::kLong && source_rows.scalar_type() == at::kLong, "ends, source_rows: int64");
  TORCH_CHECK(weights.scalar_type() == source.scalar_type(), "weights must be in the source's dtype");
  const int64_t num_rows = ends.size(0), entries = source_rows.size(0), cores = weights.size(0), d = source.size(1);
  torch::Tensor out = torch::empty({num_rows, d}, source.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, source.scalar_type(), "lookup_reduce_segment_sum", [&] {
    at::parallel_for(0, num_rows, 256, [&](int64_t begin, int64_t end) {
      segment_sum_rows<scalar_t>(ends.data_ptr<int64_t>(), source_rows.data_ptr<int64_t>(),
                                 weights.data_ptr<scalar_t>(), source.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                 entries, cores, d, begin, end);
    });
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "pooled [T, E, d_v] from rows, blocks [T, K], scores [h, T, K], table [N, d_v]");
  m.def("score_grad", &score_grad, "grad_scores [h, T, K] from rows, blocks, table, grad_pooled [T, E, d_v]");
  m.def("segment_sum", &segment_sum, "out [R, d] from ends [R], source_rows [M], weights [h, M], source [S, d]");
}
