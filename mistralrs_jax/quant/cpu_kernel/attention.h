// Paged attention on CPU for every row of a step, one-token decodes and prefill chunks alike,
// reading the KV cache in place: an XLA FFI handler (included by qmatmul.cc, so it ships in the
// same library).
//
// For each query row n (a token of sequence row token_seq[n] at position positions[n], its K/V
// already written to the cache) and each query head of KV head h it returns the un-normalized
// softmax sums over the row's visible keys p (causal, p <= pos; with a window, p > pos - window):
//     l[n, h, g]      = sum_p exp(s_p - m)
//     acc[n, h, g, :] = sum_p exp(s_p - m) v_p          (m = max_p s_p)
// with s_p = softcap(q . k_p), the keys read through the sequence's block table. This is what
// the XLA reference of pallas_kernels/paged_attention.py computes (its two paths gather key
// chunks into new buffers; here each key is read where it lies), up to the order of the f32
// roundings.
//
// Work items are tiles of consecutive rows of one sequence at consecutive positions, up to
// kTileQueries query vectors (a prefill chunk splits into such tiles, a decode row is a tile of
// its own), times the KV heads. A tile's scores are taken two keys by four query vectors at a
// time (eight independent FMA chains, each key row loaded once for four queries) into a buffer;
// each query's scores are exponentiated once its maximum is known (two passes, no online
// rescaling), and its values summed key by key in registers, two queries of a row per pass over
// the value rows. Every (query, key) pair, every exponential and every sum is computed the same
// way whichever tile a row falls in, so a row's sums do not depend on how the step batched its
// rows: a decode and a prefill (or a speculative verification) of the same position agree bit
// for bit (tests/test_attention_reference.py).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

constexpr int64_t kTileQueries = 64;  // query vectors (rows x query heads per KV head) per work item

static inline float mj_hsum8f(__m256 v) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)));
}

// exp of eight floats <= 0 (scores minus their maximum): 2^n * P(r), r = x - n ln 2 split in
// two parts (Cody-Waite), P Cephes' degree-6 polynomial for expf (relative error ~1e-7); under
// -87.3 the result is 0.
static inline __m256 mj_exp8(__m256 x) {
  const __m256 small = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_LT_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(small, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

// The vector the dot products and value sums run in: 16 floats with AVX-512 (the tail of D
// through a masked load), else 8 (the tail in scalars). One library is built for one ISA, so
// every pair of a run takes the same arithmetic.
#if defined(__AVX512F__)
constexpr int kAttnLanes = 16;
using mj_vec = __m512;
static inline mj_vec mj_vzero() { return _mm512_setzero_ps(); }
static inline mj_vec mj_vload(const float* p) { return _mm512_loadu_ps(p); }
static inline mj_vec mj_vload_tail(const float* p, int n) { return _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p); }
static inline void mj_vstore_tail(float* p, mj_vec x, int n) { _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1), x); }
static inline void mj_vstore(float* p, mj_vec x) { _mm512_storeu_ps(p, x); }
static inline mj_vec mj_vfma(mj_vec a, mj_vec b, mj_vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline mj_vec mj_vbroadcast(const float* p) { return _mm512_set1_ps(*p); }
static inline float mj_vsum(mj_vec v) {
  return mj_hsum8f(_mm256_add_ps(_mm512_castps512_ps256(v),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
}
#else
constexpr int kAttnLanes = 8;
using mj_vec = __m256;
static inline mj_vec mj_vzero() { return _mm256_setzero_ps(); }
static inline mj_vec mj_vload(const float* p) { return _mm256_loadu_ps(p); }
static inline mj_vec mj_vload_tail(const float* p, int n) {
  float t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  std::copy(p, p + n, t);
  return _mm256_loadu_ps(t);
}
static inline void mj_vstore_tail(float* p, mj_vec x, int n) {
  float t[8];
  _mm256_storeu_ps(t, x);
  std::copy(t, t + n, p);
}
static inline void mj_vstore(float* p, mj_vec x) { _mm256_storeu_ps(p, x); }
static inline mj_vec mj_vfma(mj_vec a, mj_vec b, mj_vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline mj_vec mj_vbroadcast(const float* p) { return _mm256_broadcast_ss(p); }
static inline float mj_vsum(mj_vec v) { return mj_hsum8f(v); }
#endif

// NKEYS key rows against NQ query vectors: one FMA chain per (query, key) over D, kAttnLanes at a
// time (the last chunk zero-padded), then its horizontal sum. Every pair takes the same
// arithmetic whatever NQ and NKEYS are.
template <int NQ, int NKEYS>
static inline void mj_dots(const float* const* q, const float* const* k, int D, float (*out)[4]) {
  mj_vec acc[NKEYS][NQ];
  for (int i = 0; i < NKEYS; ++i)
    for (int j = 0; j < NQ; ++j) acc[i][j] = mj_vzero();
  int d = 0;
  for (; d + kAttnLanes <= D; d += kAttnLanes) {
    mj_vec kv[NKEYS];
    for (int i = 0; i < NKEYS; ++i) kv[i] = mj_vload(k[i] + d);
    for (int j = 0; j < NQ; ++j) {
      const mj_vec qv = mj_vload(q[j] + d);
      for (int i = 0; i < NKEYS; ++i) acc[i][j] = mj_vfma(qv, kv[i], acc[i][j]);
    }
  }
  if (d < D) {
    mj_vec kv[NKEYS];
    for (int i = 0; i < NKEYS; ++i) kv[i] = mj_vload_tail(k[i] + d, D - d);
    for (int j = 0; j < NQ; ++j) {
      const mj_vec qv = mj_vload_tail(q[j] + d, D - d);
      for (int i = 0; i < NKEYS; ++i) acc[i][j] = mj_vfma(qv, kv[i], acc[i][j]);
    }
  }
  for (int i = 0; i < NKEYS; ++i)
    for (int j = 0; j < NQ; ++j) out[i][j] = mj_vsum(acc[i][j]);
}

// acc_j[0:D] = sum_i e_j[i] * v_i for NQ queries over the same keys (`slots`), in key order:
// one FMA chain per element, CH vectors of D at a time in registers, each value row loaded once
// for the NQ queries. Per element the same arithmetic whatever NQ is.
template <int NQ>
static inline void mj_weighted_values(const float* const* e, const int64_t* slots, int64_t n, const float* v,
                                      int64_t row_stride, int D, float* const* acc) {
  constexpr int CH = NQ == 1 ? 8 : 4;
  int d0 = 0;
  for (; d0 + CH * kAttnLanes <= D; d0 += CH * kAttnLanes) {
    mj_vec a[NQ][CH];
    for (int j = 0; j < NQ; ++j)
      for (int c = 0; c < CH; ++c) a[j][c] = mj_vzero();
    for (int64_t i = 0; i < n; ++i) {
      const float* vp = v + slots[i] * row_stride + d0;
      mj_vec w[NQ];
      for (int j = 0; j < NQ; ++j) w[j] = mj_vbroadcast(e[j] + i);
      for (int c = 0; c < CH; ++c) {
        const mj_vec x = mj_vload(vp + c * kAttnLanes);
        for (int j = 0; j < NQ; ++j) a[j][c] = mj_vfma(w[j], x, a[j][c]);
      }
    }
    for (int j = 0; j < NQ; ++j)
      for (int c = 0; c < CH; ++c) mj_vstore(acc[j] + d0 + c * kAttnLanes, a[j][c]);
  }
  for (; d0 < D; d0 += kAttnLanes) {
    const int width = std::min(kAttnLanes, D - d0);
    mj_vec a[NQ];
    for (int j = 0; j < NQ; ++j) a[j] = mj_vzero();
    for (int64_t i = 0; i < n; ++i) {
      const mj_vec x = mj_vload_tail(v + slots[i] * row_stride + d0, width);
      for (int j = 0; j < NQ; ++j) a[j] = mj_vfma(mj_vbroadcast(e[j] + i), x, a[j]);
    }
    for (int j = 0; j < NQ; ++j) mj_vstore_tail(acc[j] + d0, a[j], width);
  }
}

struct AttentionJob {
  const float *q, *k, *v;
  const int32_t *tables, *token_seq, *positions;
  float *l, *acc;
  int64_t kvh, G, D, max_blocks, block_size, window;
  float soft_cap;
  std::vector<int64_t> tiles;  // first row of each tile, then the end row
  std::atomic<int64_t> next{0}, done{0};
};

static inline int64_t mj_first_key(const AttentionJob& job, int64_t pos) {
  return job.window > 0 ? std::max<int64_t>(0, pos - job.window + 1) : 0;
}

// One tile of rows [r0, r1) and KV head h.
static void mj_attend_tile(const AttentionJob& job, int64_t r0, int64_t r1, int64_t h, std::vector<float>& scores,
                           std::vector<int64_t>& slots, std::vector<const float*>& qp) {
  const int G = (int)job.G, D = (int)job.D;
  const int64_t R = r1 - r0, M = R * G, GD = job.G * job.D, row_stride = job.kvh * job.D;
  const int64_t pos0 = job.positions[r0], kmin = mj_first_key(job, pos0), kmax = job.positions[r1 - 1];
  const int64_t nk = kmax - kmin + 1;
  const int32_t* table = job.tables + (int64_t)job.token_seq[r0] * job.max_blocks;
  const float* k = job.k + h * job.D;
  const float* v = job.v + h * job.D;
  scores.resize(M * nk + 8);
  slots.resize(nk);
  qp.resize(M);
  for (int64_t m = 0; m < M; ++m) qp[m] = job.q + ((r0 + m / G) * job.kvh + h) * GD + (m % G) * job.D;
  for (int64_t p = kmin; p <= kmax; ++p)
    slots[p - kmin] = (int64_t)table[p / job.block_size] * job.block_size + p % job.block_size;
  // Query vectors that see key p: rows with pos_r >= p (r >= p - pos0) and, with a window,
  // pos_r < p + window; both bounds grow with p.
  auto m_lo = [&](int64_t p) { return std::max<int64_t>(0, p - pos0) * G; };
  auto m_end = [&](int64_t p) {
    return (job.window > 0 ? std::min<int64_t>(R, std::max<int64_t>(0, p + job.window - pos0)) : R) * G;
  };
  auto store = [&](int64_t p, int64_t m, int n, const float* s) {
    const int64_t lo = m_lo(p), hi = m_end(p);
    for (int j = 0; j < n; ++j) {
      if (m + j < lo || m + j >= hi) continue;
      float x = s[j];
      if (job.soft_cap > 0.0f) x = job.soft_cap * std::tanh(x / job.soft_cap);
      scores[(m + j) * nk + (p - kmin)] = x;
    }
  };
  float s[2][4];
  int64_t p = kmin;
  for (; p + 1 <= kmax; p += 2) {  // two keys at a time, four query vectors at a time
    const float* kp[2] = {k + slots[p - kmin] * row_stride, k + slots[p + 1 - kmin] * row_stride};
    int64_t m = m_lo(p);
    const int64_t mend = m_end(p + 1);
    for (; mend - m >= 4; m += 4) mj_dots<4, 2>(qp.data() + m, kp, D, s), store(p, m, 4, s[0]), store(p + 1, m, 4, s[1]);
    if (mend - m >= 2) mj_dots<2, 2>(qp.data() + m, kp, D, s), store(p, m, 2, s[0]), store(p + 1, m, 2, s[1]), m += 2;
    if (mend - m >= 1) mj_dots<1, 2>(qp.data() + m, kp, D, s), store(p, m, 1, s[0]), store(p + 1, m, 1, s[1]);
  }
  if (p <= kmax) {
    const float* kp[1] = {k + slots[p - kmin] * row_stride};
    int64_t m = m_lo(p);
    const int64_t mend = m_end(p);
    for (; mend - m >= 4; m += 4) mj_dots<4, 1>(qp.data() + m, kp, D, s), store(p, m, 4, s[0]);
    if (mend - m >= 2) mj_dots<2, 1>(qp.data() + m, kp, D, s), store(p, m, 2, s[0]), m += 2;
    if (mend - m >= 1) mj_dots<1, 1>(qp.data() + m, kp, D, s), store(p, m, 1, s[0]);
  }
  // Each query: its maximum over its visible keys, the exponentials in place (eight at a time,
  // the tail through the same vector code), and their sum in key order.
  for (int64_t m = 0; m < M; ++m) {
    const int64_t r = r0 + m / G;
    const int64_t first = mj_first_key(job, job.positions[r]) - kmin, n = job.positions[r] - kmin - first + 1;
    float* e = scores.data() + m * nk + first;
    float* l = job.l + (r * job.kvh + h) * job.G + m % G;
    if (n <= 0) {
      *l = 0.0f;
      continue;
    }
    __m256 mx = _mm256_set1_ps(-INFINITY);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) mx = _mm256_max_ps(mx, _mm256_loadu_ps(e + i));
    float best = mj_hmax8(mx);
    for (; i < n; ++i) best = std::max(best, e[i]);
    const __m256 b = _mm256_set1_ps(best);
    // Sums in eight lanes over chunks counted from the row's first key, then one fixed
    // horizontal sum: the same order whatever tile the row is in.
    __m256 total = _mm256_setzero_ps();
    for (i = 0; i + 8 <= n; i += 8) {
      const __m256 x = mj_exp8(_mm256_sub_ps(_mm256_loadu_ps(e + i), b));
      _mm256_storeu_ps(e + i, x);
      total = _mm256_add_ps(total, x);
    }
    if (i < n) {
      float tail[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      std::copy(e + i, e + n, tail);
      const __m256 live = _mm256_cmp_ps(_mm256_set1_ps((float)(n - i)),
                                        _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), _CMP_GT_OQ);
      const __m256 x = _mm256_and_ps(live, mj_exp8(_mm256_sub_ps(_mm256_loadu_ps(tail), b)));
      _mm256_storeu_ps(tail, x);
      total = _mm256_add_ps(total, x);
      std::copy(tail, tail + (n - i), e + i);
    }
    *l = mj_hsum8f(total);
  }
  // The weighted values: the G queries of a row share its keys, two at a time.
  for (int64_t rr = 0; rr < R; ++rr) {
    const int64_t r = r0 + rr;
    const int64_t first = mj_first_key(job, job.positions[r]) - kmin, n = job.positions[r] - kmin - first + 1;
    float* acc = job.acc + (r * job.kvh + h) * GD;
    if (n <= 0) {
      std::fill(acc, acc + GD, 0.0f);
      continue;
    }
    const float* e = scores.data() + rr * G * nk + first;
    int g = 0;
    for (; g + 2 <= G; g += 2) {
      const float* es[2] = {e + g * nk, e + (g + 1) * nk};
      float* outs[2] = {acc + g * D, acc + (g + 1) * D};
      mj_weighted_values<2>(es, slots.data() + first, n, v, row_stride, D, outs);
    }
    if (g < G) {
      const float* es[1] = {e + g * nk};
      float* outs[1] = {acc + g * D};
      mj_weighted_values<1>(es, slots.data() + first, n, v, row_stride, D, outs);
    }
  }
}

static void mj_attention_work(AttentionJob& job) {
  thread_local std::vector<float> scores;
  thread_local std::vector<int64_t> slots;
  thread_local std::vector<const float*> qp;
  const int64_t items = (int64_t)(job.tiles.size() - 1) * job.kvh;
  for (;;) {
    const int64_t i = job.next.fetch_add(1, std::memory_order_relaxed);
    if (i >= items) break;
    const int64_t t = i / job.kvh, h = i % job.kvh;
    mj_attend_tile(job, job.tiles[t], job.tiles[t + 1], h, scores, slots, qp);
    job.done.fetch_add(1, std::memory_order_release);
  }
}

// q [N, kvh, G, D] (scaled), k/v cache [slots, kvh, D], block_tables [S, max_blocks],
// token_seq [N], positions [N], num_rows (scalar: rows n >= it get zero sums)
// -> l [N, kvh, G], acc [N, kvh, G, D].
static ffi::Error PagedAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                                     ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> tables,
                                     ffi::Buffer<ffi::S32> token_seq, ffi::Buffer<ffi::S32> positions,
                                     ffi::Buffer<ffi::S32> num_rows, ffi::ResultBuffer<ffi::F32> l,
                                     ffi::ResultBuffer<ffi::F32> acc, int64_t block_size, int64_t window,
                                     float soft_cap) {
  const auto qd = q.dimensions(), kd = k.dimensions(), td = tables.dimensions();
  if (qd.size() != 4 || kd.size() != 3 || td.size() != 2 || kd[1] != qd[1] || kd[2] != qd[3] ||
      token_seq.element_count() != qd[0] || positions.element_count() != qd[0])
    return ffi::Error::InvalidArgument("mistralrs paged attention: q [N, kvh, G, D], cache [slots, kvh, D], "
                                       "tables [S, blocks], token_seq [N] and positions [N] do not match");
  auto job = std::make_shared<AttentionJob>();
  const int64_t N = qd[0];
  const int64_t n = std::min<int64_t>(N, std::max<int32_t>(0, num_rows.typed_data()[0]));
  job->kvh = qd[1], job->G = qd[2], job->D = qd[3], job->max_blocks = td[1];
  job->block_size = block_size, job->window = window, job->soft_cap = soft_cap;
  job->q = q.typed_data(), job->k = k.typed_data(), job->v = v.typed_data();
  job->tables = tables.typed_data(), job->token_seq = token_seq.typed_data(), job->positions = positions.typed_data();
  job->l = l->typed_data(), job->acc = acc->typed_data();
  std::fill(job->l + n * job->kvh * job->G, job->l + N * job->kvh * job->G, 0.0f);
  std::fill(job->acc + n * job->kvh * job->G * job->D, job->acc + N * job->kvh * job->G * job->D, 0.0f);
  const int32_t* seq = job->token_seq;
  const int32_t* pos = job->positions;
  const int64_t tile_rows = std::max<int64_t>(1, kTileQueries / job->G);
  int64_t keys = 0;
  for (int64_t r = 0; r < n; ++r) {
    if (seq[r] < 0 || seq[r] >= td[0] || pos[r] < 0 || (pos[r] / block_size) >= td[1])
      return ffi::Error::InvalidArgument("mistralrs paged attention: a row's sequence or position is outside "
                                         "the block tables");
    if (r == 0 || seq[r] != seq[r - 1] || pos[r] != pos[r - 1] + 1 || r - job->tiles.back() >= tile_rows)
      job->tiles.push_back(r);
    keys += pos[r] + 1 - mj_first_key(*job, pos[r]);
  }
  job->tiles.push_back(n);
  const int64_t items = (int64_t)(job->tiles.size() - 1) * job->kvh;
  if (items <= 0) return ffi::Error::Success();
  const int64_t useful = std::max<int64_t>(1, keys * job->kvh * job->G * job->D * 4 / kWorkPerThread);
  const int64_t helpers = std::min({std::max<int64_t>(1, pool.num_threads()), items, useful}) - 1;
  run_shared(pool, helpers, job, items, mj_attention_work, /*short_job=*/n <= kSpinMaxT);
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(MjPagedAttention, PagedAttentionImpl,
                              mj_bind()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k cache
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v cache
                                  .Arg<ffi::Buffer<ffi::S32>>()  // block tables
                                  .Arg<ffi::Buffer<ffi::S32>>()  // token_seq
                                  .Arg<ffi::Buffer<ffi::S32>>()  // positions
                                  .Arg<ffi::Buffer<ffi::S32>>()  // num_rows
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("block_size")
                                  .Attr<int64_t>("window")
                                  .Attr<float>("soft_cap"));
