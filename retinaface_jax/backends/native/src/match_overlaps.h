#ifndef RETINAFACE_JAX_NATIVE_SRC_MATCH_OVERLAPS_H_
#define RETINAFACE_JAX_NATIVE_SRC_MATCH_OVERLAPS_H_

// MultiBoxLoss's matching overlaps for the CPU train step: each face's best prior and each
// prior's best face in one pass over blocks of priors (RfMatchOverlapsImpl). Part of
// cpu_conv.cc's unity build.

#include "common.h"

namespace {

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

#endif  // RETINAFACE_JAX_NATIVE_SRC_MATCH_OVERLAPS_H_
