// The fused GEMV of the AVX-512 VNNI build (included by qmatmul.cc after reduce_rows): for
// T <= 2 tokens the blocks of the 32-element formats, Q4_K, Q6_K, Q8_K and HQQ4/HQQ8 are
// decoded straight into 512-bit registers and dotted with every token, with no unpacked copy
// of the row in memory.
#pragma once
#define MJ_FUSED_GEMV 1

// Nibble formats decode two blocks at once in "paired" order, [block 0 low nibbles, block 1
// low, block 0 high, block 1 high] (16 codes each), which needs no lane shuffles; the
// activations of every full 64-element chunk are put in the same order (pair_activations).
template <class F>
struct Paired {
  static constexpr bool ok = false;
};
template <int QS, int QH, bool IQ4>  // byte offsets of qs and of the fifth bits (-1: none)
struct NibblePair {
  static constexpr bool ok = true;
  static inline __m512i codes(const uint8_t* b0, const uint8_t* b1) {
    const __m256i v = _mm256_loadu2_m128i((const __m128i*)(b1 + QS), (const __m128i*)(b0 + QS));
    const __m256i m = _mm256_set1_epi8(0x0f);
    __m256i lo = _mm256_and_si256(v, m), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m);
    if constexpr (IQ4) {
      const __m128i tab = _mm_setr_epi8(1, 24, 45, 63, 79, 93, 106, 118, (char)129, (char)141, (char)153,
                                        (char)166, (char)181, (char)197, (char)217, (char)241);
      const __m256i t2 = _mm256_set_m128i(tab, tab);
      lo = _mm256_shuffle_epi8(t2, lo), hi = _mm256_shuffle_epi8(t2, hi);
    }
    const __m512i codes = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
    if constexpr (QH >= 0) {  // fifth bits as a byte mask: bits 0-15 go with the low nibbles
      uint32_t h0, h1;
      std::memcpy(&h0, b0 + QH, 4);
      std::memcpy(&h1, b1 + QH, 4);
      const uint64_t bits = (uint64_t)(h0 & 0xffffu) | (uint64_t)(h1 & 0xffffu) << 16 | (uint64_t)(h0 >> 16) << 32 |
                            (uint64_t)(h1 >> 16) << 48;
      return _mm512_mask_or_epi32(codes, 0xffff, codes, _mm512_maskz_mov_epi8(bits, _mm512_set1_epi8(0x10)));
    }
    return codes;
  }
};
template <>
struct Paired<Fmt_q4_0> : NibblePair<2, -1, false> {};
template <>
struct Paired<Fmt_q4_1> : NibblePair<4, -1, false> {};
template <>
struct Paired<Fmt_q5_0> : NibblePair<6, 2, false> {};
template <>
struct Paired<Fmt_q5_1> : NibblePair<8, 4, false> {};
template <>
struct Paired<Fmt_iq4_nl> : NibblePair<2, -1, true> {};

// The fused GEMV's pieces, shared by the 32-block formats (gemv32) and Q4_K (gemvk): NT
// tokens' sums for R rows, acc[n][r] (group products) and corr[n][r] (offset terms).
template <int R, int NT>
static inline void gemv_zero(__m512 (*acc)[R], __m128 (*corr)[R]) {
  for (int n = 0; n < NT; ++n)
    for (int r = 0; r < R; ++r) acc[n][r] = _mm512_setzero_ps(), corr[n][r] = _mm_setzero_ps();
}

// The 64 / G scale (or offset) terms of the groups of a 64-element chunk, in the low lanes.
template <int G>
static inline __m128 gemv_groups(const float* p) {
  if constexpr (G == 16) return _mm_loadu_ps(p);
  return _mm_castpd_ps(_mm_load_sd((const double*)p));
}
// vpdpbusd lane l sums bytes 4l..4l+3: the lanes of each group take its scale.
template <int G>
static inline __m512i gemv_spread() {
  if constexpr (G == 16) return _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  return _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
}

// The NT tokens' 64 activation codes at element e, and the scale / offset terms of its groups.
template <int NT, int G = 32>
static inline void gemv_load(const int8_t* a, const float* da, const float* qa, int64_t K, int64_t e, __m512i* av,
                             __m128* dav, __m128* qav) {
  for (int n = 0; n < NT; ++n) {
    av[n] = _mm512_loadu_si512(a + n * K + e);
    dav[n] = gemv_groups<G>(da + n * (K / G) + e / G);
    qav[n] = gemv_groups<G>(qa + n * (K / G) + e / G);
  }
}

// Row r's 64 decoded codes `uv` (its two groups' scales sv and offsets cv) into every token's sums.
template <int R, int NT>
static inline void gemv_add(int r, __m512i uv, __m128 sv, __m128 cv, __m512i spread, const __m512i* av,
                            const __m128* dav, const __m128* qav, __m512 (*acc)[R], __m128 (*corr)[R]) {
  for (int n = 0; n < NT; ++n) {
    const __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), uv, av[n]);
    acc[n][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p),
                                _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_mul_ps(sv, dav[n]))),
                                acc[n][r]);
    corr[n][r] = _mm_fmadd_ps(cv, qav[n], corr[n][r]);
  }
}

template <int R, int NT>
static inline void gemv_store(__m512 (*acc)[R], __m128 (*corr)[R], float* out, int64_t ostride) {
  for (int n = 0; n < NT; ++n) {
    for (int r = 0; r < R; ++r) acc[n][r] = _mm512_add_ps(acc[n][r], _mm512_castps128_ps512(corr[n][r]));
    reduce_rows<R>(acc[n], out + n * ostride);
  }
}

// NT tokens share each decoded register of weights: token n's activations are av[n] (its
// scales dav[n], qav[n]) and its sums go to acc[n], corr[n].
template <class F, int R, int NT, bool Full>
static inline void gemv32_step(const uint8_t* const* rows, int64_t e, const __m512i* av, const __m128* dav,
                               const __m128* qav, __m512 (*acc)[R], __m128 (*corr)[R]) {
  constexpr bool paired = Paired<F>::ok && Full;
  const __m512i spread = paired ? _mm512_set_epi32(1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0)
                                : _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  for (int r = 0; r < R; ++r) {
    const uint8_t* b = rows[r] + e / 32 * F::bytes;
    __m128 sv, cv;
    __m256i hi = _mm256_setzero_si256();
    if (Full) {
      MjBlock32<F>::sc2(b, &sv, &cv);
      if constexpr (!paired) hi = MjBlock32<F>::codes(b + F::bytes);
    } else {
      float s0, c0;
      MjBlock32<F>::sc(b, &s0, &c0);
      sv = _mm_set_ss(s0), cv = _mm_set_ss(c0);
    }
    __m512i uv;
    if constexpr (paired)
      uv = Paired<F>::codes(b, b + F::bytes);
    else
      uv = _mm512_inserti64x4(_mm512_castsi256_si512(MjBlock32<F>::codes(b)), hi, 1);
    gemv_add<R, NT>(r, uv, sv, cv, spread, av, dav, qav, acc, corr);
  }
}

// R weight rows with NT tokens (token n: a + n * K, da / qa + n * (K / 32), out + n * ostride).
template <class F, int R, int NT>
static inline void gemv32(const uint8_t* const* rows, int64_t K, const int8_t* a, const float* da, const float* qa,
                          float* out, int64_t ostride) {
  const int64_t gstride = K / 32;
  __m512 acc[NT][R];
  __m128 corr[NT][R];
  gemv_zero<R, NT>(acc, corr);
  __m512i av[NT];
  __m128 dav[NT], qav[NT];
  int64_t e = 0;
  for (; e + 64 <= K; e += 64) {
    gemv_load<NT>(a, da, qa, K, e, av, dav, qav);
    gemv32_step<F, R, NT, true>(rows, e, av, dav, qav, acc, corr);
  }
  if (e < K) {  // one block left
    for (int n = 0; n < NT; ++n) {
      av[n] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)(a + n * K + e))),
                                 _mm256_setzero_si256(), 1);
      dav[n] = _mm_load_ss(da + n * gstride + e / 32);
      qav[n] = _mm_load_ss(qa + n * gstride + e / 32);
    }
    gemv32_step<F, R, NT, false>(rows, e, av, dav, qav, acc, corr);
  }
  gemv_store<R, NT>(acc, corr, out, ostride);
}

// Formats read in 64-element chunks of natural order (KPair<F>: the chunk's 64 codes in one
// register, and its block's group scales and offsets): Q4_K (each chunk is one load of 32 bytes,
// low nibbles group 2p, high nibbles group 2p + 1), Q6_K, Q8_K, HQQ4 and HQQ8. (Q5_K read this way,
// with its fifth bits through a byte mask, measured slower than unpacking it.)
template <class F>
struct KPair {
  static constexpr bool ok = false;
};
static inline __m512i mj_nibbles64(const uint8_t* qs) {  // 32 bytes: low nibbles, then high nibbles
  const __m256i q = _mm256_loadu_si256((const __m256i*)qs), m = _mm256_set1_epi8(0x0f);
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(q, m)), _mm256_and_si256(_mm256_srli_epi16(q, 4), m),
                            1);
}
template <>
struct KPair<Fmt_q4_k> {
  static constexpr bool ok = true;
  static inline void scales(const uint8_t* b, float* s, float* c) { mj_scales_k4(mj_f16(b), mj_f16(b + 2), b + 4, s, c); }
  static inline __m512i codes(const uint8_t* b, int p) { return mj_nibbles64(b + 16 + 32 * p); }
};
// Q6_K: 16-element groups; half h of a super-block holds 64 bytes of low nibbles (ql) and 32
// bytes of two-bit pairs (qh): chunk 2h takes the low nibbles with qh's bits 0-1 (bytes 0-31)
// and 2-3 (bytes 32-63), chunk 2h + 1 the high nibbles with bits 4-5 and 6-7.
template <>
struct KPair<Fmt_q6_k> {
  static constexpr bool ok = true;
  static inline void scales(const uint8_t* b, float* s, float* c) {
    mj_group_scales16<true>(_mm_loadu_si128((const __m128i*)(b + 192)), mj_f16(b + 208), -32.0f, s, c);
  }
  static inline __m512i codes(const uint8_t* b, int p) {
    const int h = p >> 1, j = p & 1;
    const __m512i l = _mm512_loadu_si512(b + 64 * h), m4 = _mm512_set1_epi8(0x0f);
    const __m256i qh = _mm256_loadu_si256((const __m256i*)(b + 128 + 32 * h));
    const __m512i pairs = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_srli_epi16(qh, 4 * j)),
                                             _mm256_srli_epi16(qh, 4 * j + 2), 1);
    const __m512i low = _mm512_and_si512(j ? _mm512_srli_epi16(l, 4) : l, m4);
    return _mm512_or_si512(low, _mm512_slli_epi16(_mm512_and_si512(pairs, _mm512_set1_epi8(3)), 4));
  }
};
template <>
struct KPair<Fmt_q8_k> {
  static constexpr bool ok = true;
  static inline void scales(const uint8_t* b, float* s, float* c) { mj_sc_q8_k(b, s, c); }
  static inline __m512i codes(const uint8_t* b, int p) {
    return _mm512_xor_si512(_mm512_loadu_si512(b + 4 + 64 * p), _mm512_set1_epi8((char)0x80));
  }
};
template <>
struct KPair<Fmt_hqq4> {
  static constexpr bool ok = true;
  static inline void scales(const uint8_t* b, float* s, float* c) { mj_sc_hqq(b, s, c); }
  static inline __m512i codes(const uint8_t* b, int) { return mj_nibbles64(b + 4); }
};
template <>
struct KPair<Fmt_hqq8> {
  static constexpr bool ok = true;
  static inline void scales(const uint8_t* b, float* s, float* c) { mj_sc_hqq(b, s, c); }
  static inline __m512i codes(const uint8_t* b, int) { return _mm512_loadu_si512(b + 4); }
};

template <class F, int R, int NT>
static inline void gemvk(const uint8_t* const* rows, int64_t K, const int8_t* a, const float* da, const float* qa,
                         float* out, int64_t ostride) {
  constexpr int C = F::block / 64, G = F::group, NG = F::block / G;  // chunks and groups per block
  const __m512i spread = gemv_spread<G>();
  __m512 acc[NT][R];
  __m128 corr[NT][R];
  gemv_zero<R, NT>(acc, corr);
  for (int64_t sb = 0; sb < K / F::block; ++sb) {
    alignas(32) float s[R][NG], c[R][NG];
    for (int r = 0; r < R; ++r) KPair<F>::scales(rows[r] + sb * F::bytes, s[r], c[r]);
    for (int p = 0; p < C; ++p) {
      const int64_t e = F::block * sb + 64 * p;
      __m512i av[NT];
      __m128 dav[NT], qav[NT];
      gemv_load<NT, G>(a, da, qa, K, e, av, dav, qav);
      for (int r = 0; r < R; ++r)
        gemv_add<R, NT>(r, KPair<F>::codes(rows[r] + sb * F::bytes, p), gemv_groups<G>(s[r] + 64 / G * p),
                        gemv_groups<G>(c[r] + 64 / G * p), spread, av, dav, qav, acc, corr);
    }
  }
  gemv_store<R, NT>(acc, corr, out, ostride);
}
