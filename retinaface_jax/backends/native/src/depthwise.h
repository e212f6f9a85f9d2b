#ifndef RETINAFACE_JAX_NATIVE_SRC_DEPTHWISE_H_
#define RETINAFACE_JAX_NATIVE_SRC_DEPTHWISE_H_

// The 3x3 depthwise convolution (pad 1): inference's depthwise-separable block RfConvDwImpl (the
// depthwise row, then the 1x1 pointwise layer over it in cache), and the train step's
// RfDepthwiseImpl and RfDepthwiseGradImpl (input and kernel gradients in one pass per row block,
// depthwise_grad_blocks). Also what later families reuse: the depthwise shape (DwShape), the
// BatchNorm row adapters BatchNormRows and CotangentRows, BatchNormInput and StatsCotangent (the
// statistics' part of a cotangent). Part of cpu_conv.cc's unity build.

#include "common.h"
#include "conv.h"

namespace {

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

}  // namespace

#endif  // RETINAFACE_JAX_NATIVE_SRC_DEPTHWISE_H_
