// Decode packed NormalFloat codes (quant/codec.py's format) without unpacking the matrix
// first: `dequantize` writes the dense float32 weight, `matvec` multiplies a few rows of
// activations by it while decoding, so a decoded token reads only the packed bytes.
//
// Exactness: a weight is levels[code] * scale with
//   scale = float(scale_code) * step[group] + offset     (two roundings, as torch does)
// so the decoded values equal codec.decode's bit for bit. Build with -ffp-contract=off so
// the compiler does not fuse that multiply-add into one rounding.
//
// Layout: codes are a little-endian bit stream, code i at bits [i*b, (i+1)*b); blocks of B0
// consecutive (row-major) weights share a scale; groups of B1 blocks share a step.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

struct Packed {
  const uint8_t* codes;
  const uint8_t* scale_codes;
  const float* step;  // (n_groups,) group scale / (2^b0 - 1), float32, computed by torch
  float offset;
  const float* levels;  // (2^b,)
  int64_t n_code_bytes, n_scale_bytes;
  int b, b0, B0, B1;
  int b1_shift;  // log2(B1) when B1 is a power of two, else -1
};

inline int log2_exact(int64_t v) {
  int k = 0;
  while ((int64_t{1} << k) < v) ++k;
  return (int64_t{1} << k) == v ? k : -1;
}

inline uint32_t code_at(const uint8_t* stream, int64_t n_bytes, int64_t i, int bits) {
  const int64_t off = i * bits;
  const int64_t byte = off >> 3;
  const int sh = static_cast<int>(off & 7);
  uint32_t v = stream[byte] >> sh;
  if (sh + bits > 8 && byte + 1 < n_bytes) v |= static_cast<uint32_t>(stream[byte + 1]) << (8 - sh);
  return v & ((1u << bits) - 1u);
}

inline float block_scale(const Packed& p, int64_t block) {
  const float code = static_cast<float>(code_at(p.scale_codes, p.n_scale_bytes, block, p.b0));
  const float scaled = code * p.step[p.b1_shift >= 0 ? block >> p.b1_shift : block / p.B1];
  return scaled + p.offset;
}

// Scales of blocks [first, first + count) into out, as codec.block_scales computes them;
// eight at a time when B1 is a power of two (the group of each lane is a shift away).
inline void block_scales(const Packed& p, int64_t first, int64_t count, float* out) {
  int64_t j = 0;
#ifdef __AVX2__
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i shifts = _mm256_setr_epi32(0, p.b0, 2 * p.b0, 3 * p.b0, 4 * p.b0, 5 * p.b0, 6 * p.b0, 7 * p.b0);
  const __m256i mask = _mm256_set1_epi32((1 << p.b0) - 1);
  const __m128i group_shift = _mm_cvtsi32_si128(p.b1_shift);
  const __m256 offset = _mm256_set1_ps(p.offset);
  for (; j + 8 <= count; j += 8) {
    const int64_t k = first + j;
    const int64_t bit = k * p.b0;
    if ((bit >> 3) + 8 > p.n_scale_bytes) break;
    uint64_t word;
    std::memcpy(&word, p.scale_codes + (bit >> 3), 8);
    __m256i codes;
    if (p.b0 == 8) {
      codes = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<int64_t>(word)));
    } else {
      const uint32_t w32 = static_cast<uint32_t>(word >> (bit & 7));
      codes = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(w32)), shifts), mask);
    }
    const __m256i blocks = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(k)), lane);
    const __m256 step = _mm256_i32gather_ps(p.step, _mm256_srl_epi32(blocks, group_shift), 4);
    _mm256_storeu_ps(out + j, _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(codes), step), offset));
  }
#endif
  for (; j < count; ++j) out[j] = block_scale(p, first + j);
}

// Eight consecutive codes starting at i (a multiple of 8) decoded to levels, unscaled.
template <int BITS>
struct Lanes {
#ifdef __AVX2__
  __m256 lo, hi;
  __m256i shifts, mask, seven;
  const float* levels;

  explicit Lanes(const Packed& p) : levels(p.levels) {
    alignas(32) float tab[16] = {0};
    if (BITS <= 4)
      for (int k = 0; k < (1 << BITS); ++k) tab[k] = p.levels[k];
    lo = _mm256_load_ps(tab);
    hi = _mm256_load_ps(tab + 8);
    shifts = _mm256_setr_epi32(0, BITS, 2 * BITS, 3 * BITS, 4 * BITS, 5 * BITS, 6 * BITS, 7 * BITS);
    mask = _mm256_set1_epi32((1 << BITS) - 1);
    seven = _mm256_set1_epi32(7);
  }

  inline __m256 levels8(const uint8_t* codes, const uint8_t* codes_end, int64_t i) const {
    const uint8_t* src = codes + (i >> 3) * BITS;  // eight codes fill exactly BITS bytes
    if (BITS == 8) {
      __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src));
      return _mm256_i32gather_ps(levels, _mm256_cvtepu8_epi32(bytes), 4);
    }
    uint32_t word = 0;  // one 4-byte load (a partial one stalls store forwarding) unless at the end
    if (src + 4 <= codes_end)
      std::memcpy(&word, src, 4);
    else
      std::memcpy(&word, src, BITS < 8 ? BITS : 4);
    __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)), shifts), mask);
    __m256 lv = _mm256_permutevar8x32_ps(lo, idx);
    if (BITS == 4)
      lv = _mm256_blendv_ps(lv, _mm256_permutevar8x32_ps(hi, idx),
                            _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, seven)));
    return lv;
  }
#else
  explicit Lanes(const Packed&) {}
#endif
};

// Walks flat weights [begin, end) block by block: emit(i, value) for single weights,
// emit8(i, values) for aligned runs of eight inside a block (AVX2 builds only).
template <int BITS, typename Scalar, typename Vector>
inline void decode_range(const Packed& p, const Lanes<BITS>& lanes, int64_t begin, int64_t end, Scalar emit,
                         Vector emit8) {
  int64_t block = begin / p.B0;
  int64_t block_start = block * p.B0;
  int64_t group = block / p.B1;
  int64_t in_group = block - group * p.B1;
  const bool aligned_blocks = p.B0 % 8 == 0;
  int64_t i = begin;
  while (i < end) {
    const int64_t block_end = std::min(end, block_start + p.B0);
    const float code = static_cast<float>(code_at(p.scale_codes, p.n_scale_bytes, block, p.b0));
    const float scaled = code * p.step[group];
    const float scale = scaled + p.offset;
#ifdef __AVX2__
    if (aligned_blocks) {
      for (; i < block_end && (i & 7); ++i) emit(i, p.levels[code_at(p.codes, p.n_code_bytes, i, BITS)] * scale);
      const __m256 s8 = _mm256_set1_ps(scale);
      for (; i + 8 <= block_end; i += 8) emit8(i, _mm256_mul_ps(lanes.levels8(p.codes, p.codes + p.n_code_bytes, i), s8));
    }
#endif
    for (; i < block_end; ++i) emit(i, p.levels[code_at(p.codes, p.n_code_bytes, i, BITS)] * scale);
    ++block;
    block_start += p.B0;
    if (++in_group == p.B1) {
      in_group = 0;
      ++group;
    }
  }
}

Packed unpack_args(const torch::Tensor& codes, const torch::Tensor& scale_codes, const torch::Tensor& step,
                   double offset, const torch::Tensor& levels, int64_t b, int64_t b0, int64_t B0, int64_t B1) {
  TORCH_CHECK(codes.dtype() == torch::kUInt8 && scale_codes.dtype() == torch::kUInt8, "codes must be uint8");
  TORCH_CHECK(step.dtype() == torch::kFloat32 && levels.dtype() == torch::kFloat32, "step, levels: float32");
  TORCH_CHECK(codes.is_contiguous() && scale_codes.is_contiguous() && step.is_contiguous() && levels.is_contiguous(),
              "packed buffers must be contiguous");
  TORCH_CHECK(b == 2 || b == 3 || b == 4 || b == 8, "b must be 2, 3, 4 or 8");
  TORCH_CHECK(levels.numel() == (int64_t{1} << b), "levels must have 2^b entries");
  return Packed{codes.data_ptr<uint8_t>(), scale_codes.data_ptr<uint8_t>(), step.data_ptr<float>(),
                static_cast<float>(offset), levels.data_ptr<float>(), codes.numel(), scale_codes.numel(),
                static_cast<int>(b), static_cast<int>(b0), static_cast<int>(B0), static_cast<int>(B1),
                log2_exact(B1)};
}

template <int BITS>
void decode_span(const Packed& p, const Lanes<BITS>& lanes, float* dst, int64_t begin, int64_t end) {
  decode_range<BITS>(
      p, lanes, begin, end, [&](int64_t i, float v) { dst[i] = v; },
      [&](int64_t i, auto v) {
#ifdef __AVX2__
        _mm256_storeu_ps(dst + i, v);
#endif
      });
}

// Blocks of a multiple of 8 with B1 a power of two (every config of the grid): the scales
// of 64 blocks at a time, eight at a time as matvec computes them, then one branch-free
// pass over their codes; a last partial block goes the general way.
template <int BITS>
bool decode_whole_blocks(const Packed& p, const Lanes<BITS>& lanes, float* dst, int64_t numel) {
#ifdef __AVX2__
  const int64_t whole = numel / p.B0;
  if (p.B0 % 8 || p.b1_shift < 0 || whole >= (int64_t{1} << 31)) return false;
  const int64_t chunks = p.B0 / 8;
  const uint8_t* end = p.codes + p.n_code_bytes;
  at::parallel_for(0, whole, 1024, [&](int64_t first, int64_t last) {
    alignas(32) float scales[64];
    for (int64_t k = first; k < last; k += 64) {
      const int64_t n = std::min<int64_t>(64, last - k);
      block_scales(p, k, n, scales);
      for (int64_t j = 0; j < n; ++j) {
        const __m256 s = _mm256_set1_ps(scales[j]);
        const int64_t base = (k + j) * p.B0;
        for (int64_t c = 0; c < chunks; ++c)
          _mm256_storeu_ps(dst + base + 8 * c, _mm256_mul_ps(lanes.levels8(p.codes, end, base + 8 * c), s));
      }
    }
  });
  if (whole * p.B0 < numel) decode_span<BITS>(p, lanes, dst, whole * p.B0, numel);
  return true;
#else
  return false;
#endif
}

template <int BITS>
void decode_all(const Packed& p, float* dst, int64_t numel) {
  const Lanes<BITS> lanes(p);
  if (decode_whole_blocks<BITS>(p, lanes, dst, numel)) return;
  const int64_t n_blocks = (numel + p.B0 - 1) / p.B0;
  at::parallel_for(0, n_blocks, 1024, [&](int64_t first, int64_t last) {
    decode_span<BITS>(p, lanes, dst, first * p.B0, std::min(numel, last * p.B0));
  });
}

// Rows that start on a block boundary, blocks of a multiple of 8, B1 a power of two (every
// config of the grid on every matrix whose width is a multiple of B0): the row's scales
// first, eight at a time, then one branch-free pass over its codes.
template <int BITS>
bool matvec_rows_fast(const Packed& p, const Lanes<BITS>& lanes, const float* xs, int64_t M, float* y,
                      int64_t rows, int64_t cols) {
#ifdef __AVX2__
  if (p.B0 % 8 || cols % p.B0 || p.b1_shift < 0 || rows * cols / p.B0 >= (int64_t{1} << 31)) return false;
  const int chunk_shift = log2_exact(p.B0 / 8);
  if (chunk_shift < 0) return false;
  const int64_t per_row = cols / p.B0, chunks = cols / 8;
  const uint8_t* end = p.codes + p.n_code_bytes;
  at::parallel_for(0, rows, 16, [&](int64_t first, int64_t last) {
    std::vector<float> scales(per_row);
    __m256 acc[2][16];
    for (int64_t r = first; r < last; ++r) {
      block_scales(p, r * per_row, per_row, scales.data());
      const int64_t base = r * cols;
      for (int64_t m = 0; m < M; ++m) acc[0][m] = acc[1][m] = _mm256_setzero_ps();
      auto weights = [&](int64_t c) {
        return _mm256_mul_ps(lanes.levels8(p.codes, end, base + 8 * c), _mm256_set1_ps(scales[c >> chunk_shift]));
      };
      if (M == 1) {  // decoding one token: two independent FMA chains kept in registers
        __m256 even = _mm256_setzero_ps(), odd = _mm256_setzero_ps();
        int64_t c = 0;
        for (; c + 2 <= chunks; c += 2) {
          even = _mm256_fmadd_ps(weights(c), _mm256_loadu_ps(xs + 8 * c), even);
          odd = _mm256_fmadd_ps(weights(c + 1), _mm256_loadu_ps(xs + 8 * c + 8), odd);
        }
        if (c < chunks) even = _mm256_fmadd_ps(weights(c), _mm256_loadu_ps(xs + 8 * c), even);
        acc[0][0] = even;
        acc[1][0] = odd;
      } else {
        for (int64_t c = 0; c < chunks; ++c) {
          const __m256 w = weights(c);
          __m256* a = acc[c & 1];
          for (int64_t m = 0; m < M; ++m) a[m] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xs + m * cols + 8 * c), a[m]);
        }
      }
      for (int64_t m = 0; m < M; ++m) {
        alignas(32) float parts[8];
        _mm256_store_ps(parts, _mm256_add_ps(acc[0][m], acc[1][m]));
        float total = 0;
        for (float v : parts) total += v;
        y[m * rows + r] = total;
      }
    }
  });
  return true;
#else
  return false;
#endif
}

template <int BITS>
void matvec_into(const Packed& p, const float* xs, int64_t M, float* y, int64_t rows, int64_t cols) {
  const Lanes<BITS> lanes(p);
  if (matvec_rows_fast<BITS>(p, lanes, xs, M, y, rows, cols)) return;
  at::parallel_for(0, rows, 16, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      const int64_t base = r * cols;
      float acc[16] = {0};
#ifdef __AVX2__
      __m256 acc8[16];
      for (int64_t m = 0; m < M; ++m) acc8[m] = _mm256_setzero_ps();
      __m256 even = _mm256_setzero_ps(), odd = _mm256_setzero_ps();  // M == 1: two chains of FMAs
#endif
      auto scalar = [&](int64_t i, float v) {
        for (int64_t m = 0; m < M; ++m) acc[m] += v * xs[m * cols + (i - base)];
      };
      if (M == 1) {
        decode_range<BITS>(p, lanes, base, base + cols, scalar, [&](int64_t i, auto w) {
#ifdef __AVX2__
          if ((i >> 3) & 1)
            odd = _mm256_fmadd_ps(w, _mm256_loadu_ps(xs + (i - base)), odd);
          else
            even = _mm256_fmadd_ps(w, _mm256_loadu_ps(xs + (i - base)), even);
#endif
        });
      } else {
        decode_range<BITS>(p, lanes, base, base + cols, scalar, [&](int64_t i, auto w) {
#ifdef __AVX2__
          for (int64_t m = 0; m < M; ++m)
            acc8[m] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xs + m * cols + (i - base)), acc8[m]);
#endif
        });
      }
      for (int64_t m = 0; m < M; ++m) {
        float total = acc[m];
#ifdef __AVX2__
        alignas(32) float parts[8];
        _mm256_store_ps(parts, M == 1 ? _mm256_add_ps(even, odd) : acc8[m]);
        for (float v : parts) total += v;
#endif
        y[m * rows + r] = total;
      }
    }
  });
}

}  // namespace

// Decodes into `out` (float32, contiguous, at least rows * cols elements; the first
// rows * cols are written) so callers can reuse one buffer for every matrix.
torch::Tensor dequantize_into(torch::Tensor out, torch::Tensor codes, torch::Tensor scale_codes, torch::Tensor step,
                              double offset, torch::Tensor levels, int64_t b, int64_t b0, int64_t B0, int64_t B1,
                              int64_t rows, int64_t cols) {
  TORCH_CHECK(out.dtype() == torch::kFloat32 && out.is_contiguous() && out.numel() >= rows * cols,
              "out must be a contiguous float32 buffer of at least rows * cols elements");
  const Packed p = unpack_args(codes, scale_codes, step, offset, levels, b, b0, B0, B1);
  float* dst = out.data_ptr<float>();
  switch (b) {
    case 2: decode_all<2>(p, dst, rows * cols); break;
    case 3: decode_all<3>(p, dst, rows * cols); break;
    case 4: decode_all<4>(p, dst, rows * cols); break;
    default: decode_all<8>(p, dst, rows * cols); break;
  }
  return out.view({-1}).narrow(0, 0, rows * cols).view({rows, cols});
}

torch::Tensor dequantize(torch::Tensor codes, torch::Tensor scale_codes, torch::Tensor step, double offset,
                         torch::Tensor levels, int64_t b, int64_t b0, int64_t B0, int64_t B1, int64_t rows,
                         int64_t cols) {
  return dequantize_into(torch::empty({rows * cols}, torch::kFloat32), codes, scale_codes, step, offset, levels, b,
                         b0, B0, B1, rows, cols);
}

// y (M, rows) = x (M, cols) @ W^T, decoding W on the fly; for a few rows (decoding tokens).
torch::Tensor matvec(torch::Tensor x, torch::Tensor codes, torch::Tensor scale_codes, torch::Tensor step,
                     double offset, torch::Tensor levels, int64_t b, int64_t b0, int64_t B0, int64_t B1,
                     int64_t rows, int64_t cols) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.size(1) == cols, "x must be float32 (M, cols)");
  TORCH_CHECK(x.size(0) <= 16, "matvec is for at most 16 rows of activations");
  const Packed p = unpack_args(codes, scale_codes, step, offset, levels, b, b0, B0, B1);
  auto xc = x.contiguous();
  auto out = torch::empty({xc.size(0), rows}, torch::kFloat32);
  const float* xs = xc.data_ptr<float>();
  float* y = out.data_ptr<float>();
  switch (b) {
    case 2: matvec_into<2>(p, xs, xc.size(0), y, rows, cols); break;
    case 3: matvec_into<3>(p, xs, xc.size(0), y, rows, cols); break;
    case 4: matvec_into<4>(p, xs, xc.size(0), y, rows, cols); break;
    default: matvec_into<8>(p, xs, xc.size(0), y, rows, cols); break;
  }
  return out;
}

namespace {

inline float dot(const float* a, const float* b, int64_t n) {
  int64_t k = 0;
  float total = 0;
#ifdef __AVX2__
  __m256 acc = _mm256_setzero_ps();
  for (; k + 8 <= n; k += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), acc);
  alignas(32) float parts[8];
  _mm256_store_ps(parts, acc);
  for (float v : parts) total += v;
#endif
  for (; k < n; ++k) total += a[k] * b[k];
  return total;
}

}  // namespace

// An LQLinear's whole forward for a few rows, in one call: x deq(Q)^T + s (x L2^T) L1^T + bias.
// (Per-layer framework overhead, not arithmetic, is what a decoded token pays otherwise.)
torch::Tensor lq_linear(torch::Tensor x, torch::Tensor codes, torch::Tensor scale_codes, torch::Tensor step,
                        double offset, torch::Tensor levels, int64_t b, int64_t b0, int64_t B0, int64_t B1,
                        int64_t rows, int64_t cols, torch::Tensor L1, torch::Tensor L2, double scaling,
                        torch::Tensor bias) {
  TORCH_CHECK(L1.dtype() == torch::kFloat32 && L2.dtype() == torch::kFloat32, "L1, L2 must be float32");
  TORCH_CHECK(L1.dim() == 2 && L2.dim() == 2 && L1.size(0) == rows && L2.size(1) == cols && L1.size(1) == L2.size(0),
              "L1 (rows, r) and L2 (r, cols) do not fit the matrix");
  auto out = matvec(x, codes, scale_codes, step, offset, levels, b, b0, B0, B1, rows, cols);
  auto xc = x.contiguous();
  auto l1 = L1.contiguous();
  auto l2 = L2.contiguous();
  const int64_t M = xc.size(0), r = l1.size(1);
  const float* xs = xc.data_ptr<float>();
  std::vector<float> t(M * r);  // (M, r) = x L2^T, scaled
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < r; ++k)
      t[m * r + k] = static_cast<float>(scaling) * dot(xs + m * cols, l2.data_ptr<float>() + k * cols, cols);
  const bool has_bias = bias.numel() > 0;
  auto bias_c = has_bias ? bias.to(torch::kFloat32).contiguous() : bias;
  const float* bs = has_bias ? bias_c.data_ptr<float>() : nullptr;
  const float* l1s = l1.data_ptr<float>();
  float* y = out.data_ptr<float>();
  at::parallel_for(0, rows, 256, [&](int64_t first, int64_t last) {
    for (int64_t m = 0; m < M; ++m)
      for (int64_t i = first; i < last; ++i)
        y[m * rows + i] += dot(t.data() + m * r, l1s + i * r, r) + (has_bias ? bs[i] : 0.0f);
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("dequantize", &dequantize, "decode packed NF codes to a dense float32 matrix");
  m.def("dequantize_into", &dequantize_into, "decode packed NF codes into a reusable float32 buffer");
  m.def("matvec", &matvec, "x @ W^T for a few rows of x, decoding W on the fly");
  m.def("lq_linear", &lq_linear, "x deq(Q)^T + s (x L2^T) L1^T + bias for a few rows of x");
}
