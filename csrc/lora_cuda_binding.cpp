// CUDA implementations of the coto_kernels_native ops (defined in csrc/lora_ops.cpp): convert tensors, pick the
// current stream and call the kernels of csrc/lora_cuda.cu through their C interface (csrc/lora_cuda.h).
// Built only where torch has CUDA (setup.py); column sums and the sums of the deterministic per-split partials
// go through ATen.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "coto_mask.h"
#include "lora_cuda.h"

namespace {

using at::Tensor;

int dtype_code(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return COTO_FLOAT32;
    case at::kBFloat16:
      return COTO_BFLOAT16;
    case at::kHalf:
      return COTO_FLOAT16;
    default:
      TORCH_CHECK(false, "coto_kernels_native (CUDA): unsupported dtype ", t.scalar_type(),
                  "; expected float32, bfloat16 or float16");
  }
}

coto_dropout make_dropout(int64_t seed, double p) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "coto_kernels_native: dropout_p must lie in [0, 1), got ", p);
  const coto::MaskKeys keys = coto::mask_keys(seed);
  return coto_dropout{p > 0.0 ? 1 : 0, keys.k0, keys.k1, coto::keep_threshold(p),
                      static_cast<float>(1.0 / (1.0 - p))};
}

coto_dropout no_dropout() { return coto_dropout{0, 0, 0, 0, 1.0f}; }

void* current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void check(int error, const char* what) {
  TORCH_CHECK(error == 0, "coto_kernels_native (CUDA) ", what, " failed: ", coto_cuda_error_string(error));
}

Tensor unit_col_stride(const Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); }

Tensor fp32(const Tensor& t) { return t.to(at::kFloat).contiguous(); }

// Row splits of the G^T X kernel: enough blocks to fill the GPU, partial sums summed in a fixed order.
int64_t row_splits(int64_t M, int64_t K, int64_t J) {
  const int64_t blocks_per_split = ((K + 63) / 64) * ((J + 15) / 16);
  const int64_t wanted = (2 * 132 + blocks_per_split - 1) / blocks_per_split;
  return std::max<int64_t>(1, std::min<int64_t>({wanted, (M + 31) / 32, 64}));
}

// sum_z alpha * G_z^T drop(X_z): [J, K] fp32.
Tensor gt_times_rows(const Tensor& g, const Tensor& x, float alpha, const coto_dropout& d) {
  const int64_t M = x.size(0), K = x.size(1), J = g.size(1);
  const int64_t splits = row_splits(M, K, J);
  Tensor part = at::empty({splits, J, K}, x.options().dtype(at::kFloat));
  check(coto_cuda_gt_times_rows(g.const_data_ptr<float>(), x.const_data_ptr(), x.stride(0), dtype_code(x),
                                part.mutable_data_ptr<float>(), M, K, J, splits, alpha, d, current_stream()),
        "gt_times_rows");
  return splits == 1 ? part[0] : part.sum(0);
}

Tensor keep_mask_cuda(const Tensor& x, int64_t seed, double dropout_p) {
  TORCH_CHECK(x.dim() == 2, "coto_kernels_native.keep_mask: x must be 2-D");
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor mask = at::empty(x.sizes(), x.options().dtype(at::kBool));
  check(coto_cuda_keep_mask(static_cast<uint8_t*>(mask.mutable_data_ptr()), x.size(0), x.size(1),
                            make_dropout(seed, dropout_p), current_stream()),
        "keep_mask");
  return mask;
}

Tensor lora_down_cuda(const Tensor& x_in, const Tensor& a_in, int64_t seed, double dropout_p) {
  TORCH_CHECK(x_in.dim() == 2 && a_in.dim() == 2 && x_in.size(1) == a_in.size(1),
              "coto_kernels_native.lora_down: x ", x_in.sizes(), " and lora_a ", a_in.sizes(), " do not fit");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = unit_col_stride(x_in);
  const Tensor a = fp32(a_in);
  const int64_t M = x.size(0), K = x.size(1), r = a.size(0);
  Tensor s = at::empty({M, r}, x.options().dtype(at::kFloat));
  check(coto_cuda_rows_times_wt(x.const_data_ptr(), x.stride(0), dtype_code(x), a.const_data_ptr<float>(),
                                s.mutable_data_ptr<float>(), M, K, r, 1.0f, make_dropout(seed, dropout_p),
                                current_stream()),
        "lora_down");
  return s;
}

std::tuple<Tensor, Tensor, Tensor> lora_dy_cuda(const Tensor& dy_in, const Tensor& b_in, const Tensor& s_in,
                                                double scaling, bool need_db, bool need_colsum) {
  TORCH_CHECK(dy_in.dim() == 2 && b_in.dim() == 2 && s_in.dim() == 2 && dy_in.size(1) == b_in.size(0) &&
                  s_in.size(0) == dy_in.size(0) && s_in.size(1) == b_in.size(1),
              "coto_kernels_native.lora_dy: dy ", dy_in.sizes(), ", lora_b ", b_in.sizes(), " and s ", s_in.sizes(),
              " do not fit together");
  const c10::cuda::CUDAGuard guard(dy_in.device());
  const Tensor dy = dy_in.contiguous();
  const int64_t M = dy.size(0), N = dy.size(1), r = b_in.size(1);
  const Tensor bt = b_in.to(at::kFloat).t().contiguous();  // [r, N]
  Tensor ds = at::empty({M, r}, dy.options().dtype(at::kFloat));
  check(coto_cuda_rows_times_wt(dy.const_data_ptr(), N, dtype_code(dy), bt.const_data_ptr<float>(),
                                ds.mutable_data_ptr<float>(), M, N, r, static_cast<float>(scaling), no_dropout(),
                                current_stream()),
        "lora_dy (dS)");
  const Tensor empty = at::empty({0}, ds.options());
  const Tensor db = need_db ? gt_times_rows(fp32(s_in), dy, static_cast<float>(scaling), no_dropout()).t().contiguous()
                            : empty;
  const Tensor colsum = need_colsum ? dy.sum(0, false, at::kFloat) : empty;
  return {ds, db, colsum};
}

Tensor lora_dx_da_cuda(const std::optional<Tensor>& dx, const Tensor& x_in, const Tensor& ds_in, const Tensor& a_in,
                       int64_t seed, double dropout_p, bool need_da) {
  TORCH_CHECK(x_in.dim() == 2 && ds_in.dim() == 2 && a_in.dim() == 2 && x_in.size(0) == ds_in.size(0) &&
                  x_in.size(1) == a_in.size(1) && ds_in.size(1) == a_in.size(0),
              "coto_kernels_native.lora_dx_da: x ", x_in.sizes(), ", ds ", ds_in.sizes(), " and lora_a ",
              a_in.sizes(), " do not fit together");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = unit_col_stride(x_in);
  const Tensor ds = fp32(ds_in);
  const coto_dropout d = make_dropout(seed, dropout_p);
  if (dx.has_value() && dx->defined()) {
    TORCH_CHECK(dx->sizes() == x.sizes() && dx->scalar_type() == x.scalar_type() && dx->stride(1) == 1,
                "coto_kernels_native.lora_dx_da: dx must have x's shape ", x.sizes(), " and dtype ",
                x.scalar_type(), " with unit column stride");
    const Tensor a = fp32(a_in);
    check(coto_cuda_add_masked_g_times_w(dx->mutable_data_ptr(), dx->stride(0), dtype_code(*dx),
                                         ds.const_data_ptr<float>(), a.const_data_ptr<float>(), x.size(0),
                                         x.size(1), a.size(0), d, current_stream()),
          "lora_dx_da (dX)");
  }
  return need_da ? gt_times_rows(ds, x, 1.0f, d) : at::empty({0}, ds.options());
}

}  // namespace

TORCH_LIBRARY_IMPL(coto_kernels_native, CUDA, m) {
  m.impl("keep_mask", &keep_mask_cuda);
  m.impl("lora_down", &lora_down_cuda);
  m.impl("lora_dy", &lora_dy_cuda);
  m.impl("lora_dx_da", &lora_dx_da_cuda);
}
