// 3D convolutions for XLA's CPU backend, computed by oneDNN (the library
// behind PyTorch's CPU convolutions), as typed XLA FFI handlers.
//
// Three handlers make a convolution and its gradient (topojax/conv.py wraps
// them in a jax.custom_vjp):
//   topojax_conv3d_forward          y  = conv(x, w)
//   topojax_conv3d_backward_input   dx = conv_transpose(dy, w)
//   topojax_conv3d_backward_kernel  dw = correlate(x, dy)
// The kernel gradient of a stride-1 convolution is our own AVX2 loop
// (DirectKernelGradient): on AVX2, oneDNN computes it by im2col and GEMM
// over an unfolded copy of the input, at a third of the speed.
// Layouts are JAX's channels-last ones, used by oneDNN in place (no copy):
// x (N, X, Y, Z, C_in) is oneDNN's "ndhwc", the kernel (kx, ky, kz, C_in,
// C_out) its "dhwio". The kernel (small) is reordered to the layout oneDNN's
// fastest implementation wants; activations never are. Attributes: strides,
// padding_low and padding_high, three int64 each.
//
// Primitive descriptors are built once per shape and cached: building one
// generates code (milliseconds), far more than a small convolution takes.
// oneDNN runs on OpenMP threads, by default as many as the process may use
// (its CPU affinity), and the same thread count gives the same bits; the
// direct kernel gradient gives the same bits whatever the thread count.

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dnnl::memory;
using Tag = memory::format_tag;

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// One convolution's geometry, in oneDNN's (N, C, X, Y, Z) dimension order.
struct Geometry {
  memory::dims src, weights, dst, strides, padding_low, padding_high;

  bool operator<(const Geometry& other) const {
    return std::tie(src, weights, dst, strides, padding_low, padding_high) <
           std::tie(other.src, other.weights, other.dst, other.strides,
                    other.padding_low, other.padding_high);
  }
};

memory::dims ChannelsFirst(ffi::Span<const int64_t> channels_last) {
  // (N, X, Y, Z, C) -> (N, C, X, Y, Z).
  return {channels_last[0], channels_last[4], channels_last[1],
          channels_last[2], channels_last[3]};
}

memory::dims KernelDims(ffi::Span<const int64_t> dhwio) {
  // (kx, ky, kz, C_in, C_out) -> (C_out, C_in, kx, ky, kz).
  return {dhwio[4], dhwio[3], dhwio[0], dhwio[1], dhwio[2]};
}

memory::dims Dims(ffi::Span<const int64_t> values) {
  return memory::dims(values.begin(), values.end());
}

memory::desc Plain(const memory::dims& dims, Tag tag) {
  return memory::desc(dims, memory::data_type::f32, tag);
}

memory::desc Any(const memory::dims& dims) {
  return memory::desc(dims, memory::data_type::f32, Tag::any);
}

// oneDNN's own scratchpad is per thread (its default build): a primitive
// made on one of XLA's threads and run on another would use a buffer sized
// for a different primitive, which crashed the kernel gradient when XLA
// moved a device's work between threads. We pass the scratchpad ourselves.
dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

dnnl::convolution_forward::primitive_desc ForwardDesc(const Geometry& g) {
  return dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training,
      dnnl::algorithm::convolution_direct, Plain(g.src, Tag::ndhwc),
      Any(g.weights), Plain(g.dst, Tag::ndhwc), g.strides, g.padding_low,
      g.padding_high, UserScratchpad());
}

// The primitives of one geometry, made on first use.
struct Primitives {
  dnnl::convolution_forward::primitive_desc forward_desc;
  dnnl::convolution_forward forward;
  dnnl::convolution_backward_data::primitive_desc input_desc;
  dnnl::convolution_backward_data backward_input;
  dnnl::convolution_backward_weights::primitive_desc kernel_desc;
  dnnl::convolution_backward_weights backward_kernel;
};

enum class Pass { kForward, kInput, kKernel };

// The primitive of `pass` for `g`, created once and kept.
const Primitives& Get(const Geometry& g, Pass pass) {
  static std::mutex mutex;
  static std::map<Geometry, std::unique_ptr<Primitives>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto& entry = cache[g];
  if (!entry) {
    entry = std::make_unique<Primitives>();
    entry->forward_desc = ForwardDesc(g);
  }
  Primitives& p = *entry;
  if (pass == Pass::kForward && !p.forward) {
    p.forward = dnnl::convolution_forward(p.forward_desc);
  } else if (pass == Pass::kInput && !p.backward_input) {
    p.input_desc = dnnl::convolution_backward_data::primitive_desc(
        Engine(), dnnl::algorithm::convolution_direct,
        Plain(g.src, Tag::ndhwc), Any(g.weights), Plain(g.dst, Tag::ndhwc),
        g.strides, g.padding_low, g.padding_high, p.forward_desc,
        UserScratchpad());
    p.backward_input = dnnl::convolution_backward_data(p.input_desc);
  } else if (pass == Pass::kKernel && !p.backward_kernel) {
    p.kernel_desc = dnnl::convolution_backward_weights::primitive_desc(
        Engine(), dnnl::algorithm::convolution_direct,
        Plain(g.src, Tag::ndhwc), Any(g.weights), Plain(g.dst, Tag::ndhwc),
        g.strides, g.padding_low, g.padding_high, p.forward_desc,
        UserScratchpad());
    p.backward_kernel = dnnl::convolution_backward_weights(p.kernel_desc);
  }
  return p;
}

Geometry MakeGeometry(ffi::Span<const int64_t> input,
                      ffi::Span<const int64_t> kernel,
                      ffi::Span<const int64_t> output,
                      ffi::Span<const int64_t> strides,
                      ffi::Span<const int64_t> padding_low,
                      ffi::Span<const int64_t> padding_high) {
  return {ChannelsFirst(input), KernelDims(kernel), ChannelsFirst(output),
          Dims(strides), Dims(padding_low), Dims(padding_high)};
}

// Checks the ranks and the attributes, runs `body`, and returns oneDNN's
// exceptions as FFI errors.
template <typename Body>
ffi::Error Guarded(std::initializer_list<size_t> ranks,
                   ffi::Span<const int64_t> strides,
                   ffi::Span<const int64_t> padding_low,
                   ffi::Span<const int64_t> padding_high, Body body) {
  for (size_t r : ranks) {
    if (r != 5) {
      return ffi::Error::InvalidArgument("topojax conv3d: arrays of rank 5");
    }
  }
  if (strides.size() != 3 || padding_low.size() != 3 ||
      padding_high.size() != 3) {
    return ffi::Error::InvalidArgument(
        "topojax conv3d: strides and paddings of 3 values");
  }
  try {
    body();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN: ") + e.what());
  }
  return ffi::Error::Success();
}

// One convolution at a time: each already runs on every core, and
// concurrent OpenMP teams (one per XLA device, e.g. with
// --xla_force_host_platform_device_count) can deadlock libgomp.
std::mutex& Running() {
  static std::mutex running;
  return running;
}

// Runs `primitive` with the kernel argument `kernel_arg` given in the plain
// dhwio layout, reordered to and from `kernel_desc` where they differ.
void Execute(const dnnl::primitive& primitive,
             const memory::desc& scratchpad_desc, int kernel_arg,
             const memory::desc& kernel_desc, void* kernel,
             const memory::dims& kernel_dims, bool kernel_is_output,
             std::unordered_map<int, memory> args) {
  std::lock_guard<std::mutex> lock(Running());
  // The calls being serialised, one scratchpad, grown to the largest
  // convolution's, serves them all.
  static std::vector<float> scratchpad;
  const size_t floats = (scratchpad_desc.get_size() + 3) / 4;
  if (scratchpad.size() < floats) scratchpad.resize(floats);
  args.insert({DNNL_ARG_SCRATCHPAD,
               memory(scratchpad_desc, Engine(), scratchpad.data())});
  dnnl::stream stream(Engine());
  memory plain(Plain(kernel_dims, Tag::dhwio), Engine(), kernel);
  if (kernel_desc == plain.get_desc()) {
    args.insert({kernel_arg, plain});
    primitive.execute(stream, args);
  } else {
    memory blocked(kernel_desc, Engine());
    if (!kernel_is_output) {
      dnnl::reorder(plain, blocked).execute(stream, plain, blocked);
    }
    args.insert({kernel_arg, blocked});
    primitive.execute(stream, args);
    if (kernel_is_output) {
      dnnl::reorder(blocked, plain).execute(stream, blocked, plain);
    }
  }
  stream.wait();
}

// terms[0:size] = the sum of the `count` arrays of `size` floats at
// `terms`, the first half's sum plus the second half's, recursively.
void SumPairwise(float* terms, int64_t count, int64_t size) {
  if (count < 2) return;
  const int64_t half = count / 2;
  SumPairwise(terms, half, size);
  SumPairwise(terms + half * size, count - half, size);
  const float* second = terms + half * size;
  for (int64_t i = 0; i < size; ++i) terms[i] += second[i];
}

// acc[i][o] += x[i] * dy[8 * o : 8 * o + 8]: one voxel's outer product.
template <int BI, int BO>
__attribute__((target("avx2,fma"), always_inline)) inline void AddVoxel(
    __m256 (&acc)[BI][BO], const float* x, const float* dy) {
  __m256 d[BO];
#pragma GCC unroll 4
  for (int o = 0; o < BO; ++o) d[o] = _mm256_loadu_ps(dy + 8 * o);
#pragma GCC unroll 16
  for (int i = 0; i < BI; ++i) {
    const __m256 xi = _mm256_broadcast_ss(x + i);
#pragma GCC unroll 4
    for (int o = 0; o < BO; ++o) {
      acc[i][o] = _mm256_fmadd_ps(xi, d[o], acc[i][o]);
    }
  }
}

// out[i * co + o] += sum over r < count of x[r * ci + i] * dy[r * co + o],
// for BI input and 8 * BO output channels: one row of voxels' contribution
// to one tap of the kernel gradient, summed in registers. A tile of fewer
// than 4 vectors keeps U sums, of every U-th voxel, so that the adds of one
// sum do not wait on each other (a 1-channel input's tile is one vector).
template <int BI, int BO>
__attribute__((target("avx2,fma"))) void RowTile(const float* x, int64_t ci,
                                                   const float* dy, int64_t co,
                                                   int64_t count, float* out) {
  constexpr int U = BI * BO >= 4 ? 1 : BI * BO == 1 ? 4 : 2;
  __m256 acc[U][BI][BO];
#pragma GCC unroll 4
  for (int u = 0; u < U; ++u) {
#pragma GCC unroll 16
    for (int i = 0; i < BI; ++i) {
#pragma GCC unroll 4
      for (int o = 0; o < BO; ++o) acc[u][i][o] = _mm256_setzero_ps();
    }
  }
  int64_t r = 0;
  for (; r + U <= count; r += U) {
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) {
      AddVoxel<BI, BO>(acc[u], x + (r + u) * ci, dy + (r + u) * co);
    }
  }
  for (int u = 0; r < count; ++r, ++u) {
    AddVoxel<BI, BO>(acc[u], x + r * ci, dy + r * co);
  }
#pragma GCC unroll 16
  for (int i = 0; i < BI; ++i) {
#pragma GCC unroll 4
    for (int o = 0; o < BO; ++o) {
      __m256 sum = acc[0][i][o];
#pragma GCC unroll 4
      for (int u = 1; u < U; ++u) sum = _mm256_add_ps(sum, acc[u][i][o]);
      float* total = out + i * co + 8 * o;
      _mm256_storeu_ps(total, _mm256_add_ps(_mm256_loadu_ps(total), sum));
    }
  }
}

// RowTile<bi, BO> for a run-time bi <= BI.
template <int BO, int BI>
void RowTileOf(int bi, const float* x, int64_t ci, const float* dy,
               int64_t co, int64_t count, float* out) {
  if constexpr (BI > 0) {
    if (bi == BI) return RowTile<BI, BO>(x, ci, dy, co, count, out);
    RowTileOf<BO, BI - 1>(bi, x, ci, dy, co, count, out);
  }
}

// Every input channel against output channels [0, 8 * BO) of dy and out,
// in tiles that keep 12 accumulators and the loads in AVX2's 16 registers.
template <int BO>
void Row(const float* x, int64_t ci, const float* dy, int64_t co,
         int64_t count, float* out) {
  constexpr int kTile = 12 / BO;
  for (int64_t i = 0; i < ci; i += kTile) {
    const int bi = static_cast<int>(std::min<int64_t>(kTile, ci - i));
    RowTileOf<BO, kTile>(bi, x + i, ci, dy, co, count, out + i * co);
  }
}

bool HasAvx2() {
  static const bool has = __builtin_cpu_supports("avx2") &&
                          __builtin_cpu_supports("fma");
  return has;
}

// Whether DirectKernelGradient computes this geometry: stride 1, output
// channels in whole AVX2 vectors, on a CPU with AVX2 and FMA.
bool DirectApplies(const Geometry& g) {
  return g.strides == memory::dims{1, 1, 1} && g.dst[1] % 8 == 0 &&
         HasAvx2();
}

// The kernel gradient dw (kx, ky, kz, C_in, C_out) of a stride-1
// convolution of x (N, X, Y, Z, C_in) giving dy (N, P, Q, R, C_out):
// dw[a, b, c] = sum over n, p, q, r of x[n, p + a - lo, q + b - lo,
// r + c - lo] (zero outside) times dy[n, p, q, r], as outer products of
// channel vectors. Each sample's planes p are cut into at most kGroups
// groups, each summed on one thread into its own buffer, row by row (a row
// summed in registers); the groups are then summed pairwise, in an order
// fixed by the shapes alone: the same bits whatever the thread count.
void DirectKernelGradient(const float* x, const Geometry& g, const float* dy,
                          float* dw) {
  constexpr int64_t kGroups = 8;
  const int64_t samples = g.src[0], ci = g.src[1], co = g.dst[1];
  const int64_t size_x = g.src[2], size_y = g.src[3], size_z = g.src[4];
  const int64_t P = g.dst[2], Q = g.dst[3], R = g.dst[4];
  const int64_t kx = g.weights[2], ky = g.weights[3], kz = g.weights[4];
  const int64_t lo_x = g.padding_low[0], lo_y = g.padding_low[1],
                lo_z = g.padding_low[2];
  const int64_t size = kx * ky * kz * ci * co;
  const int64_t groups = std::min(P, kGroups);
  if (samples * groups == 0) {  // No output voxel: nothing to sum.
    std::fill(dw, dw + size, 0.0f);
    return;
  }
  std::vector<float> sums(samples * groups * size, 0.0f);
#pragma omp parallel for schedule(dynamic)
  for (int64_t item = 0; item < samples * groups; ++item) {
    const int64_t n = item / groups, group = item % groups;
    float* acc = sums.data() + item * size;
    for (int64_t p = group * P / groups; p < (group + 1) * P / groups; ++p) {
      for (int64_t q = 0; q < Q; ++q) {
        const float* dy_row = dy + ((n * P + p) * Q + q) * R * co;
        for (int64_t a = 0; a < kx; ++a) {
          const int64_t xa = p + a - lo_x;
          if (xa < 0 || xa >= size_x) continue;
          for (int64_t b = 0; b < ky; ++b) {
            const int64_t xb = q + b - lo_y;
            if (xb < 0 || xb >= size_y) continue;
            const float* x_row = x + ((n * size_x + xa) * size_y + xb) *
                                         size_z * ci;
            for (int64_t c = 0; c < kz; ++c) {
              // The voxels r of the row whose input r + c - lo is inside.
              const int64_t first = std::max<int64_t>(0, lo_z - c);
              const int64_t end = std::min<int64_t>(R, size_z + lo_z - c);
              if (end <= first) continue;
              float* tap = acc + ((a * ky + b) * kz + c) * ci * co;
              const float* xs = x_row + (first + c - lo_z) * ci;
              const float* ds = dy_row + first * co;
              for (int64_t o = 0; o < co;) {
                if (co - o >= 32) {
                  Row<4>(xs, ci, ds + o, co, end - first, tap + o);
                  o += 32;
                } else if (co - o >= 16) {
                  Row<2>(xs, ci, ds + o, co, end - first, tap + o);
                  o += 16;
                } else {
                  Row<1>(xs, ci, ds + o, co, end - first, tap + o);
                  o += 8;
                }
              }
            }
          }
        }
      }
    }
  }
  SumPairwise(sums.data(), samples * groups, size);
  std::copy(sums.begin(), sums.begin() + size, dw);
}

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> y,
                   ffi::Span<const int64_t> strides,
                   ffi::Span<const int64_t> padding_low,
                   ffi::Span<const int64_t> padding_high) {
  return Guarded(
      {x.dimensions().size(), w.dimensions().size(), y->dimensions().size()},
      strides, padding_low, padding_high, [&] {
        Geometry g = MakeGeometry(x.dimensions(), w.dimensions(),
                                  y->dimensions(), strides, padding_low,
                                  padding_high);
        const Primitives& p = Get(g, Pass::kForward);
        Execute(p.forward, p.forward_desc.scratchpad_desc(),
                DNNL_ARG_WEIGHTS, p.forward_desc.weights_desc(),
                w.typed_data(), g.weights, false,
                {{DNNL_ARG_SRC, memory(Plain(g.src, Tag::ndhwc), Engine(),
                                       x.typed_data())},
                 {DNNL_ARG_DST, memory(Plain(g.dst, Tag::ndhwc), Engine(),
                                       y->typed_data())}});
      });
}

ffi::Error BackwardInput(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                         ffi::ResultBuffer<ffi::F32> dx,
                         ffi::Span<const int64_t> strides,
                         ffi::Span<const int64_t> padding_low,
                         ffi::Span<const int64_t> padding_high) {
  return Guarded(
      {dy.dimensions().size(), w.dimensions().size(), dx->dimensions().size()},
      strides, padding_low, padding_high, [&] {
        Geometry g = MakeGeometry(dx->dimensions(), w.dimensions(),
                                  dy.dimensions(), strides, padding_low,
                                  padding_high);
        const Primitives& p = Get(g, Pass::kInput);
        Execute(p.backward_input, p.input_desc.scratchpad_desc(),
                DNNL_ARG_WEIGHTS, p.input_desc.weights_desc(),
                w.typed_data(), g.weights, false,
                {{DNNL_ARG_DIFF_DST, memory(Plain(g.dst, Tag::ndhwc),
                                            Engine(), dy.typed_data())},
                 {DNNL_ARG_DIFF_SRC, memory(Plain(g.src, Tag::ndhwc),
                                            Engine(), dx->typed_data())}});
      });
}

// The kernel gradient: DirectKernelGradient where it applies, else oneDNN
// one sample at a time, the samples' kernels summed pairwise. Both avoid a
// long float32 sum over the whole batch, which loses ~10x XLA's accuracy
// (measured at 4 x 32^3), and their per-sample (per-group) terms summed as
// a tree give, for a batch split over a power of two of devices and summed
// by an all-reduce, the same partial sums as one device.
ffi::Error BackwardKernel(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                          ffi::ResultBuffer<ffi::F32> dw,
                          ffi::Span<const int64_t> strides,
                          ffi::Span<const int64_t> padding_low,
                          ffi::Span<const int64_t> padding_high) {
  return Guarded(
      {x.dimensions().size(), dy.dimensions().size(), dw->dimensions().size()},
      strides, padding_low, padding_high, [&] {
        Geometry g = MakeGeometry(x.dimensions(), dw->dimensions(),
                                  dy.dimensions(), strides, padding_low,
                                  padding_high);
        const int64_t samples = g.src[0];
        const int64_t dw_size = dw->element_count();
        float* total = dw->typed_data();
        if (samples == 0) {
          std::fill(total, total + dw_size, 0.0f);
          return;
        }
        if (DirectApplies(g)) {
          std::lock_guard<std::mutex> lock(Running());
          DirectKernelGradient(x.typed_data(), g, dy.typed_data(), total);
          return;
        }
        g.src[0] = g.dst[0] = 1;
        const int64_t x_size = x.element_count() / samples;
        const int64_t dy_size = dy.element_count() / samples;
        const Primitives& p = Get(g, Pass::kKernel);
        std::vector<float> terms(samples * dw_size);
        for (int64_t n = 0; n < samples; ++n) {
          Execute(p.backward_kernel, p.kernel_desc.scratchpad_desc(),
                  DNNL_ARG_DIFF_WEIGHTS,
                  p.kernel_desc.diff_weights_desc(), &terms[n * dw_size],
                  g.weights, true,
                  {{DNNL_ARG_SRC, memory(Plain(g.src, Tag::ndhwc), Engine(),
                                         x.typed_data() + n * x_size)},
                   {DNNL_ARG_DIFF_DST,
                    memory(Plain(g.dst, Tag::ndhwc), Engine(),
                           dy.typed_data() + n * dy_size)}});
        }
        SumPairwise(terms.data(), samples, dw_size);
        std::copy(terms.begin(), terms.begin() + dw_size, total);
      });
}

}  // namespace

// (input, input) -> result, with the geometry as attributes.
#define TOPOJAX_CONV_BINDING                               \
  ffi::Ffi::Bind()                                         \
      .Arg<ffi::Buffer<ffi::F32>>()                        \
      .Arg<ffi::Buffer<ffi::F32>>()                        \
      .Ret<ffi::Buffer<ffi::F32>>()                        \
      .Attr<ffi::Span<const int64_t>>("strides")           \
      .Attr<ffi::Span<const int64_t>>("padding_low")       \
      .Attr<ffi::Span<const int64_t>>("padding_high")

// The three handlers are the library's only exported symbols.
#pragma GCC visibility push(default)
XLA_FFI_DEFINE_HANDLER_SYMBOL(TopojaxConv3dForward, Forward,
                              TOPOJAX_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(TopojaxConv3dBackwardInput, BackwardInput,
                              TOPOJAX_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(TopojaxConv3dBackwardKernel, BackwardKernel,
                              TOPOJAX_CONV_BINDING);
#pragma GCC visibility pop
