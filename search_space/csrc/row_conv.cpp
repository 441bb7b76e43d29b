// Fused row-skipping convolution for CPU inference (fp32, channels-last, groups == 1).
//
// For tiles of kept output positions (parallel over tiles), build the im2col rows of the tile in a
// thread-local buffer straight from the unpadded NHWC input (out-of-image taps are zeros), multiply
// them by the weight matrix with oneDNN's batch-reduce GEMM micro-kernel (at::native::cpublas::brgemm;
// torch falls back to its BLAS gemm where the micro-kernel is unavailable) and write the rows, plus
// bias, into the NHWC output. Skipped positions are zeroed. The weight is packed by the caller into
// column blocks of kBlockN (the last one narrower), each (K, width) row-major, so a (<= kMaxBlockK x
// kBlockN) block of it stays in L2 while the tile's rows stream past it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kBlockN = 64;   // must equal ROW_CONV_BLOCK_N in search_space/row_extension.py
constexpr int64_t kMaxBlockK = 1024;  // K chunk per brgemm call: a 1024 x 64 fp32 weight block is 256 KiB
constexpr int64_t kMaxTile = 64;  // rows per tile: a 64 x K im2col tile, reused for every column block

at::Tensor row_conv(const at::Tensor& input, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                    const at::Tensor& kept, const at::Tensor& skipped, int64_t out_channels, int64_t out_h,
                    int64_t out_w, at::IntArrayRef geometry) {
  TORCH_CHECK(input.dim() == 4 && input.scalar_type() == at::kFloat && input.device().is_cpu(),
              "row_conv: input must be a 4-D fp32 CPU tensor");
  TORCH_CHECK(geometry.size() == 8, "row_conv: geometry is (kh, kw, sh, sw, dh, dw, top, left)");
  const int64_t kh = geometry[0], kw = geometry[1], sh = geometry[2], sw = geometry[3];
  const int64_t dh = geometry[4], dw = geometry[5], top = geometry[6], left = geometry[7];
  const at::Tensor x = input.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t batch = x.size(0), channels = x.size(1), height = x.size(2), width = x.size(3);
  const int64_t depth = kh * kw * channels;  // K of the GEMM
  TORCH_CHECK(packed.is_contiguous() && packed.scalar_type() == at::kFloat && packed.numel() == depth * out_channels,
              "row_conv: packed weight must hold kh*kw*C*Cout contiguous fp32 values");
  TORCH_CHECK(kept.scalar_type() == at::kLong && skipped.scalar_type() == at::kLong && kept.is_contiguous() &&
                  skipped.is_contiguous() && kept.numel() + skipped.numel() == batch * out_h * out_w,
              "row_conv: kept and skipped must be contiguous int64 indices covering the B*Ho*Wo output rows");
  const float* bias_data = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->is_contiguous() && bias->scalar_type() == at::kFloat && bias->numel() == out_channels,
                "row_conv: bias must be a contiguous fp32 (Cout,) tensor");
    bias_data = bias->data_ptr<float>();
  }
  at::Tensor out = at::empty({batch, out_channels, out_h, out_w}, x.options(), at::MemoryFormat::ChannelsLast);
  const float* in = x.data_ptr<float>();
  const float* weight = packed.data_ptr<float>();
  float* result = out.data_ptr<float>();
  const int64_t* kept_rows = kept.data_ptr<int64_t>();
  const int64_t rows = kept.numel();
  // Enough tiles for every thread, at most kMaxTile rows each (a multiple of 8 for the micro-kernel).
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t tile = std::min(kMaxTile, std::max<int64_t>(8, ((rows + threads - 1) / threads + 7) / 8 * 8));
  const int64_t tiles = (rows + tile - 1) / tile;
  const int64_t positions = out_h * out_w;
  const size_t channel_bytes = channels * sizeof(float);
  // Equal K chunks of at most kMaxBlockK (576 stays whole, 4608 is 5 x 922: measured a few % faster than 512s).
  const int64_t chunks = (depth + kMaxBlockK - 1) / kMaxBlockK;
  const int64_t block_k = (depth + chunks - 1) / chunks;

  at::parallel_for(0, tiles, 1, [&](int64_t first, int64_t last) {
    thread_local std::vector<float> columns, products;  // grow only: no allocation in steady state
    if (columns.size() < static_cast<size_t>(tile * depth)) columns.resize(tile * depth);
    if (products.size() < static_cast<size_t>(tile * out_channels)) products.resize(tile * out_channels);
    for (int64_t t = first; t < last; ++t) {
      const int64_t row0 = t * tile, m = std::min(tile, rows - row0);
      for (int64_t i = 0; i < m; ++i) {  // im2col of the tile's rows
        const int64_t flat = kept_rows[row0 + i];
        const int64_t b = flat / positions, oh = (flat % positions) / out_w, ow = flat % out_w;
        float* dst = columns.data() + i * depth;
        const int64_t iw0 = ow * sw - left;
        const bool row_inside = dw == 1 && iw0 >= 0 && iw0 + kw <= width;
        for (int64_t r = 0; r < kh; ++r) {
          const int64_t ih = oh * sh - top + r * dh;
          if (ih < 0 || ih >= height) {
            std::memset(dst, 0, kw * channel_bytes);
            dst += kw * channels;
          } else if (row_inside) {  // the kw taps are adjacent pixels: one copy
            std::memcpy(dst, in + ((b * height + ih) * width + iw0) * channels, kw * channel_bytes);
            dst += kw * channels;
          } else {
            for (int64_t s = 0; s < kw; ++s, dst += channels) {
              const int64_t iw = iw0 + s * dw;
              if (iw < 0 || iw >= width) std::memset(dst, 0, channel_bytes);
              else std::memcpy(dst, in + ((b * height + ih) * width + iw) * channels, channel_bytes);
            }
          }
        }
      }
      for (int64_t n0 = 0; n0 < out_channels; n0 += kBlockN) {
        const int64_t n = std::min(kBlockN, out_channels - n0);
        const float* block = weight + n0 * depth;  // (depth, n) row-major
        for (int64_t k0 = 0; k0 < depth; k0 += block_k) {
          at::native::cpublas::brgemm(m, n, std::min(block_k, depth - k0), depth, n, out_channels, k0 > 0,
                                      columns.data() + k0, block + k0 * n, products.data() + n0, false);
        }
      }
      for (int64_t i = 0; i < m; ++i) {
        float* dst = result + kept_rows[row0 + i] * out_channels;
        const float* src = products.data() + i * out_channels;
        if (bias_data == nullptr) {
          std::memcpy(dst, src, out_channels * sizeof(float));
        } else {
          for (int64_t j = 0; j < out_channels; ++j) dst[j] = src[j] + bias_data[j];
        }
      }
    }
  });
  const int64_t* skipped_rows = skipped.data_ptr<int64_t>();
  at::parallel_for(0, skipped.numel(), 256, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) std::memset(result + skipped_rows[i] * out_channels, 0, out_channels * sizeof(float));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(nmsearch_rows, m) {
  m.def("row_conv(Tensor input, Tensor packed, Tensor? bias, Tensor kept, Tensor skipped, int out_channels, "
        "int out_h, int out_w, int[] geometry) -> Tensor");
  m.impl("row_conv", c10::DispatchKey::CPU, TORCH_FN(row_conv));
}
