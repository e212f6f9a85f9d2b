#ifndef RETINAFACE_JAX_NATIVE_SRC_WEIGHT_GRAD_H_
#define RETINAFACE_JAX_NATIVE_SRC_WEIGHT_GRAD_H_

// The train step's kernel gradients of dense convolutions: the GEMM over pixel blocks
// (wgrad_run, wgrad_rows), Winograd F(3x3, 4x4) for 3x3 stride-1 layers, the RGB stem's whole
// patch per pixel (float32 or the uint8 image minus its mean), and the handlers RfWeightGradImpl
// and RfWeightGradU8Impl. Part of cpu_conv.cc's unity build.

#include "common.h"
#include "conv.h"
#include "depthwise.h"

namespace {

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

}  // namespace

#endif  // RETINAFACE_JAX_NATIVE_SRC_WEIGHT_GRAD_H_
