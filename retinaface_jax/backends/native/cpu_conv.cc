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
//
// Source layout: this file is the library's one translation unit (a unity build). It includes
// the kernel families from src/ in order: common.h (vector types and helpers, scratch, prefetch,
// threading), conv.h (dense convolution, Winograd, heads; with the shapes, row adapters and
// checks the later families share), depthwise.h (inference and training; with the BatchNorm row
// adapters), weight_grad.h (kernel gradients), batchnorm.h (BatchNorm's sums and the read-through
// layers), topk_nms.h and match_overlaps.h; then binds every handler to its FFI symbol
// (XLA_FFI_DEFINE_HANDLER_SYMBOL) below. The files are the single file's text cut in order, so
// the compiler sees the same code (and inlines across families) as before the split; build.py's
// cache key covers every file (build.SOURCES).
#include "src/common.h"
#include "src/conv.h"
#include "src/depthwise.h"
#include "src/weight_grad.h"
#include "src/batchnorm.h"
#include "src/topk_nms.h"
#include "src/match_overlaps.h"

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
