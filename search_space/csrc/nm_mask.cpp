// N:M mask in one pass over a contiguous CPU tensor: keep the n largest of every m consecutive
// scores along one dimension, ties to the lowest index (a stable descending sort's first n).
//
// The scores are viewed as (outer, size, inner) with the groups running along `size`; each
// group's m scores are read once (strided by `inner`) and ranked in registers: an entry is kept
// when fewer than n group members beat it (larger, or equal and earlier). One parallel loop, so a
// mask costs one thread barrier whatever m -- the eager-torch kernels it replaces on the CPU launch
// a dozen or more, each of which waits for a descheduled OpenMP thread on a busy machine.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace {

constexpr int64_t kMaxM = 64;  // scores of one group held on the stack

template <typename scalar_t, typename out_t>
void fill_mask(const scalar_t* scores, out_t* keep, int64_t outer, int64_t size, int64_t inner, int64_t n,
               int64_t m) {
  const int64_t groups_per_slice = size / m;
  const int64_t total = outer * groups_per_slice * inner;  // one task per (outer, group, inner)
  at::parallel_for(0, total, 4096, [&](int64_t begin, int64_t end) {
    at::opmath_type<scalar_t> values[kMaxM];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task % inner;
      const int64_t g = (task / inner) % groups_per_slice;
      const int64_t o = task / (inner * groups_per_slice);
      const int64_t base = (o * size + g * m) * inner + r;
      for (int64_t i = 0; i < m; ++i) values[i] = static_cast<at::opmath_type<scalar_t>>(scores[base + i * inner]);
      for (int64_t i = 0; i < m; ++i) {
        int64_t beaten_by = 0;
        for (int64_t j = 0; j < i; ++j) beaten_by += values[j] >= values[i];
        for (int64_t j = i + 1; j < m; ++j) beaten_by += values[j] > values[i];
        keep[base + i * inner] = static_cast<out_t>(beaten_by < n);
      }
    }
  });
}

void nm_mask_out(const at::Tensor& scores, at::Tensor& out, int64_t n, int64_t m, int64_t dim) {
  TORCH_CHECK(scores.device().is_cpu() && out.device().is_cpu(), "nm_mask: CPU tensors only");
  TORCH_CHECK(scores.is_contiguous() && out.is_contiguous() && scores.sizes() == out.sizes(),
              "nm_mask: scores and out must be contiguous and of one shape");
  TORCH_CHECK(1 <= n && n <= m && m <= kMaxM, "nm_mask: need 1 <= n <= m <= ", kMaxM);
  TORCH_CHECK(0 <= dim && dim < scores.dim() && scores.size(dim) % m == 0, "nm_mask: dim size not divisible by m");
  int64_t outer = 1, inner = 1;
  for (int64_t d = 0; d < dim; ++d) outer *= scores.size(d);
  for (int64_t d = dim + 1; d < scores.dim(); ++d) inner *= scores.size(d);
  const int64_t size = scores.size(dim);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "nm_mask", [&] {
    using score_t = scalar_t;
    AT_DISPATCH_ALL_TYPES_AND3(at::kBool, at::kHalf, at::kBFloat16, out.scalar_type(), "nm_mask_out", [&] {
      fill_mask<score_t, scalar_t>(scores.data_ptr<score_t>(), out.data_ptr<scalar_t>(), outer, size, inner, n, m);
    });
  });
}

}  // namespace

TORCH_LIBRARY(nmsearch_masks, m) {
  m.def("nm_mask_out(Tensor scores, Tensor(a!) out, int n, int m, int dim) -> ()");
}

TORCH_LIBRARY_IMPL(nmsearch_masks, CPU, m) {
  m.impl("nm_mask_out", TORCH_FN(nm_mask_out));
}
