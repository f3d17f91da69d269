// How the CPU kernel's FFI handlers share their work between threads: run_shared and the
// spinning helper threads behind it (included by qmatmul.cc, after `namespace ffi` is defined).
#pragma once

#include <immintrin.h>
#include <pthread.h>
#include <sched.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

// Helper threads of our own that stay hot through a model step.
//
// A decode step makes ~250 kernel calls of 10-50 us each. Handing each one to XLA's intra-op
// pool (ffi::ThreadPool::Schedule) wakes a parked thread per call, and on a VM a wake-up costs
// a vCPU exit, the more so when the host is busy (the same SmolLM2 decode step measured 6.6 ms
// and, later the same evening, 12-13 ms). ggml avoids this with a spinning thread pool, and so
// do we: `helpers` threads (XLA's pool size - 1, so that they and the calling thread use the
// cores XLA uses) wait on a job counter for up to kSpinNs after each job, which bridges the
// gaps between a step's kernel calls (the host's ~1 ms between steps costs one wake-up per
// step), and then sleep on a condition variable. They spin with pause for the first kBusySpins
// turns and with sched_yield after, so that XLA's own threads get the core when they have work:
// pure spinning made the f32 engine's decode step (XLA dots between our attention calls) 1.8x
// slower; yielding costs it ~3% (25.9/27.5 ms against 25.1/26.8), while the packed engine's
// step is ~25% faster than with a wake-up per call (10.8/11.6 ms against 13.9/15.8,
// interleaved runs on a busy host). One caller at a time owns them; a call that finds them taken
// (XLA may run two independent thunks at once) uses XLA's pool as before.
constexpr int64_t kSpinNs = 200'000;
constexpr int kBusySpins = 1024;  // ~10-40 us of _mm_pause
constexpr int64_t kSpinMaxT = 8;  // tokens up to which a matmul is a decode-sized call (run_shared)

// The calling thread's wait for the last items of its job: spin briefly, then yield.
template <class Done>
static void wait_until(Done done) {
  for (int spins = 0; !done(); ++spins) {
    if (spins < 4096)
      _mm_pause();
    else
      std::this_thread::yield();
  }
}

class SpinPool {
 public:
  explicit SpinPool(int helpers) {
    for (int i = 0; i < helpers; ++i)
      threads_.emplace_back([this] {
        pthread_setname_np(pthread_self(), "mj-kernel");  // how profilers and top show it
        loop();
      });
  }
  int size() const { return (int)threads_.size(); }

  // Run `fn(job)` on this thread and the helpers; returns false (nothing run) when another
  // caller owns them. `finished()` must hold once every item of the job is done.
  template <class Finished>
  bool run(void (*fn)(void*), void* job, Finished finished) {
    if (owned_.exchange(true, std::memory_order_acquire)) return false;
    fn_ = fn;
    job_.store(job, std::memory_order_seq_cst);
    generation_.fetch_add(1, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lock(mutex_);
      cv_.notify_all();
    }
    fn(job);
    wait_until(finished);
    // No helper may touch `job` after this returns: retract it, then wait out those inside.
    job_.store(nullptr, std::memory_order_seq_cst);
    while (inside_.load(std::memory_order_seq_cst) > 0) _mm_pause();
    owned_.store(false, std::memory_order_release);
    return true;
  }

 private:
  static int64_t now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(
               std::chrono::steady_clock::now().time_since_epoch()).count();
  }

  void loop() {
    uint64_t seen = generation_.load();
    for (;;) {
      int64_t idle_since = now_ns();
      for (int spins = 1; generation_.load(std::memory_order_acquire) == seen; ++spins) {
        // Busy for the first few microseconds (the gaps between a step's kernel calls), then
        // yielding: a thread XLA runs meanwhile (an f32 dot on its own pool) gets the core.
        if (spins < kBusySpins)
          _mm_pause();
        else
          sched_yield();
        if (spins % 64 == 0 && now_ns() - idle_since > kSpinNs) {
          std::unique_lock<std::mutex> lock(mutex_);
          sleepers_.fetch_add(1, std::memory_order_seq_cst);
          cv_.wait(lock, [&] { return generation_.load() != seen; });
          sleepers_.fetch_sub(1, std::memory_order_seq_cst);
          idle_since = now_ns();
        }
      }
      seen = generation_.load(std::memory_order_acquire);
      inside_.fetch_add(1, std::memory_order_seq_cst);
      void* job = job_.load(std::memory_order_seq_cst);
      if (job != nullptr) fn_(job);
      inside_.fetch_sub(1, std::memory_order_seq_cst);
    }
  }

  std::vector<std::thread> threads_;
  std::atomic<bool> owned_{false};
  std::atomic<uint64_t> generation_{0};
  std::atomic<void*> job_{nullptr};
  void (*fn_)(void*) = nullptr;
  std::atomic<int> inside_{0}, sleepers_{0};
  std::mutex mutex_;
  std::condition_variable cv_;
};

// The helpers for an XLA pool of `pool_threads` threads, made on first use; none when XLA has
// one thread or MISTRALRS_JAX_KERNEL_SPIN=0. Never destroyed: a process exits with them parked.
static SpinPool* spin_pool(int64_t pool_threads) {
  static std::once_flag once;
  static SpinPool* pool = nullptr;
  std::call_once(once, [pool_threads] {
    const char* setting = std::getenv("MISTRALRS_JAX_KERNEL_SPIN");
    if (pool_threads > 1 && !(setting != nullptr && std::string(setting) == "0"))
      pool = new SpinPool((int)pool_threads - 1);
  });
  return pool;
}

template <class J>
struct BoundJob {
  J* job;
  void (*fn)(J&);
  static void call(void* bound) {
    auto* b = static_cast<BoundJob*>(bound);
    b->fn(*b->job);
  }
};

// `fn(*job)` on this thread and on up to `helpers` other threads; returns once job->done
// reaches `items`. Items are claimed, never handed out, so the only wait is for items already
// running. `short_job`: a decode-sized call (few tokens), which takes the spinning helpers when
// they are free; other calls (prefill chunks: long enough that a wake-up is noise, and run
// while XLA's pool runs other thunks beside them) and calls that find the helpers taken use
// XLA's pool. Spinning helpers under every call cost prefill ~25% (SmolLM2, 256 tokens: 740
// against 1021 tok/s); with short jobs only (T <= kSpinMaxT), interleaved runs are within the
// host's noise (890/931/715 against 842/921/839 tok/s).
template <class J>
static void run_shared(ffi::ThreadPool& pool, int64_t helpers, const std::shared_ptr<J>& job, int64_t items,
                       void (*fn)(J&), bool short_job) {
  if (helpers <= 0) return fn(*job);
  const auto done = [&] { return job->done.load(std::memory_order_acquire) >= items; };
  if (SpinPool* spin = short_job ? spin_pool(std::max<int64_t>(1, pool.num_threads())) : nullptr) {
    BoundJob<J> bound{job.get(), fn};
    if (spin->run(&BoundJob<J>::call, &bound, done)) return;
  }
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([job, fn]() { fn(*job); });
  fn(*job);
  wait_until(done);
}

