// Shared by kvblend's CPU kernels (cpu_attention.cpp, cpu_norm_act.cpp).
#pragma once
#include <algorithm>
#include <cstdint>

// e^x for x <= 0 (softmax arguments after the max is taken out; SiLU's e^-|x|), within ~2 ulp of expf; plain
// arithmetic so the compiler vectorizes the loop that calls it (expf from libm would not be).
static inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln 2)
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;              // x - n ln 2, in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n
  float two_n;
  __builtin_memcpy(&two_n, &bits, sizeof two_n);
  return p * two_n;
}
