#ifndef RETINAFACE_JAX_NATIVE_SRC_TOPK_NMS_H_
#define RETINAFACE_JAX_NATIVE_SRC_TOPK_NMS_H_

// Detection's post-processing: the top_k best-scoring candidates, then greedy NMS with the
// float32 arithmetic of the original's py_cpu_nms (RfTopkNmsImpl). Part of cpu_conv.cc's unity
// build.

#include "common.h"

namespace {

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

}  // namespace

#endif  // RETINAFACE_JAX_NATIVE_SRC_TOPK_NMS_H_
