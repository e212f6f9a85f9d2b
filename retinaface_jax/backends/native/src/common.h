#ifndef RETINAFACE_JAX_NATIVE_SRC_COMMON_H_
#define RETINAFACE_JAX_NATIVE_SRC_COMMON_H_

// The helpers every kernel family of the native CPU kernels uses (cpu_conv.cc, see its opening
// comment): the standard and XLA FFI includes; the vector types (v8, v16) and their broadcast /
// load / store / activation helpers; the per-thread scratch buffers, prefetching, the zeros read
// for padding, BatchNorm's row moments, the parallel-for over XLA's thread pool and the task
// sizes. Shapes, row adapters and checks that several families use are defined by the first
// family that needs them, where the single file had them (conv.h: ConvShape, FloatImageRows,
// MeanSubtractedRows, the parameter checks, OutputMoments; depthwise.h: BatchNormRows,
// BatchNormInput, StatsCotangent, CotangentRows), so the translation unit keeps the single file's
// order. Included once, by cpu_conv.cc (a unity build: one translation unit), so its definitions
// live in an anonymous namespace.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"


namespace ffi = xla::ffi;

namespace {

typedef float v8 __attribute__((vector_size(32)));
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i8 __attribute__((vector_size(32)));   // int32 lanes of a v8
typedef int32_t i16 __attribute__((vector_size(64)));  // int32 lanes of a v16

// Lanes of a vector type (8 or 16 floats).
template <class V>
constexpr int lanes = int(sizeof(V) / sizeof(float));

template <class V = v8>
inline V bcast(float s) {  // (an initialiser list: a loop over lanes compiles to 16 inserts)
  if constexpr (lanes<V> == 8)
    return V{s, s, s, s, s, s, s, s};
  else
    return V{s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s};
}
template <class V = v8>
inline V loadu(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <class V>
inline void storeu(float* p, V v) { std::memcpy(p, &v, sizeof(v)); }
// y = v > 0 ? v : v * slope
template <class V>
inline V activate(V v, V slope) { return v > bcast<V>(0.f) ? v : v * slope; }

// Calls fn(V{}) with the widest vector type whose lanes divide n: 16 floats with AVX-512, else 8.
template <class Fn>
void with_vector_for(int64_t n, Fn&& fn) {
#if defined(__AVX512F__)
  if (n % 16 == 0) return fn(v16{});
#endif
  fn(v8{});
}

// A task's temporary buffer of T: per thread, reused across tasks and calls (a task needing
// several carves them from one block, or takes another Slot). A heap allocation per task had cost
// ~2.5 % of the train step's CPU time in malloc's bin searches and zero-filling. Contents are
// unspecified.
template <class T, int Slot = 0>
T* scratch(size_t n) {
  thread_local std::vector<T> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

// Asks for the `floats` floats at p to be fetched into cache (no fault if p is not mapped).
inline void prefetch(const float* p, int64_t floats) {
  for (int64_t i = 0; i < floats; i += 16) __builtin_prefetch(p + i);
}

// Prefetches rows [lo, hi) of image n (clamped to the image) of X [N, H, row floats]: a kernel
// streaming an image row by row asks for the rows its next step adds. It pays where a row is
// consumed right after it is read (the stem's forward: 3.1-3.4 -> 2.5-2.6 ms at batch 8); added
// to the 1x1, Winograd and kernel-gradient loops, which the hardware prefetcher already serves,
// it made them up to 1.3x slower.
inline void prefetch_rows(const float* X, int64_t n, int64_t H, int64_t row, int64_t lo,
                          int64_t hi) {
  for (int64_t ih = std::max<int64_t>(lo, 0); ih < std::min(hi, H); ++ih)
    prefetch(X + (n * H + ih) * row, row);
}

// Floats between buffers carved from one scratch block: one cache line, as heap neighbours had.
constexpr int64_t kScratchGap = 16;
constexpr int64_t kMaxCin = 4096;
alignas(64) const float kZeros[kMaxCin] = {0};  // read in place of padding pixels

// BatchNorm's batch statistics, one row at a time: the mean and M2 (the sum of squared deviations
// from that mean) per channel of a row [W][C] into out[0][C] and out[1][C]. Two passes over the
// row, the mean first, so the squares never cancel as a sum-of-squares formula's would at a large
// common offset; four partial sums per pass (one chain of dependent adds was latency-bound: 1.8x
// slower). A kernel that writes a BatchNorm's input calls it on each output row it has just
// written, while the row is in cache: the separate pass that read the whole tensor from memory
// again cost ~6 ms of the train step. The rows are then merged per image (OutputMoments).
template <class V>
void row_moments_at(const float* row, int64_t W, int64_t C, float* out) {
  const V w = bcast<V>(float(W));
  for (int64_t c0 = 0; c0 < C; c0 += lanes<V>) {
    const float* x = row + c0;
    V sp[4], qp[4];
    for (int k = 0; k < 4; ++k) sp[k] = qp[k] = bcast<V>(0.f);
    int64_t i = 0;
    for (; i + 4 <= W; i += 4)
      for (int k = 0; k < 4; ++k) sp[k] += loadu<V>(x + (i + k) * C);
    for (int k = 0; i < W; ++i, ++k) sp[k] += loadu<V>(x + i * C);
    const V mean = ((sp[0] + sp[1]) + (sp[2] + sp[3])) / w;
    for (i = 0; i + 4 <= W; i += 4)
      for (int k = 0; k < 4; ++k) {
        const V d = loadu<V>(x + (i + k) * C) - mean;
        qp[k] += d * d;
      }
    for (int k = 0; i < W; ++i, ++k) {
      const V d = loadu<V>(x + i * C) - mean;
      qp[k] += d * d;
    }
    storeu(out + c0, mean);
    storeu(out + C + c0, (qp[0] + qp[1]) + (qp[2] + qp[3]));
  }
}

// Row r's moments [2][C] of Y [rows][W][C] into M [rows][2][C]; nothing when M is null.
inline void row_moments(const float* Y, int64_t r, int64_t W, int64_t C, float* M) {
  if (!M) return;
  with_vector_for(C, [&](auto v) {
    row_moments_at<decltype(v)>(Y + r * W * C, W, C, M + r * 2 * C);
  });
}

// Runs fn(i) for i in [0, total) on the calling thread and XLA's intra-op pool. The caller takes
// items too and waits only for items already started, so it never waits on a queued task (no
// deadlock when every pool thread is itself inside a kernel).
void parallel_for(ffi::ThreadPool& pool, int64_t total, const std::function<void(int64_t)>& fn) {
  const int64_t threads = std::min<int64_t>(total, std::max<int64_t>(1, pool.num_threads()));
  if (threads <= 1) {
    for (int64_t i = 0; i < total; ++i) fn(i);
    return;
  }
  struct Job {
    std::atomic<int64_t> next{0}, done{0};
    int64_t total = 0;
    const std::function<void(int64_t)>* fn = nullptr;
  };
  auto job = std::make_shared<Job>();
  job->total = total;
  job->fn = &fn;
  auto work = [job]() {
    for (int64_t i; (i = job->next.fetch_add(1)) < job->total;) {
      (*job->fn)(i);
      job->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < threads; ++t) pool.Schedule([work]() { work(); });
  work();
  while (job->done.load(std::memory_order_acquire) < total) std::this_thread::yield();
}

// Splits `rows` output rows into tasks of about `min_work` multiply-adds (at least 1 row).
int64_t rows_per_task(int64_t rows, int64_t work_per_row, int64_t min_work = 200000) {
  const int64_t by_work = std::max<int64_t>(1, min_work / std::max<int64_t>(1, work_per_row));
  const int64_t by_count = std::max<int64_t>(1, rows / 16);
  return std::max(by_work, by_count);
}

}  // namespace

#endif  // RETINAFACE_JAX_NATIVE_SRC_COMMON_H_
