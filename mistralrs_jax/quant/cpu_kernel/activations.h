// Activations of the CPU quantized matmul (qmatmul.cc): 8-bit codes per 32 elements, as
// llama.cpp's Q8_0, with the f32 scale and the code sum of each weight group.
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <vector>

struct Activations {
  int64_t T = 0, K = 0, G = 32;
  std::vector<int8_t> a;   // T * K
  std::vector<float> da;   // T * K / G: the 32-block scale of each group
  std::vector<float> qa;   // T * K / G: da * (sum of the group's codes)
};

// One row of K floats (K a multiple of 32). Exposed for tests (C ABI, see mj_quantize_rows).
static void quantize_row(const float* x, int64_t K, int G, int8_t* a, float* da, float* qa) {
  for (int64_t b = 0; b < K; b += 32) {
    __m256 m = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
    const __m256 sign = _mm256_set1_ps(-0.0f), inf = _mm256_set1_ps(INFINITY);
    for (int j = 0; j < 32; j += 8) {
      const __m256 v = _mm256_andnot_ps(sign, _mm256_loadu_ps(x + b + j));
      m = _mm256_max_ps(m, v);
      bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, inf, _CMP_NLT_UQ));  // NaN or infinite
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
    const float amax = _mm_cvtss_f32(m4);
    // A NaN or infinite input makes the block's scale NaN, so it reaches the output as in f32.
    const float d = _mm256_movemask_ps(bad) ? NAN : amax / 127.0f;
    const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
    const __m256 idv = _mm256_set1_ps(id);
    __m256i q[4];
    for (int j = 0; j < 4; ++j)
      q[j] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + b + 8 * j), idv),
                                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    // int32 -> int8 (values within +-127): two packs interleave 128-bit lanes, a permute restores order
    const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    _mm256_storeu_si256((__m256i*)(a + b), _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    int sums[2];
    for (int h = 0; h < 2; ++h) {
      const __m256i s8 = _mm256_add_epi32(q[2 * h], q[2 * h + 1]);
      __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s8), _mm256_extracti128_si256(s8, 1));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(1, 0, 3, 2)));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(2, 3, 0, 1)));
      sums[h] = _mm_cvtsi128_si32(s4);
    }
    if (G == 32) {
      da[b / 32] = d;
      qa[b / 32] = d * (float)(sums[0] + sums[1]);
    } else {
      da[b / 16] = da[b / 16 + 1] = d;
      qa[b / 16] = d * (float)sums[0];
      qa[b / 16 + 1] = d * (float)sums[1];
    }
  }
}

