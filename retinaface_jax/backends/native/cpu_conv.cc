// CPU convolution kernels for RetinaFace inference, as XLA FFI handlers (NHWC, float32).
//
// XLA's CPU backend runs a convolution as a GEMM thunk followed by separate fused loops for the
// BatchNorm / activation epilogue, and writes depthwise convolutions as elementwise loops; for
// this network's small channel counts that costs extra passes over memory and loses to
// onnxruntime's MLAS. These kernels compute a whole conv -> BatchNorm -> activation layer (BN
// folded into weights and bias by the caller) in one pass:
//
//   retinaface_conv:    dense k x k convolution, any stride / padding, + bias, then per channel
//                       y = v > 0 ? v : v * slope[c]  (slope 0: ReLU, 0.1: LeakyReLU, 1: none).
//                       The input may be a channel slice of a wider tensor (cin, cin_offset).
//   retinaface_conv_u8: the same for a narrow first layer reading the uint8 image, minus a mean.
//   retinaface_conv_winograd: the same for 3x3 stride-1 layers (cin a multiple of 8) by Winograd
//                       F(4x4, 3x3): 36 multiply-adds per 4x4 output pixels instead of 144.
//   retinaface_conv_dw: MobileNet's depthwise-separable block: 3x3 depthwise (pad 1) + bias +
//                       activation, then 1x1 pointwise + bias + activation, one output row at a
//                       time (the depthwise row stays in cache).
//
//   retinaface_heads:   the 1x1 heads of every pyramid level in one call, reading the SSH output's
//                       three channel slices in place (no concatenation), into one [B, cells, CO].
//
//   retinaface_topk_nms: the top_k best-scoring candidates, then greedy NMS with the float32
//                       arithmetic of the original's py_cpu_nms (see RfTopkNmsImpl).
//
// For the CPU train step (weights as arrays, sums per image so the calls stay batch-parallel):
//   retinaface_depthwise / _grad: the 3x3 depthwise convolution (pad 1) and its input and kernel
//                       gradients;
//   retinaface_weight_grad: a dense convolution's kernel gradient (a GEMM over pixel blocks);
//   retinaface_weight_grad_u8: the stem's, reading the uint8 image minus a mean;
//   retinaface_moments / retinaface_bn_grad_sums: BatchNorm's batch statistics and backward sums.
//   retinaface_match_overlaps: MultiBoxLoss's matching, each face's best prior and each prior's
//                       best face, in one pass (see RfMatchOverlapsImpl).
// The layer kernels of the train step (retinaface_conv, _conv_u8, _conv_winograd, _depthwise,
// _depthwise_bn, _conv_bn) have a second result: empty, or their output's BatchNorm statistics
// per image [N, 2, CO], from each output row's moments computed right after the row is written
// (row_moments, OutputMoments).
//
// All parameters of a model live in one float32 buffer (one argument of the XLA program instead
// of ~130: dispatching a call flattens every argument); a kernel reads its layer's slices at the
// offsets given as attributes. The buffer is built by retinaface_jax/kernels/ops.py. Weights are
// packed as blocks of 16 output channels: [CO/16][K][16], then, if CO % 16 == 8, one [K][8]
// block; K = kh*kw*cin ordered (kh, kw, cin). The inner loop is a register tile of 6 pixels x 16
// channels (12 AVX2 accumulators) or, with AVX-512, 6 pixels x 32 channels (12 zmm accumulators)
// fed by broadcasts straight from the NHWC input (no im2col for cin >= 8); the K loop is split so
// one weight block stays in L1. Both vector widths add the same products in the same order. Rows of the output are shared
// between the calling thread and XLA's intra-op thread pool.
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

// acc[MRT pixels][NV vectors V of channels] (+)= x[pixel][k] * w[k][channels] over `taps` runs of
// `cin` k's (or tap_cin[t] for tap t; pixel j of tap t reads xp[t*MRT + j]); then bias +
// activation unless !final. The weights are packed in blocks of 16 channels, [K][16] each (or one
// [K][8] block for 8 channels): with 8-lane vectors the NV <= 2 vectors are one block's row, with
// 16-lane vectors vector b is block b, `bstride` floats after block 0.
template <int MRT, int NV, class V>
__attribute__((noinline)) void tile(const float* const* xp, int taps, int64_t cin, const float* w,
                                    int64_t bstride, const float* bias, const float* slope,
                                    float* y, int64_t ystride, int nvalid, bool accumulate,
                                    bool final, const int64_t* tap_cin = nullptr) {
  constexpr int L = lanes<V>;
  constexpr int64_t RW = L == 8 ? NV * 8 : 16;  // floats per k in one block
  const int64_t bs = L == 8 ? 8 : bstride;      // vector b's weights start b * bs floats on
  V acc[MRT][NV];
#pragma GCC unroll 16
  for (int j = 0; j < MRT; ++j)
#pragma GCC unroll 4
    for (int b = 0; b < NV; ++b)
      acc[j][b] = (accumulate && j < nvalid) ? loadu<V>(y + j * ystride + b * L) : bcast<V>(0.f);
  for (int t = 0; t < taps; ++t) {
    const float* p[MRT];
#pragma GCC unroll 16
    for (int j = 0; j < MRT; ++j) p[j] = xp[t * MRT + j];
    const int64_t ct = tap_cin ? tap_cin[t] : cin;  // tap_cin: taps of different widths
    const float* wt = w;
    w += ct * RW;
    for (int64_t c = 0; c < ct; ++c) {
      V wv[NV];
#pragma GCC unroll 4
      for (int b = 0; b < NV; ++b) wv[b] = loadu<V>(wt + b * bs + c * RW);
#pragma GCC unroll 16
      for (int j = 0; j < MRT; ++j) {
        const V s = bcast<V>(p[j][c]);
#pragma GCC unroll 4
        for (int b = 0; b < NV; ++b) acc[j][b] += s * wv[b];
      }
    }
  }
  if (!final) {
    for (int j = 0; j < nvalid; ++j)
      for (int b = 0; b < NV; ++b) storeu(y + j * ystride + b * L, acc[j][b]);
    return;
  }
  V bv[NV], sv[NV];
  for (int b = 0; b < NV; ++b) bv[b] = loadu<V>(bias + b * L), sv[b] = loadu<V>(slope + b * L);
  for (int j = 0; j < nvalid; ++j)
    for (int b = 0; b < NV; ++b) storeu(y + j * ystride + b * L, activate(acc[j][b] + bv[b], sv[b]));
}

// Tile shape tags: NV vectors of type V.
template <int NV, class V>
struct Span {
  static constexpr int nv = NV;
  static constexpr int width = NV * lanes<V>;
  using vec = V;
};

// The widest span: 32 channels (two 16-lane vectors) with AVX-512, else 16 (two 8-lane vectors).
#if defined(__AVX512F__)
constexpr int64_t kSpanMax = 32;
#else
constexpr int64_t kSpanMax = 16;
#endif

// Calls fn(Span<NV, V>{}) for a span of `width` output channels (kSpanMax, 16 or 8).
template <class Fn>
void with_span(int64_t width, Fn&& fn) {
#if defined(__AVX512F__)
  if (width == 32) return fn(Span<2, v16>{});
  if (width == 16) return fn(Span<1, v16>{});
#else
  if (width == 16) return fn(Span<2, v8>{});
#endif
  fn(Span<1, v8>{});
}

// Calls fn(Span<NV, V>{}, c0, wblk, bstride) over the output channels [0, CO) (a multiple of 8)
// of weights packed for K inputs (blocks of 16 channels, [K][16] each, then maybe one [K][8]):
// spans of kSpanMax channels, then of 16, then of 8; span c0's first block at wblk, its next
// block bstride floats on.
template <class Fn>
void for_each_span(int64_t CO, int64_t K, const float* wp, Fn&& fn) {
  for (int64_t c0 = 0; c0 < CO;) {
    const int64_t width = CO - c0 >= kSpanMax ? kSpanMax : CO - c0 >= 16 ? 16 : 8;
    with_span(width, [&](auto span) { fn(span, c0, wp + c0 * K, K * 16); });
    c0 += width;
  }
}

constexpr int MR = 6;  // pixels per register tile (x 16 or 32 channels = 12 accumulators)

// Runs the packed weight blocks over tiles of one output row. ptrs: [ntiles][taps][MR].
void conv_row_blocks(const float* const* ptrs, int64_t ntiles, int64_t OW, int taps, int64_t cin,
                     const float* wp, const float* bias, const float* slope, float* yrow,
                     int64_t CO, bool epilogue = true) {
  const int64_t K = taps * cin;
  // taps per K block: one 16-channel weight block of a K block fits in ~16 KB of L1
  const int64_t fit = std::max<int64_t>(1, std::min<int64_t>(taps, 16384 / (cin * 64)));
  const int64_t nblocks = (taps + fit - 1) / fit;
  const int tpb = int((taps + nblocks - 1) / nblocks);  // equal blocks: 9 taps -> 3 x 3, not 4+4+1
  for_each_span(CO, K, wp, [&](auto span, int64_t c0, const float* wblk, int64_t bstride) {
    using S = decltype(span);
    const int64_t rw = std::min(S::width, 16);  // floats per k in one block
    for (int t0 = 0; t0 < taps; t0 += tpb) {
      const int nt = std::min(tpb, taps - t0);
      const bool first = t0 == 0, last = t0 + nt >= taps;
      for (int64_t tt = 0; tt < ntiles; ++tt) {
        const int nvalid = int(std::min<int64_t>(MR, OW - tt * MR));
        tile<MR, S::nv, typename S::vec>(ptrs + (tt * taps + t0) * MR, nt, cin,
                                         wblk + t0 * cin * rw, bstride, bias + c0, slope + c0,
                                         yrow + tt * MR * CO + c0, CO, nvalid, !first,
                                         last && epilogue);
      }
    }
  });
}

// Narrow inputs (the 3-channel stem). Interior 12-pixel tiles of an 8-channel output read the
// input directly (pixel j starts stride*C floats after pixel j-1: constant offsets for SC == 6,
// i.e. stride 2 over 3 channels); other tiles are gathered (im2col) first.
template <int MRT, int SC>
inline void narrow_direct(const float* const* rowp, int kh, int kwc, const float* w,
                          const float* bias, const float* slope, float* y, int64_t ystride) {
  v8 acc[MRT];
#pragma GCC unroll 16
  for (int j = 0; j < MRT; ++j) acc[j] = bcast(0.f);
  for (int i = 0; i < kh; ++i) {
    const float* p = rowp[i];
    const float* wt = w + i * kwc * 8;
    for (int q = 0; q < kwc; ++q) {
      const v8 wv = loadu(wt + q * 8);
#pragma GCC unroll 16
      for (int j = 0; j < MRT; ++j) acc[j] += bcast(p[j * SC + q]) * wv;
    }
  }
  const v8 bv = loadu(bias), sv = loadu(slope);
#pragma GCC unroll 16
  for (int j = 0; j < MRT; ++j) storeu(y + j * ystride, activate(acc[j] + bv, sv));
}

struct ConvShape {
  int64_t N, H, W, CX, C, coff, OH, OW, CO, kh, kw, stride, pad;
};

// Row ih of image n of a float32 [N, H, row] tensor (an NHWC input: row = W * C), read in place.
struct FloatImageRows {
  const float* X;
  int64_t H, row;
  const float* operator()(int64_t n, int64_t ih) const { return X + (n * H + ih) * row; }
};

// Rows of a uint8 NHWC image as float32 minus a per-channel mean, converted on first use into
// `slots` row buffers (row ih in slot ih % slots: the kh rows an output row reads never collide).
// float(u) - mean is one float32 rounding, as XLA's convert-then-subtract: the same values.
struct MeanSubtractedRows {
  const uint8_t* X;
  const ConvShape& s;
  const float* mean;  // [CX]
  int64_t slots;
  std::vector<float> buf, pattern;  // pattern: the mean repeated over 8 * CX floats
  std::vector<int64_t> tag;
  MeanSubtractedRows(const uint8_t* x, const ConvShape& shape, const float* m, int64_t nslots)
      : X(x), s(shape), mean(m), slots(nslots), buf(size_t(nslots * shape.W * shape.CX) + 8),
        pattern(size_t(8 * shape.CX)), tag(size_t(nslots), -1) {
    for (size_t i = 0; i < pattern.size(); ++i) pattern[i] = mean[i % size_t(s.CX)];
  }
  const float* operator()(int64_t n, int64_t ih) {
    const int64_t key = n * s.H + ih, slot = ih % slots;
    float* row = buf.data() + slot * s.W * s.CX;
    if (tag[size_t(slot)] == key) return row;
    const uint8_t* u = X + key * s.W * s.CX;
    const int64_t len = s.W * s.CX, period = 8 * s.CX;  // period: a multiple of 8 and of CX
    int64_t i = 0;
    for (int64_t j = 0; i + 8 <= len; i += 8, j = j + 8 == period ? 0 : j + 8) {  // j = i % period
      // (written element-wise, GCC emits one vpmovzxbd; a u8 vector convert goes scalar)
      const i8 w = {u[i], u[i + 1], u[i + 2], u[i + 3], u[i + 4], u[i + 5], u[i + 6], u[i + 7]};
      storeu(row + i, __builtin_convertvector(w, v8) - loadu(pattern.data() + j));
    }
    for (; i < len; ++i) row[i] = float(u[i]) - mean[i % s.CX];
    tag[size_t(slot)] = key;
    return row;
  }
};

template <class Rows>
void conv_narrow_rows(const ConvShape& s, Rows& input, const float* wp, const float* bias,
                      const float* slope, float* Y, int64_t r0, int64_t r1, float* M = nullptr) {
  const int64_t K = s.kh * s.kw * s.C;
  std::vector<float> buf(size_t(12) * K, 0.f);
  const float* ptrs[12];
  const float* rowp[16];
  std::vector<const float*> rows(size_t(s.kh));  // the output row's input rows (nullptr: outside)
  const bool direct = s.CO == 8 && s.stride * s.CX == 6 && s.C == s.CX && s.kh <= 16;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n = r / s.OH, oh = r % s.OH, ih0 = oh * s.stride - s.pad;
    float* yrow = Y + r * s.OW * s.CO;
    for (int64_t i = 0; i < s.kh; ++i)
      rows[size_t(i)] = ih0 + i >= 0 && ih0 + i < s.H ? input(n, ih0 + i) : nullptr;
    if constexpr (std::is_same_v<Rows, FloatImageRows>)  // the next output row's new input rows
      prefetch_rows(input.X, n, s.H, input.row, ih0 + s.kh, ih0 + s.stride + s.kh);
    for (int64_t ow0 = 0; ow0 < s.OW; ow0 += 12) {
      const int nvalid = int(std::min<int64_t>(12, s.OW - ow0));
      const int64_t iw_first = ow0 * s.stride - s.pad;
      const int64_t iw_last = (ow0 + 11) * s.stride - s.pad + s.kw - 1;
      if (direct && nvalid == 12 && ih0 >= 0 && ih0 + s.kh <= s.H && iw_first >= 0 &&
          iw_last < s.W) {
        for (int64_t i = 0; i < s.kh; ++i) rowp[i] = rows[size_t(i)] + iw_first * s.CX;
        narrow_direct<12, 6>(rowp, int(s.kh), int(s.kw * s.C), wp, bias, slope, yrow + ow0 * s.CO, s.CO);
        continue;
      }
      for (int m = 0; m < nvalid; ++m) {
        float* o = buf.data() + m * K;
        const int64_t iw0 = (ow0 + m) * s.stride - s.pad;
        for (int64_t i = 0; i < s.kh; ++i) {
          for (int64_t j = 0; j < s.kw; ++j) {
            const int64_t iw = iw0 + j;
            const float* row = rows[size_t(i)];
            const float* src = row && iw >= 0 && iw < s.W ? row + iw * s.CX + s.coff : kZeros;
            for (int64_t c = 0; c < s.C; ++c) *o++ = src[c];
          }
        }
      }
      for (int m = 0; m < 12; ++m) ptrs[m] = m < nvalid ? buf.data() + m * K : kZeros;
      for (int64_t half = 0; half < 2; ++half) {
        const int nv = std::min(nvalid - int(half) * 6, 6);
        if (nv > 0)
          conv_row_blocks(ptrs + half * 6, 1, nv, 1, K, wp, bias, slope, yrow + (ow0 + half * 6) * s.CO,
                          s.CO);
      }
    }
    row_moments(Y, r, s.OW, s.CO, M);
  }
}

void conv_rows(const ConvShape& s, const float* X, const float* wp, const float* bias,
               const float* slope, float* Y, int64_t r0, int64_t r1, float* M) {
  const int taps = int(s.kh * s.kw);
  const int64_t ntiles = (s.OW + MR - 1) / MR;
  const float** ptrs = scratch<const float*>(size_t(ntiles) * taps * MR);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n = r / s.OH, oh = r % s.OH;
    for (int64_t tt = 0; tt < ntiles; ++tt) {
      const int64_t ow0 = tt * MR;
      int t = 0;
      for (int64_t i = 0; i < s.kh; ++i) {
        const int64_t ih = oh * s.stride + i - s.pad;
        for (int64_t j = 0; j < s.kw; ++j, ++t) {
          for (int m = 0; m < MR; ++m) {
            const int64_t iw = (ow0 + m) * s.stride + j - s.pad;
            const bool ok = ih >= 0 && ih < s.H && iw >= 0 && iw < s.W && ow0 + m < s.OW;
            ptrs[(tt * taps + t) * MR + m] = ok ? X + ((n * s.H + ih) * s.W + iw) * s.CX + s.coff : kZeros;
          }
        }
      }
    }
    conv_row_blocks(ptrs, ntiles, s.OW, taps, s.C, wp, bias, slope, Y + r * s.OW * s.CO, s.CO);
    row_moments(Y, r, s.OW, s.CO, M);
  }
}

// Winograd F(4x4, 3x3) for stride-1 3x3 layers (Lavin & Gray, 2016): each 4x4 block of output
// pixels ("tile") is A^T [U (.) V] A with V = B^T d B the tile's 6x6 input patch d transformed,
// U = G g G^T the 3x3 kernel transformed once by the caller (36 * C * CO packed weights, one
// [C x CO] matrix per element xi of the 6x6 grid; see ops.winograd_weights). The 36 products
// U[xi] . V[xi] over the input channels are matrix products run by the register tile: 36
// multiply-adds per 16 output pixels and channel pair instead of 144 (F(2x2, 3x3): 16 per 4).
// Every tile goes through the same expressions, zeros read outside the image, so a padded image
// with a zeroed border gives the unpadded image's bits.
constexpr int WT = 12;  // tiles transformed and multiplied together (2 register tiles)
constexpr int WA = 6;   // transformed tile side (4 outputs + 3 - 1)
// Floats between consecutive ones of the 36 transformed matrices beyond their size: one cache line,
// so the 36 are not all in the same L1 sets when their size is a multiple of 4 KB (the kernel
// gradient's [32 tiles x 64 channels] were: 1.75x slower).
constexpr int64_t kWinogradPad = 16;

// B^T d for one column of six inputs (rows of B^T: the interpolation points 0, +-1, +-2, inf).
template <class V>
inline void winograd_bt(const V d[6], V t[6]) {
  const V four = bcast<V>(4.f), five = bcast<V>(5.f), two = bcast<V>(2.f);
  t[0] = four * d[0] - five * d[2] + d[4];
  t[1] = d[3] + d[4] - four * (d[1] + d[2]);
  t[2] = d[4] - d[3] + four * (d[1] - d[2]);
  t[3] = d[4] - d[2] + two * (d[3] - d[1]);
  t[4] = d[4] - d[2] + two * (d[1] - d[3]);
  t[5] = four * d[1] - five * d[3] + d[5];
}

// A^T m for one column of six products: four outputs.
template <class V>
inline void winograd_at(const V m[6], V r[4]) {
  const V two = bcast<V>(2.f), four = bcast<V>(4.f), eight = bcast<V>(8.f);
  const V s12 = m[1] + m[2], d12 = m[1] - m[2], s34 = m[3] + m[4], d34 = m[3] - m[4];
  r[0] = m[0] + s12 + s34;
  r[1] = d12 + two * d34;
  r[2] = s12 + four * s34;
  r[3] = d12 + eight * d34 + m[5];
}

// V[xi][j][c] (at V + xi * xs + j * C + c) for tiles j < nt of tile row (n, ty), tiles
// tx0 .. tx0 + nt - 1.
template <class Vec>
void winograd_input(const ConvShape& s, const float* X, int64_t n, int64_t ty, int64_t tx0, int nt,
                    float* V, int64_t xs) {
  const int64_t C = s.C;
  for (int j = 0; j < nt; ++j) {
    const int64_t ih0 = 4 * ty - s.pad, iw0 = 4 * (tx0 + j) - s.pad;
    const float* src[WA][WA];
    for (int a = 0; a < WA; ++a)
      for (int b = 0; b < WA; ++b) {
        const int64_t ih = ih0 + a, iw = iw0 + b;
        const bool ok = ih >= 0 && ih < s.H && iw >= 0 && iw < s.W;
        src[a][b] = ok ? X + ((n * s.H + ih) * s.W + iw) * s.CX + s.coff : kZeros;
      }
    for (int64_t c = 0; c < C; c += lanes<Vec>) {
      Vec t[WA][WA];  // t[i][b] = (B^T d)[i][b]
      for (int b = 0; b < WA; ++b) {
        Vec d[WA], col[WA];
        for (int a = 0; a < WA; ++a) d[a] = loadu<Vec>(src[a][b] + c);
        winograd_bt(d, col);
        for (int i = 0; i < WA; ++i) t[i][b] = col[i];
      }
      for (int i = 0; i < WA; ++i) {  // (B^T d) B: row i of t through B^T again
        Vec v[WA];
        winograd_bt(t[i], v);
        for (int k = 0; k < WA; ++k) storeu(V + (i * WA + k) * xs + j * C + c, v[k]);
      }
    }
  }
}

// Y for tiles j < nt from M[xi][j][co] (at M + xi * xs + j * CO + co): A^T M A + bias,
// activation; pixels outside OH x OW dropped.
template <class V>
void winograd_output(const ConvShape& s, const float* M, int64_t xs, int64_t n, int64_t ty,
                     int64_t tx0, int nt, const float* bias, const float* slope, float* Y) {
  const int64_t CO = s.CO;
  for (int j = 0; j < nt; ++j) {
    const int64_t oh0 = 4 * ty, ow0 = 4 * (tx0 + j);
    const int rows = int(std::min<int64_t>(4, s.OH - oh0)), cols = int(std::min<int64_t>(4, s.OW - ow0));
    float* y0 = Y + ((n * s.OH + oh0) * s.OW + ow0) * CO;
    for (int64_t c = 0; c < CO; c += lanes<V>) {
      V r[4][WA];  // r[i][b] = (A^T M)[i][b]
      for (int b = 0; b < WA; ++b) {
        V m[WA], col[4];
        for (int a = 0; a < WA; ++a) m[a] = loadu<V>(M + (a * WA + b) * xs + j * CO + c);
        winograd_at(m, col);
        for (int i = 0; i < 4; ++i) r[i][b] = col[i];
      }
      const V bv = loadu<V>(bias + c), sv = loadu<V>(slope + c);
      for (int i = 0; i < rows; ++i) {
        V out[4];
        winograd_at(r[i], out);
        for (int k = 0; k < cols; ++k) storeu(y0 + (i * s.OW + k) * CO + c, activate(out[k] + bv, sv));
      }
    }
  }
}

void winograd_rows(const ConvShape& s, const float* X, const float* U, const float* bias,
                   const float* slope, float* Y, int64_t r0, int64_t r1, float* M) {
  const int64_t TH = (s.OH + 3) / 4, TW = (s.OW + 3) / 4, C = s.C, CO = s.CO;
  const int64_t vs = WT * C + kWinogradPad, ms = WT * CO + kWinogradPad;
  float* V = scratch<float>(size_t(WA * WA) * (vs + ms) + kScratchGap);
  float* P = V + WA * WA * vs + kScratchGap;  // the products
  const float* ptrs[WT];
  // A group of WT tiles runs of tile rows [r0, r1) in order, across row ends: a row's last
  // tiles share the register tiles with the next row's first (20 tiles a row at 80 x 80 were
  // 12 + 8, the 8 filling two 6-pixel register tiles to 8 of 12).
  struct Run {
    int64_t n, ty, tx0;
    int nt, at;  // tiles, and the first one's place in the group
  };
  Run runs[WT];
  int nruns = 0, filled = 0;
  auto multiply_and_output = [&] {
    const int ntiles = (filled + MR - 1) / MR;
    for (int xi = 0; xi < WA * WA; ++xi) {
      const float* v = V + xi * vs;
      for (int j = 0; j < ntiles * MR; ++j) ptrs[j] = j < filled ? v + j * C : kZeros;
      conv_row_blocks(ptrs, ntiles, filled, 1, C, U + int64_t(xi) * C * CO, bias, slope,
                      P + xi * ms, CO, false);
    }
    for (int i = 0; i < nruns; ++i) {
      const Run& run = runs[i];
      with_vector_for(CO, [&](auto v) {
        winograd_output<decltype(v)>(s, P + run.at * CO, ms, run.n, run.ty, run.tx0, run.nt, bias,
                                     slope, Y);
      });
      if (run.tx0 + run.nt == TW)  // the tile row is complete: its output rows' moments
        for (int64_t oh = 4 * run.ty; oh < std::min(4 * run.ty + 4, s.OH); ++oh)
          row_moments(Y, run.n * s.OH + oh, s.OW, CO, M);
    }
    nruns = filled = 0;
  };
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n = r / TH, ty = r % TH;
    for (int64_t tx0 = 0; tx0 < TW;) {
      const int nt = int(std::min<int64_t>(WT - filled, TW - tx0));
      with_vector_for(C, [&](auto v) {
        winograd_input<decltype(v)>(s, X, n, ty, tx0, nt, V + filled * C, vs);
      });
      runs[nruns++] = {n, ty, tx0, nt, filled};
      filled += nt;
      tx0 += nt;
      if (filled == WT) multiply_and_output();
    }
  }
  if (filled) multiply_and_output();
}

// params[offset : offset + n] must lie inside the parameter buffer.
ffi::Error check_slice(const ffi::Buffer<ffi::F32>& params, int64_t offset, int64_t n,
                       const char* what) {
  const int64_t size = int64_t(params.element_count());
  if (offset < 0 || n < 0 || n > size || offset > size - n)  // no overflow for huge offsets
    return ffi::Error::InvalidArgument(std::string(what) + ": " + std::to_string(n) +
                                       " values at offset " + std::to_string(offset) +
                                       " do not fit the parameter buffer of " +
                                       std::to_string(size) + " values");
  return ffi::Error::Success();
}

// A layer's weights (nw values), bias and slopes (co each) must lie inside the parameter buffer;
// errors name `what` (e.g. "retinaface_conv") and the part.
ffi::Error check_layer(const ffi::Buffer<ffi::F32>& params, const std::string& what, int64_t nw,
                       int64_t co, int64_t w_offset, int64_t b_offset, int64_t s_offset) {
  if (auto e = check_slice(params, w_offset, nw, (what + " weights").c_str()); e.failure()) return e;
  if (auto e = check_slice(params, b_offset, co, (what + " bias").c_str()); e.failure()) return e;
  return check_slice(params, s_offset, co, (what + " slope").c_str());
}

// The shape of a layer from x [N, H, W, CX] to y [N, OH, OW, CO] reading channels
// [coff, coff + cin) of x with a kh x kw kernel: checked (NHWC, CO a multiple of 8, the slice
// inside x, the output size of the stride and padding); errors name `what`.
template <class Dims>
ffi::ErrorOr<ConvShape> conv_shape(const std::string& what, Dims xd, Dims yd, int64_t cin,
                                   int64_t coff, int64_t kh, int64_t kw, int64_t stride,
                                   int64_t pad) {
  if (xd.size() != 4 || yd.size() != 4)
    return ffi::Unexpected(ffi::Error::InvalidArgument(what + ": x and y must be NHWC (rank 4)"));
  ConvShape s{xd[0], xd[1], xd[2], xd[3], cin, coff, yd[1], yd[2], yd[3], kh, kw, stride, pad};
  const bool ok = s.CO % 8 == 0 && s.C >= 1 && s.C <= kMaxCin && s.coff >= 0 &&
                  s.coff + s.C <= s.CX && stride >= 1 && pad >= 0 && kh >= 1 && kw >= 1 &&
                  yd[0] == s.N && s.OH == (s.H + 2 * pad - kh) / stride + 1 &&
                  s.OW == (s.W + 2 * pad - kw) / stride + 1 && s.OH >= 1 && s.OW >= 1;
  if (!ok)
    return ffi::Unexpected(ffi::Error::InvalidArgument(what + ": inconsistent shapes or attributes"));
  return s;
}

// One image's moments out [2][C] (mean, M2) from those of its rows, rows [OH][2][C] (each over
// W pixels): the rows merged in order by Chan et al.'s update (no cancellation).
template <class V>
void merge_image_moments(const float* rows, int64_t OH, int64_t W, int64_t C, float* out) {
  const V w = bcast<V>(float(W));
  for (int64_t c0 = 0; c0 < C; c0 += lanes<V>) {
    V mean = bcast<V>(0.f), m2 = bcast<V>(0.f);
    for (int64_t r = 0; r < OH; ++r) {  // rows 0 .. r - 1 (r * W values) with row r (W values)
      const V rm = loadu<V>(rows + r * 2 * C + c0), q = loadu<V>(rows + (r * 2 + 1) * C + c0);
      const V n_old = bcast<V>(float(r * W)), n_new = bcast<V>(float((r + 1) * W));
      const V delta = rm - mean;
      mean += delta * (w / n_new);
      m2 += q + delta * delta * (n_old * w / n_new);
    }
    storeu(out + c0, mean);
    storeu(out + C + c0, m2);
  }
}

// A kernel's BatchNorm statistics of y [N, OH, OW, CO] (or of an input, for retinaface_moments):
// per image [N, 2, CO] (mean, M2) into `out`, or none (out null). The kernel passes rows() to
// row_moments for every row it writes, then calls finish(), which merges each image's rows.
struct OutputMoments {
  float* out = nullptr;
  int64_t N = 0, OH = 0, OW = 0, CO = 0;
  std::vector<float> buf;  // [N * OH][2][CO]
  float* rows() { return out ? buf.data() : nullptr; }
  void finish(ffi::ThreadPool& pool) {
    if (!out) return;
    parallel_for(pool, N, [&](int64_t n) {
      with_vector_for(CO, [&](auto v) {
        merge_image_moments<decltype(v)>(buf.data() + n * OH * 2 * CO, OH, OW, CO,
                                         out + n * 2 * CO);
      });
    });
  }
};

// The optional statistics result of a layer kernel writing y [N, OH, OW, CO]: [N, 2, CO], or no
// elements when the caller wants none.
ffi::ErrorOr<OutputMoments> output_moments(ffi::ResultBuffer<ffi::F32>& moments, int64_t N,
                                           int64_t OH, int64_t OW, int64_t CO,
                                           const std::string& what) {
  OutputMoments m;
  if (moments->element_count() == 0) return m;
  auto md = moments->dimensions();
  if (md.size() != 3 || md[0] != N || md[1] != 2 || md[2] != CO || CO % 8)
    return ffi::Unexpected(ffi::Error::InvalidArgument(
        what + ": expected moments [N, 2, CO] (CO a multiple of 8) or none"));
  m.out = moments->typed_data();
  m.N = N, m.OH = OH, m.OW = OW, m.CO = CO;
  m.buf.resize(size_t(N * OH * 2 * CO));
  return m;
}

ffi::Error RfConvImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> params,
                      ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> moments,
                      int64_t stride, int64_t pad, int64_t kh,
                      int64_t kw, int64_t cin, int64_t cin_offset, int64_t w_offset,
                      int64_t b_offset, int64_t s_offset) {
  auto shape = conv_shape("retinaface_conv", x.dimensions(), y->dimensions(), cin, cin_offset, kh,
                          kw, stride, pad);
  if (shape.has_error()) return shape.error();
  const ConvShape s = *shape;
  const int64_t nw = kh * kw * s.C * s.CO;
  if (auto e = check_layer(params, "retinaface_conv", nw, s.CO, w_offset, b_offset, s_offset);
      e.failure())
    return e;
  auto stats = output_moments(moments, s.N, s.OH, s.OW, s.CO, "retinaface_conv");
  if (stats.has_error()) return stats.error();
  float* const M = stats->rows();
  const float* P = params.typed_data();
  const float *X = x.typed_data(), *Wp = P + w_offset, *B = P + b_offset, *S = P + s_offset;
  float* Y = y->typed_data();
  const int64_t rows = s.N * s.OH;
  const int64_t chunk = rows_per_task(rows, s.OW * s.CO * kh * kw * s.C);
  const bool narrow = s.C < 8;
  parallel_for(pool, (rows + chunk - 1) / chunk, [&](int64_t task) {
    const int64_t r0 = task * chunk, r1 = std::min(rows, r0 + chunk);
    if (narrow) {
      FloatImageRows input{X, s.H, s.W * s.CX};
      conv_narrow_rows(s, input, Wp, B, S, Y, r0, r1, M);
    } else
      conv_rows(s, X, Wp, B, S, Y, r0, r1, M);
  });
  stats->finish(pool);
  return ffi::Error::Success();
}

// The first layer on the uint8 image: x = float(image) - mean (mean: CX floats in the buffer)
// converted row by row as the convolution reads it, instead of a separate float32 copy of the
// image. Narrow inputs only (cin < 8, the whole channel range: the 3-channel stem).
ffi::Error RfConvU8Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::U8> x, ffi::Buffer<ffi::F32> params,
                        ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> moments,
                        int64_t stride, int64_t pad, int64_t kh,
                        int64_t kw, int64_t m_offset, int64_t w_offset, int64_t b_offset,
                        int64_t s_offset) {
  const int64_t channels = x.dimensions().size() == 4 ? x.dimensions()[3] : 0;  // all of them
  auto shape = conv_shape("retinaface_conv_u8", x.dimensions(), y->dimensions(), channels, 0, kh,
                          kw, stride, pad);
  if (shape.has_error()) return shape.error();
  const ConvShape s = *shape;
  if (s.C >= 8)
    return ffi::Error::InvalidArgument("retinaface_conv_u8: expected fewer than 8 channels");
  if (auto e = check_slice(params, m_offset, s.C, "retinaface_conv_u8 mean"); e.failure()) return e;
  if (auto e = check_layer(params, "retinaface_conv_u8", kh * kw * s.C * s.CO, s.CO, w_offset,
                           b_offset, s_offset);
      e.failure())
    return e;
  auto stats = output_moments(moments, s.N, s.OH, s.OW, s.CO, "retinaface_conv_u8");
  if (stats.has_error()) return stats.error();
  float* const M = stats->rows();
  const float* P = params.typed_data();
  const uint8_t* X = x.typed_data();
  float* Y = y->typed_data();
  const int64_t rows = s.N * s.OH;
  const int64_t chunk = rows_per_task(rows, s.OW * s.CO * kh * kw * s.C);
  parallel_for(pool, (rows + chunk - 1) / chunk, [&](int64_t task) {
    const int64_t r0 = task * chunk, r1 = std::min(rows, r0 + chunk);
    MeanSubtractedRows input(X, s, P + m_offset, kh);
    conv_narrow_rows(s, input, P + w_offset, P + b_offset, P + s_offset, Y, r0, r1, M);
  });
  stats->finish(pool);
  return ffi::Error::Success();
}

ffi::Error RfConvWinogradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                              ffi::Buffer<ffi::F32> params, ffi::ResultBuffer<ffi::F32> y,
                              ffi::ResultBuffer<ffi::F32> moments, int64_t pad, int64_t cin, int64_t cin_offset, int64_t w_offset,
                              int64_t b_offset, int64_t s_offset) {
  auto shape = conv_shape("retinaface_conv_winograd", x.dimensions(), y->dimensions(), cin,
                          cin_offset, 3, 3, 1, pad);
  if (shape.has_error()) return shape.error();
  const ConvShape s = *shape;
  if (s.C % 8)
    return ffi::Error::InvalidArgument("retinaface_conv_winograd: cin must be a multiple of 8");
  if (auto e = check_layer(params, "retinaface_conv_winograd", 36 * s.C * s.CO, s.CO, w_offset,
                           b_offset, s_offset);
      e.failure())
    return e;
  auto stats = output_moments(moments, s.N, s.OH, s.OW, s.CO, "retinaface_conv_winograd");
  if (stats.has_error()) return stats.error();
  float* const M = stats->rows();
  const float* P = params.typed_data();
  const float* X = x.typed_data();
  float* Y = y->typed_data();
  const int64_t rows = s.N * ((s.OH + 3) / 4), TW = (s.OW + 3) / 4;
  // at least two full groups of WT tiles per task (20 x 20: 2 tile rows of 5 tiles had been one
  // group of 10)
  const int64_t chunk =
      std::max(rows_per_task(rows, TW * 36 * s.C * s.CO), (2 * WT + TW - 1) / TW);
  parallel_for(pool, (rows + chunk - 1) / chunk, [&](int64_t task) {
    const int64_t r0 = task * chunk, r1 = std::min(rows, r0 + chunk);
    winograd_rows(s, X, P + w_offset, P + b_offset, P + s_offset, Y, r0, r1, M);
  });
  stats->finish(pool);
  return ffi::Error::Success();
}

// RetinaFace's heads over every pyramid level in one call: per level, a 1x1 layer (the level's
// BboxHead, ClassHead and LandmarkHead side by side, CO outputs) over the SSH output, which is the
// concatenation of channel slices of three tensors (conv3X3's, conv5X5_2's and conv7x7_3's
// outputs): the slices are read in place as consecutive runs of the K loop, so the concatenation
// is never built. y [B, cells, CO]: level 1's cells row-major, then level 2's, ... (the order of
// the original's priors, two anchors per cell).
// args: 3 tensors per level; segments: per level 3 x (cin, cin_offset); offsets: per level
// (w, b, slope).
ffi::Error RfHeadsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> params, ffi::RemainingArgs args,
                       ffi::ResultBuffer<ffi::F32> y, ffi::Span<const int64_t> segments,
                       ffi::Span<const int64_t> offsets) {
  const int64_t levels = int64_t(offsets.size()) / 3;
  auto yd = y->dimensions();
  if (levels < 1 || int64_t(offsets.size()) != 3 * levels || int64_t(segments.size()) != 6 * levels ||
      int64_t(args.size()) != 3 * levels || yd.size() != 3 || yd[2] % 8)
    return ffi::Error::InvalidArgument(
        "retinaface_heads: expected 3 tensors and 3 (cin, cin_offset) pairs and 3 offsets per level, "
        "y [B, cells, CO] with CO a multiple of 8");
  const int64_t N = yd[0], CO = yd[2];
  struct Seg { const float* x; int64_t CX, cin, coff; };
  std::vector<Seg> segs(size_t(3 * levels));
  const size_t nl = static_cast<size_t>(levels);
  std::vector<int64_t> H(nl), W(nl), first_cell(nl + 1, 0), first_row(nl + 1, 0);
  for (int64_t l = 0; l < levels; ++l) {
    int64_t K = 0;
    for (int64_t t = 0; t < 3; ++t) {
      auto buf = args.get<ffi::Buffer<ffi::F32>>(size_t(3 * l + t));
      if (buf.has_error()) return buf.error();
      auto d = buf->dimensions();
      const int64_t cin = segments[size_t(6 * l + 2 * t)], coff = segments[size_t(6 * l + 2 * t + 1)];
      if (d.size() != 4 || d[0] != N || (t > 0 && (d[1] != H[size_t(l)] || d[2] != W[size_t(l)])) ||
          cin < 1 || coff < 0 || coff + cin > d[3])
        return ffi::Error::InvalidArgument(
            "retinaface_heads: level " + std::to_string(l) + " input " + std::to_string(t) +
            ": expected NHWC [B, H, W, C] of the level's size holding channels [cin_offset, "
            "cin_offset + cin)");
      H[size_t(l)] = d[1], W[size_t(l)] = d[2];
      segs[size_t(3 * l + t)] = Seg{buf->typed_data(), d[3], cin, coff};
      K += cin;
    }
    const int64_t* off = offsets.begin() + 3 * l;
    const std::string what = "retinaface_heads level " + std::to_string(l);
    if (auto e = check_layer(params, what, K * CO, CO, off[0], off[1], off[2]); e.failure()) return e;
    first_cell[size_t(l) + 1] = first_cell[size_t(l)] + H[size_t(l)] * W[size_t(l)];
    first_row[size_t(l) + 1] = first_row[size_t(l)] + N * H[size_t(l)];
  }
  if (first_cell[size_t(levels)] != yd[1])
    return ffi::Error::InvalidArgument("retinaface_heads: y must have one row per cell of every level");
  const float* P = params.typed_data();
  float* Y = y->typed_data();
  parallel_for(pool, first_row[size_t(levels)], [&](int64_t row) {
    int64_t l = 0;
    while (row >= first_row[size_t(l) + 1]) ++l;
    const int64_t r = row - first_row[size_t(l)], n = r / H[size_t(l)], h = r % H[size_t(l)];
    const int64_t OW = W[size_t(l)], ntiles = (OW + MR - 1) / MR;
    const int64_t* off = offsets.begin() + 3 * l;
    const float *wp = P + off[0], *bias = P + off[1], *slope = P + off[2];
    float* yrow = Y + (n * yd[1] + first_cell[size_t(l)] + h * OW) * CO;
    std::vector<const float*> ptrs(size_t(ntiles * 3 * MR));  // [tile][part][pixel]
    int64_t K = 0, cins[3];
    for (int t = 0; t < 3; ++t) {
      const Seg& sg = segs[size_t(3 * l + t)];
      cins[t] = sg.cin;
      K += sg.cin;
      for (int64_t m = 0; m < ntiles * MR; ++m)
        ptrs[size_t((m / MR * 3 + t) * MR + m % MR)] =
            m < OW ? sg.x + ((n * H[size_t(l)] + h) * OW + m) * sg.CX + sg.coff : kZeros;
    }
    for_each_span(CO, K, wp, [&](auto span, int64_t c0, const float* wblk, int64_t bstride) {
      using S = decltype(span);
      for (int64_t tt = 0; tt < ntiles; ++tt) {
        const int nvalid = int(std::min<int64_t>(MR, OW - tt * MR));
        tile<MR, S::nv, typename S::vec>(ptrs.data() + tt * 3 * MR, 3, 0, wblk, bstride, bias + c0,
                                         slope + c0, yrow + tt * MR * CO + c0, CO, nvalid, false,
                                         true, cins);
      }
    });
  });
  return ffi::Error::Success();
}

// One pixel of the 3x3 depthwise convolution from its nine taps x[0..8] (row-major). Every pixel,
// at an edge or not, is computed by this same expression (missing taps read as zeros), so a
// result never depends on where the pixel is: a padded image with a zeroed border gives the same
// bits as the unpadded image.
template <class V>
inline V depthwise_sum(V acc, V x0, V x1, V x2, V x3, V x4, V x5, V x6, V x7, V x8,
                        const V* k) {
  acc += x0 * k[0] + x1 * k[1] + x2 * k[2];
  acc += x3 * k[3] + x4 * k[4] + x5 * k[5];
  acc += x6 * k[6] + x7 * k[7] + x8 * k[8];
  return acc;
}

// One output row of the 3x3 depthwise convolution (pad 1) + bias + activation into out [OW][C].
// Interior pixels of rows with all three input rows read the input directly at constant strides;
// the rest (image edges) gather their taps with zeros first.
// rows: the three input rows (oh * stride - 1 .. + 1), each [W][C]; nullptr: a zero row.
template <class V>
void depthwise_row_at(const float* const rows[3], int64_t W, int64_t C, int64_t stride, int64_t OW,
                      const float* wd, const float* bd, const float* sd, float* out) {
  // interior: output pixels whose three input columns iw0 .. iw0 + 2 (iw0 = ow*stride - 1) exist
  const int64_t lo = std::min<int64_t>(1, OW);
  const int64_t hi = rows[0] && rows[1] && rows[2]
                         ? std::max<int64_t>(lo, std::min<int64_t>(OW, (W - 3) / stride + 1))
                         : lo;  // a missing row: every pixel takes the edge path
  for (int64_t c0 = 0; c0 < C; c0 += lanes<V>) {
    V k[9];
    for (int t = 0; t < 9; ++t) k[t] = loadu<V>(wd + t * C + c0);
    const V b = loadu<V>(bd + c0), sl = loadu<V>(sd + c0);
    auto edge_pixel = [&](int64_t ow) {
      V x[9];
      for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j) {
          const int64_t iw = ow * stride - 1 + j;
          x[3 * i + j] = rows[i] && iw >= 0 && iw < W ? loadu<V>(rows[i] + iw * C + c0) : bcast<V>(0.f);
        }
      storeu(out + ow * C + c0,
             activate(depthwise_sum(b, x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7], x[8], k), sl));
    };
    for (int64_t ow = 0; ow < lo; ++ow) edge_pixel(ow);
    if (hi > lo) {
      const float *p0 = rows[0] + c0, *p1 = rows[1] + c0, *p2 = rows[2] + c0;
      const int64_t step = stride * C;
      int64_t o = (lo * stride - 1) * C;
      for (int64_t ow = lo; ow < hi; ++ow, o += step) {
        const V acc = depthwise_sum(b, loadu<V>(p0 + o), loadu<V>(p0 + o + C), loadu<V>(p0 + o + 2 * C),
                                     loadu<V>(p1 + o), loadu<V>(p1 + o + C), loadu<V>(p1 + o + 2 * C),
                                     loadu<V>(p2 + o), loadu<V>(p2 + o + C), loadu<V>(p2 + o + 2 * C), k);
        storeu(out + ow * C + c0, activate(acc, sl));
      }
    }
    for (int64_t ow = hi; ow < OW; ++ow) edge_pixel(ow);
  }
}

// Rows oh * stride - 1 .. + 1 of image n from row(n, ih) (nullptr outside the H rows).
template <class Rows>
inline void depthwise_input_rows(Rows&& row, int64_t n, int64_t oh, int64_t H, int64_t stride,
                                 const float* rows[3]) {
  for (int i = 0; i < 3; ++i) {
    const int64_t ih = oh * stride + i - 1;
    rows[i] = ih >= 0 && ih < H ? row(n, ih) : nullptr;
  }
}

// Output row oh of image n of X [N, H, W, C]; prefetches the input rows the next output row
// adds (see prefetch).
template <class V>
void depthwise_row(const float* X, int64_t n, int64_t oh, int64_t H, int64_t W, int64_t C,
                   int64_t stride, int64_t OW, const float* wd, const float* bd, const float* sd,
                   float* out) {
  const float* rows[3];
  depthwise_input_rows(FloatImageRows{X, H, W * C}, n, oh, H, stride, rows);
  prefetch_rows(X, n, H, W * C, oh * stride + 2, (oh + 1) * stride + 2);
  depthwise_row_at<V>(rows, W, C, stride, OW, wd, bd, sd, out);
}

ffi::Error RfConvDwImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                        ffi::Buffer<ffi::F32> params, ffi::ResultBuffer<ffi::F32> y, int64_t stride,
                        int64_t wd_offset, int64_t bd_offset, int64_t sd_offset, int64_t w_offset,
                        int64_t b_offset, int64_t s_offset) {
  auto xd = x.dimensions();
  auto yd = y->dimensions();
  if (xd.size() != 4 || yd.size() != 4)
    return ffi::Error::InvalidArgument("retinaface_conv_dw: x and y must be NHWC (rank 4)");
  const int64_t N = xd[0], H = xd[1], W = xd[2], C = xd[3];
  const int64_t OH = yd[1], OW = yd[2], CO = yd[3];
  if (C % 8 || CO % 8 || C > kMaxCin || stride < 1 || yd[0] != N || OH != (H - 1) / stride + 1 ||
      OW != (W - 1) / stride + 1)
    return ffi::Error::InvalidArgument("retinaface_conv_dw: inconsistent shapes or attributes");
  const char* what[] = {"retinaface_conv_dw depthwise weights", "retinaface_conv_dw depthwise bias",
                        "retinaface_conv_dw depthwise slope", "retinaface_conv_dw pointwise weights",
                        "retinaface_conv_dw pointwise bias", "retinaface_conv_dw pointwise slope"};
  const int64_t offsets[] = {wd_offset, bd_offset, sd_offset, w_offset, b_offset, s_offset};
  const int64_t sizes[] = {9 * C, C, C, C * CO, CO, CO};
  for (int i = 0; i < 6; ++i)
    if (auto e = check_slice(params, offsets[i], sizes[i], what[i]); e.failure()) return e;
  const float *P = params.typed_data(), *X = x.typed_data();
  const float *WD = P + wd_offset, *BD = P + bd_offset, *SD = P + sd_offset;
  const float *WP = P + w_offset, *BP = P + b_offset, *SP = P + s_offset;
  float* Y = y->typed_data();
  const int64_t rows = N * OH;
  const int64_t chunk = rows_per_task(rows, OW * C * (CO + 9));
  const int64_t ntiles = (OW + MR - 1) / MR;
  parallel_for(pool, (rows + chunk - 1) / chunk, [&](int64_t task) {
    float* buf = scratch<float>(size_t(OW) * C);
    const float** ptrs = scratch<const float*>(size_t(ntiles) * MR);
    for (int64_t m = 0; m < ntiles * MR; ++m) ptrs[m] = m < OW ? buf + m * C : kZeros;
    const int64_t r0 = task * chunk, r1 = std::min(rows, r0 + chunk);
    for (int64_t r = r0; r < r1; ++r) {
      with_vector_for(C, [&](auto v) {
        depthwise_row<decltype(v)>(X, r / OH, r % OH, H, W, C, stride, OW, WD, BD, SD,
                                   buf);
      });
      conv_row_blocks(ptrs, ntiles, OW, 1, C, WP, BP, SP, Y + r * OW * CO, CO);
    }
  });
  return ffi::Error::Success();
}


// -- Training: the 3x3 depthwise convolution (pad 1) and its gradients --------------------------
// The train step's depthwise layers at 320x320 (8 and 16 channels) and 160x160 are memory-bound
// loops that XLA's CPU backend runs slowly (forward + both gradients of 8 x 320 x 320 x 8: ~85 ms).
// k is the HWIO kernel [3, 3, 1, C] as [9][C]; stride 1 or 2; C a multiple of 8.

// The shapes of a depthwise layer: x [N, H, W, C] -> y [N, OH, OW, C] (pad 1), k [9 * C].
struct DwShape {
  int64_t N, H, W, C, OH, OW, stride;
};

template <class Dims>
ffi::ErrorOr<DwShape> dw_shape(const std::string& what, Dims xd, Dims yd, int64_t k_elements,
                               int64_t stride) {
  if (xd.size() != 4 || yd.size() != 4)
    return ffi::Unexpected(ffi::Error::InvalidArgument(what + ": x and y must be NHWC (rank 4)"));
  DwShape s{xd[0], xd[1], xd[2], xd[3], yd[1], yd[2], stride};
  const bool ok = s.C % 8 == 0 && s.C >= 8 && s.C <= kMaxCin && stride >= 1 && yd[0] == s.N &&
                  yd[3] == s.C && s.OH == (s.H - 1) / stride + 1 && s.OW == (s.W - 1) / stride + 1 &&
                  k_elements == 9 * s.C;
  if (!ok)
    return ffi::Unexpected(ffi::Error::InvalidArgument(
        what + ": expected x [N, H, W, C] with C a multiple of 8, k [3, 3, 1, C] and y [N, (H - 1) "
               "/ stride + 1, (W - 1) / stride + 1, C]"));
  return s;
}

// Rows of a = act(x * k + c, slope) for x [N, H, W, C] (a BatchNorm folded into the per-channel
// scale k and shift c, then a LeakyReLU), computed on first use into three row buffers (row ih in
// buffer ih % 3: the three rows a depthwise output row reads never collide, and stride-1
// neighbours reuse two of them). The buffers come from the thread's scratch: one BatchNormRows
// per task at a time.
// Filling a row prefetches the next one: without that, alternating between filling a row from
// memory and using it in cache streamed x at half the bandwidth of a plain read (18 vs 38 GB/s).
struct BatchNormRows {
  const float* X;
  int64_t H, W, C, rows;
  const float *k, *c;
  float slope;
  float* buf;
  int64_t tag[3] = {-1, -1, -1};
  BatchNormRows(const float* x, int64_t n, int64_t h, int64_t w, int64_t ch, const float* scale,
                const float* shift, float sl)
      : X(x), H(h), W(w), C(ch), rows(n * h), k(scale), c(shift), slope(sl),
        buf(scratch<float>(size_t(3 * (w * ch + kScratchGap)))) {}
  const float* operator()(int64_t n, int64_t ih) {
    const int64_t key = n * H + ih, slot = ih % 3;
    float* row = buf + slot * (W * C + kScratchGap);
    if (tag[slot] != key) {
      if (key + 1 < rows) prefetch(X + (key + 1) * W * C, W * C);
      with_vector_for(C, [&](auto v) { fill<decltype(v)>(X + key * W * C, row); });
      tag[slot] = key;
    }
    return row;
  }
  template <class V>
  void fill(const float* x, float* out) const {
    const V sv = bcast<V>(slope);
    for (int64_t ch = 0; ch < C; ch += lanes<V>) {
      const V kv = loadu<V>(k + ch), cv = loadu<V>(c + ch);
      for (int64_t p = 0; p < W; ++p)
        storeu(out + p * C + ch, activate(loadu<V>(x + p * C + ch) * kv + cv, sv));
    }
  }
};

ffi::Error RfDepthwiseImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                           ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> moments,
                           int64_t stride) {
  auto shape = dw_shape("retinaface_depthwise", x.dimensions(), y->dimensions(),
                        int64_t(k.element_count()), stride);
  if (shape.has_error()) return shape.error();
  const DwShape s = *shape;
  auto stats = output_moments(moments, s.N, s.OH, s.OW, s.C, "retinaface_depthwise");
  if (stats.has_error()) return stats.error();
  float* const M = stats->rows();
  // depthwise_row with bias 0 and slope 1 (activate(v, 1) == v): the plain convolution
  const std::vector<float> zeros(size_t(s.C), 0.f), ones(size_t(s.C), 1.f);
  const float *X = x.typed_data(), *K = k.typed_data();
  float* Y = y->typed_data();
  const int64_t rows = s.N * s.OH, chunk = rows_per_task(rows, s.OW * s.C * 9);
  parallel_for(pool, (rows + chunk - 1) / chunk, [&](int64_t task) {
    for (int64_t r = task * chunk; r < std::min(rows, (task + 1) * chunk); ++r) {
      with_vector_for(s.C, [&](auto v) {
        depthwise_row<decltype(v)>(X, r / s.OH, r % s.OH, s.H, s.W, s.C, s.stride, s.OW, K,
                                   zeros.data(), ones.data(), Y + r * s.OW * s.C);
      });
      row_moments(Y, r, s.OW, s.C, M);
    }
  });
  stats->finish(pool);
  return ffi::Error::Success();
}

// dx row (n, ih): dx[ih, iw] = sum of dy[oh, ow] * k[i, j] over the taps with
// oh * stride + i - 1 == ih and ow * stride + j - 1 == iw, accumulated tap by tap into the row
// (in L1): per tap a branch-free strided loop over the output pixels that reach this row (a
// per-pixel gather with bounds checks was 1.7x slower at 320 x 320 x 8).
template <class V, class DyRows>
void depthwise_dx_row(const DwShape& s, DyRows&& dy_row, const float* K, int64_t n, int64_t ih,
                      float* out) {
  std::memset(out, 0, size_t(s.W * s.C) * sizeof(float));
  for (int i = 0; i < 3; ++i) {
    const int64_t t = ih + 1 - i;
    if (t < 0 || t % s.stride || t / s.stride >= s.OH) continue;
    const float* g = dy_row(n, t / s.stride);
    for (int j = 0; j < 3; ++j) {
      // output columns with iw = ow * stride + j - 1 inside [0, W)
      const int64_t lo = j == 0 ? 1 : 0, hi = std::min<int64_t>(s.OW, (s.W - j) / s.stride + 1);
      float* o = out + (lo * s.stride + j - 1) * s.C;
      const float* gp = g + lo * s.C;
      const int64_t ostep = s.stride * s.C;
      for (int64_t c = 0; c < s.C; c += lanes<V>) {
        const V kv = loadu<V>(K + (3 * i + j) * s.C + c);
        for (int64_t ow = lo; ow < hi; ++ow)
          storeu(o + (ow - lo) * ostep + c,
                 loadu<V>(o + (ow - lo) * ostep + c) + loadu<V>(gp + (ow - lo) * s.C + c) * kv);
      }
    }
  }
}

// dk[n][t][c0 .. c0 + lanes) of image n: sum over output pixels of x[tap t] * dy, summed per
// output row first (shorter float32 chains), then over rows. row(n, ih): input row ih of image n,
// [W][C] (channels c0 .. c0 + lanes read); dy_row(n, oh) likewise for dy.
template <class V, class Rows, class DyRows>
void depthwise_dk_rows(const DwShape& s, Rows&& row, DyRows&& dy_row, int64_t n, int64_t c0,
                       int64_t oh0, int64_t oh1, V acc[9]) {
  const int64_t hi = std::max<int64_t>(1, std::min<int64_t>(s.OW, (s.W - 3) / s.stride + 1));
  for (int64_t oh = oh0; oh < oh1; ++oh) {
    const float* rows[3];
    depthwise_input_rows(row, n, oh, s.H, s.stride, rows);
    for (auto& r : rows)
      if (r) r += c0;
    const float* g = dy_row(n, oh) + c0;
    if constexpr (std::is_same_v<std::decay_t<DyRows>, FloatImageRows>)  // (CotangentRows: its own)
      if (oh + 1 < s.OH) prefetch(g + s.OW * s.C, s.OW * s.C);  // the next row's (see prefetch)
    V rs[9];
    for (int t = 0; t < 9; ++t) rs[t] = bcast<V>(0.f);
    auto edge_pixel = [&](int64_t ow) {
      const V gv = loadu<V>(g + ow * s.C);
      for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j) {
          const int64_t iw = ow * s.stride - 1 + j;
          if (rows[i] && iw >= 0 && iw < s.W) rs[3 * i + j] += loadu<V>(rows[i] + iw * s.C) * gv;
        }
    };
    const bool all_rows = rows[0] && rows[1] && rows[2];
    const int64_t lo = std::min<int64_t>(1, s.OW), end = all_rows ? std::max(lo, hi) : lo;
    for (int64_t ow = 0; ow < lo; ++ow) edge_pixel(ow);
    for (int64_t ow = lo; ow < end; ++ow) {  // interior: every tap inside the image
      const V gv = loadu<V>(g + ow * s.C);
      const int64_t o = (ow * s.stride - 1) * s.C;
      for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j) rs[3 * i + j] += loadu<V>(rows[i] + o + j * s.C) * gv;
    }
    for (int64_t ow = end; ow < s.OW; ++ow) edge_pixel(ow);
    for (int t = 0; t < 9; ++t) acc[t] += rs[t];
  }
}


template <class V, bool Masked, bool Direct = false>  // (BatchNorm's backward sums, below)
void grad_sums_image(const float* Dy, const float* X, const float* mean, const float* k,
                     const float* c, float slope, int64_t rows, int64_t W, int64_t C, int64_t c0,
                     float* sum_g, float* sum_gx, float* direct = nullptr);

// A BatchNorm folded into a per-channel scale k and shift c, the batch mean, and the LeakyReLU's
// slope: what the read-through gradients need of it.
struct BatchNormInput {
  const float *k, *c, *mean;
  float slope;
};

// The BatchNorm's backward sums over one row of W pixels into s [2][C]: sum(g) and
// sum(g * (x - mean)) for the activation's cotangent da and the BatchNorm's input x; in the same
// pass da becomes the BatchNorm's direct input gradient k * g (the statistics' path is added by
// the kernel that wrote x: StatsCotangent).
template <class V>
void row_grad_sums(float* da, const float* x, const BatchNormInput& bn, int64_t W, int64_t C,
                   float* s) {
  for (int64_t c0 = 0; c0 < C; c0 += lanes<V>)
    grad_sums_image<V, true, true>(da, x, bn.mean, bn.k, bn.c, bn.slope, 1, W, C, c0, s, s + C, da);
}

// The cotangent of a layer's output z [N, OH, OW, C] that a BatchNorm reads with batch
// statistics: the direct part d (from the layer reading the BatchNorm through, which computed no
// statistics' part) plus, per image n, the part through the image's moments (mean m_n and M2_n,
// which this layer's forward wrote): dmean_n / (OH OW) + 2 dM2_n (z - m_n), given per image as
// coef [N][3][C] = (m_n, a_n, b_n): d + (a_n + b_n * (z - m_n)). Z null: no statistics' part.
struct StatsCotangent {
  const float *Z = nullptr, *coef = nullptr;
};

// Checks the statistics' part of a cotangent (StatsCotangent): z shaped like dy, coef [N, 3, C].
template <class Dims>
ffi::Error check_stats_cotangent(const std::string& what, Dims dyd, Dims zd, Dims cd) {
  bool ok = zd.size() == 4 && dyd.size() == 4 && cd.size() == 3 && cd[0] == dyd[0] &&
            cd[1] == 3 && cd[2] == dyd[3];
  for (size_t i = 0; ok && i < 4; ++i) ok = zd[i] == dyd[i];
  if (!ok)
    return ffi::Error::InvalidArgument(what + ": expected z shaped like dy and coef [N, 3, C]");
  return ffi::Error::Success();
}

// One row of that cotangent: out = d + (a + b * (z - m)), coef_n the image's [3][C].
template <class V>
void stats_cotangent_row(const float* d, const float* z, const float* coef_n, int64_t W, int64_t C,
                         float* out) {
  for (int64_t c0 = 0; c0 < C; c0 += lanes<V>) {
    const V m = loadu<V>(coef_n + c0), a = loadu<V>(coef_n + C + c0);
    const V b = loadu<V>(coef_n + 2 * C + c0);
    for (int64_t p = 0; p < W; ++p)
      storeu(out + p * C + c0,
             loadu<V>(d + p * C + c0) + (a + b * (loadu<V>(z + p * C + c0) - m)));
  }
}

// Rows of that cotangent, computed on first use into four row buffers (row oh in buffer oh % 4: a
// depthwise gradient reads at most three rows at once), so it is never stored whole. Filling a
// row prefetches the next one's d and z (see BatchNormRows).
struct CotangentRows {
  const float* D;
  StatsCotangent sc;
  int64_t H, W, C, rows;
  float* buf;
  int64_t tag[4] = {-1, -1, -1, -1};
  CotangentRows(const float* d, const StatsCotangent& st, int64_t n, int64_t h, int64_t w,
                int64_t ch)
      : D(d), sc(st), H(h), W(w), C(ch), rows(n * h),
        buf(scratch<float, 1>(size_t(4 * (w * ch + kScratchGap)))) {}
  const float* operator()(int64_t n, int64_t oh) {
    const int64_t key = n * H + oh, slot = oh % 4;
    float* row = buf + slot * (W * C + kScratchGap);
    if (tag[slot] != key) {
      if (key + 1 < rows) {
        prefetch(D + (key + 1) * W * C, W * C);
        prefetch(sc.Z + (key + 1) * W * C, W * C);
      }
      with_vector_for(C, [&](auto v) {
        stats_cotangent_row<decltype(v)>(D + key * W * C, sc.Z + key * W * C, sc.coef + n * 3 * C,
                                         W, C, row);
      });
      tag[slot] = key;
    }
    return row;
  }
};

// The gradients of a depthwise layer y = depthwise(a, kernel) for the cotangent dy: da [N, H, W,
// C] and dkernel per image and row block [N, B, 9, C]. Without Bn, a is x; with it, a =
// act(x * k + c) normalised row by row (BatchNormRows), and every row of da is followed by the
// BatchNorm's backward sums over it into S [N, H, 2, C]: sum(g) and sum(g * (x - mean)),
// g = x * k + c > 0 ? da : slope * da. A task is one row block of one image and makes one pass
// over it: per output row oh it adds row oh's kernel gradient, then computes the input
// gradient's rows that need nothing below, each (with bn) followed by its sums while it and its
// x row are in cache. So x and dy are read from memory once and da written once (separate
// input- and kernel-gradient passes read both twice; with a stored activation and a pass for
// the sums, six tensors moved). With Bn, each row of da is then made the BatchNorm's direct input
// gradient k * g (row_grad_sums). With Stats, dy is d + the statistics' part of y's
// BatchNorm (StatsCotangent), computed row by row as it is read (CotangentRows).
template <bool Bn, bool Stats>
void depthwise_grad_blocks(ffi::ThreadPool& pool, const DwShape& s, const float* X,
                           const float* K, const float* DY, int64_t blocks,
                           const BatchNormInput& bn, const StatsCotangent& sc, float* DA,
                           float* DK, float* S) {
  std::vector<float> flipped(size_t(9 * s.C)), zeros(size_t(s.C), 0.f), ones(size_t(s.C), 1.f);
  for (int t = 0; t < 9; ++t)  // stride 1: dx is the depthwise convolution with the flipped kernel
    std::memcpy(flipped.data() + t * s.C, K + (8 - t) * s.C, size_t(s.C) * sizeof(float));
  parallel_for(pool, s.N * blocks, [&](int64_t task) {
    const int64_t n = task / blocks, b = task % blocks;
    const int64_t o0 = b * s.OH / blocks, o1 = (b + 1) * s.OH / blocks;
    const int64_t h1 = b + 1 == blocks ? s.H : o1 * s.stride;
    std::vector<float> acc(size_t(9 * s.C), 0.f);
    with_vector_for(s.C, [&](auto v) {
      using V = decltype(v);
      using Rows = std::conditional_t<Bn, BatchNormRows, FloatImageRows>;
      Rows input = [&] {
        if constexpr (Bn)
          return BatchNormRows(X, s.N, s.H, s.W, s.C, bn.k, bn.c, bn.slope);
        else
          return FloatImageRows{X, s.H, s.W * s.C};
      }();
      using DyRows = std::conditional_t<Stats, CotangentRows, FloatImageRows>;
      DyRows dy_row = [&] {
        if constexpr (Stats)
          return CotangentRows(DY, sc, s.N, s.OH, s.OW, s.C);
        else
          return FloatImageRows{DY, s.OH, s.OW * s.C};
      }();
      auto input_gradient_row = [&](int64_t ih) {
        const int64_t r = n * s.H + ih;
        float* out = DA + r * s.W * s.C;
        if (s.stride == 1 && !Stats) {
          depthwise_row<V>(DY, n, ih, s.OH, s.OW, s.C, 1, s.W, flipped.data(), zeros.data(),
                           ones.data(), out);
        } else if (s.stride == 1) {
          const float* rows[3];
          depthwise_input_rows(dy_row, n, ih, s.OH, 1, rows);
          depthwise_row_at<V>(rows, s.OW, s.C, 1, s.W, flipped.data(), zeros.data(), ones.data(),
                              out);
        } else {
          depthwise_dx_row<V>(s, dy_row, K, n, ih, out);
        }
        if constexpr (Bn) {
          const float* x = X + r * s.W * s.C;
          row_grad_sums<V>(out, x, bn, s.W, s.C, S + r * 2 * s.C);
        }
      };
      int64_t ih = o0 * s.stride;
      for (int64_t oh = o0; oh < o1; ++oh) {
        for (int64_t c0 = 0; c0 < s.C; c0 += lanes<V>) {
          V a[9];
          for (int t = 0; t < 9; ++t) a[t] = loadu<V>(acc.data() + t * s.C + c0);
          depthwise_dk_rows<V>(s, input, dy_row, n, c0, oh, oh + 1, a);
          for (int t = 0; t < 9; ++t) storeu(acc.data() + t * s.C + c0, a[t]);
        }
        for (; ih < std::min(h1, (oh + 1) * s.stride); ++ih) input_gradient_row(ih);
      }
      for (; ih < h1; ++ih) input_gradient_row(ih);
    });
    std::memcpy(DK + task * 9 * s.C, acc.data(), acc.size() * sizeof(float));
  });
}

// Gradients of y = depthwise(x, k): dx [N, H, W, C] and dk per image and row block [N, B, 9, C]
// (the caller sums them, so the kernel stays batch-parallel under a data-sharded mesh).
ffi::Error RfDepthwiseGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                               ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> dy,
                               ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dk,
                               int64_t stride) {
  auto shape = dw_shape("retinaface_depthwise_grad", x.dimensions(), dy.dimensions(),
                        int64_t(k.element_count()), stride);
  if (shape.has_error()) return shape.error();
  const DwShape s = *shape;
  auto dxd = dx->dimensions();
  auto dkd = dk->dimensions();
  if (dxd.size() != 4 || dxd[0] != s.N || dxd[1] != s.H || dxd[2] != s.W || dxd[3] != s.C ||
      dkd.size() != 4 || dkd[0] != s.N || dkd[1] < 1 || dkd[1] > s.OH || dkd[2] != 9 ||
      dkd[3] != s.C)
    return ffi::Error::InvalidArgument(
        "retinaface_depthwise_grad: expected dx shaped like x and dk [N, B, 9, C] (1 <= B <= "
        "output rows)");
  depthwise_grad_blocks<false, false>(pool, s, x.typed_data(), k.typed_data(), dy.typed_data(),
                                      dkd[1], {}, {}, dx->typed_data(), dk->typed_data(), nullptr);
  return ffi::Error::Success();
}

// -- Training: a convolution's kernel gradient ---------------------------------------------------
// dw[n][i][j][c][co] = sum over output pixels (oh, ow) of x[n, oh*s + i - p, ow*s + j - p, c] *
// dy[n, oh, ow, co], per image (the caller sums over images: batch-parallel). A GEMM with the
// pixels as its long dimension: register tiles of 12 (6) input channels x 32 (16) output channels
// accumulate over the pixels of a block of output rows, which stays in L2 while every tile passes
// over it (XLA materialises transposes of x for this and runs 3x3 kernel gradients as slow
// filter-gradient convolutions).

struct WgradShape {
  int64_t N, H, W, C, OH, OW, CO, k, stride, pad;
};

// acc[MRT channels][NV vectors] (+)= x[pixel][c0 + m] * dy[pixel][co0 ...] over one run of pixels.
template <int MRT, int NV, class V>
inline void wgrad_run(const float* x, int64_t xstep, const float* g, int64_t gstep, int64_t len,
                      V (&acc)[MRT][NV]) {
  constexpr int L = lanes<V>;
  for (int64_t q = 0; q < len; ++q, x += xstep, g += gstep) {
    V gv[NV];
#pragma GCC unroll 4
    for (int b = 0; b < NV; ++b) gv[b] = loadu<V>(g + b * L);
#pragma GCC unroll 16
    for (int m = 0; m < MRT; ++m) {
      const V s = bcast<V>(x[m]);
#pragma GCC unroll 4
      for (int b = 0; b < NV; ++b) acc[m][b] += s * gv[b];
    }
  }
}

// Adds rows [oh0, oh1) of image n to dw (tap t's [C][CO] at dw + t * C * CO) for channels
// [c0, c0 + MRT) and the output-channel span at co0.
template <int MRT, int NV, class V>
void wgrad_tile(const WgradShape& s, const float* X, const float* DY, int64_t n, int64_t oh0,
                int64_t oh1, int64_t c0, int64_t co0, float* dw) {
  constexpr int L = lanes<V>;
  for (int64_t i = 0; i < s.k; ++i)
    for (int64_t j = 0; j < s.k; ++j) {
      float* out = dw + ((i * s.k + j) * s.C + c0) * s.CO + co0;
      V acc[MRT][NV];
      for (int m = 0; m < MRT; ++m)
        for (int b = 0; b < NV; ++b) acc[m][b] = loadu<V>(out + m * s.CO + b * L);
      // output columns whose input column iw = ow * stride + j - pad lies inside the image
      const int64_t lo = std::max<int64_t>(0, (s.pad - j + s.stride - 1) / s.stride);
      const int64_t hi = std::min<int64_t>(s.OW, (s.W - 1 + s.pad - j) / s.stride + 1);
      for (int64_t oh = oh0; oh < oh1 && hi > lo; ++oh) {
        const int64_t ih = oh * s.stride + i - s.pad;
        if (ih < 0 || ih >= s.H) continue;
        const float* x = X + ((n * s.H + ih) * s.W + lo * s.stride + j - s.pad) * s.C + c0;
        const float* g = DY + ((n * s.OH + oh) * s.OW + lo) * s.CO + co0;
        wgrad_run<MRT, NV, V>(x, s.stride * s.C, g, s.CO, hi - lo, acc);
      }
      for (int m = 0; m < MRT; ++m)
        for (int b = 0; b < NV; ++b) storeu(out + m * s.CO + b * L, acc[m][b]);
    }
}

// Input channels per kernel-gradient tile: 12 x 2 zmm accumulators with AVX-512 (32 registers),
// 6 x 2 ymm with AVX2 (16 registers).
#if defined(__AVX512F__)
constexpr int kWgradChannels = 12;
#else
constexpr int kWgradChannels = 6;
#endif

// Calls run(std::integral_constant<int, m>{}) for m in 1 .. kWgradChannels.
template <int M = 1, class Run>
void with_channel_count(int64_t m, Run&& run) {
  if constexpr (M < kWgradChannels) {
    if (m != M) return with_channel_count<M + 1>(m, run);
  }
  run(std::integral_constant<int, M>{});
}

// The kernel gradient of a 3x3 stride-1 layer by Winograd F(3x3, 4x4), the transpose of the
// forward's F(4x4, 3x3): for y = A^T [(G g) (.) (B^T d)] (per axis), the gradient of
// sum(e * y) for g is G^T [(A e) (.) (B^T d)]. So per 4x4 tile of dy (e) and its 6x6 input patch
// (d): V = B^T d B as in the forward, E = A e A^T, and M[xi] += V[xi]^T E[xi] ([C x CO] per element
// xi of the 6x6 grid) over the tiles, then dw = G^T M G: 36 multiply-adds per 16 output pixels
// and channel pair instead of 144.
constexpr int kWgradTiles = 64;  // tiles transformed together (the K of each [C x CO] update;
                                  // 32 had made 8 x 80 x 80, 64 -> 64 ~15 % slower)

// A e for one column of four cotangents: six values (rows of A: the points 0, +-1, +-2, inf).
template <class V>
inline void winograd_a(const V e[4], V out[6]) {
  const V two = bcast<V>(2.f), four = bcast<V>(4.f), eight = bcast<V>(8.f);
  const V s02 = e[0] + e[2], s13 = e[1] + e[3];
  const V t02 = e[0] + four * e[2], t13 = two * e[1] + eight * e[3];
  out[0] = e[0];
  out[1] = s02 + s13;
  out[2] = s02 - s13;
  out[3] = t02 + t13;
  out[4] = t02 - t13;
  out[5] = e[3];
}

// E[xi][j][co] (at E + xi * xs + j * CO + co) = (A e A^T)[xi] for the dy tiles j < nt of tile
// row (n, ty), tiles tx0 .. tx0 + nt - 1; cotangents outside OH x OW read as zeros.
template <class Vec>
void winograd_cotangent(const ConvShape& s, const float* DY, int64_t n, int64_t ty, int64_t tx0,
                        int nt, float* E, int64_t xs) {
  const int64_t CO = s.CO;
  for (int j = 0; j < nt; ++j) {
    const int64_t oh0 = 4 * ty, ow0 = 4 * (tx0 + j);
    const float* src[4][4];
    for (int a = 0; a < 4; ++a)
      for (int b = 0; b < 4; ++b) {
        const int64_t oh = oh0 + a, ow = ow0 + b;
        src[a][b] = oh < s.OH && ow < s.OW ? DY + ((n * s.OH + oh) * s.OW + ow) * CO : kZeros;
      }
    for (int64_t c = 0; c < CO; c += lanes<Vec>) {
      Vec t[WA][4];  // t[a][b] = (A e)[a][b]
      for (int b = 0; b < 4; ++b) {
        Vec e[4], col[WA];
        for (int a = 0; a < 4; ++a) e[a] = loadu<Vec>(src[a][b] + c);
        winograd_a(e, col);
        for (int a = 0; a < WA; ++a) t[a][b] = col[a];
      }
      for (int a = 0; a < WA; ++a) {  // (A e) A^T: row a of t through A again
        Vec v[WA];
        winograd_a(t[a], v);
        for (int k = 0; k < WA; ++k) storeu(E + (a * WA + k) * xs + j * CO + c, v[k]);
      }
    }
  }
}

// dw[i][j][c][co] = (G^T M[.][.][c][co] G)[i][j] for the channels of M ([36][Cg][CO], Cg of them,
// element xi at M + xi * xs) into dw's channels c0 .. c0 + Cg - 1 (dw: [3][3][C][CO]).
template <class V>
void winograd_kernel_gradient(const float* M, int64_t xs, int64_t Cg, int64_t CO, int64_t C,
                              int64_t c0, float* dw) {
  // G^T rows (3 x 6): the kernel transform's interpolation weights
  const float gt[3][WA] = {{1.f / 4, -1.f / 6, -1.f / 6, 1.f / 24, 1.f / 24, 0.f},
                           {0.f, -1.f / 6, 1.f / 6, 1.f / 12, -1.f / 12, 0.f},
                           {0.f, -1.f / 6, -1.f / 6, 1.f / 6, 1.f / 6, 1.f}};
  for (int64_t c = 0; c < Cg; ++c)
    for (int64_t co = 0; co < CO; co += lanes<V>) {
      V r[3][WA];  // (G^T M)[i][b]
      for (int i = 0; i < 3; ++i)
        for (int b = 0; b < WA; ++b) r[i][b] = bcast<V>(0.f);
      for (int a = 0; a < WA; ++a)
        for (int b = 0; b < WA; ++b) {
          const V m = loadu<V>(M + (a * WA + b) * xs + c * CO + co);
          for (int i = 0; i < 3; ++i) r[i][b] += bcast<V>(gt[i][a]) * m;
        }
      for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j) {
          V out = bcast<V>(0.f);
          for (int b = 0; b < WA; ++b) out += r[i][b] * bcast<V>(gt[j][b]);
          storeu(dw + ((i * 3 + j) * C + c0 + c) * CO + co, out);
        }
    }
}

// The Winograd kernel gradient of image n for input channels [c0, c0 + Cg) (Cg a multiple of 8)
// and every output channel; dwn: the image's [3][3][C][CO].
void wgrad_winograd_image(const WgradShape& w, const float* X, const float* DY, int64_t n,
                          int64_t c0, int64_t Cg, const std::vector<std::pair<int64_t, int64_t>>& spans,
                          float* dwn) {
  const ConvShape s{w.N, w.H, w.W, w.C, Cg, c0, w.OH, w.OW, w.CO, 3, 3, 1, w.pad};
  const int64_t CO = w.CO, TH = (w.OH + 3) / 4, TW = (w.OW + 3) / 4, T = kWgradTiles;
  const int64_t vs = T * Cg + kWinogradPad, es = T * CO + kWinogradPad;
  const int64_t ms = Cg * CO + kWinogradPad;
  float* V = scratch<float>(size_t(WA * WA) * (vs + es + ms) + 2 * kScratchGap);
  float* E = V + WA * WA * vs + kScratchGap;
  float* M = E + WA * WA * es + kScratchGap;
  std::fill(M, M + WA * WA * ms, 0.f);
  auto accumulate = [&](int64_t len) {  // M[xi] += V[xi][:len]^T E[xi][:len]
    for (int xi = 0; xi < WA * WA; ++xi)
      for (int64_t ci = 0; ci < Cg; ci += kWgradChannels)
        for (const auto& [co0, width] : spans) {
          float* out = M + xi * ms + ci * CO + co0;
          const float* v = V + xi * vs + ci;
          const float* e = E + xi * es + co0;
          with_channel_count(std::min<int64_t>(kWgradChannels, Cg - ci), [&](auto mr_tag) {
            constexpr int MRT = decltype(mr_tag)::value;
            with_span(width, [&](auto span) {
              using S = decltype(span);
              constexpr int L = lanes<typename S::vec>;
              typename S::vec acc[MRT][S::nv];
              for (int m = 0; m < MRT; ++m)
                for (int b = 0; b < S::nv; ++b) acc[m][b] = loadu<typename S::vec>(out + m * CO + b * L);
              wgrad_run<MRT, S::nv, typename S::vec>(v, Cg, e, CO, len, acc);
              for (int m = 0; m < MRT; ++m)
                for (int b = 0; b < S::nv; ++b) storeu(out + m * CO + b * L, acc[m][b]);
            });
          });
        }
  };
  int64_t filled = 0;
  for (int64_t ty = 0; ty < TH; ++ty)
    for (int64_t tx0 = 0; tx0 < TW;) {
      const int nt = int(std::min<int64_t>(T - filled, TW - tx0));
      with_vector_for(Cg, [&](auto v) {
        winograd_input<decltype(v)>(s, X, n, ty, tx0, nt, V + filled * Cg, vs);
      });
      with_vector_for(CO, [&](auto v) {
        winograd_cotangent<decltype(v)>(s, DY, n, ty, tx0, nt, E + filled * CO, es);
      });
      filled += nt;
      tx0 += nt;
      if (filled == T) {
        accumulate(T);
        filled = 0;
      }
    }
  if (filled) accumulate(filled);
  with_vector_for(CO, [&](auto v) {
    winograd_kernel_gradient<decltype(v)>(M, ms, Cg, CO, w.C, c0, dwn);
  });
}

// The kernel gradient of the RGB stem (3x3, 3 channels) per image: every output pixel's whole
// input patch at once (3 rows of 9 contiguous floats in NHWC), patch element t into accumulator t,
// 8 output channels per vector. The channel-tile kernel above has only 3 accumulators per tap
// there, too few to hide the multiply-add latency. NR patch rows per pass: all 3 (27
// accumulators) with AVX-512's 32 registers, one with AVX2's 16; the sums are the same.
#if defined(__AVX512F__)
constexpr int kStemRowsPerPass = 3;
#else
constexpr int kStemRowsPerPass = 1;
#endif

// With Stats, dy is d + the statistics' part of the stem's BatchNorm (StatsCotangent), added to
// each pixel's cotangent as it is read (through CotangentRows' row buffers, as the depthwise
// gradients do, the uint8 stem's gradient took 3.5-3.7 instead of 2.7-2.8 ms). The input's rows come from `input` (FloatImageRows, or
// MeanSubtractedRows for the uint8 image).
template <int NR, bool Stats, class Rows>
void wgrad_stem_pass(const WgradShape& s, Rows& input, const float* DY, const StatsCotangent& sc,
                     int64_t n, int64_t co0, int r0, float* dwn) {
  constexpr int KC = 9;  // a patch row: 3 pixels x 3 channels
  v8 acc[NR * KC];
  for (int t = 0; t < NR * KC; ++t) acc[t] = bcast(0.f);
  v8 m{}, a{}, b{};
  if constexpr (Stats) {
    const float* coef_n = sc.coef + n * 3 * s.CO + co0;
    m = loadu(coef_n), a = loadu(coef_n + s.CO), b = loadu(coef_n + 2 * s.CO);
  }
  for (int64_t oh = 0; oh < s.OH; ++oh) {
    const int64_t ih0 = oh * s.stride - s.pad + r0;
    const float* rows[NR];  // the patch rows (nullptr: outside the image)
    for (int i = 0; i < NR; ++i)
      rows[i] = ih0 + i >= 0 && ih0 + i < s.H ? input(n, ih0 + i) : nullptr;
    const bool rows_inside = ih0 >= 0 && ih0 + NR <= s.H;
    const int64_t g0 = (n * s.OH + oh) * s.OW * s.CO + co0;
    const float* g = DY + g0;
    for (int64_t ow = 0; ow < s.OW; ++ow) {
      v8 gv = loadu(g + ow * s.CO);
      if constexpr (Stats) gv += a + b * (loadu(sc.Z + g0 + ow * s.CO) - m);
      const int64_t iw0 = ow * s.stride - s.pad;
      const float* p[NR];
      float border[NR * KC];
      if (rows_inside && iw0 >= 0 && iw0 + 3 <= s.W) {
        for (int i = 0; i < NR; ++i) p[i] = rows[i] + iw0 * s.C;
      } else {  // image border: zeros outside
        for (int i = 0; i < NR; ++i) {
          for (int u = 0; u < KC; ++u) {
            const int64_t iw = iw0 + u / 3;
            const bool inside = rows[i] && iw >= 0 && iw < s.W;
            border[i * KC + u] = inside ? rows[i][iw * s.C + u % 3] : 0.f;
          }
          p[i] = border + i * KC;
        }
      }
      // (accumulators indexed by constants only, so they stay in registers)
#pragma GCC unroll 3
      for (int i = 0; i < NR; ++i)
#pragma GCC unroll 9
        for (int u = 0; u < KC; ++u) acc[i * KC + u] += bcast(p[i][u]) * gv;
    }
  }
  for (int t = 0; t < NR * KC; ++t) storeu(dwn + (r0 * KC + t) * s.CO + co0, acc[t]);
}

// The stem's kernel gradient of image n, its rows from `input`.
template <bool Stats, class Rows>
void wgrad_stem_image(const WgradShape& s, Rows& input, const float* DY, const StatsCotangent& sc,
                      int64_t n, float* dwn) {
  for (int64_t co0 = 0; co0 < s.CO; co0 += 8)
    for (int r0 = 0; r0 < 3; r0 += kStemRowsPerPass)
      wgrad_stem_pass<kStemRowsPerPass, Stats>(s, input, DY, sc, n, co0, r0, dwn);
}

// The stem's kernel gradient, a task per image; make_rows(): the task's row source.
template <class MakeRows>
void wgrad_stem(ffi::ThreadPool& pool, const WgradShape& s, MakeRows make_rows, const float* DY,
                const StatsCotangent& sc, bool stats, float* DW) {
  parallel_for(pool, s.N, [&](int64_t n) {
    auto input = make_rows();
    float* dwn = DW + n * 9 * s.C * s.CO;
    if (stats)
      wgrad_stem_image<true>(s, input, DY, sc, n, dwn);
    else
      wgrad_stem_image<false>(s, input, DY, sc, n, dwn);
  });
}

// The shape of a k x k kernel gradient from x [N, H, W, C], dy [N, OH, OW, CO] and dw [N, k, k,
// C, CO] (CO a multiple of 8); with stats, also z shaped like dy and coef [N, 3, CO].
template <class XDims, class Dims>
ffi::ErrorOr<WgradShape> wgrad_shape(const std::string& what, XDims xd, Dims gd, Dims wd, Dims zd,
                                     Dims cd, int64_t k, int64_t stride, int64_t pad,
                                     int64_t stats) {
  bool ok = xd.size() == 4 && gd.size() == 4 && wd.size() == 5 && k >= 1 && stride >= 1 && pad >= 0;
  WgradShape s{};
  if (ok) {
    s = WgradShape{xd[0], xd[1], xd[2], xd[3], gd[1], gd[2], gd[3], k, stride, pad};
    ok = gd[0] == s.N && s.CO % 8 == 0 && s.C >= 1 && s.OH == (s.H + 2 * pad - k) / stride + 1 &&
         s.OW == (s.W + 2 * pad - k) / stride + 1 && s.OH >= 1 && s.OW >= 1 && wd[0] == s.N &&
         wd[1] == k && wd[2] == k && wd[3] == s.C && wd[4] == s.CO;
  }
  if (!ok)
    return ffi::Unexpected(ffi::Error::InvalidArgument(
        what + ": expected x [N, H, W, C], dy [N, OH, OW, CO] (CO a multiple of 8) of a k x k "
               "convolution with this stride and padding, and dw [N, k, k, C, CO]"));
  if (stats && !(k == 3 && s.C == 3))
    return ffi::Unexpected(ffi::Error::InvalidArgument(
        what + ": stats (the statistics' part of dy) is supported for the 3-channel 3x3 stem "
               "only"));
  if (stats) {
    if (auto e = check_stats_cotangent(what, gd, zd, cd); e.failure())
      return ffi::Unexpected(e);
  }
  return s;
}

// The stem's kernel gradient from the uint8 image: x = float(image) - mean, converted row by row
// as the kernel reads it (MeanSubtractedRows, as RfConvU8), not from a float32 copy; otherwise
// RfWeightGradImpl's stem.
ffi::Error RfWeightGradU8Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::U8> x,
                              ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> dy,
                              ffi::Buffer<ffi::F32> z, ffi::Buffer<ffi::F32> coef,
                              ffi::ResultBuffer<ffi::F32> dw, int64_t k, int64_t stride,
                              int64_t pad, int64_t stats) {
  auto shape = wgrad_shape("retinaface_weight_grad_u8", x.dimensions(), dy.dimensions(),
                           dw->dimensions(), z.dimensions(), coef.dimensions(), k, stride, pad,
                           stats);
  if (shape.has_error()) return shape.error();
  const WgradShape s = *shape;
  if (k != 3 || s.C != 3 || int64_t(mean.element_count()) != s.C)
    return ffi::Error::InvalidArgument(
        "retinaface_weight_grad_u8: expected the 3x3 stem on a 3-channel image and a mean of 3 "
        "values");
  const ConvShape rows_shape{s.N, s.H, s.W, s.C, s.C, 0, s.OH, s.OW, s.CO, k, k, stride, pad};
  const uint8_t* X = x.typed_data();
  const float* M = mean.typed_data();
  wgrad_stem(pool, s, [&] { return MeanSubtractedRows(X, rows_shape, M, 3); }, dy.typed_data(),
             StatsCotangent{z.typed_data(), coef.typed_data()}, stats, dw->typed_data());
  return ffi::Error::Success();
}

// x [N, H, W, C], dy [N, OH, OW, CO] -> dw [N, k, k, C, CO] (per image), CO a multiple of 8.
// With stats (the 3-channel stem only), dy + the statistics' part of y's BatchNorm (z = y, coef:
// StatsCotangent), added as dy is read.
ffi::Error RfWeightGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                            ffi::Buffer<ffi::F32> z, ffi::Buffer<ffi::F32> coef,
                            ffi::ResultBuffer<ffi::F32> dw, int64_t k, int64_t stride, int64_t pad,
                            int64_t stats) {
  auto shape = wgrad_shape("retinaface_weight_grad", x.dimensions(), dy.dimensions(),
                           dw->dimensions(), z.dimensions(), coef.dimensions(), k, stride, pad,
                           stats);
  if (shape.has_error()) return shape.error();
  const WgradShape s = *shape;
  const float *X = x.typed_data(), *DY = dy.typed_data();
  const StatsCotangent sc{z.typed_data(), coef.typed_data()};
  float* DW = dw->typed_data();
  if (k == 3 && s.C == 3) {  // the stem
    wgrad_stem(pool, s, [&] { return FloatImageRows{X, s.H, s.W * s.C}; }, DY, sc, stats, DW);
    return ffi::Error::Success();
  }
  std::vector<std::pair<int64_t, int64_t>> spans;  // (co0, width) as for_each_span visits them
  for_each_span(s.CO, 0, nullptr, [&](auto span, int64_t c0, const float*, int64_t) {
    spans.emplace_back(c0, decltype(span)::width);
  });
  const int64_t nspans = int64_t(spans.size());
  if (k == 3 && stride == 1 && s.C % 8 == 0 && s.CO <= kMaxCin) {
    // Winograd: a task per image, or per (image, group of 8k input channels) when there are
    // fewer images than threads
    const int64_t threads = std::max<int64_t>(1, pool.num_threads());
    const int64_t groups = std::min<int64_t>(s.C / 8, (threads + s.N - 1) / s.N);
    const int64_t width = (s.C / 8 + groups - 1) / groups * 8;
    const int64_t ngroups = (s.C + width - 1) / width;
    parallel_for(pool, s.N * ngroups, [&](int64_t task) {
      const int64_t n = task / ngroups, c0 = task % ngroups * width;
      wgrad_winograd_image(s, X, DY, n, c0, std::min(width, s.C - c0), spans,
                           DW + n * 9 * s.C * s.CO);
    });
    return ffi::Error::Success();
  }
  // rows per block: ~64 KB of dy rows (with their x rows) stay in L2 while every tile passes
  const int64_t block = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, s.OW * s.CO));
  // a task per image runs every output-channel span over a block while it is in L2 (x and dy
  // come from memory once); with fewer images than threads, a task per (image, span)
  const int64_t span_groups = s.N >= std::max<int64_t>(1, pool.num_threads()) ? 1 : nspans;
  parallel_for(pool, s.N * span_groups, [&](int64_t task) {
    const int64_t n = task / span_groups;
    const int64_t sp0 = span_groups == 1 ? 0 : task % span_groups;
    const int64_t sp1 = span_groups == 1 ? nspans : sp0 + 1;
    float* dwn = DW + n * k * k * s.C * s.CO;
    for (int64_t sp = sp0; sp < sp1; ++sp)
      for (int64_t t = 0; t < k * k; ++t)
        for (int64_t c = 0; c < s.C; ++c)
          std::memset(dwn + (t * s.C + c) * s.CO + spans[size_t(sp)].first, 0,
                      size_t(spans[size_t(sp)].second) * sizeof(float));
    for (int64_t oh0 = 0; oh0 < s.OH; oh0 += block) {
      const int64_t oh1 = std::min(s.OH, oh0 + block);
      for (int64_t c0 = 0; c0 < s.C; c0 += kWgradChannels) {
        for (int64_t sp = sp0; sp < sp1; ++sp) {
          const int64_t co0 = spans[size_t(sp)].first, width = spans[size_t(sp)].second;
          auto run = [&](auto mr_tag) {
            constexpr int MRT = decltype(mr_tag)::value;
            with_span(width, [&](auto span) {
              using S = decltype(span);
              wgrad_tile<MRT, S::nv, typename S::vec>(s, X, DY, n, oh0, oh1, c0, co0, dwn);
            });
          };
          with_channel_count(std::min<int64_t>(kWgradChannels, s.C - c0), run);
        }
      }
    }
  });
  return ffi::Error::Success();
}

// -- Training: BatchNorm's per-channel sums ------------------------------------------------------
// Per image, so the calls stay batch-parallel (XLA combines the images): the batch statistics
// (row_moments, OutputMoments) and the backward's sum(g) and sum(g * (x - mean)).

// Runs fn(n, c0, lanes) over (image, channel chunk) tasks; chunks of 16 channels when they divide C.
template <class Fn>
void per_image_chunks(ffi::ThreadPool& pool, int64_t N, int64_t C, Fn&& fn) {
  const int64_t lanes_c = C % 16 == 0 ? 16 : 8, chunks = C / lanes_c;
  parallel_for(pool, N * chunks, [&](int64_t task) {
    fn(task / chunks, task % chunks * lanes_c, lanes_c);
  });
}

// x [N, H, W, C] -> moments [N, 2, C]: per image the channel means, then M2 (each row's moments,
// merged per image: OutputMoments), for a BatchNorm input that no kernel wrote.
ffi::Error RfMomentsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                         ffi::ResultBuffer<ffi::F32> moments) {
  auto xd = x.dimensions();
  if (xd.size() != 4 || xd[3] % 8 || xd[3] < 8 || xd[1] * xd[2] < 1)
    return ffi::Error::InvalidArgument(
        "retinaface_moments: expected x [N, H, W, C] (C a multiple of 8) and moments [N, 2, C]");
  const int64_t N = xd[0], H = xd[1], W = xd[2], C = xd[3];
  auto stats = output_moments(moments, N, H, W, C, "retinaface_moments");
  if (stats.has_error()) return stats.error();
  if (!stats->out)
    return ffi::Error::InvalidArgument("retinaface_moments: expected moments [N, 2, C]");
  const float* X = x.typed_data();
  float* const M = stats->rows();
  const int64_t rows = N * H, chunk = rows_per_task(rows, W * C, 16384);
  parallel_for(pool, (rows + chunk - 1) / chunk, [&](int64_t task) {
    for (int64_t r = task * chunk; r < std::min(rows, (task + 1) * chunk); ++r)
      row_moments(X, r, W, C, M);
  });
  stats->finish(pool);
  return ffi::Error::Success();
}

// Per image: sum(g) and sum(g * (x - mean)) over its rows, g the BatchNorm output's cotangent.
// Masked: dy is the cotangent of LeakyReLU(z) with z = x * k + c the BatchNorm output, so
// g = z > 0 ? dy : slope * dy (torch's subgradient at 0), recomputed here instead of stored.
// Direct: also stores k * g into direct (which may be Dy).
template <class V, bool Masked, bool Direct>
void grad_sums_image(const float* Dy, const float* X, const float* mean, const float* k,
                     const float* c, float slope, int64_t rows, int64_t W, int64_t C, int64_t c0,
                     float* sum_g, float* sum_gx, float* direct) {
  V a = bcast<V>(0.f), b = bcast<V>(0.f);
  const V m = loadu<V>(mean + c0);
  const V kv = loadu<V>(k + c0), cv = loadu<V>(c + c0), sv = bcast<V>(slope);
  for (int64_t r = 0; r < rows; ++r) {
    const float *dy = Dy + r * W * C + c0, *x = X + r * W * C + c0;
    // per row first (shorter float32 chains), in four partial sums (one chain of dependent adds
    // was latency-bound)
    V ra[4], rb[4];
    for (int k = 0; k < 4; ++k) ra[k] = rb[k] = bcast<V>(0.f);
    auto add = [&](int64_t i, int k) {
      V gv = loadu<V>(dy + i * C);
      const V xv = loadu<V>(x + i * C);
      if constexpr (Masked) gv = xv * kv + cv > 0 ? gv : gv * sv;
      if constexpr (Direct) storeu(direct + r * W * C + c0 + i * C, kv * gv);
      ra[k] += gv;
      rb[k] += gv * (xv - m);
    };
    int64_t i = 0;
    for (; i + 4 <= W; i += 4)
      for (int k = 0; k < 4; ++k) add(i + k, k);
    for (int k = 0; i < W; ++i, ++k) add(i, k);
    a += (ra[0] + ra[1]) + (ra[2] + ra[3]);
    b += (rb[0] + rb[1]) + (rb[2] + rb[3]);
  }
  storeu(sum_g + c0, a);
  storeu(sum_gx + c0, b);
}

// dy, x [N, H, W, C], mean, k, c [C] -> sums [N, 2, C]: per image sum(g), then
// sum(g * (x - mean)), with g = dy (slope 1: no activation) or dy masked by LeakyReLU(x * k + c).
ffi::Error RfBnGradSumsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy,
                            ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> mean,
                            ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> c,
                            ffi::ResultBuffer<ffi::F32> sums, float slope) {
  auto xd = x.dimensions();
  auto gd = dy.dimensions();
  auto sd = sums->dimensions();
  const int64_t channels = xd.size() == 4 ? xd[3] : -1;
  bool ok = xd.size() == 4 && gd.size() == 4 && xd[3] % 8 == 0 && xd[3] >= 8 && sd.size() == 3 &&
            int64_t(mean.element_count()) == channels && int64_t(k.element_count()) == channels &&
            int64_t(c.element_count()) == channels;
  for (size_t i = 0; ok && i < 4; ++i) ok = gd[i] == xd[i];
  ok = ok && sd[0] == xd[0] && sd[1] == 2 && sd[2] == xd[3];
  if (!ok)
    return ffi::Error::InvalidArgument(
        "retinaface_bn_grad_sums: expected dy and x [N, H, W, C] (C a multiple of 8), mean, k "
        "and c [C] and sums [N, 2, C]");
  const int64_t N = xd[0], H = xd[1], W = xd[2], C = xd[3];
  const float *G = dy.typed_data(), *X = x.typed_data(), *Mn = mean.typed_data();
  const float *K = k.typed_data(), *B = c.typed_data();
  float* S = sums->typed_data();
  per_image_chunks(pool, N, C, [&](int64_t n, int64_t c0, int64_t lanes_c) {
    with_vector_for(lanes_c, [&](auto v) {
      using V = decltype(v);
      const float *g = G + n * H * W * C, *xn = X + n * H * W * C;
      float *sg = S + n * 2 * C, *sgx = S + n * 2 * C + C;
      if (slope == 1.f)
        grad_sums_image<V, false>(g, xn, Mn, K, B, slope, H, W, C, c0, sg, sgx);
      else
        grad_sums_image<V, true>(g, xn, Mn, K, B, slope, H, W, C, c0, sg, sgx);
    });
  });
  return ffi::Error::Success();
}

// -- Training: a BatchNorm + LeakyReLU read through by the depthwise layer after it -----------
// When a depthwise layer is the only consumer of a BatchNorm (batch statistics) and its LeakyReLU,
// the activation a = act(x * k + c) is never stored: the depthwise forward and its kernel
// gradient read the BatchNorm's input x and compute a row by row (BatchNormRows), and the input
// gradient's rows end with the BatchNorm's backward sums over that row, computed while the row is
// in cache (the separate pass over dy and x would read both from memory again).

// y = depthwise(act(x * k + c, slope), kernel): x [N, H, W, C], kernel [9][C], k and c [C].
ffi::Error RfDepthwiseBnImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                             ffi::Buffer<ffi::F32> kernel, ffi::Buffer<ffi::F32> k,
                             ffi::Buffer<ffi::F32> c, ffi::ResultBuffer<ffi::F32> y,
                             ffi::ResultBuffer<ffi::F32> moments, int64_t stride, float slope) {
  auto shape = dw_shape("retinaface_depthwise_bn", x.dimensions(), y->dimensions(),
                        int64_t(kernel.element_count()), stride);
  if (shape.has_error()) return shape.error();
  const DwShape s = *shape;
  auto stats = output_moments(moments, s.N, s.OH, s.OW, s.C, "retinaface_depthwise_bn");
  if (stats.has_error()) return stats.error();
  float* const M = stats->rows();
  if (int64_t(k.element_count()) != s.C || int64_t(c.element_count()) != s.C)
    return ffi::Error::InvalidArgument("retinaface_depthwise_bn: expected k and c of [C] values");
  const std::vector<float> zeros(size_t(s.C), 0.f), ones(size_t(s.C), 1.f);
  const float *X = x.typed_data(), *K = kernel.typed_data();
  float* Y = y->typed_data();
  const int64_t rows = s.N * s.OH, chunk = rows_per_task(rows, s.OW * s.C * 9);
  parallel_for(pool, (rows + chunk - 1) / chunk, [&](int64_t task) {
    BatchNormRows input(X, s.N, s.H, s.W, s.C, k.typed_data(), c.typed_data(), slope);
    for (int64_t r = task * chunk; r < std::min(rows, (task + 1) * chunk); ++r) {
      const float* in[3];
      depthwise_input_rows(input, r / s.OH, r % s.OH, s.H, s.stride, in);
      with_vector_for(s.C, [&](auto v) {
        depthwise_row_at<decltype(v)>(in, s.W, s.C, s.stride, s.OW, K, zeros.data(), ones.data(),
                                      Y + r * s.OW * s.C);
      });
      row_moments(Y, r, s.OW, s.C, M);
    }
  });
  stats->finish(pool);
  return ffi::Error::Success();
}

// Gradients of RfDepthwiseBn for the cotangent dy (depthwise_grad_blocks with the BatchNorm):
// dx [N, H, W, C], the BatchNorm's direct input gradient k * g (g the cotangent of x * k + c,
// without the part through the batch statistics); dkernel per image and row block [N, B, 9, C];
// and per row of dx the BatchNorm's backward sums [N, H, 2, C] of g and g * (x - mean). With
// stats, dy + the statistics' part of y's own BatchNorm (z = y, coef: StatsCotangent).
ffi::Error RfDepthwiseBnGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                 ffi::Buffer<ffi::F32> kernel, ffi::Buffer<ffi::F32> dy,
                                 ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> c,
                                 ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> z,
                                 ffi::Buffer<ffi::F32> coef, ffi::ResultBuffer<ffi::F32> da,
                                 ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> sums,
                                 int64_t stride, float slope, int64_t stats) {
  auto shape = dw_shape("retinaface_depthwise_bn_grad", x.dimensions(), dy.dimensions(),
                        int64_t(kernel.element_count()), stride);
  if (shape.has_error()) return shape.error();
  const DwShape s = *shape;
  auto dad = da->dimensions();
  auto dkd = dk->dimensions();
  auto sd = sums->dimensions();
  if (dad.size() != 4 || dad[0] != s.N || dad[1] != s.H || dad[2] != s.W || dad[3] != s.C ||
      dkd.size() != 4 || dkd[0] != s.N || dkd[1] < 1 || dkd[1] > s.OH || dkd[2] != 9 ||
      dkd[3] != s.C || sd.size() != 4 || sd[0] != s.N || sd[1] != s.H || sd[2] != 2 ||
      sd[3] != s.C || int64_t(k.element_count()) != s.C || int64_t(c.element_count()) != s.C ||
      int64_t(mean.element_count()) != s.C)
    return ffi::Error::InvalidArgument(
        "retinaface_depthwise_bn_grad: expected da shaped like x, dk [N, B, 9, C] (1 <= B <= "
        "output rows), sums [N, H, 2, C] and k, c, mean of [C] values");
  if (auto e = check_stats_cotangent("retinaface_depthwise_bn_grad", dy.dimensions(),
                                     z.dimensions(), coef.dimensions());
      e.failure())
    return e;
  const BatchNormInput bn{k.typed_data(), c.typed_data(), mean.typed_data(), slope};
  const StatsCotangent sc{z.typed_data(), coef.typed_data()};
  auto run = [&](auto stats_tag) {
    depthwise_grad_blocks<true, decltype(stats_tag)::value>(
        pool, s, x.typed_data(), kernel.typed_data(), dy.typed_data(), dkd[1], bn, sc,
        da->typed_data(), dk->typed_data(), sums->typed_data());
  };
  if (stats)
    run(std::true_type{});
  else
    run(std::false_type{});
  return ffi::Error::Success();
}

// -- Training: a BatchNorm + LeakyReLU read through by the 1x1 layer after it ----------------
// The same for a 1x1 stride-1 layer (MobileNet's pointwise layers after their depthwise layer's
// BatchNorm): its forward and its kernel gradient normalise x row by row (BatchNormRows), and its
// input gradient's rows end with the BatchNorm's backward sums.

// y = conv1x1(act(x * k + c, slope)) with the packed weights, bias and slopes at the offsets.
ffi::Error RfConvBnImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> params,
                        ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> c,
                        ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> moments,
                        int64_t w_offset, int64_t b_offset, int64_t s_offset, float slope) {
  const int64_t cin = x.dimensions().size() == 4 ? x.dimensions()[3] : 0;
  auto shape = conv_shape("retinaface_conv_bn", x.dimensions(), y->dimensions(), cin, 0, 1, 1, 1, 0);
  if (shape.has_error()) return shape.error();
  const ConvShape s = *shape;
  auto stats = output_moments(moments, s.N, s.OH, s.OW, s.CO, "retinaface_conv_bn");
  if (stats.has_error()) return stats.error();
  float* const M = stats->rows();
  if (int64_t(k.element_count()) != s.C || int64_t(c.element_count()) != s.C)
    return ffi::Error::InvalidArgument("retinaface_conv_bn: expected k and c of [C] values");
  if (auto e = check_layer(params, "retinaface_conv_bn", s.C * s.CO, s.CO, w_offset, b_offset,
                           s_offset);
      e.failure())
    return e;
  const float* P = params.typed_data();
  const float* X = x.typed_data();
  float* Y = y->typed_data();
  const int64_t rows = s.N * s.H, ntiles = (s.W + MR - 1) / MR;
  const int64_t chunk = rows_per_task(rows, s.W * s.CO * s.C);
  parallel_for(pool, (rows + chunk - 1) / chunk, [&](int64_t task) {
    BatchNormRows input(X, s.N, s.H, s.W, s.C, k.typed_data(), c.typed_data(), slope);
    std::vector<const float*> ptrs(size_t(ntiles * MR));
    for (int64_t r = task * chunk; r < std::min(rows, (task + 1) * chunk); ++r) {
      const float* a = input(r / s.H, r % s.H);
      for (int64_t m = 0; m < ntiles * MR; ++m) ptrs[size_t(m)] = m < s.W ? a + m * s.C : kZeros;
      conv_row_blocks(ptrs.data(), ntiles, s.W, 1, s.C, P + w_offset, P + b_offset, P + s_offset,
                      Y + r * s.W * s.CO, s.CO);
      row_moments(Y, r, s.W, s.CO, M);
    }
  });
  stats->finish(pool);
  return ffi::Error::Success();
}

// The gradients of that layer for the cotangent dy [N, H, W, CO]: da = conv1x1(dy, w^T) (w^T
// packed at the offsets: CO inputs, C outputs), the cotangent of a = act(x * k + c) [N, H, W, C];
// the kernel gradient per image and row block, dw [N, B, C, CO] = sum of a dy^T; and per row of
// da the BatchNorm's backward sums [N, H, 2, C] of g and g * (x - mean), g = x * k + c > 0 ?
// da : slope * da; da is then returned as the BatchNorm's direct input gradient dx = k * g. One
// pass per row block, as RfDepthwiseBnGrad: each row of dy and x is read from memory once for all
// three (separate input- and kernel-gradient kernels read both twice). With stats, dy + the
// statistics' part of y's own BatchNorm (z = y, coef: StatsCotangent), row by row.
ffi::Error RfConvBnGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy,
                            ffi::Buffer<ffi::F32> params, ffi::Buffer<ffi::F32> x,
                            ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> c,
                            ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> z,
                            ffi::Buffer<ffi::F32> coef, ffi::ResultBuffer<ffi::F32> da,
                            ffi::ResultBuffer<ffi::F32> dw, ffi::ResultBuffer<ffi::F32> sums,
                            int64_t w_offset, int64_t b_offset, int64_t s_offset, float slope,
                            int64_t stats) {
  const int64_t cout = dy.dimensions().size() == 4 ? dy.dimensions()[3] : 0;
  auto shape = conv_shape("retinaface_conv_bn_grad", dy.dimensions(), da->dimensions(), cout, 0,
                          1, 1, 1, 0);
  if (shape.has_error()) return shape.error();
  const ConvShape s = *shape;  // from dy (s.C = CO) to da (s.CO = C)
  const int64_t C = s.CO, CO = s.C;
  auto xd = x.dimensions();
  auto wd = dw->dimensions();
  auto sd = sums->dimensions();
  bool ok = xd.size() == 4 && wd.size() == 4 && wd[0] == s.N && wd[1] >= 1 && wd[1] <= s.H &&
            wd[2] == C && wd[3] == CO && sd.size() == 4 && sd[0] == s.N && sd[1] == s.H &&
            sd[2] == 2 && sd[3] == C && CO % 8 == 0 && int64_t(k.element_count()) == C &&
            int64_t(c.element_count()) == C && int64_t(mean.element_count()) == C;
  for (size_t i = 0; ok && i < 4; ++i) ok = xd[i] == da->dimensions()[i];
  if (!ok)
    return ffi::Error::InvalidArgument(
        "retinaface_conv_bn_grad: expected x shaped like da, dw [N, B, C, CO] (1 <= B <= H, CO a "
        "multiple of 8), sums [N, H, 2, C] and k, c, mean of [C] values");
  if (auto e = check_layer(params, "retinaface_conv_bn_grad", C * CO, C, w_offset, b_offset,
                           s_offset);
      e.failure())
    return e;
  if (auto e = check_stats_cotangent("retinaface_conv_bn_grad", dy.dimensions(), z.dimensions(),
                                     coef.dimensions());
      e.failure())
    return e;
  const float *P = params.typed_data(), *G = dy.typed_data(), *X = x.typed_data();
  const float *Z = z.typed_data(), *Coef = coef.typed_data();
  const BatchNormInput bn{k.typed_data(), c.typed_data(), mean.typed_data(), slope};
  float *DA = da->typed_data(), *DW = dw->typed_data(), *S = sums->typed_data();
  const int64_t blocks = wd[1], ntiles = (s.W + MR - 1) / MR;
  std::vector<std::pair<int64_t, int64_t>> spans;  // (co0, width) as for_each_span visits them
  for_each_span(CO, 0, nullptr, [&](auto span, int64_t c0, const float*, int64_t) {
    spans.emplace_back(c0, decltype(span)::width);
  });
  // one row as an image for the kernel-gradient tiles: 1x1, stride 1, no padding
  const WgradShape row{1, 1, s.W, C, 1, s.W, CO, 1, 1, 0};
  parallel_for(pool, s.N * blocks, [&](int64_t task) {
    const int64_t n = task / blocks, b = task % blocks;
    const int64_t h0 = b * s.H / blocks, h1 = (b + 1) * s.H / blocks;
    BatchNormRows input(X, s.N, s.H, s.W, C, bn.k, bn.c, bn.slope);
    std::vector<const float*> ptrs(size_t(ntiles * MR));
    float* dwt = DW + task * C * CO;
    float* grow = stats ? scratch<float, 1>(size_t(s.W * CO)) : nullptr;
    std::fill(dwt, dwt + C * CO, 0.f);
    for (int64_t h = h0; h < h1; ++h) {
      const int64_t r = n * s.H + h;
      const float* g = G + r * s.W * CO;
      if (stats) {  // dy's row with the statistics' part added, in cache for both gradients
        with_vector_for(CO, [&](auto v) {
          stats_cotangent_row<decltype(v)>(g, Z + r * s.W * CO, Coef + n * 3 * CO, s.W, CO, grow);
        });
        g = grow;
      }
      const float* a = input(n, h);  // reads (and prefetches the next) x row
      for (int64_t m = 0; m < ntiles * MR; ++m) ptrs[size_t(m)] = m < s.W ? g + m * CO : kZeros;
      float* out = DA + r * s.W * C;
      conv_row_blocks(ptrs.data(), ntiles, s.W, 1, CO, P + w_offset, P + b_offset, P + s_offset,
                      out, C);
      with_vector_for(C, [&](auto v) {
        row_grad_sums<decltype(v)>(out, X + r * s.W * C, bn, s.W, C, S + r * 2 * C);
      });
      for (int64_t c0 = 0; c0 < C; c0 += kWgradChannels)
        for (const auto& [co0, width] : spans)
          with_channel_count(std::min<int64_t>(kWgradChannels, C - c0), [&](auto mr_tag) {
            constexpr int MRT = decltype(mr_tag)::value;
            with_span(width, [&](auto span) {
              using Sp = decltype(span);
              wgrad_tile<MRT, Sp::nv, typename Sp::vec>(row, a, g, 0, 0, 1, c0, co0, dwt);
            });
          });
    }
  });
  return ffi::Error::Success();
}

// Greedy NMS of one image's candidates, sorted by score descending (-inf: no candidate), with the
// exact float32 arithmetic of greedy_nms in retinaface_jax/inference/postprocess.py (the original
// py_cpu_nms): no contraction into FMAs, IEEE division, NaN propagating through min/max and
// suppressing (ovr <= threshold is false for NaN).
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#pragma STDC FP_CONTRACT OFF
// max / min that return NaN when either operand is NaN (as numpy's np.maximum / np.minimum).
inline v8 nan_max(v8 a, v8 b) { return (a != a) | (b != b) ? a + b : (a > b ? a : b); }
inline v8 nan_min(v8 a, v8 b) { return (a != a) | (b != b) ? a + b : (a < b ? a : b); }

// order: candidate indices sorted by score descending. Writes the kept indices to keep. The
// candidates' boxes and areas are laid out by rank (structure of arrays, padded to 8 lanes) so
// each kept box's IoU with every later candidate is computed 8 lanes at a time (3x faster than
// scalar; compacting the survivors after each kept box measured slower); the arithmetic per lane
// is the scalar py_cpu_nms expression (IEEE operations give the same bits in vector registers).
int64_t greedy_nms(const int32_t* order, int64_t n, const float* boxes, float threshold,
                   int64_t max_keep, int32_t* keep, std::vector<float>& soa,
                   std::vector<int32_t>& active) {
  const int64_t np = (n + 7) / 8 * 8;
  soa.assign(size_t(5 * np), 0.f);
  active.assign(size_t(np), 0);
  float *x1 = soa.data(), *y1 = x1 + np, *x2 = y1 + np, *y2 = x2 + np, *area = y2 + np;
  for (int64_t j = 0; j < n; ++j) {
    const float* b = boxes + 4 * int64_t(order[j]);
    x1[j] = b[0], y1[j] = b[1], x2[j] = b[2], y2[j] = b[3];
    area[j] = (b[2] - b[0] + 1.f) * (b[3] - b[1] + 1.f);
    active[j] = 1;
  }
  const v8 zero = bcast(0.f), one = bcast(1.f), thr = bcast(threshold);
  int64_t count = 0;
  int64_t i = n > 0 ? 0 : -1;
  while (count < max_keep && i >= 0) {
    keep[count++] = order[i];
    const v8 bx1 = bcast(x1[i]), by1 = bcast(y1[i]), bx2 = bcast(x2[i]), by2 = bcast(y2[i]);
    const v8 ai = bcast(area[i]);
    for (int64_t j = (i + 1) / 8 * 8; j < np; j += 8) {  // lanes <= i are left alone below
      const v8 w = nan_max(zero, nan_min(bx2, loadu(x2 + j)) - nan_max(bx1, loadu(x1 + j)) + one);
      const v8 h = nan_max(zero, nan_min(by2, loadu(y2 + j)) - nan_max(by1, loadu(y1 + j)) + one);
      const v8 inter = w * h;
      const v8 ovr = inter / (ai + loadu(area + j) - inter);
      i8 act;
      std::memcpy(&act, active.data() + j, sizeof(act));
      const i8 lane = i8{0, 1, 2, 3, 4, 5, 6, 7} + int32_t(j);
      act = lane > int32_t(i) ? act & (ovr <= thr) : act;  // (ovr <= thr): -1 or 0; NaN: 0
      std::memcpy(active.data() + j, &act, sizeof(act));
    }
    int64_t next = -1;
    for (int64_t j = i + 1; j < n && next < 0; ++j)
      if (active[j]) next = j;
    i = next;
  }
  for (int64_t c = count; c < max_keep; ++c) keep[c] = -1;
  return count;
}
#pragma GCC pop_options

// scores [B, P] (non-finite, e.g. -inf: not a candidate), boxes [B, P, 4], threshold [] -> keep [B, max_keep]
// (indices into P, -1 after count), count [B]. Candidates are ordered by score descending, ties
// by index (jax.lax.top_k's order), cut to the top_k best, then reduced by greedy NMS.
ffi::Error RfTopkNmsImpl(ffi::Buffer<ffi::F32> scores, ffi::Buffer<ffi::F32> boxes,
                         ffi::Buffer<ffi::F32> threshold, ffi::ResultBuffer<ffi::S32> keep,
                         ffi::ResultBuffer<ffi::S32> count, int64_t top_k) {
  auto sd = scores.dimensions();
  auto bd = boxes.dimensions();
  auto kd = keep->dimensions();
  if (sd.size() != 2 || bd.size() != 3 || bd[0] != sd[0] || bd[1] != sd[1] || bd[2] != 4 ||
      kd.size() != 2 || kd[0] != sd[0] || threshold.element_count() != 1 ||
      count->element_count() != size_t(sd[0]) || top_k < 0 || sd[1] > INT32_MAX)
    return ffi::Error::InvalidArgument(
        "retinaface_topk_nms: expected scores [B,P], boxes [B,P,4], threshold [], keep "
        "[B,max_keep], count [B], top_k >= 0");
  const int64_t B = sd[0], P = sd[1], max_keep = kd[1];
  const float thr = threshold.typed_data()[0];
  std::vector<uint64_t> keys;
  std::vector<int32_t> order, active;
  std::vector<float> soa;
  for (int64_t b = 0; b < B; ++b) {
    const float* sc = scores.typed_data() + b * P;
    // (score descending, index ascending) as one integer key: the high word orders the float
    // scores (sign-magnitude flipped to an unsigned order, -0 as +0, then complemented for
    // descending), the low word is the index. Candidates: finite scores, as greedy_nms.
    keys.clear();
    for (int64_t j = 0; j < P; ++j) {
      if (!std::isfinite(sc[j])) continue;
      uint32_t u;
      const float f = sc[j] == 0.f ? 0.f : sc[j];
      std::memcpy(&u, &f, sizeof(u));
      u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
      keys.push_back((uint64_t(~u) << 32) | uint64_t(j));
    }
    const int64_t n = std::min<int64_t>(top_k, int64_t(keys.size()));
    if (n < int64_t(keys.size())) std::nth_element(keys.begin(), keys.begin() + n, keys.end());
    std::sort(keys.begin(), keys.begin() + n);
    order.resize(size_t(n));
    for (int64_t j = 0; j < n; ++j) order[size_t(j)] = int32_t(keys[size_t(j)] & 0xffffffffu);
    count->typed_data()[b] = int32_t(greedy_nms(order.data(), n, boxes.typed_data() + b * P * 4, thr,
                                                max_keep, keep->typed_data() + b * max_keep, soa,
                                                active));
  }
  return ffi::Error::Success();
}

// MultiBoxLoss's matching overlaps (retinaface_jax/loss.py, _best_overlaps) for the CPU train step.
// truths [B, M, 4] and priors [P, 4] in point form, usable [B, M] -> per face the overlap of its
// best prior and that prior's first index [B, M] (-1 / 0 for a face that is not usable), per prior
// the overlap of its best usable face and that face's first index [B, P] (-1 / 0 when none): ties
// go to the first index, as torch's max. The XLA formulation writes a [B, 8, P] IoU per chunk of 8
// faces and reads it back four times (~0.12 ms per face of the batch's most crowded image at batch
// 8, 640 x 640); here a task holds one image's block of priors (coordinates, areas and running best:
// 28 KB) in cache and runs every usable face over it; the faces' best priors are merged over the
// blocks after.
// The IoU is the original's expression, each operation rounded (no contraction into FMAs):
// inter / (area_a + area_b - inter), the intersection's width and height clamped at 0.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#pragma STDC FP_CONTRACT OFF
constexpr int64_t kMatchBlock = 1024;  // priors per task: a multiple of 16

// The int32 vector with as many lanes as float vector V.
template <class V>
struct int_lanes;
template <>
struct int_lanes<v8> {
  using type = i8;
};
template <>
struct int_lanes<v16> {
  using type = i16;
};

// One task: priors [p0, p0 + kMatchBlock) of soa (5 rows of `stride` floats), the first `count`
// of them real, against one image's usable faces (rows `faces` of truths [M, 4]).
template <class V>
void match_block(const float* soa, int64_t stride, int64_t p0, int64_t count, const float* truths,
                 const int32_t* faces, int64_t nfaces, float* prior_best, int32_t* prior_idx,
                 float* face_best, int32_t* face_idx) {
  using I = typename int_lanes<V>::type;
  constexpr int L = lanes<V>;
  const float *x1 = soa + p0, *y1 = x1 + stride, *x2 = y1 + stride, *y2 = x2 + stride;
  const float* area = y2 + stride;
  alignas(64) float best[kMatchBlock];
  alignas(64) int32_t owner[kMatchBlock];
  for (int64_t j = 0; j < kMatchBlock; ++j) best[j] = -1.f, owner[j] = 0;
  I iota;
  for (int l = 0; l < L; ++l) iota[l] = l;
  const V zero = bcast<V>(0.f);
  for (int64_t f = 0; f < nfaces; ++f) {
    const int32_t m = faces[f];
    const float* t = truths + 4 * int64_t(m);
    const V a0 = bcast<V>(t[0]), a1 = bcast<V>(t[1]), a2 = bcast<V>(t[2]), a3 = bcast<V>(t[3]);
    const V area_a = bcast<V>((t[2] - t[0]) * (t[3] - t[1]));
    const I face = I{} + m;
    V fbest = bcast<V>(-1.f);
    I fidx = I{};
    for (int64_t j = 0; j < kMatchBlock; j += L) {
      const V iw = (a2 < loadu<V>(x2 + j) ? a2 : loadu<V>(x2 + j)) -
                   (a0 > loadu<V>(x1 + j) ? a0 : loadu<V>(x1 + j));
      const V ih = (a3 < loadu<V>(y2 + j) ? a3 : loadu<V>(y2 + j)) -
                   (a1 > loadu<V>(y1 + j) ? a1 : loadu<V>(y1 + j));
      const V inter = (iw > zero ? iw : zero) * (ih > zero ? ih : zero);
      const V iou = inter / (area_a + loadu<V>(area + j) - inter);
      V b = loadu<V>(best + j);
      I o;
      std::memcpy(&o, owner + j, sizeof(o));
      const auto take = iou > b;  // later faces replace only on a strictly larger overlap
      b = take ? iou : b;
      o = take ? face : o;
      storeu(best + j, b);
      std::memcpy(owner + j, &o, sizeof(o));
      const auto up = iou > fbest;  // per lane the first maximum (indices rise along a lane)
      fbest = up ? iou : fbest;
      fidx = up ? iota + int32_t(p0 + j) : fidx;
    }
    float fb = -1.f;
    int32_t fi = 0;
    for (int l = 0; l < L; ++l)  // the largest overlap, then the smallest index holding it
      if (fbest[l] > fb || (fbest[l] == fb && fidx[l] < fi)) fb = fbest[l], fi = fidx[l];
    face_best[f] = fb;
    face_idx[f] = fi;
  }
  for (int64_t j = 0; j < count; ++j) prior_best[j] = best[j], prior_idx[j] = owner[j];
}
#pragma GCC pop_options

ffi::Error RfMatchOverlapsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> truths,
                               ffi::Buffer<ffi::PRED> usable, ffi::Buffer<ffi::F32> priors,
                               ffi::ResultBuffer<ffi::F32> face_best,
                               ffi::ResultBuffer<ffi::S32> face_idx,
                               ffi::ResultBuffer<ffi::F32> prior_best,
                               ffi::ResultBuffer<ffi::S32> prior_idx) {
  auto td = truths.dimensions();
  auto ud = usable.dimensions();
  auto pd = priors.dimensions();
  if (td.size() != 3 || td[2] != 4 || ud.size() != 2 || ud[0] != td[0] || ud[1] != td[1] ||
      pd.size() != 2 || pd[1] != 4 || pd[0] > INT32_MAX || td[1] > INT32_MAX ||
      face_best->element_count() != size_t(td[0] * td[1]) ||
      face_idx->element_count() != size_t(td[0] * td[1]) ||
      prior_best->element_count() != size_t(td[0] * pd[0]) ||
      prior_idx->element_count() != size_t(td[0] * pd[0]))
    return ffi::Error::InvalidArgument(
        "retinaface_match_overlaps: expected truths [B,M,4], usable [B,M], priors [P,4], results "
        "[B,M], [B,M], [B,P], [B,P]");
  const int64_t B = td[0], M = td[1], P = pd[0];
  const int64_t blocks = (P + kMatchBlock - 1) / kMatchBlock;
  const int64_t padded = blocks * kMatchBlock;
  // priors as structure of arrays (x1, y1, x2, y2, area), padded with NaN boxes: a NaN overlap
  // never compares larger, so the padding wins nothing
  std::vector<float> soa(size_t(5 * padded), std::numeric_limits<float>::quiet_NaN());
  const float* pp = priors.typed_data();
  for (int64_t p = 0; p < P; ++p) {
    const float* q = pp + 4 * p;
    for (int k = 0; k < 4; ++k) soa[size_t(k * padded + p)] = q[k];
    soa[size_t(4 * padded + p)] = (q[2] - q[0]) * (q[3] - q[1]);
  }
  // the usable rows of each image, in order
  std::vector<int32_t> faces(size_t(B * M));
  std::vector<int64_t> count(size_t(B), 0);
  const bool* use = usable.typed_data();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t m = 0; m < M; ++m)
      if (use[b * M + m]) faces[size_t(b * M + count[size_t(b)]++)] = int32_t(m);
  // per (image, block): each usable face's best overlap and first index within the block
  std::vector<float> part_best(size_t(B * blocks * M));
  std::vector<int32_t> part_idx(size_t(B * blocks * M));
  const float* T = truths.typed_data();
  parallel_for(pool, B * blocks, [&](int64_t task) {
    const int64_t b = task / blocks, k = task % blocks, p0 = k * kMatchBlock;
    const size_t part = size_t((b * blocks + k) * M);
    with_vector_for(kMatchBlock, [&](auto v) {
      match_block<decltype(v)>(soa.data(), padded, p0, std::min(kMatchBlock, P - p0),
                               T + b * M * 4, faces.data() + b * M, count[size_t(b)],
                               prior_best->typed_data() + b * P + p0,
                               prior_idx->typed_data() + b * P + p0, part_best.data() + part,
                               part_idx.data() + part);
    });
  });
  for (int64_t b = 0; b < B; ++b) {
    float* fb = face_best->typed_data() + b * M;
    int32_t* fi = face_idx->typed_data() + b * M;
    for (int64_t m = 0; m < M; ++m) fb[m] = -1.f, fi[m] = 0;
    for (int64_t f = 0; f < count[size_t(b)]; ++f) {
      float best = -1.f;
      int32_t idx = 0;
      for (int64_t k = 0; k < blocks; ++k) {  // blocks in prior order: strictly larger replaces
        const size_t at = size_t((b * blocks + k) * M + f);
        if (part_best[at] > best) best = part_best[at], idx = part_idx[at];
      }
      const int32_t m = faces[size_t(b * M + f)];
      fb[m] = best, fi[m] = idx;
    }
  }
  return ffi::Error::Success();
}

}  // namespace

namespace {
// What every convolution handler binds first (XLA's thread pool, x, the parameter buffer, y) and
// last (the offsets of the layer's packed weights, bias [cout] and negative slopes [cout]).
template <ffi::DataType XT>
auto conv_binding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .template Arg<ffi::Buffer<XT>>()         // x
      .template Arg<ffi::Buffer<ffi::F32>>()   // every layer's parameters
      .template Ret<ffi::Buffer<ffi::F32>>();  // y
}
template <class Binding>
auto with_offsets(Binding binding) {
  return std::move(binding)  // (Binding methods take rvalues)
      .template Attr<int64_t>("w_offset")
      .template Attr<int64_t>("b_offset")
      .template Attr<int64_t>("s_offset");
}
}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RfConv, RfConvImpl,
                              with_offsets(conv_binding<ffi::F32>()
                                               .Ret<ffi::Buffer<ffi::F32>>()  // moments or none
                                               .Attr<int64_t>("stride")
                                               .Attr<int64_t>("pad")
                                               .Attr<int64_t>("kh")
                                               .Attr<int64_t>("kw")
                                               .Attr<int64_t>("cin")
                                               .Attr<int64_t>("cin_offset")));

XLA_FFI_DEFINE_HANDLER_SYMBOL(RfConvU8, RfConvU8Impl,  // x: the uint8 image
                              with_offsets(conv_binding<ffi::U8>()
                                               .Ret<ffi::Buffer<ffi::F32>>()  // moments or none
                                               .Attr<int64_t>("stride")
                                               .Attr<int64_t>("pad")
                                               .Attr<int64_t>("kh")
                                               .Attr<int64_t>("kw")
                                               .Attr<int64_t>("m_offset")));  // mean [channels]

XLA_FFI_DEFINE_HANDLER_SYMBOL(RfConvWinograd, RfConvWinogradImpl,  // weights [36][C][CO] packed
                              with_offsets(conv_binding<ffi::F32>()
                                               .Ret<ffi::Buffer<ffi::F32>>()  // moments or none
                                               .Attr<int64_t>("pad")
                                               .Attr<int64_t>("cin")
                                               .Attr<int64_t>("cin_offset")));

XLA_FFI_DEFINE_HANDLER_SYMBOL(RfHeads, RfHeadsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // every layer's parameters
                                  .RemainingArgs()               // 3 tensors per level
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y [B, cells, CO]
                                  .Attr<ffi::Span<const int64_t>>("segments")
                                  .Attr<ffi::Span<const int64_t>>("offsets"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(RfConvDw, RfConvDwImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // every layer's parameters
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("wd_offset")   // depthwise weights [9][C]
                                  .Attr<int64_t>("bd_offset")   // depthwise bias [C]
                                  .Attr<int64_t>("sd_offset")   // depthwise slope [C]
                                  .Attr<int64_t>("w_offset")    // packed pointwise weights
                                  .Attr<int64_t>("b_offset")    // pointwise bias [cout]
                                  .Attr<int64_t>("s_offset"));  // pointwise slope [cout]

XLA_FFI_DEFINE_HANDLER_SYMBOL(RfTopkNms, RfTopkNmsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scores [B, P]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // boxes [B, P, 4]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // IoU threshold []
                                  .Ret<ffi::Buffer<ffi::S32>>()  // keep [B, max_keep]
                                  .Ret<ffi::Buffer<ffi::S32>>()  // count [B]
                                  .Attr<int64_t>("top_k"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(RfDepthwise, RfDepthwiseImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [N, H, W, C]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k [3, 3, 1, C]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y [N, OH, OW, C]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // moments [N, 2, C] or none
                                  .Attr<int64_t>("stride"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(RfDepthwiseGrad, RfDepthwiseGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [N, H, W, C]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k [3, 3, 1, C]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy [N, OH, OW, C]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx [N, H, W, C]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dk [N, B, 9, C] per row block
                                  .Attr<int64_t>("stride"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(RfDepthwiseBn, RfDepthwiseBnImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [N, H, W, C]: BatchNorm input
                                  .Arg<ffi::Buffer<ffi::F32>>()  // kernel [3, 3, 1, C]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k [C]: BatchNorm's scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // c [C]: and shift
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y [N, OH, OW, C]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // moments [N, 2, C] or none
                                  .Attr<int64_t>("stride")
                                  .Attr<float>("slope"));  // LeakyReLU's

XLA_FFI_DEFINE_HANDLER_SYMBOL(RfDepthwiseBnGrad, RfDepthwiseBnGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [N, H, W, C]: BatchNorm input
                                  .Arg<ffi::Buffer<ffi::F32>>()  // kernel [3, 3, 1, C]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy [N, OH, OW, C]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k [C]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // c [C]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // mean [C]: the batch mean of x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // z [N, OH, OW, C]: y
                                  .Arg<ffi::Buffer<ffi::F32>>()  // coef [N, 3, C]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx [N, H, W, C]: k * g
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dk [N, B, 9, C] per row block
                                  .Ret<ffi::Buffer<ffi::F32>>()  // sums [N, H, 2, C] per row
                                  .Attr<int64_t>("stride")
                                  .Attr<float>("slope")
                                  .Attr<int64_t>("stats"));  // 1: add z and coef's part to dy

XLA_FFI_DEFINE_HANDLER_SYMBOL(RfConvBn, RfConvBnImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [N, H, W, C]: BatchNorm input
                                  .Arg<ffi::Buffer<ffi::F32>>()  // the layer's parameters
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k [C]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // c [C]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y [N, H, W, CO]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // moments or none
                                  .Attr<int64_t>("w_offset")
                                  .Attr<int64_t>("b_offset")
                                  .Attr<int64_t>("s_offset")
                                  .Attr<float>("slope"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(RfConvBnGrad, RfConvBnGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy [N, H, W, CO]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w^T packed, zero bias, slope 1
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [N, H, W, C]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k [C]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // c [C]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // mean [C]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // z [N, H, W, CO]: y
                                  .Arg<ffi::Buffer<ffi::F32>>()  // coef [N, 3, CO]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx [N, H, W, C]: k * g
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dw [N, B, C, CO] per row block
                                  .Ret<ffi::Buffer<ffi::F32>>()  // sums [N, H, 2, C] per row
                                  .Attr<int64_t>("w_offset")
                                  .Attr<int64_t>("b_offset")
                                  .Attr<int64_t>("s_offset")
                                  .Attr<float>("slope")
                                  .Attr<int64_t>("stats"));  // 1: add z and coef's part to dy

XLA_FFI_DEFINE_HANDLER_SYMBOL(RfMoments, RfMomentsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x [N, H, W, C]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // [N, 2, C]: mean, M2

XLA_FFI_DEFINE_HANDLER_SYMBOL(RfBnGradSums, RfBnGradSumsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // dy [N, H, W, C]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x [N, H, W, C]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // mean [C]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k [C]: BatchNorm's scale
                                  .Arg<ffi::Buffer<ffi::F32>>()   // c [C]: and shift
                                  .Ret<ffi::Buffer<ffi::F32>>()   // [N, 2, C]: sum g, sum g (x - mean)
                                  .Attr<float>("slope"));         // LeakyReLU's; 1: none

XLA_FFI_DEFINE_HANDLER_SYMBOL(RfWeightGradU8, RfWeightGradU8Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::U8>>()   // x [N, H, W, 3]: the image
                                  .Arg<ffi::Buffer<ffi::F32>>()  // mean [3]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy [N, OH, OW, CO]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // z [N, OH, OW, CO]: y
                                  .Arg<ffi::Buffer<ffi::F32>>()  // coef [N, 3, CO]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dw [N, 3, 3, 3, CO] per image
                                  .Attr<int64_t>("k")
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("pad")
                                  .Attr<int64_t>("stats"));  // 1: add z and coef's part to dy

XLA_FFI_DEFINE_HANDLER_SYMBOL(RfWeightGrad, RfWeightGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [N, H, W, C]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy [N, OH, OW, CO]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // z [N, OH, OW, CO]: y
                                  .Arg<ffi::Buffer<ffi::F32>>()  // coef [N, 3, CO]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dw [N, k, k, C, CO] per image
                                  .Attr<int64_t>("k")
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("pad")
                                  .Attr<int64_t>("stats"));  // 1: add z and coef's part to dy

XLA_FFI_DEFINE_HANDLER_SYMBOL(RfMatchOverlaps, RfMatchOverlapsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // truths [B, M, 4]
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // usable [B, M]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // priors [P, 4]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // best prior's overlap [B, M]
                                  .Ret<ffi::Buffer<ffi::S32>>()   // and its index [B, M]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // best face's overlap [B, P]
                                  .Ret<ffi::Buffer<ffi::S32>>());  // and its index [B, P]
