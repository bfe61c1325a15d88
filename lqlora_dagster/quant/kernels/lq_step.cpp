// The elementwise half of an LQ iteration, one pass per step instead of torch's five to
// ten: forming residuals, block absmaxes, table-based quantization (quant/lut.py) and the
// squared error. The low-rank fit (BLAS) and the double quantization of the block scales
// (a few thousand values) stay in torch.
//
// Exactness: every value is computed with the same roundings as lut.py's torch sequence,
// so an iteration gives the same bits either way (tests/method/test_lq_step_kernel.py):
//   y = fma(x, t, BINS/2)  (torch's addcmul fuses it too), clamped to [0, BINS-1],
//   truncated to the bin; q = level[bin] * scale; residuals subtract in torch's order.
// Build with -ffp-contract=off so the compiler fuses nothing else.
//
// Single-threaded on purpose: the caller runs one matrix per thread (per_matrix_threads.py),
// and each call releases the GIL so those threads run side by side.

#include <torch/extension.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

void check(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.dtype() == torch::kFloat32 && t.is_contiguous(), name,
              " must be a contiguous float32 CPU tensor");
}

void check_same(const torch::Tensor& a, const torch::Tensor& b, const char* name) {
  check(b, name);
  TORCH_CHECK(a.numel() == b.numel(), name, " has ", b.numel(), " values, expected ", a.numel());
}

int64_t n_blocks(int64_t n, int64_t B0) { return (n + B0 - 1) / B0; }

// max |x[i]| over [begin, end), writing x[i] = w[i] - lr[i] first when w is given
// (the maximum is exact whatever the order, so the 8-wide path gives the same value)
float absmax_of(const float* w, const float* lr, float* x, int64_t begin, int64_t end) {
  float m = 0.0f;
  int64_t i = begin;
#ifdef __AVX2__
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= end; i += 8) {
    __m256 v;
    if (w != nullptr) {
      v = _mm256_sub_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(lr + i));
      _mm256_storeu_ps(x + i, v);
    } else {
      v = _mm256_loadu_ps(x + i);
    }
    acc = _mm256_max_ps(acc, _mm256_andnot_ps(sign, v));
  }
  alignas(32) float parts[8];
  _mm256_store_ps(parts, acc);
  for (float p : parts) m = std::max(m, p);
#endif
  for (; i < end; ++i) {
    if (w != nullptr) x[i] = w[i] - lr[i];
    m = std::max(m, std::fabs(x[i]));
  }
  return m;
}

}  // namespace

// X = W - LR, and the absolute maximum of each block of B0 consecutive values of X.
torch::Tensor sub_absmax(torch::Tensor W, torch::Tensor LR, torch::Tensor X, int64_t B0) {
  check(W, "W");
  check_same(W, LR, "LR");
  check_same(W, X, "X");
  const int64_t n = W.numel(), nb = n_blocks(n, B0);
  auto absmax = torch::empty({nb}, W.options());
  const float *w = W.data_ptr<float>(), *lr = LR.data_ptr<float>();
  float *x = X.data_ptr<float>(), *am = absmax.data_ptr<float>();
  {
    pybind11::gil_scoped_release release;
    for (int64_t blk = 0; blk < nb; ++blk) am[blk] = absmax_of(w, lr, x, blk * B0, std::min(n, (blk + 1) * B0));
  }
  return absmax;
}

// The absolute maximum of each block of B0 consecutive values of X.
torch::Tensor block_absmax(torch::Tensor X, int64_t B0) {
  check(X, "X");
  const int64_t n = X.numel(), nb = n_blocks(n, B0);
  auto absmax = torch::empty({nb}, X.options());
  float* x = X.data_ptr<float>();  // only read: no w given
  float* am = absmax.data_ptr<float>();
  {
    pybind11::gil_scoped_release release;
    for (int64_t blk = 0; blk < nb; ++blk) am[blk] = absmax_of(nullptr, nullptr, x, blk * B0, std::min(n, (blk + 1) * B0));
  }
  return absmax;
}

namespace {

// What the table-based quantization of X reads: X, per block BINS/2 over its (nonzero)
// scale (`t`) and the scale itself, and the BINS-entry level table.
struct LutInput {
  const float *x, *t, *scale, *levels;
  int64_t n_levels, n, B0;
};

LutInput lut_input(const torch::Tensor& X, const torch::Tensor& t, const torch::Tensor& scale,
                   const torch::Tensor& levels, int64_t B0, const torch::Tensor& out) {
  check(X, "X");
  check_same(X, out, "out");
  check(t, "t");
  check(scale, "scale");
  check(levels, "levels");
  const int64_t n = X.numel();
  TORCH_CHECK(t.numel() >= n_blocks(n, B0) && scale.numel() >= n_blocks(n, B0), "one t and scale per block");
  return {X.data_ptr<float>(), t.data_ptr<float>(), scale.data_ptr<float>(), levels.data_ptr<float>(),
          levels.numel(), n, B0};
}

// level[bin(x)] * scale, as lut.BlockQuantizer computes it; `emit8(i, q)` takes 8 values
// from x[i] on (AVX2), `emit(i, q)` one
template <typename Emit8, typename Emit>
void for_each_quantized(const LutInput& in, Emit8 emit8, Emit emit) {
  const float half = static_cast<float>(in.n_levels) / 2.0f, top = static_cast<float>(in.n_levels - 1);
  const int64_t nb = n_blocks(in.n, in.B0);
#ifdef __AVX2__
  const __m256 vhalf = _mm256_set1_ps(half), vtop = _mm256_set1_ps(top), zero = _mm256_setzero_ps();
#endif
  for (int64_t blk = 0; blk < nb; ++blk) {
    const int64_t end = std::min(in.n, (blk + 1) * in.B0);
    const float tb = in.t[blk], sb = in.scale[blk];
    int64_t i = blk * in.B0;
#ifdef __AVX2__
    const __m256 vt = _mm256_set1_ps(tb), vs = _mm256_set1_ps(sb);
    for (; i + 8 <= end; i += 8) {
      __m256 y = _mm256_fmadd_ps(_mm256_loadu_ps(in.x + i), vt, vhalf);
      y = _mm256_min_ps(_mm256_max_ps(y, zero), vtop);
      const __m256 level = _mm256_i32gather_ps(in.levels, _mm256_cvttps_epi32(y), 4);
      emit8(i, _mm256_mul_ps(level, vs));
    }
#endif
    for (; i < end; ++i) {
      float y = std::fma(in.x[i], tb, half);
      y = y < 0.0f ? 0.0f : (y > top ? top : y);
      emit(i, in.levels[static_cast<int32_t>(y)] * sb);
    }
  }
}

}  // namespace

// Q = the table-quantized X.
void lut_quantize(torch::Tensor X, torch::Tensor t, torch::Tensor scale, torch::Tensor levels, int64_t B0,
                  torch::Tensor Q) {
  const LutInput in = lut_input(X, t, scale, levels, B0, Q);
  float* q = Q.data_ptr<float>();
  pybind11::gil_scoped_release release;
#ifdef __AVX2__
  auto emit8 = [q](int64_t i, __m256 v) { _mm256_storeu_ps(q + i, v); };
#else
  auto emit8 = [](int64_t, float) {};  // never called without AVX2
#endif
  for_each_quantized(in, emit8, [q](int64_t i, float v) { q[i] = v; });
}

// out = (quantized X - X)^2, elementwise: a config's squared error without keeping its Q.
void lut_squared_error(torch::Tensor X, torch::Tensor t, torch::Tensor scale, torch::Tensor levels, int64_t B0,
                       torch::Tensor out) {
  const LutInput in = lut_input(X, t, scale, levels, B0, out);
  const float* x = in.x;
  float* o = out.data_ptr<float>();
  pybind11::gil_scoped_release release;
#ifdef __AVX2__
  auto emit8 = [o, x](int64_t i, __m256 v) {
    const __m256 d = _mm256_sub_ps(v, _mm256_loadu_ps(x + i));
    _mm256_storeu_ps(o + i, _mm256_mul_ps(d, d));
  };
#else
  auto emit8 = [](int64_t, float) {};  // never called without AVX2
#endif
  for_each_quantized(in, emit8, [o, x](int64_t i, float v) {
    const float d = v - x[i];
    o[i] = d * d;
  });
}

// out = ((W - Q) - LR)^2, elementwise (the caller sums it, Fisher-weighted or not).
void squared_residual(torch::Tensor W, torch::Tensor Q, torch::Tensor LR, torch::Tensor out) {
  check(W, "W");
  check_same(W, Q, "Q");
  check_same(W, LR, "LR");
  check_same(W, out, "out");
  const float *w = W.data_ptr<float>(), *q = Q.data_ptr<float>(), *lr = LR.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int64_t n = W.numel();
  pybind11::gil_scoped_release release;
  for (int64_t i = 0; i < n; ++i) {
    const float r = (w[i] - q[i]) - lr[i];
    o[i] = r * r;
  }
}

// out = (row_i * (W - Q)_ij) * col_j for an (m, n) W; plain W - Q when row is empty.
void scaled_difference(torch::Tensor W, torch::Tensor Q, torch::Tensor row, torch::Tensor col, torch::Tensor out) {
  check(W, "W");
  check_same(W, Q, "Q");
  check_same(W, out, "out");
  TORCH_CHECK(W.dim() == 2, "W must be a matrix");
  const int64_t m = W.size(0), n = W.size(1);
  const bool scaled = row.numel() > 0;
  if (scaled) {
    check(row, "row");
    check(col, "col");
    TORCH_CHECK(row.numel() == m && col.numel() == n, "row and col weights must match W's shape");
  }
  const float *w = W.data_ptr<float>(), *q = Q.data_ptr<float>();
  const float *rw = scaled ? row.data_ptr<float>() : nullptr, *cw = scaled ? col.data_ptr<float>() : nullptr;
  float* o = out.data_ptr<float>();
  pybind11::gil_scoped_release release;
  for (int64_t i = 0; i < m; ++i) {
    const float* wi = w + i * n;
    const float* qi = q + i * n;
    float* oi = o + i * n;
    if (scaled) {
      const float r = rw[i];
      for (int64_t j = 0; j < n; ++j) oi[j] = (r * (wi[j] - qi[j])) * cw[j];
    } else {
      for (int64_t j = 0; j < n; ++j) oi[j] = wi[j] - qi[j];
    }
  }
}

// The double-quantized scale of every block, as codec.quantize_scales and codec.block_scales
// compute it (same roundings: the group scale rounded to its format b1 (0 fp32, 1 fp16,
// 2 bf16), the scale codes to the nearest even integer), and t = BINS/2 over it (1 where it
// is 0). Returns (t, scale), one of each per block.
std::vector<torch::Tensor> block_scales(torch::Tensor absmax, int64_t b0, int64_t b1, int64_t B1, int64_t bins) {
  check(absmax, "absmax");
  TORCH_CHECK(b1 >= 0 && b1 <= 2 && B1 >= 1 && b0 >= 1, "bad scale format");
  const int64_t nb = absmax.numel(), n_groups = (nb + B1 - 1) / B1;
  auto t = torch::empty({nb}, absmax.options());
  auto scale = torch::empty({nb}, absmax.options());
  const float* am = absmax.data_ptr<float>();
  float *ts = t.data_ptr<float>(), *ss = scale.data_ptr<float>();
  pybind11::gil_scoped_release release;
  float offset = am[0];
  for (int64_t i = 1; i < nb; ++i) offset = std::min(offset, am[i]);
  const float top = static_cast<float>((int64_t{1} << b0) - 1), half = static_cast<float>(bins) / 2.0f;
  for (int64_t g = 0; g < n_groups; ++g) {
    const int64_t first = g * B1, last = std::min(nb, first + B1);
    float group = first + B1 > nb ? 0.0f : -INFINITY;  // zero padding counts in the max
    for (int64_t i = first; i < last; ++i) group = std::max(group, am[i] - offset);
    if (b1 == 1) group = static_cast<float>(c10::Half(group));
    if (b1 == 2) group = static_cast<float>(c10::BFloat16(group));
    const float step = group / top;
    for (int64_t i = first; i < last; ++i) {
      float code = 0.0f;
      if (group > 0.0f) code = std::min(std::max(std::nearbyint(((am[i] - offset) / group) * top), 0.0f), top);
      const float s = code * step + offset;
      ss[i] = s;
      ts[i] = half / (s > 0.0f ? s : 1.0f);
    }
  }
  return {t, scale};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sub_absmax", &sub_absmax, "X = W - LR and X's block absmaxes");
  m.def("block_absmax", &block_absmax, "block absmaxes of X");
  m.def("lut_quantize", &lut_quantize, "table-based quantization of X into Q");
  m.def("lut_squared_error", &lut_squared_error, "(quantized X - X)^2 elementwise");
  m.def("squared_residual", &squared_residual, "((W - Q) - LR)^2 elementwise");
  m.def("block_scales", &block_scales, "double-quantized block scales and BINS/2 over them");
  m.def("scaled_difference", &scaled_difference, "(row * (W - Q)) * col, or W - Q");
}
