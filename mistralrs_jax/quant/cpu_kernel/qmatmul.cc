// y[T, N] = x[T, K] @ W[N, K]^T with W held as raw GGML blocks: an XLA FFI handler for CPU.
//
// The arithmetic is llama.cpp's CPU backend's, so that greedy outputs agree with it:
// activations are quantized to 8 bits as ggml quantizes them for the weight type
// (Q8_0, Q8_1 or Q8_K blocks, activations.h), weights are unpacked to u8 codes with f32
// group scales and offsets (unpack.h), and each group's dot product is taken in integers
// (u8 x s8 -> s32), then scaled in f32:
//     y = sum_g s[g] * da[g] * sum_{i in g} u[i] * a[i]  +  c[g] * qa[g]
// which is ggml's vec_dot (sum over blocks of d_w * d_a * isum, plus m * s for Q4_1/Q5_1 and
// dmin * d * sum(min * bsum) for the K-quants) up to the order of the f32 roundings. As
// x_hat = da * a is within da / 2 (+ the f16 rounding of da) of x elementwise, each output is
// within sum_b (da_b / 2 + 127 ulp16(da_b) / 2) sum_{i in b} |w_i| of the f32 product (b: the
// activation blocks), which tests/test_cpu_kernel.py asserts with llama.cpp's own vec_dot (and
// tests/test_cpu_kernel_isq.py with its quantizers and decoders for Q8_1, Q8_K and HQQ).
//
// Work: output rows are split into chunks that the caller and helper threads claim from an
// atomic counter, four rows at a time. The helpers are the kernel's own spinning threads, as
// many as XLA's intra-op pool (ffi::ThreadPool) has cores beyond the caller's (see SpinPool),
// or that pool itself when they are taken. At T <= 2 the
// 32-element block formats, Q4_K, Q6_K, Q8_K and HQQ are decoded in registers (gemv32,
// gemvk); otherwise (the other formats, and every format for T > 2) four rows are unpacked
// into an L1-sized buffer (for T > 1 in an interleaved layout, see dot_rows) and dotted with
// every token of an L2-sized block of tokens, K in 2048-element slices.
// ISA: AVX-512 VNNI, else AVX2 (with AVX-VNNI when present); chosen at compile time
// (the library is built with -march=native on the machine that runs it).
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "activations.h"
#include "unpack.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

#if !defined(__AVX2__)
#error "the mistralrs-jax CPU kernel needs AVX2"
#endif

constexpr int kRows = 4;  // weight rows unpacked and dotted together
constexpr int kInterleaveMinT = 2;  // tokens from which rows are interleaved (see dot_rows)
constexpr int64_t kWorkPerThread = 1 << 14;  // multiply-adds that justify one more thread (see below)
constexpr int kSub = 64;  // output rows gathered before they are written (a multiple of kRows)
constexpr int64_t kSlice = 2048;  // elements of K per pass (a multiple of every interleaved run)
constexpr int64_t kActivationBytes = 1 << 18;  // activation codes kept in L2 while rows stream past

// ---------------------------------------------------------------------------------------
// Dot products of R unpacked weight rows with one activation row.

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define MJ_ISA "avx512vnni"

// Interleaved layout (T > 1): within each run of 16 groups, 4-byte piece j of group l sits at
// byte 64 j + 4 l, so lane l of vpdpbusd accumulates group l alone and a run of 16 groups
// costs one int->float conversion and two fused multiply-adds per row instead of several
// per 64 bytes. The first `kfull` bytes of u and a are in this layout, the rest is not.
#define MJ_INTERLEAVE 1
constexpr int kLanes = 16;

// Sums of the 16 lanes of R vectors.
template <int R>
static inline void reduce_rows(const __m512* acc, float* out) {
  if (R % 4 == 0) {
    for (int r0 = 0; r0 < R; r0 += 4) {
      __m256 h[4];
      for (int r = 0; r < 4; ++r)
        h[r] = _mm256_add_ps(_mm512_castps512_ps256(acc[r0 + r]),
                             _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[r0 + r]), 1)));
      const __m256 q = _mm256_hadd_ps(_mm256_hadd_ps(h[0], h[1]), _mm256_hadd_ps(h[2], h[3]));
      const __m128 v = _mm_add_ps(_mm256_castps256_ps128(q), _mm256_extractf128_ps(q, 1));
      _mm_storeu_ps(out + r0, _mm_add_ps(_mm_loadu_ps(out + r0), v));
    }
  } else {
    for (int r = 0; r < R; ++r) out[r] += _mm512_reduce_add_ps(acc[r]);
  }
}

// NT tokens per pass share the weight loads: token n reads a + n * astride, da / qa + n * gstride
// and adds its R sums to out + n * ostride.
template <int R, int G, int NT = 1>
static inline void dot_rows(const uint8_t* u, const float* s, const float* c, int64_t K, int64_t stride,
                            int64_t kfull, const int8_t* a, const float* da, const float* qa, float* out,
                            int64_t astride = 0, int64_t gstride = 0, int64_t ostride = 0) {
  constexpr int P = NT == 1 ? 2 : 1;  // integer accumulators per (token, row): enough independent chains
  const int64_t ng_row = K / G, sstride = stride / G;
  __m512 acc[NT][R];
  for (int n = 0; n < NT; ++n)
    for (int r = 0; r < R; ++r) acc[n][r] = _mm512_setzero_ps();
  for (int64_t base = 0; base < kfull; base += kLanes * G) {
    const int64_t g0 = base / G;
    __m512i ai[NT][R][P];
    for (int n = 0; n < NT; ++n)
      for (int r = 0; r < R; ++r)
        for (int q = 0; q < P; ++q) ai[n][r][q] = _mm512_setzero_si512();
    for (int j = 0; j < G / 4; ++j) {
      __m512i av[NT];
      for (int n = 0; n < NT; ++n) av[n] = _mm512_loadu_si512(a + n * astride + base + 64 * j);
      for (int r = 0; r < R; ++r) {
        const __m512i uv = _mm512_loadu_si512(u + r * stride + base + 64 * j);
        for (int n = 0; n < NT; ++n) ai[n][r][j % P] = _mm512_dpbusd_epi32(ai[n][r][j % P], uv, av[n]);
      }
    }
    for (int n = 0; n < NT; ++n) {
      const __m512 dav = _mm512_loadu_ps(da + n * gstride + g0), qav = _mm512_loadu_ps(qa + n * gstride + g0);
      for (int r = 0; r < R; ++r) {
        __m512i sum = ai[n][r][0];
        if (P == 2) sum = _mm512_add_epi32(sum, ai[n][r][P - 1]);
        acc[n][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(_mm512_loadu_ps(s + r * sstride + g0), dav),
                                    acc[n][r]);
        acc[n][r] = _mm512_fmadd_ps(_mm512_loadu_ps(c + r * sstride + g0), qav, acc[n][r]);
      }
    }
  }
  // The rest in chunks of 64 elements: 64 / G groups, each group's scale spread over its lanes.
  constexpr int NG = 64 / G;
  const __m512i spread = NG == 2 ? _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0)
                                 : _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  for (int64_t e = kfull; e < K; e += 64) {
    const bool full = e + 64 <= K;
    const __mmask64 bm = full ? ~(__mmask64)0 : (__mmask64)0xffffffffu;
    const __mmask8 gm = full ? (__mmask8)((1u << NG) - 1) : (__mmask8)((1u << (NG / 2)) - 1);
    const int64_t g = e / G;
    for (int r = 0; r < R; ++r) {
      const __m512i uv = _mm512_maskz_loadu_epi8(bm, u + r * stride + e);
      const __m128 sv = _mm_maskz_loadu_ps(gm, s + r * sstride + g);
      for (int n = 0; n < NT; ++n) {
        const __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), uv, _mm512_maskz_loadu_epi8(bm, a + n * astride + e));
        const __m128 sd = _mm_mul_ps(sv, _mm_maskz_loadu_ps(gm, da + n * gstride + g));
        acc[n][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(sd)),
                                    acc[n][r]);
      }
    }
  }
  // Offsets of the groups outside the interleaved runs: c[g] * qa[g].
  for (int64_t g = kfull / G; g < ng_row; g += 16) {
    const __mmask16 m = g + 16 <= ng_row ? (__mmask16)0xffff : (__mmask16)((1u << (ng_row - g)) - 1);
    for (int r = 0; r < R; ++r) {
      const __m512 cv = _mm512_maskz_loadu_ps(m, c + r * sstride + g);
      for (int n = 0; n < NT; ++n) acc[n][r] = _mm512_fmadd_ps(cv, _mm512_maskz_loadu_ps(m, qa + n * gstride + g), acc[n][r]);
    }
  }
  for (int n = 0; n < NT; ++n) reduce_rows<R>(acc[n], out + n * ostride);
}
#define MJ_PAIR_TOKENS 1

#include "gemv.h"

#else  // AVX2
#if defined(__AVXVNNI__)
#define MJ_ISA "avx2+avxvnni"
static inline __m256i mj_dot_u8s8(__m256i u, __m256i a) {
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, a);
}
#else
#define MJ_ISA "avx2"
static inline __m256i mj_dot_u8s8(__m256i u, __m256i a) {
  // Widen to 16 bits first: u8 * s8 pairs would saturate maddubs for codes above 128.
  const __m256i u0 = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(u));
  const __m256i u1 = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(u, 1));
  const __m256i a0 = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(a));
  const __m256i a1 = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(a, 1));
  // lanes of p0 cover elements 0-15, lanes of p1 16-31: interleave so lane l sums 4 elements
  // of the same 16-group as in the VNNI layout (lanes 0-3 -> group 0, 4-7 -> group 1).
  const __m256i p0 = _mm256_madd_epi16(u0, a0);
  const __m256i p1 = _mm256_madd_epi16(u1, a1);
  const __m256i lo = _mm256_permute2x128_si256(p0, p1, 0x20);
  const __m256i hi = _mm256_permute2x128_si256(p0, p1, 0x31);
  return _mm256_add_epi32(lo, hi);
}
#endif

template <int R, int G>
static inline void dot_rows(const uint8_t* u, const float* s, const float* c, int64_t K, int64_t stride,
                            int64_t e0, const int8_t* a, const float* da, const float* qa, float* out) {
  const int64_t ng_row = K / G, sstride = stride / G;
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t e = e0; e < K; e += 32) {
    const int64_t g = e / G;
    const __m256i av = _mm256_loadu_si256((const __m256i*)(a + e));
    for (int r = 0; r < R; ++r) {
      const __m256i uv = _mm256_loadu_si256((const __m256i*)(u + r * stride + e));
      const __m256 p = _mm256_cvtepi32_ps(mj_dot_u8s8(uv, av));
      __m256 sd;
      if (G == 32) {
        sd = _mm256_set1_ps(s[r * sstride + g] * da[g]);
      } else {
        const __m128 lo = _mm_set1_ps(s[r * sstride + g] * da[g]);
        const __m128 hi = _mm_set1_ps(s[r * sstride + g + 1] * da[g + 1]);
        sd = _mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1);
      }
      acc[r] = _mm256_fmadd_ps(p, sd, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float corr = 0.0f;
    for (int64_t g = 0; g < ng_row; ++g) corr += c[r * sstride + g] * qa[g];
    __m128 v = _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1));
    v = _mm_add_ps(v, _mm_movehl_ps(v, v));
    v = _mm_add_ss(v, _mm_shuffle_ps(v, v, 1));
    out[r] += _mm_cvtss_f32(v) + corr;
  }
}
#define MJ_INTERLEAVE 0
#define MJ_FUSED_GEMV 0
#define MJ_PAIR_TOKENS 0
template <class F>
struct Paired {
  static constexpr bool ok = false;
};
constexpr int kLanes = 16;
template <class F>
struct KPair {
  static constexpr bool ok = false;
};
template <class F, int R, int NT>
static inline void gemv32(const uint8_t* const*, int64_t, const int8_t*, const float*, const float*, float*, int64_t) {}
template <class F, int R, int NT>
static inline void gemvk(const uint8_t* const*, int64_t, const int8_t*, const float*, const float*, float*, int64_t) {}
#endif

// Tokens up to which the formats with a fused GEMV read their blocks in place (run_rows_gemv)
// instead of unpacking rows: the engine pads a batch-1 decode step to two tokens, and there the
// fused path is ~1.4x the unpacking one (SmolLM2's shapes, one core); from T = 3 on they are level.
#ifndef MJ_GEMV_MAX_T
#define MJ_GEMV_MAX_T 2
#endif
constexpr int64_t kGemvMaxT = MJ_GEMV_MAX_T;

template <class F>
static constexpr bool uses_gemv() {
  return MJ_FUSED_GEMV && (MjBlock32<F>::ok || KPair<F>::ok);
}

// The first `kfull` bytes of a row (whole runs of kLanes groups) into the interleaved layout.
template <int G>
static void interleave(uint8_t* p, int64_t kfull) {
  alignas(64) uint8_t tmp[kLanes * G];
  for (int64_t base = 0; base < kfull; base += kLanes * G) {
    std::memcpy(tmp, p + base, sizeof(tmp));
    for (int j = 0; j < G / 4; ++j)
      for (int l = 0; l < kLanes; ++l) std::memcpy(p + base + 64 * j + 4 * l, tmp + l * G + 4 * j, 4);
  }
}

static inline int64_t interleaved_bytes(int64_t T, int64_t K, int G) {
  return MJ_INTERLEAVE && T >= kInterleaveMinT ? K / (kLanes * G) * (kLanes * G) : 0;
}

// ---------------------------------------------------------------------------------------
// One chunk of output rows: unpack four rows at a time, dot them with every activation row.

struct Job {
  const MjFormat* fmt;
  const uint8_t* w;
  int64_t row_bytes, N, K;
  const Activations* act;
  float* y;
  int64_t rows_per_chunk, nchunks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

// Few tokens (T <= kGemvMaxT) on a 32-element block format or a KPair one: blocks are read in place
// (gemv32, gemvk), four rows at a time, each decoded register of weights serving two tokens.
template <class F, int NT>
static inline void gemv_tile(const uint8_t* const* rows, int64_t R, int64_t K, const int8_t* a, const float* da,
                             const float* qa, float* out) {
  if constexpr (KPair<F>::ok) {
    if (R == kRows) return gemvk<F, kRows, NT>(rows, K, a, da, qa, out, kRows);
    for (int64_t i = 0; i < R; ++i) gemvk<F, 1, NT>(rows + i, K, a, da, qa, out + i, kRows);
  } else {
    if (R == kRows) return gemv32<F, kRows, NT>(rows, K, a, da, qa, out, kRows);
    for (int64_t i = 0; i < R; ++i) gemv32<F, 1, NT>(rows + i, K, a, da, qa, out + i, kRows);
  }
}

template <class F>
static void run_rows_gemv(const Job& job, int64_t r0, int64_t r1) {
  const Activations& A = *job.act;
  const int64_t T = A.T, K = job.K, ng = K / F::group;
  for (int64_t r = r0; r < r1; r += kRows) {
    const int64_t R = std::min<int64_t>(kRows, r1 - r);
    const uint8_t* rows[kRows];
    for (int64_t i = 0; i < kRows; ++i) rows[i] = job.w + (r + std::min<int64_t>(i, R - 1)) * job.row_bytes;
    for (int64_t t = 0; t < T; t += 2) {
      float out[2][kRows] = {};
      const int8_t* a = A.a.data() + t * K;
      const float *da = A.da.data() + t * ng, *qa = A.qa.data() + t * ng;
      const int64_t nt = std::min<int64_t>(2, T - t);
      if (nt == 2)
        gemv_tile<F, 2>(rows, R, K, a, da, qa, out[0]);
      else
        gemv_tile<F, 1>(rows, R, K, a, da, qa, out[0]);
      for (int64_t n = 0; n < nt; ++n) std::memcpy(job.y + (t + n) * job.N + r, out[n], R * sizeof(float));
    }
  }
}

template <class F>
static void run_rows(const Job& job, int64_t r0, int64_t r1, std::vector<uint8_t>& buf) {
  constexpr int G = F::group, BPG = F::block / F::group;  // groups per block
  const int64_t K = job.K, T = job.act->T, ng = K / G, nb = K / F::block;
  if constexpr (uses_gemv<F>()) {
    if (T <= kGemvMaxT) return run_rows_gemv<F>(job, r0, r1);
  }
  const int64_t kfull = interleaved_bytes(T, K, G);
  buf.resize(kRows * (K + 2 * ng * sizeof(float)) + 64);
  uint8_t* u = buf.data();
  float* s = reinterpret_cast<float*>(u + kRows * K + (64 - (kRows * K) % 64) % 64);
  float* c = s + kRows * ng;
  const Activations& A = *job.act;
  // Tokens go in blocks whose codes stay in L2 (rows are unpacked again for each block), and
  // outputs of kSub rows gather in ybuf to go out one contiguous run per token: writing
  // y[t][r..r+3] for every t thrashes L1 when N * 4 bytes is a multiple of 4 KiB.
  const int64_t tblock = std::max<int64_t>(16, std::min<int64_t>(T, kActivationBytes / K));
  thread_local std::vector<float> ybuf;
  ybuf.resize(tblock * kSub);
  for (int64_t t0 = 0; t0 < T; t0 += tblock) {
    const int64_t t1 = std::min(T, t0 + tblock);
    for (int64_t r = r0; r < r1; r += kRows) {
      const int64_t R = std::min<int64_t>(kRows, r1 - r), sub0 = r0 + (r - r0) / kSub * kSub;
      for (int64_t i = 0; i < R; ++i) {
        const uint8_t* row = job.w + (r + i) * job.row_bytes;
        for (int64_t b = 0; b < nb; ++b)
          F::unpack(row + b * F::bytes, u + i * K + b * F::block, s + i * ng + b * BPG, c + i * ng + b * BPG);
        if (kfull) interleave<G>(u + i * K, kfull);
      }
      for (int64_t t = t0; t < t1; ++t)
        for (int64_t i = 0; i < R; ++i) ybuf[(t - t0) * kSub + (r - sub0) + i] = 0.0f;
      // K in slices whose unpacked rows stay in L1 while every token of the block passes.
      for (int64_t e0 = 0; e0 < K; e0 += kSlice) {
        const int64_t len = std::min<int64_t>(kSlice, K - e0), g0 = e0 / G;
        const int64_t kf = std::max<int64_t>(0, std::min<int64_t>(len, kfull - e0));
        for (int64_t t = t0; t < t1; ++t) {
          const int8_t* a = A.a.data() + t * K + e0;
          const float* da = A.da.data() + t * ng + g0;
          const float* qa = A.qa.data() + t * ng + g0;
          float* out = ybuf.data() + (t - t0) * kSub + (r - sub0);
#if MJ_PAIR_TOKENS
          if (R == kRows && t + 1 < t1) {  // two tokens per pass over the unpacked rows
            dot_rows<kRows, G, 2>(u + e0, s + g0, c + g0, len, K, kf, a, da, qa, out, K, ng, kSub);
            ++t;
            continue;
          }
#endif
          if (R == kRows) {
            dot_rows<kRows, G>(u + e0, s + g0, c + g0, len, K, kf, a, da, qa, out);
          } else {
            for (int64_t i = 0; i < R; ++i)
              dot_rows<1, G>(u + i * K + e0, s + i * ng + g0, c + i * ng + g0, len, K, kf, a, da, qa, out + i);
          }
        }
      }
      if (r + R == r1 || r + R - sub0 == kSub) {
        const int64_t cnt = r + R - sub0;
        for (int64_t t = t0; t < t1; ++t)
          std::memcpy(job.y + t * job.N + sub0, ybuf.data() + (t - t0) * kSub, cnt * sizeof(float));
      }
    }
  }
}

static void work(Job& job) {
  thread_local std::vector<uint8_t> buf;
  for (;;) {
    const int64_t k = job.next.fetch_add(1, std::memory_order_relaxed);
    if (k >= job.nchunks) break;
    const int64_t r0 = k * job.rows_per_chunk, r1 = std::min(job.N, r0 + job.rows_per_chunk);
    switch (job.fmt->type) {
#define MJ_CASE(name, id, blk, nbytes, grp) \
  case id:                                  \
    run_rows<Fmt_##name>(job, r0, r1, buf); \
    break;
      MJ_FORMATS(MJ_CASE)
#undef MJ_CASE
    }
    job.done.fetch_add(1, std::memory_order_release);
  }
}

// Whether a matmul of T tokens on `type` takes the fused GEMV (run_rows_gemv), and whether that
// reads the weights in paired order (Paired<F>).
static void gemv_route(int64_t type, int64_t T, bool* gemv, bool* paired) {
  *gemv = *paired = false;
  switch (type) {
#define MJ_CASE(name, id, blk, nbytes, grp)                 \
  case id:                                                  \
    *gemv = uses_gemv<Fmt_##name>() && T <= kGemvMaxT;      \
    *paired = *gemv && Paired<Fmt_##name>::ok;              \
    break;
    MJ_FORMATS(MJ_CASE)
#undef MJ_CASE
  }
}

// Each full 64-element chunk of activations into paired order (swap its second and third 16
// bytes), the order Paired<F>::codes decodes weights in.
static void pair_activations(int8_t* a, int64_t K) {
  for (int64_t e = 0; e + 64 <= K; e += 64) {
    int8_t tmp[16];
    std::memcpy(tmp, a + e + 16, 16);
    std::memcpy(a + e + 16, a + e + 32, 16);
    std::memcpy(a + e + 32, tmp, 16);
  }
}

#include "threads.h"

// ggml's vec_dot_type of each weight type: what its activations are quantized to. ggml's CPU
// backend has no vec_dot for Q8_1 or Q8_K weights (they are its activation types; ISQ can write
// them as weights), and HQQ has no llama.cpp peer. They take Q8_0 blocks: for Q8_1 that is what
// ggml names (its vec_dot_type Q8_1 has Q8_0's codes and d; the extra s only serves affine
// weights); for Q8_K it is our choice over Q8_K blocks (candle's), as one scale per 32 elements
// loses less than one per 256 (ISQ Q8K on SmolLM2: KL vs f32 0.0032 against 0.0051);
// for HQQ4/HQQ8, two blocks per 64-weight group.
static int act_kind(const MjFormat& f) {
  if (f.block == 256 && f.type != Fmt_q8_k::type) return kActQ8_K;
  return f.type == Fmt_q4_1::type || f.type == Fmt_q5_1::type ? kActQ8_1 : kActQ8_0;
}

static std::atomic<int64_t> g_pool_threads{0};  // XLA's intra-op threads seen by the last call

static ffi::Error QuantMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> w,
                                  ffi::ResultBuffer<ffi::F32> y, int64_t qtype, int64_t k) {
  const MjFormat* fmt = mj_format(qtype);
  if (fmt == nullptr) return ffi::Error::InvalidArgument("mistralrs quant_matmul: unsupported GGML type " +
                                                         std::to_string(qtype));
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2) return ffi::Error::InvalidArgument("x and w must be 2-D");
  const int64_t T = xd[0], K = xd[1], N = wd[0];
  if (K != k || K % fmt->block != 0 || wd[1] != K / fmt->block * fmt->bytes)
    return ffi::Error::InvalidArgument("mistralrs quant_matmul: shapes do not match the block format (K=" +
                                       std::to_string(K) + ", row bytes=" + std::to_string(wd[1]) + ")");
  if (T == 0 || N == 0) return ffi::Error::Success();

  // Kept per calling thread so that repeated calls reuse pages instead of faulting in new ones.
  thread_local Activations act;
  act.T = T, act.K = K, act.G = fmt->group;
  act.a.resize(T * K);
  act.da.resize(T * K / fmt->group);
  act.qa.resize(T * K / fmt->group);
  const int kind = act_kind(*fmt);
  for (int64_t t = 0; t < T; ++t)
    quantize_row(x.typed_data() + t * K, K, kind, fmt->group, act.a.data() + t * K,
                 act.da.data() + t * K / fmt->group, act.qa.data() + t * K / fmt->group);

  bool gemv, paired;
  gemv_route(qtype, T, &gemv, &paired);
  if (paired)
    for (int64_t t = 0; t < T; ++t) pair_activations(act.a.data() + t * K, K);
  if (const int64_t kfull = gemv ? 0 : interleaved_bytes(T, K, fmt->group)) {
    for (int64_t t = 0; t < T; ++t) {
      uint8_t* row = reinterpret_cast<uint8_t*>(act.a.data() + t * K);
      fmt->group == 32 ? interleave<32>(row, kfull) : interleave<16>(row, kfull);
    }
  }

  auto job = std::make_shared<Job>();
  job->fmt = fmt, job->w = w.typed_data(), job->row_bytes = wd[1], job->N = N, job->K = K;
  job->act = &act, job->y = y->typed_data();
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  g_pool_threads.store(threads, std::memory_order_relaxed);
  // ~4 chunks per thread so a thread that starts late still finds work; chunks of whole 4-row tiles.
  const int64_t tiles = (N + kRows - 1) / kRows;
  const int64_t per = std::max<int64_t>(1, tiles / (threads * 4));
  job->rows_per_chunk = per * kRows;
  job->nchunks = (N + job->rows_per_chunk - 1) / job->rows_per_chunk;
  // A thread per ~16K multiply-adds at most: a small matmul on a many-core machine is not spread
  // over all of them. (With a wake-up per call this was 256K; the spinning helpers are already
  // awake, and splitting SmolLM2's 192x576 k/v projections too made its decode step ~10%
  // faster in interleaved runs: 1<<14 11.58/12.30 ms, 1<<16 11.6-14.6 ms, 1<<18 12.9-13.7 ms.)
  const int64_t useful = std::max<int64_t>(1, N * K * T / kWorkPerThread);
  run_shared(pool, std::min({threads, job->nchunks, useful}) - 1, job, job->nchunks, work, T <= kSpinMaxT);
  return ffi::Error::Success();
}

// How every handler here is bound: XLA's intra-op thread pool, then an f32 input.
static inline auto mj_bind() { return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>(); }

XLA_FFI_DEFINE_HANDLER_SYMBOL(MjQuantMatmul, QuantMatmulImpl,
                              mj_bind()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("qtype")
                                  .Attr<int64_t>("k"));

#include "attention.h"

// ---------------------------------------------------------------------------------------
// Plain C entry points for tests and diagnostics.

extern "C" {
const char* mj_isa() { return MJ_ISA; }

int mj_supports(int64_t qtype) { return mj_format(qtype) != nullptr; }

int64_t mj_pool_threads() { return g_pool_threads.load(std::memory_order_relaxed); }

// x: T x K floats -> a (T x K int8), da and qa (T x K/G floats each), as the kernel quantizes
// activations for weights of type `qtype` (G: its group size, returned; -1: unsupported type or K).
int mj_quantize_rows(int64_t qtype, const float* x, int64_t T, int64_t K, int8_t* a, float* da, float* qa) {
  const MjFormat* f = mj_format(qtype);
  if (f == nullptr || K % f->block != 0) return -1;
  const int G = f->group;
  for (int64_t t = 0; t < T; ++t)
    quantize_row(x + t * K, K, act_kind(*f), G, a + t * K, da + t * K / G, qa + t * K / G);
  return G;
}

// One row of blocks -> u (K bytes), s and c (K/G floats each).
int mj_unpack_row(int64_t qtype, const uint8_t* row, int64_t K, uint8_t* u, float* s, float* c) {
  const MjFormat* f = mj_format(qtype);
  if (f == nullptr || K % f->block != 0) return -1;
  const int64_t bpg = f->block / f->group;
  for (int64_t b = 0; b < K / f->block; ++b) {
    switch (qtype) {
#define MJ_CASE(name, id, blk, nbytes, grp)                                                        \
  case id:                                                                                         \
    Fmt_##name::unpack(row + b * f->bytes, u + b * f->block, s + b * bpg, c + b * bpg); \
    break;
      MJ_FORMATS(MJ_CASE)
#undef MJ_CASE
    }
  }
  return f->group;
}
}
