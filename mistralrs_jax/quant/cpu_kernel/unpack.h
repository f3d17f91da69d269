// Unpacking GGML weight blocks into one common form the dot kernels read.
//
// Every format is rewritten, block by block, as
//     w[i] = s[g] * u[i] + c[g]          (g = i / G, G = 16 or 32 elements)
// with u[i] an unsigned byte code (0..255), s[g] the group's f32 scale and c[g] its f32
// offset: c = -s * zero_point for symmetric formats (Q4_0: -8 d, Q8_0: -128 d, ...) and the
// block minimum for the affine ones (Q4_1: m, Q4_K: -dmin * m, ...). Unsigned codes let one
// u8 x s8 instruction (VNNI vpdpbusd, or a widening multiply-add) serve every format; the
// offset is applied once per group with the activations' group sum.
//
// Block layouts follow ggml's ggml-common.h (block_q4_0 ... block_iq4_xs, and the activation
// types block_q8_1 / block_q8_K, which ISQ can write as weights), the bytes GGUF files store;
// HQQ4/HQQ8 are this project's layout (quant/hqq.py): per 64 weights an f16 scale, an f16 zero
// point and the codes, w = (q - zero) * scale = scale * q + (-scale * zero). That offset is exact
// in f32 (a product of two f16 values), so the kernel's weights are HQQ's to the last bit.
// The loops are written over fixed byte counts so that gcc vectorizes them.
#pragma once

#include <cstdint>
#include <cstring>

#include <immintrin.h>

#if defined(__F16C__)
static inline float mj_f16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}
#else
static inline float mj_f16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ffu, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    int e = -1;
    do { man <<= 1; ++e; } while (!(man & 0x400u));
    bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
#endif


// Low nibbles of 16 bytes then their high nibbles: 32 codes, ggml's order for 32-blocks.
static inline __m256i mj_nibbles32v(const uint8_t* qs) {
  const __m128i q = _mm_loadu_si128((const __m128i*)qs);
  const __m128i m = _mm_set1_epi8(0x0f);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), m), _mm_and_si128(q, m));
}

// 32 bits -> 32 bytes holding 0x10 where the bit is set (Q5's fifth bit).
static inline __m256i mj_bits32v(const uint8_t* qh4) {
  uint32_t qh;
  std::memcpy(&qh, qh4, 4);
  const __m256i spread = _mm256_shuffle_epi8(
      _mm256_set1_epi32((int)qh),
      _mm256_set_epi64x(0x0303030303030303LL, 0x0202020202020202LL, 0x0101010101010101LL, 0));
  const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
  return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit), _mm256_set1_epi8(0x10));
}

// 32 bytes, each shifted right by `k` bits (0..7) and masked: no bits cross between bytes.
static inline __m256i mj_srl8(__m256i v, int k, int mask) {
  return _mm256_and_si256(_mm256_srl_epi16(v, _mm_cvtsi32_si128(k)), _mm256_set1_epi8((char)mask));
}
static inline __m256i mj_load32(const uint8_t* p) { return _mm256_loadu_si256((const __m256i*)p); }
static inline void mj_store32(uint8_t* p, __m256i v) { _mm256_storeu_si256((__m256i*)p, v); }

// s[g] = scale * bytes[g] and, unless c is null, c[g] = offset_ratio * s[g] for 16 groups
// (bytes read as u8 or i8).
template <bool Signed>
static inline void mj_group_scales16(__m128i bytes, float scale, float offset_ratio, float* s, float* c) {
  for (int g = 0; g < 16; g += 8) {
    const __m128i b8 = g ? _mm_srli_si128(bytes, 8) : bytes;
    const __m256i i32 = Signed ? _mm256_cvtepi8_epi32(b8) : _mm256_cvtepu8_epi32(b8);
    const __m256 sv = _mm256_mul_ps(_mm256_set1_ps(scale), _mm256_cvtepi32_ps(i32));
    _mm256_storeu_ps(s + g, sv);
    if (c) _mm256_storeu_ps(c + g, _mm256_mul_ps(sv, _mm256_set1_ps(offset_ratio)));
  }
}

// ---- 32-element blocks: 32 codes in one register, and the block's scale and offset ----
// mj_codes_X(b) -> the 32 u8 codes; mj_sc_X(b, &s, &c). The fused GEMV (qmatmul.cc) reads
// blocks through these without a trip through memory; mj_unpack_X stores them.

static inline __m256i mj_codes_q4_0(const uint8_t* b) { return mj_nibbles32v(b + 2); }
static inline __m256i mj_codes_q4_1(const uint8_t* b) { return mj_nibbles32v(b + 4); }
static inline __m256i mj_codes_q5_0(const uint8_t* b) { return _mm256_or_si256(mj_nibbles32v(b + 6), mj_bits32v(b + 2)); }
static inline __m256i mj_codes_q5_1(const uint8_t* b) { return _mm256_or_si256(mj_nibbles32v(b + 8), mj_bits32v(b + 4)); }
static inline __m256i mj_codes_q8_0(const uint8_t* b) {  // int8 q -> q + 128
  return _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(b + 2)), _mm256_set1_epi8((char)0x80));
}
// Q8_1 as a weight: d, s = d * (sum of codes) (an aid for affine dots, unused here), 32 int8 codes.
static inline __m256i mj_codes_q8_1(const uint8_t* b) {
  return _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(b + 4)), _mm256_set1_epi8((char)0x80));
}
// IQ4 codebook (ggml's kvalues_iq4nl: -127 -104 -83 -65 -49 -35 -22 -10 1 13 25 38 53 69 89 113)
// + 128, looked up for the 32 nibbles of 16 bytes.
static inline __m256i mj_iq4_codes(const uint8_t* qs) {
  const __m128i tab = _mm_setr_epi8(1, 24, 45, 63, 79, 93, 106, 118, (char)129, (char)141, (char)153,
                                    (char)166, (char)181, (char)197, (char)217, (char)241);
  return _mm256_shuffle_epi8(_mm256_set_m128i(tab, tab), mj_nibbles32v(qs));
}
static inline __m256i mj_codes_iq4_nl(const uint8_t* b) { return mj_iq4_codes(b + 2); }

// Symmetric blocks: s = d, c = -zero_point * d. Affine ones: s = d, c = m.
#define MJ_SC_SYM(name, zero)                                              \
  static inline void mj_sc_##name(const uint8_t* b, float* s, float* c) { \
    const float d = mj_f16(b);                                             \
    *s = d;                                                                \
    *c = -(zero) * d;                                                      \
  }
#define MJ_SC_AFFINE(name)                                                 \
  static inline void mj_sc_##name(const uint8_t* b, float* s, float* c) { \
    *s = mj_f16(b);                                                        \
    *c = mj_f16(b + 2);                                                    \
  }
// Two consecutive blocks at once: s = [s0, s1, 0, 0], c = [c0, c1, 0, 0].
static inline __m128 mj_f16x2(const uint8_t* p0, const uint8_t* p1) {
  uint16_t h0, h1;
  std::memcpy(&h0, p0, 2);
  std::memcpy(&h1, p1, 2);
  return _mm_cvtph_ps(_mm_cvtsi32_si128((int)h0 | ((int)h1 << 16)));
}
#define MJ_SC2_SYM(name, zero)                                                                       \
  static inline void mj_sc2_##name(const uint8_t* b, int bytes, __m128* s, __m128* c) {             \
    *s = mj_f16x2(b, b + bytes);                                                                     \
    *c = _mm_mul_ps(*s, _mm_set1_ps(-(zero)));                                                       \
  }
#define MJ_SC2_AFFINE(name)                                                                          \
  static inline void mj_sc2_##name(const uint8_t* b, int bytes, __m128* s, __m128* c) {             \
    uint32_t p0, p1; /* (d, m) of each block */                                                      \
    std::memcpy(&p0, b, 4);                                                                          \
    std::memcpy(&p1, b + bytes, 4);                                                                  \
    const __m128 v = _mm_cvtph_ps(_mm_set_epi32(0, 0, (int)p1, (int)p0)); /* d0 m0 d1 m1 */          \
    *s = _mm_shuffle_ps(v, _mm_setzero_ps(), _MM_SHUFFLE(0, 0, 2, 0));                               \
    *c = _mm_shuffle_ps(v, _mm_setzero_ps(), _MM_SHUFFLE(0, 0, 3, 1));                               \
  }
MJ_SC2_SYM(q4_0, 8.0f)
MJ_SC2_AFFINE(q4_1)
MJ_SC2_SYM(q5_0, 16.0f)
MJ_SC2_AFFINE(q5_1)
MJ_SC2_SYM(q8_0, 128.0f)
MJ_SC2_SYM(q8_1, 128.0f)
MJ_SC2_SYM(iq4_nl, 128.0f)

MJ_SC_SYM(q4_0, 8.0f)
MJ_SC_AFFINE(q4_1)
MJ_SC_SYM(q5_0, 16.0f)
MJ_SC_AFFINE(q5_1)
MJ_SC_SYM(q8_0, 128.0f)
MJ_SC_SYM(q8_1, 128.0f)
MJ_SC_SYM(iq4_nl, 128.0f)

#define MJ_UNPACK32(name)                                                                         \
  static inline void mj_unpack_##name(const uint8_t* b, uint8_t* u, float* s, float* c) {         \
    _mm256_storeu_si256((__m256i*)u, mj_codes_##name(b));                                         \
    mj_sc_##name(b, s, c);                                                                        \
  }
MJ_UNPACK32(q4_0)
MJ_UNPACK32(q4_1)
MJ_UNPACK32(q5_0)
MJ_UNPACK32(q5_1)
MJ_UNPACK32(q8_0)
MJ_UNPACK32(q8_1)
MJ_UNPACK32(iq4_nl)

// ---- K-quants: 256-element super-blocks ----

// Q4_K / Q5_K: eight 6-bit (scale, min) pairs packed in 12 bytes (ggml's get_scale_min_k4),
// unpacked for all eight groups at once with 32-bit masks, then s = d * scale, c = -dmin * min.
static inline void mj_scales_k4(float d, float dmin, const uint8_t* scales, float* s, float* c) {
  uint32_t w[4];
  std::memcpy(w, scales, 12);
  const uint32_t m6 = 0x3f3f3f3fu, m4 = 0x0f0f0f0fu, m2 = 0x03030303u;
  w[3] = ((w[2] >> 4) & m4) | (((w[1] >> 6) & m2) << 4);  // mins 4-7
  const uint32_t mins03 = w[1] & m6;
  w[1] = (w[2] & m4) | (((w[0] >> 6) & m2) << 4);  // scales 4-7
  w[2] = mins03;
  w[0] &= m6;  // scales 0-3
  const __m128i bytes = _mm_loadu_si128((const __m128i*)w);
  const __m256 sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
  const __m256 mn = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8)));
  _mm256_storeu_ps(s, _mm256_mul_ps(sc, _mm256_set1_ps(d)));
  _mm256_storeu_ps(c, _mm256_mul_ps(mn, _mm256_set1_ps(-dmin)));
}

static inline void mj_unpack_q4_k(const uint8_t* b, uint8_t* u, float* s, float* c) {
  const float d = mj_f16(b), dmin = mj_f16(b + 2);
  const uint8_t* scales = b + 4;
  const uint8_t* qs = b + 16;
  for (int p = 0; p < 4; ++p) {
    for (int l = 0; l < 32; ++l) {
      u[64 * p + l] = qs[32 * p + l] & 0x0f;
      u[64 * p + 32 + l] = qs[32 * p + l] >> 4;
    }
  }
  mj_scales_k4(d, dmin, scales, s, c);
}

static inline void mj_unpack_q5_k(const uint8_t* b, uint8_t* u, float* s, float* c) {
  const float d = mj_f16(b), dmin = mj_f16(b + 2);
  const uint8_t* scales = b + 4;
  const uint8_t* qh = b + 16;
  const uint8_t* qs = b + 48;
  const __m256i h = mj_load32(qh);
  for (int p = 0; p < 4; ++p) {
    const __m256i q = mj_load32(qs + 32 * p);
    // bit 2p (then 2p + 1) of qh[l] becomes bit 4 of the code
    const __m256i b_lo = _mm256_slli_epi16(mj_srl8(h, 2 * p, 1), 4), b_hi = _mm256_slli_epi16(mj_srl8(h, 2 * p + 1, 1), 4);
    mj_store32(u + 64 * p, _mm256_or_si256(_mm256_and_si256(q, _mm256_set1_epi8(0x0f)), b_lo));
    mj_store32(u + 64 * p + 32, _mm256_or_si256(mj_srl8(q, 4, 0x0f), b_hi));
  }
  mj_scales_k4(d, dmin, scales, s, c);
}

// Q6_K: groups of 16, int8 scales, codes q - 32 with q in 0..63.
static inline void mj_unpack_q6_k(const uint8_t* b, uint8_t* u, float* s, float* c) {
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const int8_t* sc = (const int8_t*)(b + 192);
  const float d = mj_f16(b + 208);
  for (int h = 0; h < 2; ++h) {
    const uint8_t* l8 = ql + 64 * h;
    const uint8_t* h8 = qh + 32 * h;
    uint8_t* o = u + 128 * h;
    const __m256i q1 = mj_load32(l8), q2 = mj_load32(l8 + 32), hh = mj_load32(h8);
    const __m256i lo = _mm256_set1_epi8(0x0f);
    // two bits of qh per code, shifted to bits 4-5: (h & 3) << 4, (h >> 2 & 3) << 4, ...
    const __m256i h0 = _mm256_slli_epi16(mj_srl8(hh, 0, 3), 4), h1 = _mm256_slli_epi16(mj_srl8(hh, 2, 3), 4);
    const __m256i h2 = _mm256_slli_epi16(mj_srl8(hh, 4, 3), 4), h3 = _mm256_slli_epi16(mj_srl8(hh, 6, 3), 4);
    mj_store32(o, _mm256_or_si256(_mm256_and_si256(q1, lo), h0));
    mj_store32(o + 32, _mm256_or_si256(_mm256_and_si256(q2, lo), h1));
    mj_store32(o + 64, _mm256_or_si256(mj_srl8(q1, 4, 0x0f), h2));
    mj_store32(o + 96, _mm256_or_si256(mj_srl8(q2, 4, 0x0f), h3));
  }
  mj_group_scales16<true>(_mm_loadu_si128((const __m128i*)sc), d, -32.0f, s, c);
}

// Q2_K: groups of 16, 4-bit scale and 4-bit min per group, 2-bit codes.
static inline void mj_unpack_q2_k(const uint8_t* b, uint8_t* u, float* s, float* c) {
  const uint8_t* scales = b;
  const uint8_t* qs = b + 16;
  const float d = mj_f16(b + 80), dmin = mj_f16(b + 82);
  for (int h = 0; h < 2; ++h) {
    const uint8_t* q = qs + 32 * h;
    uint8_t* o = u + 128 * h;
    const __m256i qv = mj_load32(q);
    for (int j = 0; j < 4; ++j) mj_store32(o + 32 * j, mj_srl8(qv, 2 * j, 3));
  }
  // low nibble: the group's scale (times d); high nibble: its min (times dmin)
  const __m128i sb = _mm_loadu_si128((const __m128i*)scales), m4 = _mm_set1_epi8(0x0f);
  mj_group_scales16<false>(_mm_and_si128(sb, m4), d, 0.0f, s, nullptr);
  mj_group_scales16<false>(_mm_and_si128(_mm_srli_epi16(sb, 4), m4), -dmin, 0.0f, c, nullptr);
}

// Q3_K: groups of 16, 6-bit signed scales (stored + 32), codes 0..7 = 2 low bits + high bit.
static inline void mj_unpack_q3_k(const uint8_t* b, uint8_t* u, float* s, float* c) {
  const uint8_t* hm = b;
  const uint8_t* qs = b + 32;
  const float d = mj_f16(b + 108);
  uint32_t aux[4];
  std::memcpy(aux, b + 96, 12);
  const uint32_t k1 = 0x03030303u, k2 = 0x0f0f0f0fu, tmp = aux[2];
  aux[2] = ((aux[0] >> 4) & k2) | (((tmp >> 4) & k1) << 4);
  aux[3] = ((aux[1] >> 4) & k2) | (((tmp >> 6) & k1) << 4);
  aux[0] = (aux[0] & k2) | (((tmp >> 0) & k1) << 4);
  aux[1] = (aux[1] & k2) | (((tmp >> 2) & k1) << 4);

  for (int h = 0; h < 2; ++h) {
    const uint8_t* q = qs + 32 * h;
    uint8_t* o = u + 128 * h;
    const __m256i qv = mj_load32(q), hv = mj_load32(hm);
    for (int j = 0; j < 4; ++j)
      mj_store32(o + 32 * j, _mm256_or_si256(mj_srl8(qv, 2 * j, 3), _mm256_slli_epi16(mj_srl8(hv, 4 * h + j, 1), 2)));
  }
  const __m128i sc = _mm_sub_epi8(_mm_loadu_si128((const __m128i*)aux), _mm_set1_epi8(32));  // 6-bit scales - 32
  mj_group_scales16<true>(sc, d, -4.0f, s, c);
}

// IQ4_XS: eight 32-groups with 6-bit scales (stored + 32), non-linear 4-bit codebook.
static inline void mj_unpack_iq4_xs(const uint8_t* b, uint8_t* u, float* s, float* c) {
  const float d = mj_f16(b);
  uint16_t scales_h;
  std::memcpy(&scales_h, b + 2, 2);
  const uint8_t* scales_l = b + 4;
  const uint8_t* qs = b + 8;
  for (int g = 0; g < 8; ++g) {
    const int ls = ((scales_l[g / 2] >> (4 * (g % 2))) & 0x0f) | (((scales_h >> (2 * g)) & 3) << 4);
    s[g] = d * (float)(ls - 32);
    c[g] = -128.0f * s[g];
    _mm256_storeu_si256((__m256i*)(u + 32 * g), mj_iq4_codes(qs + 16 * g));
  }
}

// Q8_K as a weight: f32 d, 256 int8 codes, 16 int16 sums of 16 codes (unused here); w = d * q.
static inline float mj_f32(const uint8_t* p) {
  float f;
  std::memcpy(&f, p, 4);
  return f;
}
static inline void mj_sc_q8_k(const uint8_t* b, float* s, float* c) {
  const __m256 d = _mm256_set1_ps(mj_f32(b));
  _mm256_storeu_ps(s, d);
  _mm256_storeu_ps(c, _mm256_mul_ps(d, _mm256_set1_ps(-128.0f)));
}
static inline void mj_unpack_q8_k(const uint8_t* b, uint8_t* u, float* s, float* c) {
  for (int j = 0; j < 8; ++j) mj_store32(u + 32 * j, _mm256_xor_si256(mj_load32(b + 4 + 32 * j), _mm256_set1_epi8((char)0x80)));
  mj_sc_q8_k(b, s, c);
}

// HQQ4 / HQQ8: 64 weights in two 32-groups sharing one scale and zero point. HQQ4's 32 bytes
// hold code j in the low nibble of byte j and code j + 32 in its high nibble; HQQ8's 64 bytes
// are the codes.
// (Each pair goes out in one 8-byte store, which the fused GEMV's 8-byte load can forward.)
static inline void mj_sc_hqq(const uint8_t* b, float* s, float* c) {
  uint32_t scale_zero;
  std::memcpy(&scale_zero, b, 4);
  const __m128 v = _mm_cvtph_ps(_mm_cvtsi32_si128((int)scale_zero));  // scale, zero, 0, 0
  const __m128 scale = _mm_shuffle_ps(v, v, 0x00), zero = _mm_shuffle_ps(v, v, 0x55);
  _mm_storel_pi((__m64*)s, scale);
  _mm_storel_pi((__m64*)c, _mm_xor_ps(_mm_mul_ps(scale, zero), _mm_set1_ps(-0.0f)));
}
static inline void mj_unpack_hqq4(const uint8_t* b, uint8_t* u, float* s, float* c) {
  const __m256i q = mj_load32(b + 4);
  mj_store32(u, _mm256_and_si256(q, _mm256_set1_epi8(0x0f)));
  mj_store32(u + 32, mj_srl8(q, 4, 0x0f));
  mj_sc_hqq(b, s, c);
}
static inline void mj_unpack_hqq8(const uint8_t* b, uint8_t* u, float* s, float* c) {
  std::memcpy(u, b + 4, 64);
  mj_sc_hqq(b, s, c);
}

struct MjFormat {
  int type;   // gguf-py GGMLQuantizationType id
  int block;  // elements per block
  int bytes;  // bytes per block
  int group;  // elements per scale group (16 or 32)
};

// X(name, type id, block, bytes, group). Ids are gguf-py's GGMLQuantizationType ids; HQQ4/HQQ8,
// which GGML does not have, get this project's ids 1004 / 1008 (blocks.py), outside GGML's range.
#define MJ_FORMATS(X)                  \
  X(q4_0, 2, 32, 18, 32)               \
  X(q4_1, 3, 32, 20, 32)               \
  X(q5_0, 6, 32, 22, 32)               \
  X(q5_1, 7, 32, 24, 32)               \
  X(q8_0, 8, 32, 34, 32)               \
  X(q8_1, 9, 32, 36, 32)               \
  X(q2_k, 10, 256, 84, 16)             \
  X(q3_k, 11, 256, 110, 16)            \
  X(q4_k, 12, 256, 144, 32)            \
  X(q5_k, 13, 256, 176, 32)            \
  X(q6_k, 14, 256, 210, 16)            \
  X(q8_k, 15, 256, 292, 32)            \
  X(iq4_nl, 20, 32, 18, 32)            \
  X(iq4_xs, 23, 256, 136, 32)          \
  X(hqq4, 1004, 64, 36, 32)            \
  X(hqq8, 1008, 64, 68, 32)

// One type per format, so that the kernels are instantiated with the unpacker inlined.
#define MJ_TRAITS(name, id, blk, nbytes, grp)                                          \
  struct Fmt_##name {                                                                  \
    static constexpr int type = id, block = blk, bytes = nbytes, group = grp;          \
    static inline void unpack(const uint8_t* b, uint8_t* u, float* s, float* c) {      \
      mj_unpack_##name(b, u, s, c);                                                     \
    }                                                                                  \
  };
MJ_FORMATS(MJ_TRAITS)
#undef MJ_TRAITS

// The 32-element block formats also read block by block, for the fused GEMV.
template <class F>
struct MjBlock32 {
  static constexpr bool ok = false;
};
#define MJ_BLOCK32(name)                                                                   \
  template <>                                                                              \
  struct MjBlock32<Fmt_##name> {                                                           \
    static constexpr bool ok = true;                                                       \
    static inline __m256i codes(const uint8_t* b) { return mj_codes_##name(b); }           \
    static inline void sc(const uint8_t* b, float* s, float* c) { mj_sc_##name(b, s, c); } \
    static inline void sc2(const uint8_t* b, __m128* s, __m128* c) {                       \
      mj_sc2_##name(b, Fmt_##name::bytes, s, c);                                           \
    }                                                                                      \
  };
MJ_BLOCK32(q4_0)
MJ_BLOCK32(q4_1)
MJ_BLOCK32(q5_0)
MJ_BLOCK32(q5_1)
MJ_BLOCK32(q8_0)
MJ_BLOCK32(q8_1)
MJ_BLOCK32(iq4_nl)
#undef MJ_BLOCK32

static const MjFormat* mj_format(int64_t type) {
#define MJ_ROW(name, id, blk, nbytes, grp) {id, blk, nbytes, grp},
  static const MjFormat formats[] = {MJ_FORMATS(MJ_ROW)};
#undef MJ_ROW
  for (const MjFormat& f : formats)
    if (f.type == type) return &f;
  return nullptr;
}
