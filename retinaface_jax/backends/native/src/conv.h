#ifndef RETINAFACE_JAX_NATIVE_SRC_CONV_H_
#define RETINAFACE_JAX_NATIVE_SRC_CONV_H_

// Dense convolution (inference and the train step's forward): the register tile (tile, Span,
// for_each_span, conv_row_blocks), the narrow-input stem path, Winograd F(4x4, 3x3) for 3x3
// stride-1 layers, and the handlers RfConvImpl, RfConvU8Impl, RfConvWinogradImpl and RfHeadsImpl
// (the heads of every pyramid level in one call). Also what the later families reuse: the
// register tile, the Winograd transforms (the kernel gradient's), a dense layer's shape
// (ConvShape, conv_shape), the row adapters FloatImageRows and MeanSubtractedRows, the
// parameter-buffer checks and a kernel's output moments (OutputMoments). Part of cpu_conv.cc's
// unity build.

#include "common.h"

namespace {

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

}  // namespace

#endif  // RETINAFACE_JAX_NATIVE_SRC_CONV_H_
