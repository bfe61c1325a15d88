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
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <sys/mman.h>
#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25  // older headers; an older kernel refuses it, which costs nothing
#endif
#include <cmath>
#include <memory>
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
    __m256 step;
    if ((k >> p.b1_shift) == ((k + 7) >> p.b1_shift)) {  // one group for all eight (a gather is slow)
      step = _mm256_set1_ps(p.step[k >> p.b1_shift]);
    } else {
      const __m256i blocks = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(k)), lane);
      step = _mm256_i32gather_ps(p.step, _mm256_srl_epi32(blocks, group_shift), 4);
    }
    _mm256_storeu_ps(out + j, _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(codes), step), offset));
  }
#endif
  for (; j < count; ++j) out[j] = block_scale(p, first + j);
}

// Eight consecutive codes starting at i (a multiple of 8) decoded to levels, unscaled.
// vpermps reads only the low three bits of each index, so 3-bit codes need no mask, 2-bit
// codes none with the table repeated twice, and 4-bit codes pick the high half by bit 3
// moved to the sign (blendv reads only the sign).
template <int BITS>
struct Lanes {
#ifdef __AVX2__
  __m256 lo, hi;
  __m256i shifts;
  const float* levels;

  explicit Lanes(const Packed& p) : levels(p.levels) {
    alignas(32) float tab[16] = {0};
    if (BITS <= 4)
      for (int k = 0; k < 16; ++k) tab[k] = p.levels[k % (1 << BITS)];
    lo = _mm256_load_ps(tab);
    hi = _mm256_load_ps(tab + 8);
    shifts = _mm256_setr_epi32(0, BITS, 2 * BITS, 3 * BITS, 4 * BITS, 5 * BITS, 6 * BITS, 7 * BITS);
  }

  inline __m256 levels8(const uint8_t* codes, const uint8_t* codes_end, int64_t i) const {
    const uint8_t* src = codes + (i >> 3) * BITS;  // eight codes fill exactly BITS bytes
    if (BITS == 8) {
      __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src));
      return _mm256_i32gather_ps(levels, _mm256_cvtepu8_epi32(bytes), 4);
    }
    __m256i word;
    if (src + 4 <= codes_end) {  // one broadcast load (a partial one stalls store forwarding)
      word = _mm256_castps_si256(_mm256_broadcast_ss(reinterpret_cast<const float*>(src)));
    } else {
      uint32_t w = 0;
      std::memcpy(&w, src, BITS < 8 ? BITS : 4);
      word = _mm256_set1_epi32(static_cast<int>(w));
    }
    const __m256i idx = _mm256_srlv_epi32(word, shifts);  // code k in the low bits of lane k
    __m256 lv = _mm256_permutevar8x32_ps(lo, idx);
    if (BITS == 4)
      lv = _mm256_blendv_ps(lv, _mm256_permutevar8x32_ps(hi, idx), _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
    return lv;
  }
#else
  explicit Lanes(const Packed&) {}
#endif
};

#if defined(__AVX512F__) && defined(__AVX512VBMI__)
#define LQ_AVX512 1
// Sixteen codes at a time (b <= 4) on AVX-512 machines: one byte shuffle puts each code's
// bytes in its lane, one shift brings the code down, one 16-entry table lookup (which reads
// only the low four bits, so the table repeats for b < 4). A third of the instructions per
// weight of the eight-lane path.
template <int BITS>
struct Lanes16 {
  __m512 table;
  __m512i bytes, shifts, multishift;

  explicit Lanes16(const Packed& p) {
    alignas(64) float tab[16];
    alignas(64) uint8_t ctrl[64];
    alignas(64) int32_t sh[16];
    for (int k = 0; k < 16; ++k) {
      tab[k] = p.levels[k % (1 << BITS)];
      const int start = k * BITS;
      for (int b = 0; b < 4; ++b) ctrl[4 * k + b] = static_cast<uint8_t>(start / 8 + b);
      sh[k] = start % 8;
    }
    table = _mm512_load_ps(tab);
    bytes = _mm512_load_si512(ctrl);
    shifts = _mm512_load_si512(sh);
    alignas(64) uint8_t select[64];  // for row_dot16: 32-bit lane k takes the bits from k * BITS on
    for (int k = 0; k < 16; ++k)
      for (int b = 0; b < 4; ++b) select[4 * k + b] = static_cast<uint8_t>((k * BITS + 8 * b) & 63);
    multishift = _mm512_load_si512(select);
  }

  // Codes i .. i + 15 (i a multiple of 16, so they start on a byte) as levels, unscaled.
  inline __m512 levels16(const uint8_t* codes, const uint8_t* codes_end, int64_t i) const {
    const uint8_t* src = codes + (i >> 3) * BITS;
    __m128i raw;
    if (src + 16 <= codes_end) {
      raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
    } else {  // the matrix's last codes: copy what is there
      alignas(16) uint8_t tail[16] = {0};
      std::memcpy(tail, src, static_cast<size_t>(std::min<int64_t>(16, codes_end - src)));
      raw = _mm_load_si128(reinterpret_cast<const __m128i*>(tail));
    }
    const __m512i words = _mm512_permutexvar_epi8(bytes, _mm512_castsi128_si512(raw));
    return _mm512_permutexvar_ps(_mm512_srlv_epi32(words, shifts), table);
  }
};

// One row's dot product with x over `chunks` runs of 16 codes starting at `codes` (every
// load in bounds): the constants in registers and one pointer step per run, so the loop
// is the decode and the multiply-adds, not address arithmetic.
// The codes come out of one multishift: the 8 bytes holding 16 codes are broadcast to
// every 64-bit lane, and each 32-bit lane's low byte takes the 8 bits starting at its
// code (the permute reads only the low four), one instruction instead of a byte shuffle
// and a shift.
template <int BITS>
inline float row_dot16(const Lanes16<BITS>& wide, const uint8_t* codes, const float* x, const float* scales,
                       int64_t chunks, int scale_shift) {
  const __m512i ctrl = wide.multishift;
  const __m512 table = wide.table;
  auto weights = [&](const uint8_t* at, int64_t c) {
    long long word;
    std::memcpy(&word, at, 8);
    const __m512i idx = _mm512_multishift_epi64_epi8(ctrl, _mm512_set1_epi64(word));
    return _mm512_mul_ps(_mm512_permutexvar_ps(idx, table), _mm512_set1_ps(scales[c >> scale_shift]));
  };
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t c = 0;
  for (; c + 4 <= chunks; c += 4, codes += 8 * BITS, x += 64) {
    a0 = _mm512_fmadd_ps(weights(codes, c), _mm512_loadu_ps(x), a0);
    a1 = _mm512_fmadd_ps(weights(codes + 2 * BITS, c + 1), _mm512_loadu_ps(x + 16), a1);
    a2 = _mm512_fmadd_ps(weights(codes + 4 * BITS, c + 2), _mm512_loadu_ps(x + 32), a2);
    a3 = _mm512_fmadd_ps(weights(codes + 6 * BITS, c + 3), _mm512_loadu_ps(x + 48), a3);
  }
  for (; c < chunks; ++c, codes += 2 * BITS, x += 16) a0 = _mm512_fmadd_ps(weights(codes, c), _mm512_loadu_ps(x), a0);
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

// Sixteen-lane paths apply to b <= 4 with blocks of a multiple of 16 weights.
template <int BITS>
inline bool sixteen_lanes(const Packed& p) {
  return BITS <= 4 && p.B0 % 16 == 0;
}
#endif

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

// Calls block(first weight, scale) for each of the first `whole` blocks, in parallel, the
// scales computed 64 blocks at a time.
template <typename Block>
void each_whole_block(const Packed& p, int64_t whole, Block block) {
  at::parallel_for(0, whole, 1024, [&](int64_t first, int64_t last) {
    alignas(32) float scales[64];
    for (int64_t k = first; k < last; k += 64) {
      const int64_t n = std::min<int64_t>(64, last - k);
      block_scales(p, k, n, scales);
      for (int64_t j = 0; j < n; ++j) block((k + j) * p.B0, scales[j]);
    }
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
#ifdef LQ_AVX512
  if constexpr (BITS <= 4) {
    if (sixteen_lanes<BITS>(p)) {
      const Lanes16<BITS> wide(p);
      const int64_t chunks16 = p.B0 / 16;
      each_whole_block(p, whole, [&](int64_t base, float scale) {
        const __m512 s = _mm512_set1_ps(scale);
        for (int64_t c = 0; c < chunks16; ++c)
          _mm512_storeu_ps(dst + base + 16 * c, _mm512_mul_ps(wide.levels16(p.codes, end, base + 16 * c), s));
      });
      if (whole * p.B0 < numel) decode_span<BITS>(p, lanes, dst, whole * p.B0, numel);
      return true;
    }
  }
#endif
  each_whole_block(p, whole, [&](int64_t base, float scale) {
    const __m256 s = _mm256_set1_ps(scale);
    for (int64_t c = 0; c < chunks; ++c)
      _mm256_storeu_ps(dst + base + 8 * c, _mm256_mul_ps(lanes.levels8(p.codes, end, base + 8 * c), s));
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
#ifdef LQ_AVX512
  if constexpr (BITS <= 4) {
    if (sixteen_lanes<BITS>(p)) {
      const Lanes16<BITS> wide(p);
      const int64_t chunks16 = cols / 16;
      const int shift16 = chunk_shift - 1;  // log2(B0 / 16)
      at::parallel_for(0, rows, 16, [&](int64_t first, int64_t last) {
        std::vector<float> scales(per_row);
        __m512 acc[16];
        for (int64_t r = first; r < last; ++r) {
          block_scales(p, r * per_row, per_row, scales.data());
          const int64_t base = r * cols;
          auto weights = [&](int64_t c) {
            return _mm512_mul_ps(wide.levels16(p.codes, end, base + 16 * c), _mm512_set1_ps(scales[c >> shift16]));
          };
          const uint8_t* row_codes = p.codes + (base >> 3) * BITS;
          if (M == 1 && row_codes + (chunks16 - 1) * 2 * BITS + 16 <= end) {  // one token, loads in bounds
            y[r] = row_dot16<BITS>(wide, row_codes, xs, scales.data(), chunks16, shift16);
            continue;
          }
          if (M == 1) {  // one token: four independent FMA chains (one would wait on its adds)
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            int64_t c = 0;
            for (; c + 4 <= chunks16; c += 4) {
              a0 = _mm512_fmadd_ps(weights(c), _mm512_loadu_ps(xs + 16 * c), a0);
              a1 = _mm512_fmadd_ps(weights(c + 1), _mm512_loadu_ps(xs + 16 * c + 16), a1);
              a2 = _mm512_fmadd_ps(weights(c + 2), _mm512_loadu_ps(xs + 16 * c + 32), a2);
              a3 = _mm512_fmadd_ps(weights(c + 3), _mm512_loadu_ps(xs + 16 * c + 48), a3);
            }
            for (; c < chunks16; ++c) a0 = _mm512_fmadd_ps(weights(c), _mm512_loadu_ps(xs + 16 * c), a0);
            y[r] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
            continue;
          }
          for (int64_t m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
          for (int64_t c = 0; c < chunks16; ++c) {
            const __m512 w = weights(c);
            for (int64_t m = 0; m < M; ++m) acc[m] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xs + m * cols + 16 * c), acc[m]);
          }
          for (int64_t m = 0; m < M; ++m) y[m * rows + r] = _mm512_reduce_add_ps(acc[m]);
        }
      });
      return true;
    }
  }
#endif
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

// The templated decoders for p.b, chosen once per call.
void decode_packed(const Packed& p, float* dst, int64_t numel) {
  switch (p.b) {
    case 2: decode_all<2>(p, dst, numel); break;
    case 3: decode_all<3>(p, dst, numel); break;
    case 4: decode_all<4>(p, dst, numel); break;
    default: decode_all<8>(p, dst, numel); break;
  }
}

void matvec_packed(const Packed& p, const float* xs, int64_t M, float* y, int64_t rows, int64_t cols) {
  switch (p.b) {
    case 2: matvec_into<2>(p, xs, M, y, rows, cols); break;
    case 3: matvec_into<3>(p, xs, M, y, rows, cols); break;
    case 4: matvec_into<4>(p, xs, M, y, rows, cols); break;
    default: matvec_into<8>(p, xs, M, y, rows, cols); break;
  }
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
  decode_packed(p, out.data_ptr<float>(), rows * cols);
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
  matvec_packed(p, xc.data_ptr<float>(), xc.size(0), out.data_ptr<float>(), rows, cols);
  return out;
}

namespace {

inline float dot(const float* a, const float* b, int64_t n) {
  int64_t k = 0;
  float total = 0;
#ifdef LQ_AVX512
  if (n >= 16) {
    __m512 wide = _mm512_setzero_ps();
    for (; k + 16 <= n; k += 16) wide = _mm512_fmadd_ps(_mm512_loadu_ps(a + k), _mm512_loadu_ps(b + k), wide);
    total = _mm512_reduce_add_ps(wide);
  }
#endif
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

// y (M, rows) += s (x L2^T) L1^T + bias for a few rows of x (M, cols), in plain loops: for
// one token, the factors are too small for a library call's overhead to pay.
void add_low_rank(const float* xs, int64_t M, int64_t cols, const torch::Tensor& L1, const torch::Tensor& L2,
                  double scaling, const torch::Tensor& bias, float* y, int64_t rows) {
  const int64_t r = L1.numel() > 0 ? L1.size(1) : 0;
  std::vector<float> t(M * r);  // (M, r) = x L2^T, scaled
  const float* l2s = r ? L2.data_ptr<float>() : nullptr;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < r; ++k)
      t[m * r + k] = static_cast<float>(scaling) * dot(xs + m * cols, l2s + k * cols, cols);
  const bool has_bias = bias.numel() > 0;
  const float* bs = has_bias ? bias.data_ptr<float>() : nullptr;
  const float* l1s = r ? L1.data_ptr<float>() : nullptr;
  at::parallel_for(0, rows, 256, [&](int64_t first, int64_t last) {
    for (int64_t m = 0; m < M; ++m)
      for (int64_t i = first; i < last; ++i)
        y[m * rows + i] += (r ? dot(t.data() + m * r, l1s + i * r, r) : 0.0f) + (has_bias ? bs[i] : 0.0f);
  });
}

// As add_low_rank with L1 stored transposed (r, rows): y += sum_k t_k L1^T[k] as
// vectorized row updates, instead of one short dot product per output.
void add_low_rank_t(const float* xs, int64_t M, int64_t cols, const torch::Tensor& L1t, const torch::Tensor& L2,
                    double scaling, const torch::Tensor& bias, float* y, int64_t rows) {
  const int64_t r = L1t.numel() > 0 ? L1t.size(0) : 0;
  std::vector<float> t(M * r);
  const float* l2s = r ? L2.data_ptr<float>() : nullptr;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < r; ++k)
      t[m * r + k] = static_cast<float>(scaling) * dot(xs + m * cols, l2s + k * cols, cols);
  const float* bs = bias.numel() > 0 ? bias.data_ptr<float>() : nullptr;
  const float* l1t = r ? L1t.data_ptr<float>() : nullptr;
  at::parallel_for(0, rows, 512, [&](int64_t first, int64_t last) {
    for (int64_t m = 0; m < M; ++m) {
      float* ym = y + m * rows;
      int64_t i0 = first;
#ifdef LQ_AVX512
      const float* tm = t.data() + m * r;
      for (; i0 + 16 <= last; i0 += 16) {  // each output stays in a register over the r updates
        __m512 acc = _mm512_loadu_ps(ym + i0);
        for (int64_t k = 0; k < r; ++k)
          acc = _mm512_fmadd_ps(_mm512_set1_ps(tm[k]), _mm512_loadu_ps(l1t + k * rows + i0), acc);
        if (bs) acc = _mm512_add_ps(acc, _mm512_loadu_ps(bs + i0));
        _mm512_storeu_ps(ym + i0, acc);
      }
#endif
      for (int64_t k = 0; k < r; ++k) {
        const float tk = t[m * r + k];
        const float* col = l1t + k * rows;
        for (int64_t i = i0; i < last; ++i) ym[i] += tk * col[i];
      }
      if (bs)
        for (int64_t i = i0; i < last; ++i) ym[i] += bs[i];
    }
  });
}

// Four rows of W (rows w, w + cols, ...) times x: four independent chains of FMAs keep the
// loads streaming (one chain waits on its adds). Each row's sum is the same whichever
// rows share its call, so head_argmax recomputes one row bit for bit as dense_matvec did.
inline void quad_dots(const float* w, int64_t cols, const float* x, float* y) {
  int64_t k = 0;
  float tail[4] = {0, 0, 0, 0};
#ifdef LQ_AVX512
  __m512 b0 = _mm512_setzero_ps(), b1 = b0, b2 = b0, b3 = b0;
  for (; k + 16 <= cols; k += 16) {
    const __m512 xv = _mm512_loadu_ps(x + k);
    b0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k), xv, b0);
    b1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + cols + k), xv, b1);
    b2 = _mm512_fmadd_ps(_mm512_loadu_ps(w + 2 * cols + k), xv, b2);
    b3 = _mm512_fmadd_ps(_mm512_loadu_ps(w + 3 * cols + k), xv, b3);
  }
  tail[0] = _mm512_reduce_add_ps(b0);
  tail[1] = _mm512_reduce_add_ps(b1);
  tail[2] = _mm512_reduce_add_ps(b2);
  tail[3] = _mm512_reduce_add_ps(b3);
#endif
#ifdef __AVX2__
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (; k + 8 <= cols; k += 8) {
    const __m256 xv = _mm256_loadu_ps(x + k);
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), xv, a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + cols + k), xv, a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + 2 * cols + k), xv, a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + 3 * cols + k), xv, a3);
  }
  alignas(32) float parts[4][8];
  _mm256_store_ps(parts[0], a0);
  _mm256_store_ps(parts[1], a1);
  _mm256_store_ps(parts[2], a2);
  _mm256_store_ps(parts[3], a3);
  for (int j = 0; j < 4; ++j)
    for (float v : parts[j]) tail[j] += v;
#endif
  for (; k < cols; ++k)
    for (int j = 0; j < 4; ++j) tail[j] += w[j * cols + k] * x[k];
  for (int j = 0; j < 4; ++j) y[j] = tail[j];
}

// y (rows) = W (rows, cols) x for one row of activations, four rows of W at a time; the
// last rows % 4 one at a time.
void dense_matvec(const float* W, int64_t rows, int64_t cols, const float* x, float* y) {
  at::parallel_for(0, (rows + 3) / 4, 64, [&](int64_t first, int64_t last) {
    for (int64_t quad = first; quad < last; ++quad) {
      const int64_t r0 = quad * 4, n = std::min<int64_t>(4, rows - r0);
      if (n < 4) {
        for (int64_t r = r0; r < r0 + n; ++r) y[r] = dot(W + r * cols, x, cols);
        continue;
      }
      quad_dots(W + r0 * cols, cols, x, y + r0);
    }
  });
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
  auto bias_c = bias.numel() > 0 ? bias.to(torch::kFloat32).contiguous() : bias;
  add_low_rank(xc.data_ptr<float>(), xc.size(0), cols, L1.contiguous(), L2.contiguous(), scaling, bias_c,
               out.data_ptr<float>(), rows);
  return out;
}


// ---------------------------------------------------------------------------------------
// A decoder layer stack of the Llama family (Llama, Mistral, Qwen2: pre-norm RMSNorm,
// rotary attention with grouped KV heads, SiLU-gated MLP) run in one call per token, over
// a key/value cache allocated once. Generating a token through transformers' modules
// spends about a third of its time in Python and small tensor operations between the
// matrix products; here that glue is plain loops. The packed products are the same
// kernels as above, so the weights' decoded values are the same.

namespace {

// y = x W^T for a prompt's rows. Through oneDNN where torch has it (its registered
// `mkldnn::_linear_pointwise`, which takes dense tensors as they are): its float32 GEMM
// picks the widest vector unit by CPU feature (AVX-512 on AMD's too, where MKL's stays on
// AVX2: twice the speed there, bench/results/inference.md). Else torch's mm.
void dense_product(const torch::Tensor& x, const torch::Tensor& W, torch::Tensor& y) {
  static const std::optional<c10::OperatorHandle> onednn = [] {
    return at::hasMKLDNN() ? c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""})
                           : std::optional<c10::OperatorHandle>();
  }();
  static std::atomic<bool> refused{false};  // once oneDNN refuses a product, torch's mm does them all
  if (onednn && !refused.load()) {
    try {
      std::vector<c10::IValue> stack{x, W, c10::IValue(), std::string("none"),
                                     c10::List<std::optional<at::Scalar>>(), std::string("")};
      onednn->callBoxed(&stack);
      y.copy_(stack[0].toTensor());
      return;
    } catch (const std::exception&) {
      refused.store(true);
    }
  }
  at::mm_out(y, x, W.t());
}

// One projection: a packed LQ matrix with its factors and bias, or a dense weight.
struct Projection {
  bool packed = false;
  Packed p{};
  torch::Tensor codes, scale_codes, step, levels;  // kept alive for p's pointers
  torch::Tensor weight;                             // dense (rows, cols) when not packed
  torch::Tensor L1t, L2, bias;  // L1 transposed (r, rows), L2 (r, cols), bias (rows); may be empty
  double scaling = 1.0;
  int64_t rows = 0, cols = 0;

  // y (M, rows) = x (M, cols) W^T + s (x L2^T) L1^T + bias, as LQLinear computes it.
  void forward(const torch::Tensor& x, torch::Tensor& y) const {
    const int64_t M = x.size(0);
    if (packed && M <= 16) {
      matvec_packed(p, x.data_ptr<float>(), M, y.data_ptr<float>(), rows, cols);
    } else if (packed) {  // many rows: decode once into a shared buffer, then a dense product
      static thread_local torch::Tensor scratch;
      if (!scratch.defined() || scratch.numel() < rows * cols) scratch = torch::empty({rows * cols}, torch::kFloat32);
      decode_packed(p, scratch.data_ptr<float>(), rows * cols);
      dense_product(x, scratch.narrow(0, 0, rows * cols).view({rows, cols}), y);
    } else if (M == 1) {
      dense_matvec(weight.data_ptr<float>(), rows, cols, x.data_ptr<float>(), y.data_ptr<float>());
    } else {
      dense_product(x, weight, y);
    }
    if (M <= 16) {
      add_low_rank_t(x.data_ptr<float>(), M, cols, L1t, L2, scaling, bias, y.data_ptr<float>(), rows);
      return;
    }
    if (L1t.numel() > 0) y.addmm_(at::mm(x, L2.t()), L1t, 1.0, scaling);
    if (bias.numel() > 0) y.add_(bias);
  }
};

using ProjectionPtr = std::shared_ptr<Projection>;

ProjectionPtr packed_projection(torch::Tensor codes, torch::Tensor scale_codes, torch::Tensor step, double offset,
                                torch::Tensor levels, int64_t b, int64_t b0, int64_t B0, int64_t B1, int64_t rows,
                                int64_t cols, torch::Tensor L1, torch::Tensor L2, double scaling, torch::Tensor bias) {
  auto proj = std::make_shared<Projection>();
  proj->codes = codes.contiguous();
  proj->scale_codes = scale_codes.contiguous();
  proj->step = step.contiguous();
  proj->levels = levels.contiguous();
  proj->p = unpack_args(proj->codes, proj->scale_codes, proj->step, offset, proj->levels, b, b0, B0, B1);
  proj->packed = true;
  proj->rows = rows;
  proj->cols = cols;
  TORCH_CHECK(L1.numel() == 0 || (L1.size(0) == rows && L2.size(1) == cols && L1.size(1) == L2.size(0)),
              "L1 (rows, r) and L2 (r, cols) do not fit the matrix");
  proj->L1t = L1.to(torch::kFloat32).t().contiguous();
  proj->L2 = L2.to(torch::kFloat32).contiguous();
  proj->scaling = scaling;
  proj->bias = bias.to(torch::kFloat32).contiguous();
  return proj;
}

ProjectionPtr dense_projection(torch::Tensor weight, torch::Tensor bias) {
  TORCH_CHECK(weight.dim() == 2, "a dense projection's weight is (rows, cols)");
  auto proj = std::make_shared<Projection>();
  proj->weight = weight.to(torch::kFloat32).contiguous();
  proj->rows = weight.size(0);
  proj->cols = weight.size(1);
  proj->L1t = torch::empty({0});
  proj->L2 = torch::empty({0});
  proj->bias = bias.to(torch::kFloat32).contiguous();
  return proj;
}

// out = x / rms(x) * weight, row by row (as transformers' LlamaRMSNorm in float32).
void rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps, torch::Tensor& out) {
  const int64_t M = x.size(0), d = x.size(1);
  const float* xs = x.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  float* o = out.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    const float* row = xs + m * d;
    const float mean = dot(row, row, d) / static_cast<float>(d);
    const float inv = 1.0f / std::sqrt(mean + static_cast<float>(eps));
    for (int64_t k = 0; k < d; ++k) o[m * d + k] = w[k] * (row[k] * inv);
  }
}

// x (M, heads * hd) rotated in place: x cos + rotate_half(x) sin, per head.
void rotate(torch::Tensor& x, int64_t heads, int64_t hd, const torch::Tensor& cos, const torch::Tensor& sin) {
  const int64_t M = x.size(0), half = hd / 2;
  float* xs = x.data_ptr<float>();
  const float* c = cos.data_ptr<float>();
  const float* s = sin.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t h = 0; h < heads; ++h) {
      float* v = xs + (m * heads + h) * hd;
      const float* cm = c + m * hd;
      const float* sm = s + m * hd;
      for (int64_t k = 0; k < half; ++k) {
        const float a = v[k], b = v[k + half];
        v[k] = a * cm[k] - b * sm[k];
        v[k + half] = b * cm[k + half] + a * sm[k + half];
      }
    }
}

#ifdef LQ_AVX512
// One query head over `seen` cached positions, head_dim = 16 * HD16: the query and the
// output stay in registers, each key or value row is a few 16-lane loads.
template <int HD16>
void attend_one(const float* q, const float* keys, const float* vals, int64_t seen, float scale, float* scores,
                float* out) {
  constexpr int hd = 16 * HD16;
  __m512 qv[HD16];
  for (int c = 0; c < HD16; ++c) qv[c] = _mm512_loadu_ps(q + 16 * c);
  float top = -INFINITY;
  for (int64_t j = 0; j < seen; ++j) {
    const float* k = keys + j * hd;
    __m512 acc = _mm512_mul_ps(qv[0], _mm512_loadu_ps(k));
    for (int c = 1; c < HD16; ++c) acc = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(k + 16 * c), acc);
    scores[j] = _mm512_reduce_add_ps(acc) * scale;
    top = std::max(top, scores[j]);
  }
  float total = 0;
  for (int64_t j = 0; j < seen; ++j) total += (scores[j] = std::exp(scores[j] - top));
  __m512 ov[HD16];
  for (int c = 0; c < HD16; ++c) ov[c] = _mm512_setzero_ps();
  const float inv = 1.0f / total;
  for (int64_t j = 0; j < seen; ++j) {
    const __m512 w = _mm512_set1_ps(scores[j] * inv);
    const float* v = vals + j * hd;
    for (int c = 0; c < HD16; ++c) ov[c] = _mm512_fmadd_ps(w, _mm512_loadu_ps(v + 16 * c), ov[c]);
  }
  for (int c = 0; c < HD16; ++c) _mm512_storeu_ps(out + 16 * c, ov[c]);
}
#endif

class Decoder {
 public:
  Decoder(std::vector<ProjectionPtr> projections, std::vector<torch::Tensor> norms, torch::Tensor final_norm,
          double eps, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t max_length)
      : projections_(std::move(projections)), eps_(eps), heads_(heads), kv_heads_(kv_heads), hd_(head_dim),
        max_length_(max_length) {
    TORCH_CHECK(projections_.size() % 7 == 0 && norms.size() * 7 == projections_.size() * 2,
                "7 projections (q k v o gate up down) and 2 norms per layer");
    TORCH_CHECK(heads % kv_heads == 0, "the query heads must be a multiple of the key/value heads");
    for (auto& n : norms) norms_.push_back(n.to(torch::kFloat32).contiguous());
    final_norm_ = final_norm.to(torch::kFloat32).contiguous();
    layers_ = static_cast<int64_t>(projections_.size() / 7);
    keys_ = torch::empty({layers_, kv_heads, max_length, head_dim}, torch::kFloat32);
    values_ = torch::empty({layers_, kv_heads, max_length, head_dim}, torch::kFloat32);
  }

  int64_t length() const { return length_; }
  void reset() { length_ = 0; }

  // Runs M new positions (hidden: their embeddings (M, d); cos, sin: (M, head_dim) for
  // positions length() .. length() + M - 1) through every layer and the final norm,
  // appending their keys and values to the cache.
  torch::Tensor step(torch::Tensor hidden, torch::Tensor cos, torch::Tensor sin) {
    TORCH_CHECK(hidden.dtype() == torch::kFloat32 && hidden.dim() == 2, "hidden must be float32 (M, d)");
    const int64_t M = hidden.size(0);
    TORCH_CHECK(length_ + M <= max_length_, "the cache holds ", max_length_, " positions; ", length_ + M,
                " asked for");
    TORCH_CHECK(cos.size(0) == M && cos.size(1) == hd_ && sin.sizes() == cos.sizes(), "cos, sin must be (M, head_dim)");
    torch::Tensor c = cos.to(torch::kFloat32).contiguous(), s = sin.to(torch::kFloat32).contiguous();
    const int64_t d = hidden.size(1);
    // the activations live in buffers kept between steps: a prompt's step would otherwise
    // allocate and free megabytes per layer, and the allocator's page faults cost a third
    // of the time on some runs
    auto rows = [&](torch::Tensor& buffer, int64_t width) {
      if (!buffer.defined() || buffer.size(0) < M || buffer.size(1) != width)
        buffer = torch::empty({std::max<int64_t>(M, buffer.defined() ? buffer.size(0) : 0), width}, torch::kFloat32);
      return buffer.narrow(0, 0, M);
    };
    torch::Tensor h = rows(h_, d).copy_(hidden);
    torch::Tensor normed = rows(normed_, d);
    torch::Tensor q = rows(q_, heads_ * hd_);
    torch::Tensor k = rows(k_, kv_heads_ * hd_);
    torch::Tensor v = rows(v_, kv_heads_ * hd_);
    torch::Tensor attn = rows(attn_, heads_ * hd_);
    torch::Tensor out = rows(out_, d);
    for (int64_t layer = 0; layer < layers_; ++layer) {
      const ProjectionPtr* P = projections_.data() + 7 * layer;
      rms_norm(h, norms_[2 * layer], eps_, normed);
      P[0]->forward(normed, q);
      P[1]->forward(normed, k);
      P[2]->forward(normed, v);
      rotate(q, heads_, hd_, c, s);
      rotate(k, kv_heads_, hd_, c, s);
      store(layer, k, v);
      attend(layer, q, attn);
      P[3]->forward(attn, out);
      h.add_(out);
      rms_norm(h, norms_[2 * layer + 1], eps_, normed);
      const int64_t inter = P[4]->rows;
      torch::Tensor gate = rows(gate_, inter), up = rows(up_, inter);
      P[4]->forward(normed, gate);
      P[5]->forward(normed, up);
      if (M <= 16) {
        float* g = gate.data_ptr<float>();
        const float* u = up.data_ptr<float>();
        for (int64_t i = 0; i < M * inter; ++i) g[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
      } else {  // a prompt: ATen's vectorized, threaded SiLU
        at::silu_(gate).mul_(up);
      }
      P[6]->forward(gate, out);
      h.add_(out);
    }
    length_ += M;
    torch::Tensor result = torch::empty({M, d}, torch::kFloat32);
    rms_norm(h, final_norm_, eps_, result);
    return result;
  }

 private:
  void store(int64_t layer, const torch::Tensor& k, const torch::Tensor& v) {
    const int64_t M = k.size(0);
    const float* ks = k.data_ptr<float>();
    const float* vs = v.data_ptr<float>();
    float* kc = keys_[layer].data_ptr<float>();
    float* vc = values_[layer].data_ptr<float>();
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < kv_heads_; ++g) {
        const int64_t at = (g * max_length_ + length_ + m) * hd_;
        std::memcpy(kc + at, ks + (m * kv_heads_ + g) * hd_, hd_ * sizeof(float));
        std::memcpy(vc + at, vs + (m * kv_heads_ + g) * hd_, hd_ * sizeof(float));
      }
  }

  // Causal attention of the M new queries over the cache, each query seeing the positions
  // up to its own: softmax(q k^T / sqrt(hd)) v, per query head, grouped over KV heads.
  void attend(int64_t layer, const torch::Tensor& q, torch::Tensor& out) {
    const int64_t M = q.size(0), group = heads_ / kv_heads_;
    if (M > 16) {  // a prompt: ATen's fused attention (matrix products over blocks of queries)
      const int64_t seen = length_ + M;
      auto qh = q.view({1, M, heads_, hd_}).transpose(1, 2);
      auto kh = keys_[layer].narrow(1, 0, seen).unsqueeze(0);
      auto vh = values_[layer].narrow(1, 0, seen).unsqueeze(0);
      c10::optional<at::Tensor> mask;
      if (length_ > 0)  // query m sees the cache and the new positions up to its own
        mask = at::ones({M, seen}, torch::kBool).tril(length_);
      auto o = at::scaled_dot_product_attention(qh, kh, vh, mask, 0.0, length_ == 0, c10::nullopt, group > 1);
      out.view({M, heads_, hd_}).copy_(o[0].transpose(0, 1));
      return;
    }
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd_));
    const float* qs = q.data_ptr<float>();
    const float* kc = keys_[layer].data_ptr<float>();
    const float* vc = values_[layer].data_ptr<float>();
    float* o = out.data_ptr<float>();
    at::parallel_for(0, M * heads_, 1, [&](int64_t first, int64_t last) {
      std::vector<float> scores(length_ + M);
      for (int64_t task = first; task < last; ++task) {
        const int64_t m = task / heads_, h = task % heads_, g = h / group;
        const int64_t seen = length_ + m + 1;
        const float* qv = qs + (m * heads_ + h) * hd_;
        const float* keys = kc + g * max_length_ * hd_;
        const float* vals = vc + g * max_length_ * hd_;
        float* ov = o + (m * heads_ + h) * hd_;
#ifdef LQ_AVX512
        if (hd_ == 64) {
          attend_one<4>(qv, keys, vals, seen, scale, scores.data(), ov);
          continue;
        }
        if (hd_ == 128) {
          attend_one<8>(qv, keys, vals, seen, scale, scores.data(), ov);
          continue;
        }
#endif
        float top = -INFINITY;
        for (int64_t j = 0; j < seen; ++j) {
          scores[j] = dot(qv, keys + j * hd_, hd_) * scale;
          top = std::max(top, scores[j]);
        }
        float total = 0;
        for (int64_t j = 0; j < seen; ++j) total += (scores[j] = std::exp(scores[j] - top));
        std::fill(ov, ov + hd_, 0.0f);
        for (int64_t j = 0; j < seen; ++j) {
          const float w = scores[j] / total;
          const float* vj = vals + j * hd_;
          for (int64_t k = 0; k < hd_; ++k) ov[k] += w * vj[k];
        }
      }
    });
  }

  std::vector<ProjectionPtr> projections_;
  std::vector<torch::Tensor> norms_;
  torch::Tensor final_norm_, keys_, values_;
  torch::Tensor h_, normed_, q_, k_, v_, attn_, out_, gate_, up_;  // activation buffers, grown as needed
  double eps_;
  int64_t heads_, kv_heads_, hd_, max_length_, layers_ = 0, length_ = 0;
};

}  // namespace

// The logits of one hidden row (1, cols) under a dense head weight (rows, cols): decoding
// reads the whole head every token, so this is a streaming, threaded matrix-vector product.
torch::Tensor head_logits_into(torch::Tensor out, torch::Tensor x, torch::Tensor weight) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && weight.dtype() == torch::kFloat32 && weight.dim() == 2 &&
                  x.numel() == weight.size(1) && weight.is_contiguous(),
              "head_logits takes one float32 row and a contiguous float32 (vocab, hidden) weight");
  TORCH_CHECK(out.dtype() == torch::kFloat32 && out.is_contiguous() && out.numel() == weight.size(0),
              "out must be a contiguous float32 vector of the head's rows");
  auto xc = x.contiguous();
  dense_matvec(weight.data_ptr<float>(), weight.size(0), weight.size(1), xc.data_ptr<float>(), out.data_ptr<float>());
  return out;
}

torch::Tensor head_logits(torch::Tensor x, torch::Tensor weight) {
  return head_logits_into(torch::empty({weight.size(0)}, torch::kFloat32), x, weight);
}

namespace {

// Hands the whole pages of a file mapping in [start, end) back (a hint that loses nothing:
// a page is read again if touched). MADV_PAGEOUT also reclaims them from the page cache,
// for a source never read again; MADV_DONTNEED only unmaps them from this process, so a
// later read is a minor fault, not a disk read.
void release_pages(uintptr_t start, uintptr_t end, bool reclaim) {
  const uintptr_t page = 4096, first = (start + page - 1) & ~(page - 1), last = end & ~(page - 1);
  if (last <= first) return;
#ifdef MADV_PAGEOUT
  const int advice = reclaim ? MADV_PAGEOUT : MADV_DONTNEED;
#else
  const int advice = MADV_DONTNEED;
#endif
  madvise(reinterpret_cast<void*>(first), last - first, advice);
}

// `bytes` of memory the kernel is asked to back with 2 MB pages (nullptr if refused).
void* hugepage_alloc(size_t bytes) {
  const size_t align = size_t{2} << 20, size = (bytes + align - 1) / align * align;
  void* memory = nullptr;
  if (bytes == 0 || posix_memalign(&memory, align, size) != 0) return nullptr;
#ifdef MADV_HUGEPAGE
  madvise(memory, size, MADV_HUGEPAGE);  // a hint; without it, 4 KB pages
#endif
  return memory;
}

// Once the memory is written: the 2 MB pages now, not when khugepaged gets to it (Linux 6.1+).
void hugepage_collapse(void* memory, size_t bytes) {
#ifdef MADV_HUGEPAGE
  const size_t align = size_t{2} << 20;
  madvise(memory, (bytes + align - 1) / align * align, MADV_COLLAPSE);
#endif
}

}  // namespace

// A float32 tensor's copy in memory the kernel is asked to back with 2 MB pages: a token
// streams the whole head (113 MB on SmolLM2), and walking it 4 KB page by page through a
// file mapping made that read about 30% slower (bench/results/inference.md). With
// `release_source` (the source lies in a mapped file) the source's pages are handed back
// as each 8 MB is copied, so resident memory never holds both.
torch::Tensor hugepage_copy(torch::Tensor src, bool release_source) {
  TORCH_CHECK(src.dtype() == torch::kFloat32 && src.is_contiguous(), "hugepage_copy takes a contiguous float32 tensor");
  const size_t bytes = static_cast<size_t>(src.numel()) * sizeof(float);
  void* memory = hugepage_alloc(bytes);
  if (memory == nullptr) return src.clone();
  const auto* from = static_cast<const uint8_t*>(src.data_ptr());
  auto* to = static_cast<uint8_t*>(memory);
  const size_t step = size_t{8} << 20;
  for (size_t done = 0; done < bytes; done += step) {
    const size_t n = std::min(step, bytes - done);
    std::memcpy(to + done, from + done, n);
    if (release_source)
      release_pages(reinterpret_cast<uintptr_t>(from + done), reinterpret_cast<uintptr_t>(from + done + n), true);
  }
  hugepage_collapse(memory, bytes);
  return torch::from_blob(memory, src.sizes(), [](void* p) { std::free(p); }, torch::kFloat32);
}

// ---- Greedy decoding's head: the exact argmax, reading half the bytes ----
//
// A greedy token needs only the largest logit, not all of them. Every row is scored with a
// bfloat16 copy of the head (half the bytes of the float32 head a token otherwise streams),
// each score's distance from the float32 logit is bounded, and only the rows whose bound
// reaches the best lower bound are recomputed from the float32 head, with the arithmetic
// dense_matvec uses. The token is the argmax of the float32 logits, ties to the first row,
// as head_logits(...).argmax() picks it.
//
// The bound, for row w (float32) and its bfloat16 rounding b, activations h, n = cols,
// u = 2^-24 (float32), gamma = (n + 16) u / (1 - (n + 16) u) (float32 sums of n products,
// in any order):
//   |h.w - h.b|                <= 2^-8 sum |h_j w_j| + sqrt(n) |h| 2^-134  (round to nearest;
//                                 the last term covers subnormal weights)
//   |score - h.b|, |logit - h.w| <= gamma (1 + 2^-8) sum |h_j w_j|, gamma sum |h_j w_j|
//   sum |h_j w_j|              <= |h| |w|                                (Cauchy-Schwarz)
// so |score - logit| <= e = (2^-8 + gamma (2 + 2^-8)) |h| |w| + sqrt(n) |h| 2^-134, with |w|
// computed in double once and the factor rounded up.

namespace {

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even (finite inputs)
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return static_cast<uint16_t>((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

// Rows ahead of the ones being scored that bf16_matvec asks the cache for: a bfloat16 row is
// a short stream (1.2 KB on SmolLM2) that the hardware prefetcher picks up late; asking two
// quads ahead took the head's scores from 2.4 to 1.2-1.5 ms on one thread. (The same hint
// made the float32 head's read slower, so dense_matvec goes without.) A prefetch past the
// end is a hint, never a fault.
constexpr int64_t kRowsAhead = 8;

// The bfloat16 rows' scores: y (rows) = B (rows, cols) x, four rows at a time. A 32-bit
// lane holds two neighbours, so the even one is the lane shifted left by 16 and the odd one
// the lane with its low half cleared: two cheap in-lane operations where widening 16-bit
// values into 32-bit lanes crosses lanes (it made the half-size read no faster). x is
// split into its even and odd elements once per call to match.
void bf16_matvec(const uint16_t* B, int64_t rows, int64_t cols, const float* x, float* y) {
#ifdef LQ_AVX512
  constexpr int64_t kStep = 32;  // weights a step: a 512-bit load of bfloat16 pairs
#elif defined(__AVX2__)
  constexpr int64_t kStep = 16;
#else
  constexpr int64_t kStep = 0;
#endif
  const int64_t vectorized = kStep ? cols / kStep * kStep : 0;
  std::vector<float> even(vectorized / 2), odd(vectorized / 2);  // x[k], x[k + 1] for even k
  for (int64_t k = 0; k < vectorized; k += 2) even[k / 2] = x[k], odd[k / 2] = x[k + 1];
  at::parallel_for(0, (rows + 3) / 4, 64, [&](int64_t first, int64_t last) {
    for (int64_t quad = first; quad < last; ++quad) {
      const int64_t r0 = quad * 4, n = std::min<int64_t>(4, rows - r0);
      float total[4] = {0, 0, 0, 0};
      int64_t k = 0;
#ifdef LQ_AVX512
      if (n == 4) {
        const uint16_t* w = B + r0 * cols;
        const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
        __m512 b[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (; k < vectorized; k += kStep) {
          const __m512 xe = _mm512_loadu_ps(even.data() + k / 2), xo = _mm512_loadu_ps(odd.data() + k / 2);
          for (int j = 0; j < 4; ++j) {
            _mm_prefetch(reinterpret_cast<const char*>(w + (j + kRowsAhead) * cols + k), _MM_HINT_T0);
            const __m512i pair = _mm512_loadu_si512(w + j * cols + k);
            b[j] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(pair, 16)), xe, b[j]);
            b[j] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(pair, high)), xo, b[j]);
          }
        }
        for (int j = 0; j < 4; ++j) total[j] = _mm512_reduce_add_ps(b[j]);
      }
#elif defined(__AVX2__)
      if (n == 4) {
        const uint16_t* w = B + r0 * cols;
        const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
        __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        for (; k < vectorized; k += kStep) {
          const __m256 xe = _mm256_loadu_ps(even.data() + k / 2), xo = _mm256_loadu_ps(odd.data() + k / 2);
          for (int j = 0; j < 4; ++j) {
            _mm_prefetch(reinterpret_cast<const char*>(w + (j + kRowsAhead) * cols + k), _MM_HINT_T0);
            const __m256i pair = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * cols + k));
            a[j] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(pair, 16)), xe, a[j]);
            a[j] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(pair, high)), xo, a[j]);
          }
        }
        for (int j = 0; j < 4; ++j) {
          alignas(32) float parts[8];
          _mm256_store_ps(parts, a[j]);
          for (float v : parts) total[j] += v;
        }
      }
#endif
      for (int64_t j = 0; j < n; ++j) {
        const uint16_t* w = B + (r0 + j) * cols;
        for (int64_t c = k; c < cols; ++c) total[j] += bf16_to_float(w[c]) * x[c];
        y[r0 + j] = total[j];
      }
    }
  });
}

}  // namespace

// The head's bfloat16 copy (rounded to nearest even, in memory advised for 2 MB pages) and
// each row's Euclidean norm (float64), for head_argmax; an empty list where a weight or its
// rounding is not finite (the bound would not hold). With `release_source` (the float32
// head lies in a mapped file) its pages leave this process's resident set as each 8 MB is
// read, but stay in the page cache: head_argmax reads a few of its rows every token.
std::vector<torch::Tensor> bf16_head(torch::Tensor weight, bool release_source) {
  TORCH_CHECK(weight.dtype() == torch::kFloat32 && weight.dim() == 2 && weight.is_contiguous(),
              "bf16_head takes a contiguous float32 (vocab, hidden) weight");
  const int64_t rows = weight.size(0), cols = weight.size(1);
  const size_t bytes = static_cast<size_t>(rows * cols) * sizeof(uint16_t);
  void* memory = hugepage_alloc(bytes);
  auto half = memory ? torch::from_blob(memory, {rows, cols}, [](void* p) { std::free(p); }, torch::kBFloat16)
                     : torch::empty({rows, cols}, torch::kBFloat16);
  auto norms = torch::empty({rows}, torch::kFloat64);
  const float* W = weight.data_ptr<float>();
  auto* H = reinterpret_cast<uint16_t*>(half.data_ptr());
  double* N = norms.data_ptr<double>();
  std::atomic<bool> finite{true};
  const int64_t chunk = std::max<int64_t>(1, (int64_t{8} << 20) / (cols * 4));  // rows in 8 MB
  for (int64_t start = 0; start < rows; start += chunk) {
    const int64_t end = std::min(rows, start + chunk);
    at::parallel_for(start, end, 64, [&](int64_t first, int64_t last) {
      for (int64_t r = first; r < last; ++r) {
        double sum = 0;
        for (int64_t c = 0; c < cols; ++c) {
          const float w = W[r * cols + c];
          const uint16_t h = float_to_bf16(w);
          if (!std::isfinite(w) || !std::isfinite(bf16_to_float(h))) finite = false;
          H[r * cols + c] = h;
          sum += static_cast<double>(w) * w;
        }
        N[r] = std::sqrt(sum);
      }
    });
    if (release_source)
      release_pages(reinterpret_cast<uintptr_t>(W + start * cols), reinterpret_cast<uintptr_t>(W + end * cols), false);
  }
  if (!finite) return {};
  if (memory) hugepage_collapse(memory, bytes);
  return {half, norms};
}

// The index of the largest float32 logit of one row x under `weight`, ties to the first,
// from its bfloat16 copy and row norms (bf16_head); -1 where x is not finite or a
// recomputed logit is NaN (the caller then takes the full logits).
int64_t head_argmax(torch::Tensor x, torch::Tensor weight, torch::Tensor half, torch::Tensor norms) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && weight.dtype() == torch::kFloat32 && weight.dim() == 2 &&
                  weight.is_contiguous() && x.numel() == weight.size(1),
              "head_argmax takes one float32 row and a contiguous float32 (vocab, hidden) weight");
  TORCH_CHECK(half.dtype() == torch::kBFloat16 && half.sizes() == weight.sizes() && half.is_contiguous() &&
                  norms.dtype() == torch::kFloat64 && norms.numel() == weight.size(0),
              "half and norms must come from bf16_head(weight)");
  const int64_t rows = weight.size(0), cols = weight.size(1);
  auto xc = x.contiguous();
  const float* xs = xc.data_ptr<float>();
  double h2 = 0;
  for (int64_t c = 0; c < cols; ++c) h2 += static_cast<double>(xs[c]) * xs[c];
  const double h = std::sqrt(h2);
  if (!std::isfinite(h)) return -1;
  std::vector<float> score(rows);
  bf16_matvec(reinterpret_cast<const uint16_t*>(half.data_ptr()), rows, cols, xs, score.data());
  const double u = std::ldexp(1.0, -24), n = static_cast<double>(cols + 16);
  const double gamma = n * u / (1 - n * u);
  const double slope = (std::ldexp(1.0, -8) + gamma * (2 + std::ldexp(1.0, -8))) * (1 + 1e-9) * h;
  const double floor = std::sqrt(static_cast<double>(cols)) * h * std::ldexp(1.0, -134);
  const double* N = norms.data_ptr<double>();
  double best_low = -INFINITY;
  for (int64_t r = 0; r < rows; ++r) best_low = std::max(best_low, score[r] - (slope * N[r] + floor));
  best_low -= 1e-12 * (std::abs(best_low) + 1);  // the double sums' own rounding, generously
  const float* W = weight.data_ptr<float>();
  const int64_t whole = rows / 4 * 4;  // rows dense_matvec sums four at a time
  int64_t best = -1, quad_done = -1;
  float best_logit = 0, quad[4];
  for (int64_t r = 0; r < rows; ++r) {
    if (score[r] + (slope * N[r] + floor) < best_low) continue;
    float logit;
    if (r < whole) {
      if (r / 4 != quad_done) {
        quad_dots(W + r / 4 * 4 * cols, cols, xs, quad);
        quad_done = r / 4;
      }
      logit = quad[r % 4];
    } else {
      logit = dot(W + r * cols, xs, cols);
    }
    if (std::isnan(logit)) return -1;
    if (best < 0 || logit > best_logit) best = r, best_logit = logit;
  }
  return best;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("dequantize", &dequantize, "decode packed NF codes to a dense float32 matrix");
  m.def("dequantize_into", &dequantize_into, "decode packed NF codes into a reusable float32 buffer");
  m.def("matvec", &matvec, "x @ W^T for a few rows of x, decoding W on the fly");
  m.def("head_logits", &head_logits, "one row's logits under a dense head weight, streamed and threaded");
  m.def("head_logits_into", &head_logits_into, "head_logits into a given vector");
  m.def("hugepage_copy", &hugepage_copy, "a float32 tensor's copy in memory advised for 2 MB pages");
  m.def("bf16_head", &bf16_head, "a head's bfloat16 copy and row norms, for head_argmax");
  m.def("head_argmax", &head_argmax, "the largest float32 logit's index, read through the bfloat16 copy",
        py::call_guard<py::gil_scoped_release>());
  m.def("lq_linear", &lq_linear, "x deq(Q)^T + s (x L2^T) L1^T + bias for a few rows of x");
  py::class_<Projection, ProjectionPtr>(m, "Projection");
  m.def("packed_projection", &packed_projection, "an LQLinear's packed matrix, factors and bias, for Decoder");
  m.def("dense_projection", &dense_projection, "a dense weight and bias, for Decoder");
  py::class_<Decoder>(m, "Decoder")
      .def(py::init<std::vector<ProjectionPtr>, std::vector<torch::Tensor>, torch::Tensor, double, int64_t, int64_t,
                    int64_t, int64_t>())
      .def("step", &Decoder::step, py::call_guard<py::gil_scoped_release>())
      .def("reset", &Decoder::reset)
      .def_property_readonly("length", &Decoder::length);
}
