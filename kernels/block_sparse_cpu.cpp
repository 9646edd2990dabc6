// Block-sparse causal attention on the CPU, float32 or bfloat16 in; built once per machine by
// block_sparse_cpu.py.
//
// Each 64-row query block walks its kept key blocks, then its diagonal block, with the online
// softmax of FlashAttention-2 (Dao, 2023): up to CHUNK_KEYS keys at a time are copied next to
// each other, so one matrix product scores them and one more adds them to the output, and the
// scores stay in the L2 cache. Query blocks are handed out heaviest first from a shared counter:
// a thread that the OS preempts takes fewer, and the last ones handed out are short.
//
// float32 runs the products through the BLAS inside libtorch (sgemm). bfloat16, on a CPU whose
// bfloat16 products PyTorch packs for (AMX, AVX512-BF16), runs them through ATen's brgemm on
// bfloat16 operands with float32 sums, as PyTorch's own CPU flash attention does: every key and
// value block is packed once per call in the layout the instructions read (VNNI), and each query
// block multiplies the packed blocks it keeps in place, one 64-key block per product; the
// probabilities are rounded to bfloat16 for the second product, the softmax stays float32.
// Elsewhere bfloat16 is computed in float32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

// The BLAS inside libtorch_cpu (MKL in the x86 wheels), Fortran interface.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
                       const int* k, const float* alpha, const float* a, const int* lda,
                       const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc);

namespace {

constexpr int64_t BLOCK = 64;
constexpr int64_t CHUNK_KEYS = 1024;  // scores of one step: 64 × 1024 floats, 256 KiB
using Vec = at::vec::Vectorized<float>;

// Row-major c[m × n] = alpha · a[m × k] · op(b) + beta · c with op(b) = b[k × n], or b[n × k]ᵀ
// when b_transposed. BLAS is column-major, so it computes cᵀ = op(b)ᵀ · aᵀ.
void matmul(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
            const float* b, int64_t ldb, bool b_transposed, float beta, float* c, int64_t ldc) {
  const char op_b = b_transposed ? 'T' : 'N', op_a = 'N';
  const int cm = n, cn = m, ck = k, ld_b = ldb, ld_a = lda, ld_c = ldc;
  sgemm_(&op_b, &op_a, &cm, &cn, &ck, &alpha, b, &ld_b, a, &ld_a, &beta, c, &ld_c);
}

float max_of(const float* x, int64_t n, float init) {
  Vec best(init);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) best = at::vec::maximum(best, Vec::loadu(x + i));
  float result = at::vec::vec_reduce_all<float>(
      [](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, best);
  for (; i < n; ++i) result = std::max(result, x[i]);
  return result;
}

// x ← exp(x − shift) in place; returns the sum.
float exp_and_sum(float* x, int64_t n, float shift) {
  Vec total(0.f);
  const Vec vshift(shift);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec e = (Vec::loadu(x + i) - vshift).exp_u20();
    e.store(x + i);
    total += e;
  }
  float result = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, total);
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] - shift);
    result += x[i];
  }
  return result;
}

void scale(float* out, const float* x, int64_t n, float factor) {
  at::vec::map([factor](Vec v) { return v * Vec(factor); }, out, x, n);
}

template <typename T>
struct Problem {
  const T *q, *k, *v;
  float* out;
  const int32_t *indices, *counts;
  int64_t q_heads, kv_group, q_start, kv_len, head_dim, first_row, rows, width;
  int64_t q_strides[3], k_strides[3], v_strides[3], out_strides[3];
  float sm_scale;
  // bfloat16: the packed key and value blocks, [b, Hkv, key blocks, head_dim · BLOCK] each.
  const at::BFloat16 *keys_packed = nullptr, *values_packed = nullptr;
};

// One thread's buffers: the gathered keys and values of a step (float32; bfloat16 points at the
// packed blocks instead), their scores, the output rows and the running row max and sum.
template <typename T>
struct Workspace {
  std::vector<float> keys, values, scores, acc, row_max, row_sum;
  std::vector<const at::BFloat16*> key_blocks, value_blocks;
  std::vector<at::BFloat16> probs;
  explicit Workspace(int64_t head_dim)
      : scores(BLOCK * CHUNK_KEYS), acc(BLOCK * head_dim), row_max(BLOCK), row_sum(BLOCK) {
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      probs.resize(BLOCK * CHUNK_KEYS);
    } else {
      keys.resize(CHUNK_KEYS * head_dim);
      values.resize(CHUNK_KEYS * head_dim);
    }
  }
};

// Adds key block `first_key / BLOCK` (its first `keys` keys) to the step at column `column`.
void take(const Problem<float>& p, Workspace<float>& ws, const float* k, const float* v,
          int64_t first_key, int64_t keys, int64_t column) {
  const int64_t d = p.head_dim;
  for (int64_t j = 0; j < keys; ++j) {
    std::copy_n(k + (first_key + j) * p.k_strides[2], d, ws.keys.data() + (column + j) * d);
    std::copy_n(v + (first_key + j) * p.v_strides[2], d, ws.values.data() + (column + j) * d);
  }
}

void take(const Problem<at::BFloat16>& p, Workspace<at::BFloat16>& ws, int64_t batch,
          int64_t kv_head, int64_t first_key) {
  const int64_t blocks = (p.kv_len + BLOCK - 1) / BLOCK, tile = p.head_dim * BLOCK;
  const int64_t at = ((batch * (p.q_heads / p.kv_group) + kv_head) * blocks + first_key / BLOCK);
  ws.key_blocks.push_back(p.keys_packed + at * tile);
  ws.value_blocks.push_back(p.values_packed + at * tile);
}

// ws.scores = scale · q · keysᵀ for the step's `columns` keys, float32 sums; returns the scores'
// row stride.
int64_t score(const Problem<float>& p, Workspace<float>& ws, const float* q, int64_t queries,
              int64_t columns) {
  matmul(queries, columns, p.head_dim, p.sm_scale, q, p.q_strides[2], ws.keys.data(), p.head_dim,
         true, 0.f, ws.scores.data(), columns);
  return columns;
}

// bfloat16: one product per packed key block (a partial last block is padded with zero keys).
int64_t score(const Problem<at::BFloat16>& p, Workspace<at::BFloat16>& ws,
              const at::BFloat16* q, int64_t queries, int64_t columns) {
  const int64_t stride = static_cast<int64_t>(ws.key_blocks.size()) * BLOCK;
  float* scores = ws.scores.data();
  for (size_t i = 0; i < ws.key_blocks.size(); ++i) {
    at::native::cpublas::brgemm(queries, BLOCK, p.head_dim, p.q_strides[2], BLOCK, stride, false,
                                q, ws.key_blocks[i], scores + i * BLOCK);
  }
  for (int64_t r = 0; r < queries; ++r) {
    scale(scores + r * stride, scores + r * stride, columns, p.sm_scale);
  }
  return stride;
}

// ws.acc += probabilities · values: the probabilities in ws.scores (row stride `stride`, zero
// past each row's visible keys).
void accumulate(const Problem<float>& p, Workspace<float>& ws, int64_t queries, int64_t columns,
                int64_t stride) {
  matmul(queries, p.head_dim, columns, 1.f, ws.scores.data(), stride, ws.values.data(),
         p.head_dim, false, 1.f, ws.acc.data(), p.head_dim);
}

void accumulate(const Problem<at::BFloat16>& p, Workspace<at::BFloat16>& ws, int64_t queries,
                int64_t columns, int64_t stride) {
  const int64_t d = p.head_dim;
  at::vec::convert(ws.scores.data(), ws.probs.data(), queries * stride);
  for (size_t i = 0; i < ws.value_blocks.size(); ++i) {
    // Packed 64 output channels at a time (see pack_blocks).
    for (int64_t first = 0; first < d; first += BLOCK) {
      const int64_t width = std::min(BLOCK, d - first);
      at::native::cpublas::brgemm(queries, width, BLOCK, stride, width, d, true,
                                  ws.probs.data() + i * BLOCK,
                                  ws.value_blocks[i] + first * BLOCK, ws.acc.data() + first);
    }
  }
  // The step is done: the next one takes its blocks afresh.
  ws.key_blocks.clear();
  ws.value_blocks.clear();
}

// Packs every key block transposed ([head_dim × BLOCK]) and every value block ([BLOCK ×
// head_dim], 64 channels at a time) of k and v for the bfloat16 products, zero past the last key.
void pack_blocks(Problem<at::BFloat16>& p, int64_t batches, int64_t kv_heads,
                 std::vector<at::BFloat16>& keys, std::vector<at::BFloat16>& values) {
  const int64_t d = p.head_dim, blocks = (p.kv_len + BLOCK - 1) / BLOCK, tile = d * BLOCK;
  keys.resize(batches * kv_heads * blocks * tile);
  values.resize(keys.size());
  at::parallel_for(0, batches * kv_heads * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<at::BFloat16> plain(tile);
    const at::BFloat16 zero(0.f);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t block = i % blocks, kv_head = i / blocks % kv_heads, batch = i / blocks / kv_heads;
      const int64_t first = block * BLOCK, keys_here = std::min(BLOCK, p.kv_len - first);
      const at::BFloat16* k = p.k + batch * p.k_strides[0] + kv_head * p.k_strides[1];
      const at::BFloat16* v = p.v + batch * p.v_strides[0] + kv_head * p.v_strides[1];
      for (int64_t j = 0; j < BLOCK; ++j) {
        for (int64_t c = 0; c < d; ++c) {
          plain[c * BLOCK + j] = j < keys_here ? k[(first + j) * p.k_strides[2] + c] : zero;
        }
      }
      at::native::cpublas::pack(d, BLOCK, BLOCK, BLOCK, at::kBFloat16, at::kBFloat16,
                                plain.data(), keys.data() + i * tile);
      for (int64_t j = 0; j < BLOCK; ++j) {
        for (int64_t c = 0; c < d; ++c) {
          plain[j * d + c] = j < keys_here ? v[(first + j) * p.v_strides[2] + c] : zero;
        }
      }
      for (int64_t c = 0; c < d; c += BLOCK) {
        const int64_t width = std::min(BLOCK, d - c);
        at::native::cpublas::pack(BLOCK, width, d, width, at::kBFloat16, at::kBFloat16,
                                  plain.data() + c, values.data() + i * tile + c * BLOCK);
      }
    }
  });
  p.keys_packed = keys.data();
  p.values_packed = values.data();
}

// Query block row `item` = (batch, head, row): its kept key blocks, then its diagonal block.
template <typename T>
void attend_query_block(const Problem<T>& p, int64_t item, Workspace<T>& ws) {
  const int64_t row = item % p.rows, head = item / p.rows % p.q_heads;
  const int64_t batch = item / p.rows / p.q_heads, kv_head = head / p.kv_group;
  const int64_t d = p.head_dim, block = p.first_row + row, block_start = block * BLOCK;
  // The queries of this block; the first row of a chunk may start inside it.
  const int64_t first_query = std::max(block_start, p.q_start);
  const int64_t queries = std::min(block_start + BLOCK, p.kv_len) - first_query;
  const int64_t diagonal_keys = std::min(BLOCK, p.kv_len - block_start);
  const T* q = p.q + batch * p.q_strides[0] + head * p.q_strides[1] +
               (first_query - p.q_start) * p.q_strides[2];
  const T* k = p.k + batch * p.k_strides[0] + kv_head * p.k_strides[1];
  const T* v = p.v + batch * p.v_strides[0] + kv_head * p.v_strides[1];
  const int32_t* kept = p.indices + item * p.width;
  const int64_t count = p.counts[item];

  std::fill(ws.row_max.begin(), ws.row_max.end(), -std::numeric_limits<float>::infinity());
  std::fill(ws.row_sum.begin(), ws.row_sum.end(), 0.f);
  std::fill(ws.acc.begin(), ws.acc.end(), 0.f);

  for (int64_t next = 0; next <= count;) {  // next == count: the diagonal block
    int64_t columns = 0;
    bool with_diagonal = false;
    while (next <= count && columns + BLOCK <= CHUNK_KEYS) {
      with_diagonal = next == count;
      const int64_t first_key = with_diagonal ? block_start : kept[next] * int64_t{BLOCK};
      const int64_t keys = with_diagonal ? diagonal_keys : BLOCK;
      if constexpr (std::is_same_v<T, at::BFloat16>) {
        take(p, ws, batch, kv_head, first_key);
      } else {
        take(p, ws, k, v, first_key, keys, columns);
      }
      columns += keys;
      ++next;
    }
    const int64_t stride = score(p, ws, q, queries, columns);
    float* scores = ws.scores.data();
    for (int64_t r = 0; r < queries; ++r) {
      float* s = scores + r * stride;
      // The diagonal block closes the step; its keys after this query are in the future.
      const int64_t visible =
          with_diagonal ? columns - diagonal_keys + (first_query + r - block_start) + 1 : columns;
      const float new_max = max_of(s, visible, ws.row_max[r]);
      const float sum = exp_and_sum(s, visible, new_max);
      std::fill(s + visible, s + stride, 0.f);
      const float correction = std::exp(ws.row_max[r] - new_max);
      ws.row_sum[r] = ws.row_sum[r] * correction + sum;
      ws.row_max[r] = new_max;
      if (correction != 1.f) scale(ws.acc.data() + r * d, ws.acc.data() + r * d, d, correction);
    }
    accumulate(p, ws, queries, columns, stride);
  }
  float* out = p.out + batch * p.out_strides[0] + head * p.out_strides[1] +
               (first_query - p.q_start) * p.out_strides[2];
  for (int64_t r = 0; r < queries; ++r) {
    scale(out + r * p.out_strides[2], ws.acc.data() + r * d, d, 1.f / ws.row_sum[r]);
  }
}

template <typename T>
void run(const Problem<T>& p, int64_t items) {
  std::vector<int64_t> order(items);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return p.counts[a] > p.counts[b]; });
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t begin, int64_t end) {
    Workspace<T> ws(p.head_dim);
    for (int64_t thread = begin; thread < end; ++thread) {
      for (int64_t i = next++; i < items; i = next++) attend_query_block(p, order[i], ws);
    }
    if constexpr (std::is_same_v<T, at::BFloat16>) at::native::cpublas::brgemm_release();
  });
}

// q [b, Hq, sq, d]: the last sq positions of k/v [b, Hkv, s, d]; indices [b, Hq, nq, w] and
// counts [b, Hq, nq] (contiguous int32) list each query block row's kept off-diagonal blocks.
// Returns float32 [b, Hq, sq, d], laid out token-major.
at::Tensor block_sparse_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& indices, const at::Tensor& counts,
                                  double sm_scale) {
  const auto dtype = q.scalar_type();
  TORCH_CHECK((dtype == at::kFloat || dtype == at::kBFloat16) && k.scalar_type() == dtype &&
                  v.scalar_type() == dtype,
              "q, k and v must be all float32 or all bfloat16");
  if (dtype == at::kBFloat16 && !at::native::cpublas::could_pack(at::kBFloat16)) {
    return block_sparse_attention(q.to(at::kFloat), k.to(at::kFloat), v.to(at::kFloat), indices,
                                  counts, sm_scale);
  }
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "q, k and v need unit stride along head_dim");
  TORCH_CHECK(indices.scalar_type() == at::kInt && counts.scalar_type() == at::kInt &&
                  indices.is_contiguous() && counts.is_contiguous(),
              "indices and counts must be contiguous int32 tensors");
  // Token-major, as the model takes the output next ([b, sq, Hq, d]): no copy to get there.
  auto out = at::empty({q.size(0), q.size(2), q.size(1), q.size(3)}, q.options().dtype(at::kFloat))
                 .transpose(1, 2);
  const int64_t q_start = k.size(2) - q.size(2), rows = indices.size(2);
  auto problem = [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    return Problem<T>{q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), out.data_ptr<float>(),
                      indices.data_ptr<int32_t>(), counts.data_ptr<int32_t>(),
                      q.size(1), q.size(1) / k.size(1), q_start, k.size(2), q.size(3),
                      q_start / BLOCK, rows, indices.size(3),
                      {q.stride(0), q.stride(1), q.stride(2)},
                      {k.stride(0), k.stride(1), k.stride(2)},
                      {v.stride(0), v.stride(1), v.stride(2)},
                      {out.stride(0), out.stride(1), out.stride(2)},
                      static_cast<float>(sm_scale)};
  };
  if (dtype == at::kBFloat16) {
    auto p = problem(static_cast<at::BFloat16*>(nullptr));
    std::vector<at::BFloat16> keys, values;
    pack_blocks(p, k.size(0), k.size(1), keys, values);
    run(p, counts.numel());
  } else {
    run(problem(static_cast<float*>(nullptr)), counts.numel());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(seer_cpu, m) { m.def("block_sparse_attention", &block_sparse_attention); }
