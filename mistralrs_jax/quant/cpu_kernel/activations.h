// Activations of the CPU quantized matmul (qmatmul.cc), quantized as llama.cpp's CPU backend
// quantizes them for each weight type (its vec_dot_type), so that the products are its products:
//   Q8_0 (for Q4_0, Q5_0, Q8_0, IQ4_NL; and Q8_1, Q8_K, HQQ4, HQQ8, see act_kind): per 32 elements,
//        codes rint(x * 127 / amax) and the scale d = amax / 127 stored as f16, so the dot uses
//        the f16-rounded d;
//   Q8_1 (for Q4_1, Q5_1): Q8_0 plus s = f16(d * sum of the codes), d unrounded there, which the
//        weights' offsets m multiply;
//   Q8_K (for the K-quants Q2_K..Q6_K and IQ4_XS): per 256 elements, the element of largest
//        magnitude `max` (the first one, with its sign), codes rint(x * (-127 / max)) (at most 127),
//        d = 1 / (-127 / max) in f32, and the code sums of each 16 elements.
// rint rounds half to even, as ggml's AVX2 quantizer (_mm256_round_ps) and nearest_int do.
// Per weight group g (G = 16 or 32 elements) the kernel keeps da[g], the scale of the block the
// group lies in, and qa[g], the activation term the group's offset multiplies: d16 * (code sum)
// for Q8_0, s for Q8_1, d * (code sum) for Q8_K.
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <vector>

enum MjActKind : int { kActQ8_0 = 0, kActQ8_1 = 1, kActQ8_K = 2 };

struct Activations {
  int64_t T = 0, K = 0, G = 32;
  std::vector<int8_t> a;   // T * K
  std::vector<float> da;   // T * K / G: the scale of the block each group lies in
  std::vector<float> qa;   // T * K / G: the term each group's offset multiplies
};

static inline float mj_round_f16(float v) {
  return _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtps_ph(_mm_set_ss(v), _MM_FROUND_TO_NEAREST_INT)));
}

static inline float mj_hmax8(__m256 m) {
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
  return _mm_cvtss_f32(m4);
}

static inline int mj_hsum8_epi32(__m256i s8) {
  __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s8), _mm256_extracti128_si256(s8, 1));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(1, 0, 3, 2)));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s4);
}

// |x| of n elements (a multiple of 8): the maximum, and whether any is NaN or infinite.
static inline float mj_amax(const float* x, int n, bool* bad) {
  __m256 m = _mm256_setzero_ps(), b = _mm256_setzero_ps();
  const __m256 sign = _mm256_set1_ps(-0.0f), inf = _mm256_set1_ps(INFINITY);
  for (int j = 0; j < n; j += 8) {
    const __m256 v = _mm256_andnot_ps(sign, _mm256_loadu_ps(x + j));
    m = _mm256_max_ps(m, v);
    b = _mm256_or_ps(b, _mm256_cmp_ps(v, inf, _CMP_NLT_UQ));
  }
  *bad = _mm256_movemask_ps(b) != 0;
  return mj_hmax8(m);
}

// 32 codes rint(x * scale) (within +-127) into a; the sums of codes 0-15 and 16-31 into sums.
static inline void mj_codes32(const float* x, float scale, int8_t* a, int* sums) {
  const __m256 sv = _mm256_set1_ps(scale);
  __m256i q[4];
  for (int j = 0; j < 4; ++j)
    q[j] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + 8 * j), sv),
                                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  // int32 -> int8: two packs interleave 128-bit lanes, a permute restores the order
  const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
  _mm256_storeu_si256((__m256i*)a, _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  for (int h = 0; h < 2; ++h) sums[h] = mj_hsum8_epi32(_mm256_add_epi32(q[2 * h], q[2 * h + 1]));
}

// One 32-element block as Q8_0 or Q8_1; writes the 32 / G groups' da and qa.
static inline void mj_quantize_q8_32(const float* x, int kind, int G, int8_t* a, float* da, float* qa) {
  bool bad;
  const float amax = mj_amax(x, 32, &bad);
  const float d = amax / 127.0f;
  int sums[2];
  mj_codes32(x, amax > 0.0f ? 127.0f / amax : 0.0f, a, sums);
  // A NaN or infinite input makes the block's scale NaN, so it reaches the output as in f32.
  const float d16 = bad ? NAN : mj_round_f16(d);
  if (G == 32) {
    da[0] = d16;
    qa[0] = bad ? NAN : kind == kActQ8_1 ? mj_round_f16(d * (float)(sums[0] + sums[1])) : d16 * (float)(sums[0] + sums[1]);
  } else {  // only Q8_0 meets 16-element groups in principle; Q8_1's s has no halves
    da[0] = da[1] = d16;
    qa[0] = d16 * (float)sums[0];
    qa[1] = d16 * (float)sums[1];
  }
}

// One 256-element block as Q8_K; writes the 256 / G groups' da and qa.
static inline void mj_quantize_q8_k(const float* x, int G, int8_t* a, float* da, float* qa) {
  bool bad;
  const float amax = mj_amax(x, 256, &bad);
  float d = 0.0f, iscale = 0.0f;
  if (amax > 0.0f && !bad) {
    int j = 0;
    while (std::fabs(x[j]) != amax) ++j;  // the first element of largest magnitude
    iscale = -127.0f / x[j];
    d = 1.0f / iscale;
  }
  int sums[16];
  for (int b = 0; b < 8; ++b) mj_codes32(x + 32 * b, iscale, a + 32 * b, sums + 2 * b);
  if (bad) d = NAN;
  for (int g = 0; g < 256 / G; ++g) {
    da[g] = d;
    qa[g] = d * (float)(G == 16 ? sums[g] : sums[2 * g] + sums[2 * g + 1]);
  }
}

// One row of K floats (K a multiple of the kind's block: 32, or 256 for Q8_K).
// Exposed for tests (C ABI, see mj_quantize_rows).
static void quantize_row(const float* x, int64_t K, int kind, int G, int8_t* a, float* da, float* qa) {
  if (kind == kActQ8_K) {
    for (int64_t b = 0; b < K; b += 256) mj_quantize_q8_k(x + b, G, a + b, da + b / G, qa + b / G);
  } else {
    for (int64_t b = 0; b < K; b += 32) mj_quantize_q8_32(x + b, kind, G, a + b, da + b / G, qa + b / G);
  }
}
