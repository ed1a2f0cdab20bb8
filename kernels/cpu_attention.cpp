// Selected-query causal attention on CPU, fp32: query row i (absolute position q_pos[i]) sees the
// keys at positions 0..q_pos[i]. Flash-style: per (KV head, tile of queries with every query head
// of its group) the keys stream through in tiles with an online softmax, so no score matrix and no
// mask tensor exist; key tiles past a tile's last query are never touched, and only tiles that
// straddle a query's position are cut per row. The two products per key tile go to the BLAS
// sgemm that torch links (MKL). Built and loaded by cpu_library.py; reference: the torch path
// in selected_attention.py.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu_math.h"

extern "C" void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                       const int*, const float*, const int*, const float*, float*, const int*);

// Column-major BLAS call; row-major callers swap operands (C^T = B^T A^T).
static void gemm(char ta, char tb, int m, int n, int k, float alpha, const float* a, int lda, const float* b, int ldb,
                 float beta, float* c, int ldc) {
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

// q [heads, S, D], k and v [kv_heads, N, D], out [heads, S, D], all contiguous; q_pos [S] strictly
// increasing, < N. heads is a multiple of kv_heads (GQA: query head h reads KV head h / group).
extern "C" void kvblend_selected_attention_f32(const float* q, const float* k, const float* v, float* out,
                                               const int64_t* q_pos, int64_t heads, int64_t kv_heads, int64_t S,
                                               int64_t N, int64_t D, float scale, int64_t q_tile, int64_t k_tile,
                                               int threads) {
  const int64_t group = heads / kv_heads;
  const int64_t tiles_per_head = (S + q_tile - 1) / q_tile;
  const int64_t rows_max = group * q_tile;
  const float neg_inf = -std::numeric_limits<float>::infinity();
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> qp(rows_max * D), acc(rows_max * D), p(rows_max * k_tile), m(rows_max), l(rows_max);
    std::vector<int64_t> seen(rows_max);
    // last tiles first: they see the most keys, so dynamic scheduling ends balanced
#pragma omp for schedule(dynamic, 1)
    for (int64_t w = kv_heads * tiles_per_head - 1; w >= 0; --w) {
      const int64_t h = w / tiles_per_head, q0 = (w % tiles_per_head) * q_tile;
      const int64_t nq = std::min(S, q0 + q_tile) - q0, rows = group * nq;
      for (int64_t g = 0; g < group; ++g)
        for (int64_t i = 0; i < nq; ++i) {
          const float* src = q + ((h * group + g) * S + q0 + i) * D;
          std::copy(src, src + D, qp.data() + (g * nq + i) * D);
          seen[g * nq + i] = q_pos[q0 + i] + 1;
        }
      std::fill(acc.begin(), acc.begin() + rows * D, 0.f);
      std::fill(m.begin(), m.begin() + rows, neg_inf);
      std::fill(l.begin(), l.begin() + rows, 0.f);
      const int64_t all_see = q_pos[q0] + 1, any_sees = q_pos[q0 + nq - 1] + 1;
      const float* kh = k + h * N * D;
      const float* vh = v + h * N * D;
      for (int64_t k0 = 0; k0 < any_sees; k0 += k_tile) {
        const int64_t width = std::min(k_tile, any_sees - k0);
        gemm('T', 'N', width, rows, D, scale, kh + k0 * D, D, qp.data(), D, 0.f, p.data(), width);  // scores
        const bool cut = k0 + width > all_see;
        for (int64_t r = 0; r < rows; ++r) {
          float* row = p.data() + r * width;
          const int64_t valid = cut ? std::clamp<int64_t>(seen[r] - k0, 0, width) : width;
          float mx = m[r];
#pragma omp simd reduction(max : mx)
          for (int64_t c = 0; c < valid; ++c) mx = row[c] > mx ? row[c] : mx;
          float sum = 0.f;
#pragma omp simd reduction(+ : sum)
          for (int64_t c = 0; c < valid; ++c) {
            row[c] = exp_nonpositive(row[c] - mx);
            sum += row[c];
          }
          std::fill(row + valid, row + width, 0.f);
          const float rescale = exp_nonpositive(m[r] - mx);  // acc and l are still 0 on the first tile
          if (rescale != 1.f)
            for (float *a = acc.data() + r * D, *end = a + D; a < end; ++a) *a *= rescale;
          l[r] = l[r] * rescale + sum;
          m[r] = mx;
        }
        gemm('N', 'N', D, rows, width, 1.f, vh + k0 * D, D, p.data(), width, 1.f, acc.data(), D);  // acc += p v
      }
      for (int64_t g = 0; g < group; ++g)
        for (int64_t i = 0; i < nq; ++i) {
          const int64_t r = g * nq + i;
          const float inv = 1.f / l[r];
          float* dst = out + ((h * group + g) * S + q0 + i) * D;
          for (int64_t d = 0; d < D; ++d) dst[d] = acc[r * D + d] * inv;
        }
    }
  }
}
