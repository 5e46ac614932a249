// The skinny, dropout-fused parts of the gated LoRA layer as torch.library ops (namespace coto_kernels_native),
// and their CPU implementations. The dense GEMMs (X W^T, dY W) stay with BLAS; see
// coto_kernels/kernels/lora_native.py. Math (coto_kernels/kernels/interface.py), with drop(X) = keep * X / (1-p):
//
//   lora_down(x, a, seed, p)             -> S = drop(X) A^T                               fp32 [M, r]
//   lora_dy(dy, b, s, scaling, ...)      -> dS = s dY B,  dB = s dY^T S,  colsum(dY)
//   lora_dx_da(dx?, x, ds, a, seed, p)   -> dX += drop'(dS A) in place,  dA = dS^T drop(X) one pass over X, dX
//   dora_dy(dy, c, saved?)               -> G = c * dY,  sum_rows(dY * saved) fp32   one pass over dY (DoRA, CPU)
//   dora_row_norm(w, ||W||^2, a, b, lb?) -> ||W + s (B A + lb 1^T)||_row fp32 [N]        no N x K temporary (DoRA)
//
// The keep mask is regenerated from coto_mask.h one row block at a time, into a cache-sized buffer that BLAS
// then reads: no M x K temporary exists. Accumulation is fp32 for fp32, bf16 and fp16 inputs. Parallel over row
// blocks with at::parallel_for (BLAS runs single-threaded inside); reductions over rows (dB, colsum, dA) go
// through per-thread partial sums in a fixed order, so results are deterministic for a given thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "coto_mask.h"

// The hot loops are compiled twice (AVX2+FMA and the baseline) and picked at load time, so the build is
// portable and still vectorised on the machines that have AVX2.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define COTO_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define COTO_CLONES
#endif
// Helpers of the cloned loops must be inlined into them to be compiled for the clone's instruction set.
#define COTO_INLINE inline __attribute__((always_inline))

namespace coto {
namespace {

using at::Tensor;

struct Dropout {
  MaskKeys keys;
  int32_t threshold;
  bool on;
  float scale;  // 1 / (1 - p)
  // col(k >> 1) for every column k of X (each pair's key twice), computed once per call and shared by all rows:
  // the per-element work is then one xor, one multiply, one variable shift and the compare (vectorised).
  std::vector<uint32_t> column_keys;
};

Dropout make_dropout(int64_t seed, double p, int64_t columns) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "coto_kernels_native: dropout_p must lie in [0, 1), got ", p);
  Dropout d{mask_keys(seed), keep_threshold(p), p > 0.0, static_cast<float>(1.0 / (1.0 - p)), {}};
  if (d.on) {
    d.column_keys.resize(static_cast<size_t>(columns));
    for (int64_t k = 0; k < columns; ++k) d.column_keys[k] = column_key(static_cast<uint32_t>(k) >> 1, d.keys);
  }
  return d;
}

// out[k] = keep * x[k] * scale for columns [k0, k0 + n) of row `row` (the dropped row chunk in fp32) and, when
// factor != nullptr, factor[k] = keep * scale. The dropout fields are copied into locals so the compiler knows
// the float stores cannot change them (the loop then vectorises: 8 lanes per AVX2 instruction sequence).
template <typename T>
COTO_INLINE void dropped_chunk(const T* __restrict__ x, int64_t n, int64_t row, int64_t k0, const Dropout& d,
                          float* __restrict__ out, float* __restrict__ factor) {
  if (!d.on) {
    for (int64_t k = 0; k < n; ++k) out[k] = static_cast<float>(x[k]);
    if (factor != nullptr) std::fill(factor, factor + n, 1.0f);
    return;
  }
  const uint32_t row_hash = row_key(static_cast<uint32_t>(row), d.keys);
  const uint32_t* __restrict__ columns = d.column_keys.data() + k0;
  const uint32_t parity = static_cast<uint32_t>(k0);
  const int32_t threshold = d.threshold;
  const float scale = d.scale;
  const uint32_t count = static_cast<uint32_t>(n);
  if (factor == nullptr) {
    for (uint32_t k = 0; k < count; ++k) {
      const float value = static_cast<float>(x[k]);  // loaded unconditionally, so the loop vectorises
      out[k] = value * (keep_half(pair_hash(row_hash, columns[k]), parity + k, threshold) ? scale : 0.0f);
    }
    return;
  }
  for (uint32_t k = 0; k < count; ++k) {
    const float f = keep_half(pair_hash(row_hash, columns[k]), parity + k, threshold) ? scale : 0.0f;
    factor[k] = f;
    out[k] = static_cast<float>(x[k]) * f;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The products themselves are BLAS calls (at::mm_out / addmm_out: MKL or OpenBLAS, whatever torch uses), on
// row blocks small enough to stay in cache: a thread writes drop(X) of one block into its own fp32 buffer, hands
// that buffer to BLAS, and moves on. So the dropout costs one pass over X and no M x K tensor exists, while the
// arithmetic runs at BLAS speed (a hand-written loop here was 1.4-2x slower than MKL on these skinny shapes).
// Without dropout, fp32 operands go to BLAS whole, multi-threaded; half-precision ones are widened per block.

constexpr int64_t kDotChunk = 128;  // columns per dora_dy task: 512 B of accumulators
constexpr int64_t kBlockRows = 64;  // 64 x K fp32: 128 KiB at K = 512, within L2 up to K ~ 4096

// Rows [row0, row0 + rows) of X into `out` (fp32, [rows, K]), dropped when d.on; when `factor` is given it
// receives keep * 1/(1-p) per element (what dX's term is multiplied by).
template <typename T>
COTO_CLONES void drop_rows(const T* x, int64_t ldx, int64_t row0, int64_t rows, int64_t K, const Dropout& d,
                           float* out, float* factor) {
  for (int64_t i = 0; i < rows; ++i) {
    dropped_chunk(x + (row0 + i) * ldx, K, row0 + i, 0, d, out + i * K, factor != nullptr ? factor + i * K : nullptr);
  }
}

// dx rows += factor * delta (factor == nullptr: 1), accumulated in fp32 and rounded once to T.
template <typename T>
COTO_CLONES void add_rows(T* dx, int64_t lddx, int64_t rows, int64_t K, const float* delta, const float* factor) {
  for (int64_t i = 0; i < rows; ++i) {
    T* __restrict__ out = dx + i * lddx;
    const float* __restrict__ add = delta + i * K;
    if (factor != nullptr) {
      const float* __restrict__ f = factor + i * K;
      for (int64_t k = 0; k < K; ++k) out[k] = static_cast<T>(static_cast<float>(out[k]) + f[k] * add[k]);
    } else {
      for (int64_t k = 0; k < K; ++k) out[k] = static_cast<T>(static_cast<float>(out[k]) + add[k]);
    }
  }
}

// drop_rows into a thread's reusable buffer, viewed as an fp32 [rows, K] tensor for BLAS.
template <typename T>
Tensor dropped_rows(const T* x, int64_t ldx, int64_t row0, int64_t rows, int64_t K, const Dropout& d,
                    std::vector<float>& buffer, std::vector<float>* factor) {
  buffer.resize(static_cast<size_t>(rows * K));
  if (factor != nullptr) factor->resize(static_cast<size_t>(rows * K));
  drop_rows(x, ldx, row0, rows, K, d, buffer.data(), factor != nullptr ? factor->data() : nullptr);
  return at::from_blob(buffer.data(), {rows, K}, at::TensorOptions().dtype(at::kFloat));
}

// Split [0, rows) into one contiguous range per thread, fixed for a given thread count: the per-thread partial
// sums of dB and dA are then added in a fixed order and results are deterministic.
int64_t partition_count(int64_t rows) {
  const int64_t blocks = (rows + kBlockRows - 1) / kBlockRows;
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks));
}

// Run body(row0, rows, part) over the row blocks of [0, M), part p's blocks on one thread.
template <typename Body>
void for_row_blocks(int64_t M, int64_t parts, const Body& body) {
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    // Dispatch state is thread-local and worker threads start with autograd on: the BLAS calls must skip it.
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t part = begin; part < end; ++part) {
      const int64_t first = part * M / parts, last = (part + 1) * M / parts;
      for (int64_t row0 = first; row0 < last; row0 += kBlockRows) body(row0, std::min(kBlockRows, last - row0), part);
    }
  });
}

Tensor as_fp32(const Tensor& t) { return t.scalar_type() == at::kFloat ? t : t.to(at::kFloat); }

Tensor unit_col_stride(const Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); }

void check_2d(const Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, "coto_kernels_native: ", name, " must be 2-D, got shape ", t.sizes());
}

// One adapter of a call: rows [offset, offset + rank) of the (stacked) A, the same columns of S and dS, and the mask
// of its own seed. A single layer's call has one; a group of layers reading the same X (q/k/v: coto_kernels/
// kernels/lora_group.py) has one per layer, and each row block of X is then read from memory once for all of them
// (the members' dropped copies are made from the block while it is in cache).
struct Member {
  int64_t offset;
  int64_t rank;
  Dropout dropout;
};

bool any_dropout(const std::vector<Member>& members) {
  return std::any_of(members.begin(), members.end(), [](const Member& m) { return m.dropout.on; });
}

std::vector<Member> single_member(int64_t rank, int64_t seed, double dropout_p, int64_t K) {
  return {Member{0, rank, make_dropout(seed, dropout_p, K)}};
}

std::vector<Member> group_members(c10::IntArrayRef ranks, c10::IntArrayRef seeds, double dropout_p, int64_t K,
                                  int64_t stacked_rank, const char* op) {
  TORCH_CHECK(!ranks.empty() && ranks.size() == seeds.size(), "coto_kernels_native.", op,
              ": ranks and seeds need one entry per member, got ", ranks.size(), " and ", seeds.size());
  std::vector<Member> members;
  int64_t offset = 0;
  for (size_t i = 0; i < ranks.size(); ++i) {
    TORCH_CHECK(ranks[i] > 0, "coto_kernels_native.", op, ": ranks must be positive, got ", ranks);
    members.push_back(Member{offset, ranks[i], make_dropout(seeds[i], dropout_p, K)});
    offset += ranks[i];
  }
  TORCH_CHECK(offset == stacked_rank, "coto_kernels_native.", op, ": ranks ", ranks, " do not add up to lora_a's ",
              stacked_rank, " rows");
  return members;
}

void check_down(const Tensor& x, const Tensor& a, const char* op) {
  check_2d(x, "x");
  check_2d(a, "lora_a");
  TORCH_CHECK(x.size(1) == a.size(1), "coto_kernels_native.", op, ": x ", x.sizes(), " and lora_a ", a.sizes(),
              " disagree on K");
}

// S = [drop_1(X) A_1^T | ... | drop_n(X) A_n^T] (fp32).
Tensor down_members(const Tensor& x_in, const Tensor& a_in, const std::vector<Member>& members) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // BLAS calls inside: no autograd on them
  const Tensor x = unit_col_stride(x_in);
  const Tensor a_t = as_fp32(a_in).t();
  const int64_t M = x.size(0), K = x.size(1);
  if (!any_dropout(members) && x.scalar_type() == at::kFloat) return at::mm(x, a_t);
  Tensor s = at::empty({M, a_in.size(0)}, x.options().dtype(at::kFloat));
  if (M == 0) return s;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lora_down", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    for_row_blocks(M, partition_count(M), [&](int64_t row0, int64_t rows, int64_t) {
      thread_local std::vector<float> buffer;
      for (const Member& m : members) {
        Tensor s_rows = s.narrow(0, row0, rows).narrow(1, m.offset, m.rank);
        at::mm_out(s_rows, dropped_rows(xp, x.stride(0), row0, rows, K, m.dropout, buffer, nullptr),
                   a_t.narrow(1, m.offset, m.rank));
      }
    });
  });
  return s;
}

Tensor lora_down_cpu(const Tensor& x, const Tensor& a, int64_t seed, double dropout_p) {
  check_down(x, a, "lora_down");
  return down_members(x, a, single_member(a.size(0), seed, dropout_p, x.size(1)));
}

Tensor lora_down_group_cpu(const Tensor& x, const Tensor& a, c10::IntArrayRef ranks, c10::IntArrayRef seeds,
                           double dropout_p) {
  check_down(x, a, "lora_down_group");
  return down_members(x, a, group_members(ranks, seeds, dropout_p, x.size(1), a.size(0), "lora_down_group"));
}

// ---------------------------------------------------------------------------------------------------------------
// dS = s dY B, dB = s dY^T S and the column sums of dY. fp32 dY goes to BLAS whole; half-precision dY is widened
// one row block at a time (dB and the column sums then come from per-thread partial sums).
std::tuple<Tensor, Tensor, Tensor> lora_dy_cpu(const Tensor& dy_in, const Tensor& b_in, const Tensor& s_in,
                                               double scaling, bool need_db, bool need_colsum) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // BLAS calls inside: no autograd on them
  check_2d(dy_in, "dy");
  check_2d(b_in, "lora_b");
  check_2d(s_in, "s");
  TORCH_CHECK(dy_in.size(1) == b_in.size(0) && s_in.size(0) == dy_in.size(0) && s_in.size(1) == b_in.size(1),
              "coto_kernels_native.lora_dy: dy ", dy_in.sizes(), ", lora_b ", b_in.sizes(), " and s ", s_in.sizes(),
              " do not fit together");
  const Tensor dy = dy_in.contiguous();
  const Tensor b = as_fp32(b_in), s = as_fp32(s_in);
  const int64_t M = dy.size(0), N = dy.size(1), r = b.size(1);
  const auto fp32 = dy.options().dtype(at::kFloat);
  const auto none = [&] { return at::empty({0}, fp32); };  // one per output: outputs must not alias
  if (dy.scalar_type() == at::kFloat) {
    Tensor ds = at::empty({M, r}, fp32);
    at::addmm_out(ds, ds, dy, b, 0.0, scaling);  // beta = 0: ds's contents are never read
    Tensor db = none();
    if (need_db) {
      db = at::empty({N, r}, fp32);
      at::addmm_out(db, db, dy.t(), s, 0.0, scaling);
    }
    return {ds, db, need_colsum ? dy.sum(0) : none()};
  }
  Tensor ds = at::empty({M, r}, fp32);
  const int64_t parts = partition_count(M);
  Tensor db_parts = at::zeros({need_db ? parts : 0, N, r}, fp32);
  Tensor colsum_parts = at::zeros({need_colsum ? parts : 0, N}, fp32);
  if (M > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dy.scalar_type(), "lora_dy", [&] {
      const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
      const Dropout identity = make_dropout(0, 0.0, 0);
      for_row_blocks(M, parts, [&](int64_t row0, int64_t rows, int64_t part) {
        thread_local std::vector<float> buffer;
        const Tensor dy_rows = dropped_rows(dyp, N, row0, rows, N, identity, buffer, nullptr);
        Tensor ds_rows = ds.narrow(0, row0, rows);
        at::mm_out(ds_rows, dy_rows, b);
        if (need_db) db_parts[part].addmm_(dy_rows.t(), s.narrow(0, row0, rows));
        if (need_colsum) colsum_parts[part].add_(dy_rows.sum(0));
      });
    });
  }
  ds.mul_(scaling);
  Tensor db = need_db ? db_parts.sum(0).mul_(scaling) : none();
  return {ds, db, need_colsum ? colsum_parts.sum(0) : none()};
}

// ---------------------------------------------------------------------------------------------------------------
// dX += drop'(dS A) in place and dA = dS^T drop(X): per row block, drop(X) (and keep / (1-p)) once into a thread's
// buffer, dA_part += dS_rows^T drop(X_rows) and dX_rows += factor * (dS_rows A), both by BLAS.
template <typename T>
void dx_da_rows(T* dx, int64_t lddx, const T* x, int64_t ldx, int64_t row0, int64_t rows, int64_t K,
                const Tensor& ds, const Tensor& a, const Dropout& d, Tensor* da_part) {
  thread_local std::vector<float> buffer, factor, delta;
  const bool scale_dx = dx != nullptr && d.on;
  const Tensor xd = dropped_rows(x, ldx, row0, rows, K, d, buffer, scale_dx ? &factor : nullptr);
  const Tensor ds_rows = ds.narrow(0, row0, rows);
  if (da_part != nullptr) da_part->addmm_(ds_rows.t(), xd);
  if (dx == nullptr) return;
  delta.resize(static_cast<size_t>(rows * K));
  Tensor delta_rows = at::from_blob(delta.data(), {rows, K}, xd.options());
  at::mm_out(delta_rows, ds_rows, a);
  add_rows(dx + row0 * lddx, lddx, rows, K, delta.data(), scale_dx ? factor.data() : nullptr);
}

void check_dx_da(const std::optional<Tensor>& dx_opt, const Tensor& x, const Tensor& ds, const Tensor& a,
                 const char* op) {
  check_2d(x, "x");
  check_2d(ds, "ds");
  check_2d(a, "lora_a");
  TORCH_CHECK(x.size(0) == ds.size(0) && x.size(1) == a.size(1) && ds.size(1) == a.size(0), "coto_kernels_native.",
              op, ": x ", x.sizes(), ", ds ", ds.sizes(), " and lora_a ", a.sizes(), " do not fit together");
  if (dx_opt.has_value() && dx_opt->defined()) {
    TORCH_CHECK(dx_opt->sizes() == x.sizes() && dx_opt->scalar_type() == x.scalar_type() && dx_opt->stride(1) == 1,
                "coto_kernels_native.", op, ": dx must have x's shape ", x.sizes(), " and dtype ", x.scalar_type(),
                " with unit column stride; got ", dx_opt->sizes(), " ", dx_opt->scalar_type());
  }
}

// dX += sum_i drop'_i(dS_i A_i) in place and dA = [dS_1^T drop_1(X); ...; dS_n^T drop_n(X)] (fp32).
Tensor dx_da_members(const std::optional<Tensor>& dx_opt, const Tensor& x_in, const Tensor& ds_in,
                     const Tensor& a_in, const std::vector<Member>& members, bool need_da) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // BLAS calls inside: no autograd on them
  const Tensor x = unit_col_stride(x_in);
  const Tensor ds = as_fp32(ds_in).contiguous(), a = as_fp32(a_in);
  const int64_t M = x.size(0), K = x.size(1), r = a.size(0);
  const bool has_dx = dx_opt.has_value() && dx_opt->defined();
  const auto fp32 = ds.options();
  if (!any_dropout(members) && x.scalar_type() == at::kFloat) {  // nothing to fuse: BLAS on the whole operands
    if (has_dx) {
      Tensor dx = *dx_opt;
      dx.addmm_(ds, a);
    }
    // dA as (X^T dS)^T: MKL takes a cold M x K X 25-45% faster as this product's left operand than as dS^T X's
    // right one (measured at M = 512, K = 512 / 1376, r = 16; the transpose copied back is r x K)
    return need_da ? at::mm(x.t(), ds).t().contiguous() : at::empty({0}, fp32);
  }
  const int64_t parts = partition_count(M);
  Tensor da_parts = at::zeros({need_da ? parts : 0, r, K}, fp32);
  if (M > 0 && (has_dx || need_da)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lora_dx_da", [&] {
      scalar_t* dxp = has_dx ? dx_opt->mutable_data_ptr<scalar_t>() : nullptr;
      const int64_t lddx = has_dx ? dx_opt->stride(0) : 0;
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      for_row_blocks(M, parts, [&](int64_t row0, int64_t rows, int64_t part) {
        for (const Member& m : members) {
          Tensor da_part = need_da ? da_parts[part].narrow(0, m.offset, m.rank) : Tensor();
          dx_da_rows(dxp, lddx, xp, x.stride(0), row0, rows, K, ds.narrow(1, m.offset, m.rank),
                     a.narrow(0, m.offset, m.rank), m.dropout, need_da ? &da_part : nullptr);
        }
      });
    });
  }
  if (!need_da) return at::empty({0}, fp32);
  return parts == 1 ? da_parts[0] : da_parts.sum(0);
}

Tensor lora_dx_da_cpu(const std::optional<Tensor>& dx, const Tensor& x, const Tensor& ds, const Tensor& a,
                      int64_t seed, double dropout_p, bool need_da) {
  check_dx_da(dx, x, ds, a, "lora_dx_da");
  return dx_da_members(dx, x, ds, a, single_member(a.size(0), seed, dropout_p, x.size(1)), need_da);
}

Tensor lora_dx_da_group_cpu(const std::optional<Tensor>& dx, const Tensor& x, const Tensor& ds, const Tensor& a,
                            c10::IntArrayRef ranks, c10::IntArrayRef seeds, double dropout_p, bool need_da) {
  check_dx_da(dx, x, ds, a, "lora_dx_da_group");
  return dx_da_members(dx, x, ds, a, group_members(ranks, seeds, dropout_p, x.size(1), a.size(0), "lora_dx_da_group"),
                       need_da);
}

// ---------------------------------------------------------------------------------------------------------------
// dora_dy(dy, c, saved?) -> (G = c * dY in dY's dtype, sum_rows(dY * saved) in fp32, or an empty tensor): DoRA's
// backward reads dY once for both the scaled gradient its GEMMs take and the magnitude gradient's numerator
// (torch would write the M x N product dY * saved and read it back). Each thread owns whole column chunks: no
// partial sums, deterministic whatever the thread count; a chunk's accumulators stay in L1.
template <typename T>
COTO_CLONES void dora_dy_chunk(const T* dy, const float* c, const T* saved, T* g, int64_t N, int64_t M, int64_t n0,
                               int64_t n, float* dots) {
  float acc[kDotChunk] = {};
  for (int64_t m = 0; m < M; ++m) {
    const T* __restrict__ d = dy + m * N + n0;
    T* __restrict__ out = g + m * N + n0;
    for (int64_t j = 0; j < n; ++j) out[j] = static_cast<T>(static_cast<float>(d[j]) * c[n0 + j]);
    if (saved != nullptr) {
      const T* __restrict__ y = saved + m * N + n0;
      for (int64_t j = 0; j < n; ++j) acc[j] += static_cast<float>(d[j]) * static_cast<float>(y[j]);
    }
  }
  if (dots != nullptr) std::copy(acc, acc + n, dots + n0);
}

std::tuple<Tensor, Tensor> dora_dy_cpu(const Tensor& dy_in, const Tensor& c_in, const std::optional<Tensor>& saved_opt) {
  check_2d(dy_in, "dy");
  const Tensor dy = dy_in.contiguous();
  const int64_t M = dy.size(0), N = dy.size(1);
  TORCH_CHECK(c_in.dim() == 1 && c_in.size(0) == N, "coto_kernels_native.dora_dy: the column scale must have shape [",
              N, "], got ", c_in.sizes());
  const bool has_saved = saved_opt.has_value() && saved_opt->defined();
  Tensor saved;
  if (has_saved) {
    TORCH_CHECK(saved_opt->sizes() == dy.sizes() && saved_opt->scalar_type() == dy.scalar_type(),
                "coto_kernels_native.dora_dy: saved must have dy's shape ", dy.sizes(), " and dtype ",
                dy.scalar_type(), "; got ", saved_opt->sizes(), " ", saved_opt->scalar_type());
    saved = saved_opt->contiguous();
  }
  const Tensor c = as_fp32(c_in).contiguous();
  Tensor g = at::empty_like(dy);
  Tensor dots = at::empty({has_saved ? N : 0}, dy.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dy.scalar_type(), "dora_dy", [&] {
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    const scalar_t* sp = has_saved ? saved.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* gp = g.mutable_data_ptr<scalar_t>();
    float* dp = has_saved ? dots.mutable_data_ptr<float>() : nullptr;
    const int64_t chunks = (N + kDotChunk - 1) / kDotChunk;
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        const int64_t n0 = chunk * kDotChunk;
        dora_dy_chunk(dyp, c.const_data_ptr<float>(), sp, gp, N, M, n0, std::min(kDotChunk, N - n0), dp);
      }
    });
  });
  return {g, dots};
}

// ---------------------------------------------------------------------------------------------------------------
// dora_row_norm(weight, w_squared, a, b, lora_bias?, scaling, guard, weight_is_kn) -> n (fp32 [N]): DoRA's row norm
// by dora_torch's guarded expansion (its docstring has the math and when it loses precision). With U = B'A' the
// low-rank update (A' = [A; 1^T], B' = [B, lora_bias] when there is a lora_bias):
//   n_j^2 = ||W_j||^2 + 2 s W_j . U_j + s^2 ||U_j||^2,
// rows with n_j^2 < guard (||W_j||^2 + ||s U_j||^2) recomputed exactly in fp64. ||W_j||^2 comes in (cached by the
// caller: W is frozen, and at B = 0 the result is then exactly its sqrt). The other two terms come from one
// streaming pass over W: each thread rebuilds a row (or column block) of U a chunk at a time in registers from A
// (r x K, cache-resident) and B, and takes its dots with W there; W is read once and nothing of U is stored.
// Not BLAS: on a W the training step has evicted from the caches, MKL's skinny W A'^T alone takes 2-3.5x a plain
// read of W and runs at ~18 GFLOP/s per core here, and the expansion then needs two more products and a loop. This
// pass (2 threads, caches flushed, interleaved with the BLAS expansion): 764 against 1402 us at 512 x 512, 1036
// against 1637 at 1376 x 512, 9.1 against 14.9 ms at 4096 x 4096 (r 16; W A'^T alone 13.9 ms there); on a hot W
// 83 GFLOP/s at 512 x 512.
constexpr int64_t kUpdateChunk = 32;  // columns of U per block in the [K, N] (Conv1D) pass

// Eight floats as one value: GCC keeps them in a register (an AVX2 ymm in the x86-64-v3 clone, two SSE registers in
// the baseline one), so the row kernel's accumulators below are registers by construction, not arrays the
// vectoriser may or may not promote.
typedef float Float8 __attribute__((vector_size(32)));

template <typename T>
COTO_INLINE Float8 load8(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    Float8 v;
    __builtin_memcpy(&v, p, sizeof(v));  // an unaligned vector load, without type punning
    return v;
  } else {
    Float8 v;
    for (int e = 0; e < 8; ++e) v[e] = static_cast<float>(p[e]);
    return v;
  }
}

COTO_INLINE float sum8(Float8 v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

// (W_j . U_j, ||U_j||^2) for kRows consecutive rows j of a row-major W (row stride K), U_j = lb_j + B_j A, built
// 16 columns at a time: kRows x 2 Float8 of U in registers, each load of A feeding kRows FMAs; at kRows = 4 that
// is eight independent FMA chains, enough to cover the FMA latency (one row alone leaves the units half idle).
constexpr int64_t kPrefetchAhead = 64;  // elements of W (four cache lines) requested ahead of each row's dots
template <typename T, int kRows>
COTO_INLINE void rows_update_dots(const T* __restrict__ w, int64_t w_elements, const float* __restrict__ a,
                                  int64_t K, const float* __restrict__ b, int64_t r, const float* __restrict__ lb,
                                  float* __restrict__ cross_out, float* __restrict__ update_out) {
  Float8 cross[kRows][2] = {}, update[kRows][2] = {};
  int64_t k0 = 0;
  for (; k0 + 16 <= K; k0 += 16) {
    for (int row = 0; row < kRows; ++row)  // the next rows' heads too, within the elements this thread reads
      __builtin_prefetch(w + std::min(row * K + k0 + kPrefetchAhead, w_elements - 1), 0, 0);
    Float8 u[kRows][2];
    for (int row = 0; row < kRows; ++row) u[row][0] = u[row][1] = Float8{} + lb[row];
    for (int64_t i = 0; i < r; ++i) {
      const Float8 a0 = load8(a + i * K + k0), a1 = load8(a + i * K + k0 + 8);
      for (int row = 0; row < kRows; ++row) {
        const float bi = b[row * r + i];
        u[row][0] += bi * a0;
        u[row][1] += bi * a1;
      }
    }
    for (int row = 0; row < kRows; ++row) {
      cross[row][0] += load8(w + row * K + k0) * u[row][0];
      cross[row][1] += load8(w + row * K + k0 + 8) * u[row][1];
      update[row][0] += u[row][0] * u[row][0];
      update[row][1] += u[row][1] * u[row][1];
    }
  }
  for (int row = 0; row < kRows; ++row) {
    float cross_sum = sum8(cross[row][0] + cross[row][1]), update_sum = sum8(update[row][0] + update[row][1]);
    for (int64_t k = k0; k < K; ++k) {  // the last K % 16 columns, one at a time
      float u = lb[row];
      for (int64_t i = 0; i < r; ++i) u += b[row * r + i] * a[i * K + k];
      cross_sum += static_cast<float>(w[row * K + k]) * u;
      update_sum += u * u;
    }
    cross_out[row] = cross_sum;
    update_out[row] = update_sum;
  }
}

// Rows [begin, end) of a row-major W: blocks of four, then the rest one by one.
template <typename T>
COTO_CLONES void row_range_update_dots(const T* __restrict__ w, int64_t begin, int64_t end, const float* a,
                                       int64_t K, const float* b, int64_t r, const float* lb, float* cross_out,
                                       float* update_out) {
  const float no_bias[4] = {};
  int64_t j = begin;
  for (; j + 4 <= end; j += 4)
    rows_update_dots<T, 4>(w + j * K, (end - j) * K, a, K, b + j * r, r, lb == nullptr ? no_bias : lb + j,
                           cross_out + j, update_out + j);
  for (; j < end; ++j)
    rows_update_dots<T, 1>(w + j * K, (end - j) * K, a, K, b + j * r, r, lb == nullptr ? no_bias : lb + j,
                           cross_out + j, update_out + j);
}

// The same for up to kUpdateChunk columns j0.. of a W stored [K, N] (GPT-2's Conv1D): U's columns are built a row
// k at a time from B^T (r x N) and A[:, k], so W is still read in its storage order.
template <typename T>
COTO_CLONES void column_block_update_dots(const T* __restrict__ w_kn, int64_t N, int64_t j0, int64_t count,
                                          const float* __restrict__ a, int64_t K, const float* __restrict__ b_t,
                                          int64_t r, const float* __restrict__ lb, float* cross_out,
                                          float* update_out) {
  float cross[kUpdateChunk] = {}, update[kUpdateChunk] = {};
  for (int64_t k = 0; k < K; ++k) {
    float u[kUpdateChunk];
    for (int64_t jj = 0; jj < count; ++jj) u[jj] = lb == nullptr ? 0.0f : lb[j0 + jj];
    for (int64_t i = 0; i < r; ++i) {
      const float aik = a[i * K + k];
      const float* __restrict__ bi = b_t + i * N + j0;
      for (int64_t jj = 0; jj < count; ++jj) u[jj] += bi[jj] * aik;
    }
    const T* __restrict__ w_row = w_kn + k * N + j0;
    for (int64_t jj = 0; jj < count; ++jj) {
      cross[jj] += static_cast<float>(w_row[jj]) * u[jj];
      update[jj] += u[jj] * u[jj];
    }
  }
  for (int64_t jj = 0; jj < count; ++jj) {
    cross_out[j0 + jj] = cross[jj];
    update_out[j0 + jj] = update[jj];
  }
}

// cross_j = W_j . U_j and update_j = ||U_j||^2 for every row j of W (fp32 [N] each), in one pass over W.
void update_dots(const Tensor& w_nk, const Tensor& a, const Tensor& b, const float* lb, Tensor& cross,
                 Tensor& update) {
  const int64_t N = w_nk.size(0), K = w_nk.size(1), r = a.size(0);
  const float* ap = a.const_data_ptr<float>();
  float *cp = cross.mutable_data_ptr<float>(), *up = update.mutable_data_ptr<float>();
  const bool kn_storage = N > 1 && w_nk.stride(0) == 1 && w_nk.stride(1) == N;
  const Tensor w = kn_storage ? w_nk.t() : w_nk.contiguous();  // [K, N] or [N, K], both contiguous
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "dora_row_norm", [&] {
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    if (kn_storage) {
      const Tensor b_t = b.t().contiguous();
      const float* btp = b_t.const_data_ptr<float>();
      const int64_t blocks = (N + kUpdateChunk - 1) / kUpdateChunk;
      at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t block = begin; block < end; ++block) {
          const int64_t j0 = block * kUpdateChunk;
          column_block_update_dots(wp, N, j0, std::min(kUpdateChunk, N - j0), ap, K, btp, r, lb, cp, up);
        }
      });
    } else {
      const float* bp = b.const_data_ptr<float>();
      at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
        row_range_update_dots(wp, begin, end, ap, K, bp, r, lb, cp, up);
      });
    }
  });
}

// Rows whose expansion the guard flagged, exactly: ||W_j + s B'_j A'||^2 in fp64, rounded once to fp32.
void exact_rows_(Tensor& norm_squared, const std::vector<int64_t>& rows, const Tensor& w_nk, const Tensor& a,
                 const Tensor& b, double scaling) {
  const Tensor index = at::from_blob(const_cast<int64_t*>(rows.data()), {static_cast<int64_t>(rows.size())},
                                     at::TensorOptions().dtype(at::kLong));
  const Tensor exact = w_nk.index_select(0, index).to(at::kDouble).add(
      at::mm(b.index_select(0, index).to(at::kDouble), a.to(at::kDouble)), scaling);
  norm_squared.index_copy_(0, index, exact.square().sum(1).to(at::kFloat));
}

Tensor dora_row_norm_cpu(const Tensor& weight, const Tensor& w_squared_in, const Tensor& a_in, const Tensor& b_in,
                         const std::optional<Tensor>& lora_bias, double scaling, double guard, bool weight_is_kn) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  // fp32 whatever the caller's autocast says: the guard's fp64 product would otherwise run in its half precision
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKeySet(c10::DispatchKey::AutocastCPU));
  check_2d(weight, "weight");
  check_2d(a_in, "lora_a");
  check_2d(b_in, "lora_b");
  const Tensor w_nk = weight_is_kn ? weight.t() : weight;
  const int64_t N = w_nk.size(0), K = w_nk.size(1);
  TORCH_CHECK(a_in.size(1) == K && b_in.size(0) == N && b_in.size(1) == a_in.size(0),
              "coto_kernels_native.dora_row_norm: shape mismatch: weight [N, K] = ", w_nk.sizes(), ", lora_a ",
              a_in.sizes(), ", lora_b ", b_in.sizes());
  TORCH_CHECK(w_squared_in.dim() == 1 && w_squared_in.size(0) == N,
              "coto_kernels_native.dora_row_norm: w_squared must have shape [", N, "], got ", w_squared_in.sizes());
  Tensor a = as_fp32(a_in).contiguous(), b = as_fp32(b_in).contiguous();
  Tensor lb;
  if (lora_bias.has_value() && lora_bias->defined()) {
    TORCH_CHECK(lora_bias->dim() == 1 && lora_bias->size(0) == N,
                "coto_kernels_native.dora_row_norm: lora_bias must have shape [", N, "], got ", lora_bias->sizes());
    lb = as_fp32(*lora_bias).contiguous();
  }
  Tensor cross = at::empty({N}, a.options()), update = at::empty({N}, a.options());
  update_dots(w_nk, a, b, lb.defined() ? lb.const_data_ptr<float>() : nullptr, cross, update);
  const Tensor w_squared = as_fp32(w_squared_in).contiguous();
  Tensor norm_squared = at::empty({N}, a.options());
  const float two_s = static_cast<float>(2.0 * scaling), s_squared = static_cast<float>(scaling * scaling);
  const float guard_f = static_cast<float>(guard);
  const float *cp = cross.const_data_ptr<float>(), *up = update.const_data_ptr<float>();
  const float* wp = w_squared.const_data_ptr<float>();
  float* np = norm_squared.mutable_data_ptr<float>();
  std::vector<int64_t> rows;
  for (int64_t j = 0; j < N; ++j) {
    const float update_squared = up[j] * s_squared;  // ||s U_j||^2
    np[j] = wp[j] + two_s * cp[j] + update_squared;
    if (np[j] < guard_f * (wp[j] + update_squared)) rows.push_back(j);
  }
  if (!rows.empty()) {
    if (lb.defined()) {  // the exact rows take the augmented factors
      a = at::cat({a, at::ones({1, K}, a.options())});
      b = at::cat({b, lb.unsqueeze(1)}, 1);
    }
    exact_rows_(norm_squared, rows, w_nk, a, b, scaling);
  }
  return norm_squared.sqrt_();
}

// ---------------------------------------------------------------------------------------------------------------
// The keep mask itself (bool, x's shape): for tests, references and DoRA's dropout path (coto_kernels/kernels/
// dora_native.py); the LoRA ops above never materialise it. One row from the per-call column keys (the loop
// vectorises as dropped_chunk's does: ~9x faster than torch's elementwise passes at 512 x 512).
COTO_CLONES void keep_row(int64_t row, int64_t K, const Dropout& d, uint8_t* __restrict__ out) {
  const uint32_t row_hash = row_key(static_cast<uint32_t>(row), d.keys);
  const uint32_t* __restrict__ columns = d.column_keys.data();
  const int32_t threshold = d.threshold;
  const uint32_t count = static_cast<uint32_t>(K);
  for (uint32_t k = 0; k < count; ++k) out[k] = keep_half(pair_hash(row_hash, columns[k]), k, threshold) ? 1 : 0;
}

Tensor keep_mask_cpu(const Tensor& x, int64_t seed, double dropout_p) {
  check_2d(x, "x");
  const int64_t M = x.size(0), K = x.size(1);
  const Dropout d = make_dropout(seed, dropout_p, K);
  if (!d.on) return at::ones({M, K}, x.options().dtype(at::kBool));
  Tensor mask = at::empty({M, K}, x.options().dtype(at::kBool));
  uint8_t* out = reinterpret_cast<uint8_t*>(mask.mutable_data_ptr<bool>());
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) keep_row(m, K, d, out + m * K);
  });
  return mask;
}

}  // namespace
}  // namespace coto

TORCH_LIBRARY(coto_kernels_native, m) {
  m.def("keep_mask(Tensor x, int seed, float dropout_p) -> Tensor");
  m.def("lora_down(Tensor x, Tensor lora_a, int seed, float dropout_p) -> Tensor");
  m.def(
      "lora_dy(Tensor dy, Tensor lora_b, Tensor s, float scaling, bool need_db, bool need_colsum)"
      " -> (Tensor, Tensor, Tensor)");
  m.def("dora_dy(Tensor dy, Tensor col_scale, Tensor? saved) -> (Tensor, Tensor)");
  m.def(
      "dora_row_norm(Tensor weight, Tensor w_squared, Tensor lora_a, Tensor lora_b, Tensor? lora_bias, float scaling,"
      " float guard, bool weight_is_kn) -> Tensor");
  m.def(
      "lora_dx_da(Tensor(a!)? dx, Tensor x, Tensor ds, Tensor lora_a, int seed, float dropout_p, bool need_da)"
      " -> Tensor");
  m.def("lora_down_group(Tensor x, Tensor lora_a, int[] ranks, int[] seeds, float dropout_p) -> Tensor");
  m.def(
      "lora_dx_da_group(Tensor(a!)? dx, Tensor x, Tensor ds, Tensor lora_a, int[] ranks, int[] seeds,"
      " float dropout_p, bool need_da) -> Tensor");
}

TORCH_LIBRARY_IMPL(coto_kernels_native, CPU, m) {
  m.impl("keep_mask", &coto::keep_mask_cpu);
  m.impl("lora_down", &coto::lora_down_cpu);
  m.impl("lora_dy", &coto::lora_dy_cpu);
  m.impl("lora_dx_da", &coto::lora_dx_da_cpu);
  m.impl("lora_down_group", &coto::lora_down_group_cpu);
  m.impl("lora_dx_da_group", &coto::lora_dx_da_group_cpu);
  m.impl("dora_dy", &coto::dora_dy_cpu);
  m.impl("dora_row_norm", &coto::dora_row_norm_cpu);
}
