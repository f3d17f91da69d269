// Paged attention of one-token decodes on CPU, reading the KV cache in place: an XLA FFI
// handler (included by qmatmul.cc, so it ships in the same library).
//
// It computes what `_decode_path` of pallas_kernels/paged_attention.py computes, the
// un-normalized softmax sums of each decode token over its own context:
//     l[n, h, g]      = sum_p exp(s_p - m)
//     acc[n, h, g, :] = sum_p exp(s_p - m) v_p          (m = max_p s_p)
// with s_p = softcap(q . k_p) over the visible key positions p (causal, optional sliding
// window), the keys read through the token's block table. The XLA reference gathers every
// 128-key chunk into a new buffer and transposes it for a dot, which on XLA:CPU cost more than
// the layer's matmuls at batch 1; here each key is read once where it lies. The scores of one
// (token, kv head) are kept in a buffer and exponentiated after their maximum is known (two
// passes instead of an online update); the sums differ from the reference's only in the order
// of the f32 roundings.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

// q . k over D elements: vector partial sums, one horizontal sum at the end.
static inline float mj_dot(const float* q, const float* k, int D) {
  int d = 0;
  float s = 0.0f;
#if defined(__AVX512F__)
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  for (; d + 32 <= D; d += 32) {
    s0 = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), _mm512_loadu_ps(k + d), s0);
    s1 = _mm512_fmadd_ps(_mm512_loadu_ps(q + d + 16), _mm512_loadu_ps(k + d + 16), s1);
  }
  for (; d + 16 <= D; d += 16) s0 = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), _mm512_loadu_ps(k + d), s0);
  s = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
#else
  __m256 s0 = _mm256_setzero_ps();
  for (; d + 8 <= D; d += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(k + d), s0);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(s0), _mm256_extractf128_ps(s0, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  s = _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)));
#endif
  for (; d < D; ++d) s += q[d] * k[d];
  return s;
}

// One (token, kv head): `q` holds the group's G query rows (pre-scaled), `l`, `acc` its sums.
static void mj_attend_one(const float* q, int G, int D, const float* k_cache, const float* v_cache, int64_t row_stride,
                          const int32_t* table, int64_t block_size, int64_t first, int64_t last, float soft_cap,
                          float* l, float* acc, std::vector<float>& scores) {
  const int64_t n_keys = last - first + 1;
  if (n_keys <= 0) {
    std::fill(l, l + G, 0.0f);
    std::fill(acc, acc + G * D, 0.0f);
    return;
  }
  scores.resize(n_keys * G + G);
  float* best = scores.data() + n_keys * G;  // each query row's largest score
  std::fill(best, best + G, -INFINITY);
  for (int64_t p = first; p <= last; ++p) {
    const int64_t slot = (int64_t)table[p / block_size] * block_size + p % block_size;
    const float* k = k_cache + slot * row_stride;
    for (int g = 0; g < G; ++g) {
      float s = mj_dot(q + g * D, k, D);
      if (soft_cap > 0.0f) s = soft_cap * std::tanh(s / soft_cap);
      scores[(p - first) * G + g] = s;
      best[g] = std::max(best[g], s);
    }
  }
  std::fill(l, l + G, 0.0f);
  std::fill(acc, acc + G * D, 0.0f);
  for (int64_t p = first; p <= last; ++p) {
    const int64_t slot = (int64_t)table[p / block_size] * block_size + p % block_size;
    const float* v = v_cache + slot * row_stride;
    for (int g = 0; g < G; ++g) {
      const float e = std::exp(scores[(p - first) * G + g] - best[g]);
      l[g] += e;
      float* out = acc + g * D;
      for (int d = 0; d < D; ++d) out[d] += e * v[d];
    }
  }
}

struct AttentionJob {
  const float *q, *k, *v;
  const int32_t *tables, *positions;
  float *l, *acc;
  int64_t n, kvh, G, D, max_blocks, block_size, window;
  float soft_cap;
  std::atomic<int64_t> next{0}, done{0};
};

static void mj_attention_work(AttentionJob& job) {
  thread_local std::vector<float> scores;
  const int64_t items = job.n * job.kvh;
  for (;;) {
    const int64_t i = job.next.fetch_add(1, std::memory_order_relaxed);
    if (i >= items) break;
    const int64_t n = i / job.kvh, h = i % job.kvh;
    const int64_t pos = job.positions[n];
    const int64_t first = job.window > 0 ? std::max<int64_t>(0, pos - job.window + 1) : 0;
    const int64_t GD = job.G * job.D;
    mj_attend_one(job.q + (n * job.kvh + h) * GD, (int)job.G, (int)job.D, job.k + h * job.D, job.v + h * job.D,
                  job.kvh * job.D, job.tables + n * job.max_blocks, job.block_size, first, pos, job.soft_cap,
                  job.l + (n * job.kvh + h) * job.G, job.acc + (n * job.kvh + h) * GD, scores);
    job.done.fetch_add(1, std::memory_order_release);
  }
}

// q [N, kvh, G, D] (scaled), k/v cache [slots, kvh, D], tables [N, max_blocks], positions [N],
// num_decode (scalar: rows n >= it get zero sums) -> l [N, kvh, G], acc [N, kvh, G, D].
static ffi::Error DecodeAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                                      ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> tables,
                                      ffi::Buffer<ffi::S32> positions, ffi::Buffer<ffi::S32> num_decode,
                                      ffi::ResultBuffer<ffi::F32> l, ffi::ResultBuffer<ffi::F32> acc,
                                      int64_t block_size, int64_t window, float soft_cap) {
  const auto qd = q.dimensions(), kd = k.dimensions(), td = tables.dimensions();
  if (qd.size() != 4 || kd.size() != 3 || td.size() != 2 || kd[1] != qd[1] || kd[2] != qd[3] || td[0] != qd[0])
    return ffi::Error::InvalidArgument("mistralrs decode attention: q [N, kvh, G, D], cache [slots, kvh, D] and "
                                       "tables [N, blocks] do not match");
  auto job = std::make_shared<AttentionJob>();
  job->n = std::min<int64_t>(qd[0], std::max<int32_t>(0, num_decode.typed_data()[0]));
  job->kvh = qd[1], job->G = qd[2], job->D = qd[3], job->max_blocks = td[1];
  job->block_size = block_size, job->window = window, job->soft_cap = soft_cap;
  job->q = q.typed_data(), job->k = k.typed_data(), job->v = v.typed_data();
  job->tables = tables.typed_data(), job->positions = positions.typed_data();
  job->l = l->typed_data(), job->acc = acc->typed_data();
  const int64_t rows = qd[0] * qd[1];
  std::fill(job->l + job->n * job->kvh * job->G, job->l + rows * job->G, 0.0f);
  std::fill(job->acc + job->n * job->kvh * job->G * job->D, job->acc + rows * job->G * job->D, 0.0f);
  const int64_t items = job->n * job->kvh;
  int64_t keys = 0;
  for (int64_t n = 0; n < job->n; ++n) keys += job->positions[n] + 1;
  const int64_t useful = std::max<int64_t>(1, keys * job->kvh * job->G * job->D * 2 / kWorkPerThread);
  const int64_t helpers = std::min({std::max<int64_t>(1, pool.num_threads()), items, useful}) - 1;
  run_shared(pool, helpers, job, items, mj_attention_work, /*short_job=*/true);
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(MjDecodeAttention, DecodeAttentionImpl,
                              mj_bind()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k cache
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v cache
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("block_size")
                                  .Attr<int64_t>("window")
                                  .Attr<float>("soft_cap"));
