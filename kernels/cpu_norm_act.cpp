// The element-wise steps around a decoder layer's GEMMs on CPU, fp32, one pass each: RMSNorm and
// SiLU(gate)·up, where torch makes 6 and 3 passes with temporaries between them. Rows go to the
// threads in small dynamic batches. Built and loaded by cpu_library.py; references:
// kernels/norm_act.py.
#include <cmath>
#include <cstdint>

#include "cpu_math.h"

// out[r] = weight * x[r] / sqrt(mean(x[r]^2) + eps) for rows of `dim` contiguous floats.
extern "C" void kvblend_rms_norm_f32(const float* x, const float* weight, float* out, int64_t rows, int64_t dim,
                                     float eps, int threads) {
#pragma omp parallel for schedule(dynamic, 16) num_threads(threads)
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    float* o = out + r * dim;
    float squares = 0.f;
#pragma omp simd reduction(+ : squares)
    for (int64_t i = 0; i < dim; ++i) squares += xr[i] * xr[i];
    const float inv = 1.f / std::sqrt(squares / static_cast<float>(dim) + eps);
#pragma omp simd
    for (int64_t i = 0; i < dim; ++i) o[i] = weight[i] * (xr[i] * inv);
  }
}

// out[r, i] = silu(gate_up[r, i]) * gate_up[r, inter + i]: the gate and up halves of one fused
// projection row. The sigmoid takes e^-|g|, so it never overflows.
extern "C" void kvblend_silu_mul_f32(const float* gate_up, float* out, int64_t rows, int64_t inter, int threads) {
#pragma omp parallel for schedule(dynamic, 16) num_threads(threads)
  for (int64_t r = 0; r < rows; ++r) {
    const float* gate = gate_up + r * 2 * inter;
    const float* up = gate + inter;
    float* o = out + r * inter;
#pragma omp simd
    for (int64_t i = 0; i < inter; ++i) {
      const float e = exp_nonpositive(-std::fabs(gate[i]));
      const float sigmoid = gate[i] >= 0.f ? 1.f / (1.f + e) : e / (1.f + e);
      o[i] = gate[i] * sigmoid * up[i];
    }
  }
}
