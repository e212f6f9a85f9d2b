#ifndef RETINAFACE_JAX_NATIVE_SRC_BATCHNORM_H_
#define RETINAFACE_JAX_NATIVE_SRC_BATCHNORM_H_

// BatchNorm in the train step: its per-image sums (RfMomentsImpl: the batch statistics of an
// input no kernel wrote; RfBnGradSumsImpl: the backward's sum(g) and sum(g * (x - mean))), and
// the layers that read a BatchNorm + LeakyReLU through instead of a stored activation: the
// depthwise layer (RfDepthwiseBnImpl, RfDepthwiseBnGradImpl) and the 1x1 stride-1 layer
// (RfConvBnImpl, RfConvBnGradImpl). Part of cpu_conv.cc's unity build.

#include "common.h"
#include "conv.h"
#include "depthwise.h"
#include "weight_grad.h"

namespace {

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

}  // namespace

#endif  // RETINAFACE_JAX_NATIVE_SRC_BATCHNORM_H_
