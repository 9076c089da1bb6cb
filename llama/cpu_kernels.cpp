// The C++ CPU kernels of llama (built by llama/cpu_kernels.py): the fused decoding step of
// llama/inference/cpu_decode.py - every layer of a LLaMA model, the final norm and the output
// projection for up to 8 rows of one new token each, in one call, with the model's rounding points
// (bf16: bf16 activations, fp32 norms / RoPE / softmax / accumulation) - and the training loss's pass
// over the logits (softmax_gradient), generation's prefill (the whole forward of a prompt chunk; its
// matrix products, rowlin, and the causal attention of the blocked backend are AVX-512 only, bf16
// and fp32) and the benchmarks' bandwidth probe (read_bandwidth).
// One source, one build per instruction set (torch.utils.cpp_extension.load):
//   -DLLAMA_ISA_AVX512BF16 (-mavx512f -mavx512bw -mavx512bf16): 16 fp32 lanes, native bf16 dots
//   -DLLAMA_ISA_AVX512BF16_VBMI (the same and -mavx512vbmi): as AVX512BF16, int8 weights widened to
//     bf16 by byte-permute table look-ups (V::i8_bf16_lut)
//   -DLLAMA_ISA_AVX512 (-mavx512f -mavx512bw): 16 lanes; bf16 widened to fp32 in registers (the
//     native dot's pairs too: dot_pairs), rounding to bf16 in integer code
//   -DLLAMA_ISA_AVX2 (-mavx2 -mfma): 8 lanes; bf16 widened to fp32 in registers, fp32 FMAs
//   -DLLAMA_ISA_NEON (aarch64): 4 lanes; bf16 as for AVX2
// Everything below the `V` structs is written once against them, except rowlin and the attention
// (16-lane code, LLAMA_AVX512: both AVX-512 builds).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#if defined(_OPENMP)
#include <omp.h>
#endif
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <exception>
#include <type_traits>
#include <limits>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

// [primitives begin] (to the matching end: no torch, so tests/test_inference.py compiles this part
// alone for each instruction set and checks it against scalar code, NEON under qemu)
using bf16 = uint16_t;
static inline float b2f(bf16 v) { uint32_t u = (uint32_t)v << 16; float f; std::memcpy(&f, &u, 4); return f; }
static inline bf16 f2b(float f) {  // round to nearest even, as torch does
  uint32_t u; std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  u += 0x7fffu + ((u >> 16) & 1u);
  return (bf16)(u >> 16);
}

// V: one register of N fp32 lanes and what the step does with it. bf16 loads/stores move N
// elements. A dot block (BF16_BLOCK bf16, N fp32 or I8_BLOCK (16) int8 elements of a weight row and
// of an input row) goes into a lane-wise partial sum (lanes are summed at the end, so their order is
// free) as parts: bf16_part / i8_part widen part p of the weight block to the register the multiply
// takes, bf16_x is the input register it meets, bf16_mac multiplies and adds (fp32 parts: V::fma).
// int8 weights (the scales are applied per output row after the sum) meet an fp32 input row: the
// int8 values widen exactly to fp32 in registers. The bf16 input row comes as BF16X: bf16 where the
// ISA multiplies bf16 directly (one part: the native dot of 32), else fp32 that split_bf16 laid out
// once per product (each block: its even elements, then its odd ones: two parts), so the
// per-weight-row work is widening the weights only. ACC: how many accumulators a product tile keeps
// in registers (the rest of REGS holds the weight parts, widened where the ISA must, and an input
// part). I8_BF16: int8 weights meet a bf16 input in the native bf16 dot (i8_bf16_part); I8_LUT:
// with VBMI, one-row products widen them by table look-up instead (i8_bf16_lut).
#if defined(LLAMA_ISA_AVX512BF16_VBMI)  // the AVX512-BF16 build, its int8 weights widened by VBMI's byte permutes
#define LLAMA_ISA_AVX512BF16 1
#define LLAMA_VBMI 1
#endif
#if defined(LLAMA_ISA_AVX512BF16) || defined(LLAMA_ISA_AVX512)
#define LLAMA_AVX512 1  // the 16-lane code below the V structs (rowlin, attention, lane sums): both builds
#include <immintrin.h>
#if defined(LLAMA_VBMI)
struct I8Lut {  // the low and the high byte of bf16(i), i < 128 (V::i8_bf16_lut)
  alignas(64) uint8_t lo[128], hi[128];
  constexpr I8Lut() : lo(), hi() {
    for (int i = 1; i < 128; ++i) {  // exponent 127 + e (i in [2^e, 2^(e+1))), 7 fraction bits: exact
      int e = 0;
      while ((i >> (e + 1)) != 0) ++e;
      const int bits = (127 + e) << 7 | ((i << (7 - e)) & 0x7f);
      lo[i] = (uint8_t)(bits & 0xff);
      hi[i] = (uint8_t)(bits >> 8);
    }
  }
};
inline constexpr I8Lut I8_LUT_TABLE{};
#endif
struct V {
  using F = __m512;
  static constexpr int N = 16, REGS = 32, BF16_BLOCK = 32, ACC = 24;
  static constexpr float EXP_HI = 88.7f;  // scalef takes 2^128 (e^88.7 < FLT_MAX)
  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float f) { return _mm512_set1_ps(f); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F div(F a, F b) { return _mm512_div_ps(a, b); }
  static F min(F a, F b) { return _mm512_min_ps(a, b); }
  static F max(F a, F b) { return _mm512_max_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }    // a b + c
  static F fnma(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a b
  static float sum(F v) { return _mm512_reduce_add_ps(v); }
  static F round(F v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static F ldexp(F p, F n) { return _mm512_scalef_ps(p, n); }  // p 2^n, n integral
  static F load_bf16(const bf16* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
  }
  // the even (low) and odd (high) bf16 of each 32-bit word as fp32
  static F even_bf16(__m512i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)); }
  static F odd_bf16(__m512i v) { return _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xffff0000u))); }
  static F pair_part(const bf16* w, int p) {  // 32 bf16 = 16 pairs: p = 0 the even elements as fp32, 1 the odd
    const __m512i wv = _mm512_loadu_si512(w);
    return p ? odd_bf16(wv) : even_bf16(wv);
  }
  static constexpr int I8_PARTS = 1;
  static F i8_part(const int8_t* w, int) {  // 16 int8 sign-extended, exact in fp32
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)w)));
  }
#if defined(LLAMA_ISA_AVX512BF16)
#if defined(LLAMA_VBMI)
  static constexpr const char* ISA = "avx512bf16_vbmi";
#else
  static constexpr const char* ISA = "avx512bf16";
#endif
  using BF16X = bf16;
  static void split_bf16(const bf16* x, bf16* out) { std::memcpy(out, x, BF16_BLOCK * sizeof(bf16)); }
  static __m256i bf16_bits(F v) { return (__m256i)_mm512_cvtneps_pbh(v); }  // 16 bf16, rounded to nearest even
  static constexpr int BF16_PARTS = 1;  // 32 products in one instruction, of the bf16 as they are
  static F bf16_part(const bf16* w, int) { return _mm512_castsi512_ps(_mm512_loadu_si512(w)); }
  static F bf16_x(const bf16* x, int) { return _mm512_castsi512_ps(_mm512_loadu_si512(x)); }
  static F bf16_mac(F acc, F w, F x) { return _mm512_dpbf16_ps(acc, (__m512bh)w, (__m512bh)x); }
  // the native bf16 dot of pairs: acc + a.even b.even + a.odd b.odd per lane (a, b: 16 bf16 pairs)
  static F dot_pairs(F acc, F a, F b) { return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b); }
  // 32 int8 weights as 32 bf16 for the native bf16 dot (bf16_mac) against 32 bf16 inputs: the int8
  // values widen to fp32 and pack to bf16 exactly (8 significant bits hold any int8), so this is
  // i8_part on the bf16 input with half the multiply instructions and half the input bytes
  static constexpr bool I8_BF16 = true;
  static F i8_bf16_part(const int8_t* w) {
    const F lo = i8_part(w, 0), hi = i8_part(w + 16, 0);
    return (F)_mm512_cvtne2ps_pbh(hi, lo);  // (hi, lo): lo first
  }
#if defined(LLAMA_VBMI)
  // 64 int8 weights as 64 bf16 by table look-up (VBMI byte permutes; the build for CPUs with them):
  // the low and the high byte of bf16(|v|) looked up for the 64 values at once (|v| < 128: 7 index
  // bits, two tables of 128 bytes), v's sign put into the high byte, -128 (|v| = 128) set whole,
  // then the bytes interleaved into words: 8 instructions for 64 weights, against 10 for
  // i8_bf16_part's two (a one-core loop over weights in L2: 1.5-1.65x; the one-row product with its
  // weights in cache 1.15-1.25x; the batch-1 int8 step 1.02x at ~80 GB/s, as the bandwidth limits). The
  // interleave works within each 128-bit lane, so part 0 holds elements 0-7, 16-23, 32-39, 48-55 and
  // part 1 the rest: the input is laid out to match (lut_block)
  static constexpr bool I8_LUT = true;
  static void i8_bf16_lut(const int8_t* w, F& a, F& b) {
    const __m512i v = _mm512_loadu_si512(w), m = _mm512_abs_epi8(v);  // -128 stays 0x80: index 0, mended below
    const uint8_t *tl = I8_LUT_TABLE.lo, *th = I8_LUT_TABLE.hi;
    const __m512i lo = _mm512_permutex2var_epi8(_mm512_load_si512(tl), m, _mm512_load_si512(tl + 64));
    __m512i hi = _mm512_permutex2var_epi8(_mm512_load_si512(th), m, _mm512_load_si512(th + 64));
    hi = _mm512_ternarylogic_epi32(hi, v, _mm512_set1_epi8((char)0x80), 0xF8);  // hi | (v & 0x80)
    hi = _mm512_mask_blend_epi8(_mm512_movepi8_mask(m), hi, _mm512_set1_epi8((char)0xC3));  // bf16(-128) = 0xC300 (lo 0)
    a = (F)_mm512_unpacklo_epi8(lo, hi);
    b = (F)_mm512_unpackhi_epi8(lo, hi);
  }
  // element j of the input's 64-element blocks as lut_block lays them out: part 0's elements in
  // register order, then part 1's
  static constexpr int lut_order(int j) { return (j >> 3 & 3) * 16 + (j >> 5) * 8 + (j & 7); }
  static void lut_block(const bf16* r, bf16* o) {  // 64 input elements in lut_order: two word permutes
    struct Idx {
      alignas(64) uint16_t v[64];
      constexpr Idx() : v() { for (int j = 0; j < 64; ++j) v[j] = (uint16_t)lut_order(j); }
    };
    static constexpr Idx idx{};
    const __m512i lo = _mm512_loadu_si512(r), hi = _mm512_loadu_si512(r + 32);
    _mm512_storeu_si512(o, _mm512_permutex2var_epi16(lo, _mm512_load_si512(idx.v), hi));
    _mm512_storeu_si512(o + 32, _mm512_permutex2var_epi16(lo, _mm512_load_si512(idx.v + 32), hi));
  }
#else
  static constexpr bool I8_LUT = false;
#endif
#else  // AVX-512 without its bf16 instructions: bf16 widened to fp32 in registers, as in the AVX2 build
  static constexpr const char* ISA = "avx512";
  static constexpr bool I8_BF16 = false, I8_LUT = false;  // int8 weights meet an fp32-widened input (i8_part)
  using BF16X = float;
  static void split_bf16(const bf16* x, float* out) {  // 32 bf16 -> 16 even, 16 odd as fp32
    const __m512i v = _mm512_loadu_si512(x);
    store(out, even_bf16(v));
    store(out + 16, odd_bf16(v));
  }
  static __m256i bf16_bits(F v) {  // 16 bf16 rounded to nearest even as f2b (every NaN to 0x7fc0, as torch)
    const __m512i u = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
    return _mm512_cvtepi32_epi16(r);
  }
  static constexpr int BF16_PARTS = 2;  // 32 bf16 = 16 pairs: the even elements, then the odd, as fp32
  static F bf16_part(const bf16* w, int p) { return pair_part(w, p); }
  static F bf16_x(const float* x, int p) { return load(x + 16 * p); }
  static F bf16_mac(F acc, F w, F x) { return fma(w, x, acc); }
  static F dot_pairs(F acc, F a, F b) {  // as the native bf16 dot: the even products, then the odd
    const __m512i ai = _mm512_castps_si512(a), bi = _mm512_castps_si512(b);
    return fma(odd_bf16(ai), odd_bf16(bi), fma(even_bf16(ai), even_bf16(bi), acc));
  }
#endif
  static void store_bf16(bf16* p, F v) { _mm256_storeu_si256((__m256i*)p, bf16_bits(v)); }
  static F rnd_bf16(F v) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16_bits(v)), 16)); }
};
#elif defined(LLAMA_ISA_AVX2)
#include <immintrin.h>
struct V {
  using F = __m256;
  static constexpr int N = 8, REGS = 16, BF16_BLOCK = 16, ACC = 8;
  static constexpr bool I8_BF16 = false, I8_LUT = false;  // int8 weights meet an fp32-widened input (i8_part)
  static constexpr float EXP_HI = 88.3762626f;  // n = round(x log2 e) <= 127: 2^n built in the exponent field
  static constexpr const char* ISA = "avx2";
  using BF16X = float;
  static void split_bf16(const bf16* x, float* out) {  // 16 bf16 -> 8 even, 8 odd as fp32
    const __m256i v = _mm256_loadu_si256((const __m256i*)x);
    _mm256_storeu_si256((__m256i*)out, _mm256_slli_epi32(v, 16));
    _mm256_storeu_si256((__m256i*)(out + 8), _mm256_and_si256(v, _mm256_set1_epi32((int)0xffff0000u)));
  }
  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float f) { return _mm256_set1_ps(f); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F div(F a, F b) { return _mm256_div_ps(a, b); }
  static F min(F a, F b) { return _mm256_min_ps(a, b); }
  static F max(F a, F b) { return _mm256_max_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F fnma(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }
  static float sum(F v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  static F round(F v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static F ldexp(F p, F n) {
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  }
  static F load_bf16(const bf16* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
  }
  static __m256i rnd_bits(F v) {  // fp32 bits rounded to the nearest even bf16 (low 16 bits zero), as f2b
    const __m256i u = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_and_si256(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))),
                                       _mm256_set1_epi32((int)0xffff0000u));
    const __m256 nan = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fc00000));  // every NaN, as torch
    return _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(r), nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  }
  static void store_bf16(bf16* p, F v) {
    const __m256i r = _mm256_srli_epi32(rnd_bits(v), 16);  // 8 x 32-bit lanes holding bf16 bits
    _mm_storeu_si128((__m128i*)p, _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
  }
  static F rnd_bf16(F v) { return _mm256_castsi256_ps(rnd_bits(v)); }
  // 16 bf16 = 8 pairs: the even elements widen by a shift, the odd ones by masking the low half
  static F pair_part(const bf16* w, int p) {
    const __m256i wv = _mm256_loadu_si256((const __m256i*)w);
    return _mm256_castsi256_ps(p ? _mm256_and_si256(wv, _mm256_set1_epi32((int)0xffff0000u)) : _mm256_slli_epi32(wv, 16));
  }
  static constexpr int BF16_PARTS = 2;
  static F bf16_part(const bf16* w, int p) { return pair_part(w, p); }
  static F bf16_x(const float* x, int p) { return load(x + 8 * p); }
  static F bf16_mac(F acc, F w, F x) { return fma(w, x, acc); }
  static constexpr int I8_PARTS = 2;  // 16 int8: two halves of 8 lanes
  static F i8_part(const int8_t* w, int p) {
    const __m128i v = _mm_loadu_si128((const __m128i*)w);
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(p ? _mm_unpackhi_epi64(v, v) : v));
  }
};
#elif defined(LLAMA_ISA_NEON)
#include <arm_neon.h>
struct V {
  using F = float32x4_t;
  static constexpr int N = 4, REGS = 32, BF16_BLOCK = 8, ACC = 16;
  static constexpr bool I8_BF16 = false, I8_LUT = false;  // as for AVX2
  static constexpr float EXP_HI = 88.3762626f;  // as for AVX2
  static constexpr const char* ISA = "neon";
  using BF16X = float;
  static void split_bf16(const bf16* x, float* out) {  // 8 bf16 -> 4 even, 4 odd as fp32
    const uint32x4_t v = vreinterpretq_u32_u16(vld1q_u16(x));
    vst1q_f32(out, vreinterpretq_f32_u32(vshlq_n_u32(v, 16)));
    vst1q_f32(out + 4, vreinterpretq_f32_u32(vandq_u32(v, vdupq_n_u32(0xffff0000u))));
  }
  static F zero() { return vdupq_n_f32(0.f); }
  static F set1(float f) { return vdupq_n_f32(f); }
  static F load(const float* p) { return vld1q_f32(p); }
  static void store(float* p, F v) { vst1q_f32(p, v); }
  static F add(F a, F b) { return vaddq_f32(a, b); }
  static F sub(F a, F b) { return vsubq_f32(a, b); }
  static F mul(F a, F b) { return vmulq_f32(a, b); }
  static F div(F a, F b) { return vdivq_f32(a, b); }
  static F min(F a, F b) { return vminq_f32(a, b); }
  static F max(F a, F b) { return vmaxq_f32(a, b); }
  static F fma(F a, F b, F c) { return vfmaq_f32(c, a, b); }
  static F fnma(F a, F b, F c) { return vfmsq_f32(c, a, b); }
  static float sum(F v) { return vaddvq_f32(v); }
  static F round(F v) { return vrndnq_f32(v); }
  static F ldexp(F p, F n) {
    const int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23);
    return vmulq_f32(p, vreinterpretq_f32_s32(e));
  }
  static F load_bf16(const bf16* p) { return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16)); }
  static uint32x4_t rnd_bits(F v) {  // as for AVX2
    const uint32x4_t u = vreinterpretq_u32_f32(v);
    const uint32x4_t odd = vandq_u32(vshrq_n_u32(u, 16), vdupq_n_u32(1));
    const uint32x4_t r = vandq_u32(vaddq_u32(u, vaddq_u32(odd, vdupq_n_u32(0x7fff))), vdupq_n_u32(0xffff0000u));
    return vbslq_u32(vceqq_f32(v, v), r, vdupq_n_u32(0x7fc00000u));
  }
  static void store_bf16(bf16* p, F v) { vst1_u16(p, vshrn_n_u32(rnd_bits(v), 16)); }
  static F rnd_bf16(F v) { return vreinterpretq_f32_u32(rnd_bits(v)); }
  static F pair_part(const bf16* w, int p) {  // 8 bf16 = 4 pairs, as for AVX2
    const uint32x4_t wv = vreinterpretq_u32_u16(vld1q_u16(w));
    return vreinterpretq_f32_u32(p ? vandq_u32(wv, vdupq_n_u32(0xffff0000u)) : vshlq_n_u32(wv, 16));
  }
  static constexpr int BF16_PARTS = 2;
  static F bf16_part(const bf16* w, int p) { return pair_part(w, p); }
  static F bf16_x(const float* x, int p) { return vld1q_f32(x + 4 * p); }
  static F bf16_mac(F acc, F w, F x) { return vfmaq_f32(acc, w, x); }
  static constexpr int I8_PARTS = 4;  // 16 int8 -> 8 int16 (low or high half) -> 4 fp32 (quarter p)
  static F i8_part(const int8_t* w, int p) {
    const int8x8_t h = p < 2 ? vld1_s8(w) : vld1_s8(w + 8);
    const int16x8_t v = vmovl_s8(h);
    return vcvtq_f32_s32(vmovl_s16(p % 2 ? vget_high_s16(v) : vget_low_s16(v)));
  }
};
#else
#error "build with -DLLAMA_ISA_AVX512BF16(_VBMI), -DLLAMA_ISA_AVX512, -DLLAMA_ISA_AVX2 or -DLLAMA_ISA_NEON (see llama/cpu_kernels.py)"
#endif
using F = V::F;
constexpr int N = V::N;
constexpr int I8_BLOCK = 16;  // int8 weights per dot block, every ISA

// Buffers the products read as rows: 64-byte aligned, so that a row of whole vectors never splits a
// cache line (malloc's large blocks start 16 bytes into a page: on Intel every AVX-512 load of such
// a row straddled two lines: the batch-8 step of an 85M-parameter model, 16.5 against 12.1 ms in bf16)
template <typename T> struct Aligned {
  using value_type = T;
  Aligned() = default;
  template <typename U> Aligned(const Aligned<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <typename U> bool operator==(const Aligned<U>&) const { return true; }
  template <typename U> bool operator!=(const Aligned<U>&) const { return false; }
};
template <typename T> using avec = std::vector<T, Aligned<T>>;

// What the step needs from an element type (bf16 or fp32 weights and activations): N-lane fp32
// loads/stores, the round trip that the model's dtype imposes (none in fp32), and a dot block of a
// weight row with an input row as prep (once per product) made it: X elements. A dot block is
// PARTS parts: acc = mac(acc, wpart(w, p), xpart(x, p)) for p = 0, 1, ... (dot: all of them)
template <typename T> struct E;
template <> struct E<bf16> {
  static constexpr int W = V::BF16_BLOCK;
  static constexpr bool IN_ORDER = true;  // prep keeps the elements' order
  using X = V::BF16X;
  static inline float xto(bf16 v) { return b2f(v); }
  static inline float xto(float v) { return v; }
  static void prep(const bf16* x, int64_t M, int64_t K, X* out) {  // (M, K): whole blocks split, the tail as is
    const int64_t KB = K / W * W;
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t k = 0; k < KB; k += W) V::split_bf16(x + m * K + k, out + m * K + k);
      for (int64_t k = KB; k < K; ++k) {
        if constexpr (std::is_same<X, float>::value) out[m * K + k] = b2f(x[m * K + k]);
        else out[m * K + k] = x[m * K + k];
      }
    }
  }
  static inline float to(bf16 v) { return b2f(v); }
  static inline bf16 from(float f) { return f2b(f); }
  static inline float rnd(float f) { return b2f(f2b(f)); }
  static inline F load(const bf16* p) { return V::load_bf16(p); }
  static inline void store(bf16* p, F v) { V::store_bf16(p, v); }
  static inline F rnd(F v) { return V::rnd_bf16(v); }
  static constexpr int PARTS = V::BF16_PARTS;
  static inline F wpart(const bf16* w, int p) { return V::bf16_part(w, p); }
  static inline F xpart(const X* x, int p) { return V::bf16_x(x, p); }
  static inline F mac(F acc, F w, F x) { return V::bf16_mac(acc, w, x); }
  static inline F dot(F acc, const bf16* w, const X* x) {
    for (int p = 0; p < PARTS; ++p) acc = mac(acc, wpart(w, p), xpart(x, p));
    return acc;
  }
};
template <> struct E<float> {
  static constexpr int W = N;
  static constexpr bool IN_ORDER = true;
  using X = float;
  static inline float xto(float v) { return v; }
  static void prep(const float* x, int64_t M, int64_t K, float* out) { std::memcpy(out, x, M * K * sizeof(float)); }
  static inline float to(float v) { return v; }
  static inline float from(float f) { return f; }
  static inline float rnd(float f) { return f; }
  static inline F load(const float* p) { return V::load(p); }
  static inline void store(float* p, F v) { V::store(p, v); }
  static inline F rnd(F v) { return v; }
  static constexpr int PARTS = 1;
  static inline F wpart(const float* w, int) { return V::load(w); }
  static inline F xpart(const float* x, int) { return V::load(x); }
  static inline F mac(F acc, F w, F x) { return V::fma(w, x, acc); }
  static inline F dot(F acc, const float* w, const float* x) { return mac(acc, wpart(w, 0), xpart(x, 0)); }
};
// A product's dot blocks: weights WT (T itself, or int8 with per-row scales: llama/quantize.py's
// Int8Linear) against input rows in the model's type T, which prep lays out once per product as X
// elements; each dot consumes W elements of a weight row and of an input row; w / x: one element as
// fp32 (the K % W tail). int8 weights: on AVX512-BF16 against the bf16 rows as they are, through
// the native bf16 dot; else against the rows widened to fp32, each weight block widened in
// registers (exact either way: gemv applies the scales after the sums)
template <typename WT, typename T, bool ONE_ROW = false> struct Dot : E<T> {  // WT = T
  static constexpr bool LUT = false;
  static inline float w(T v) { return E<T>::to(v); }
  static inline float x(typename E<T>::X v) { return E<T>::xto(v); }
};
template <typename T, bool ONE_ROW> struct Dot<int8_t, T, ONE_ROW> {
  static constexpr bool BF16 = V::I8_BF16 && std::is_same<T, bf16>::value;
  // 64 weights a block by table look-up (i8_bf16_lut) for a one-row product (ONE_ROW): batch tiles,
  // whose accumulators take most registers, ran slower with the tables (batch 8 with the weights in
  // L2: 31 against 41 GB/s)
  static constexpr bool LUT = BF16 && V::I8_LUT && ONE_ROW;
  static constexpr bool IN_ORDER = !LUT;  // the input as prep lays it out: its elements in order
  static constexpr int W = LUT ? 4 * I8_BLOCK : BF16 ? 2 * I8_BLOCK : I8_BLOCK;
  using X = typename std::conditional<BF16, bf16, float>::type;
  static void prep(const T* x, int64_t M, int64_t K, X* out) {  // (M, K): bf16 as is (LUT: each block reordered), else fp32
    if constexpr (LUT) {
      for (int64_t m = 0; m < M; ++m) {
        const T* r = x + m * K;
        X* o = out + m * K;
        int64_t k = 0;
        for (; k + W <= K; k += W) lut_block<>(r + k, o + k);
        for (; k < K; ++k) o[k] = r[k];
      }
    } else if constexpr (std::is_same<X, T>::value) std::memcpy(out, x, M * K * sizeof(T));
    else for (int64_t i = 0; i < M * K; ++i) out[i] = E<T>::to(x[i]);
  }
  template <typename U = V>  // U: V, named through a parameter so ISAs without lut_block compile this
  static void lut_block(const T* r, X* o) { U::lut_block(r, o); }
  static inline float w(int8_t v) { return v; }
  static inline float x(X v) { return E<T>::xto(v); }  // bf16 or fp32
  static constexpr int PARTS = LUT ? 2 : BF16 ? 1 : V::I8_PARTS;
  template <typename U = V>  // U: V, named through a parameter so ISAs without i8_bf16_part compile this
  static inline F wpart(const int8_t* w, int p) {
    if constexpr (LUT) {
      F a, b;
      U::i8_bf16_lut(w, a, b);  // both parts each time: the compiler keeps one look-up where a caller takes both
      return p ? b : a;
    } else if constexpr (BF16) return U::i8_bf16_part(w);
    else return V::i8_part(w, p);
  }
  static inline F xpart(const X* x, int p) {
    if constexpr (LUT) return V::bf16_x(x + 32 * p, 0);
    else if constexpr (BF16) return V::bf16_x(x, 0);  // the bf16 as they are
    else return V::load(x + p * N);
  }
  static inline F mac(F acc, F w, F x) {
    if constexpr (BF16) return V::bf16_mac(acc, w, x);
    else return V::fma(w, x, acc);
  }
  static inline F dot(F acc, const int8_t* w, const X* x) {
    for (int p = 0; p < PARTS; ++p) acc = mac(acc, wpart(w, p), xpart(x, p));
    return acc;
  }
};

// e^x: x = n ln2 + r with |r| <= ln2 / 2, e^r by a degree-6 polynomial (Cephes' coefficients),
// times 2^n; relative error ~1e-7
static inline F vexp(F x) {
  x = V::min(V::max(x, V::set1(-87.3f)), V::set1(V::EXP_HI));
  const F n = V::round(V::mul(x, V::set1(1.44269504088896341f)));
  F r = V::fnma(n, V::set1(0.693359375f), x);
  r = V::fnma(n, V::set1(-2.12194440e-4f), r);
  F p = V::set1(1.9875691500e-4f);
  p = V::fma(p, r, V::set1(1.3981999507e-3f));
  p = V::fma(p, r, V::set1(8.3334519073e-3f));
  p = V::fma(p, r, V::set1(4.1665795894e-2f));
  p = V::fma(p, r, V::set1(1.6666665459e-1f));
  p = V::fma(p, r, V::set1(5.0000001201e-1f));
  p = V::fma(p, V::mul(r, r), V::add(r, V::set1(1.f)));
  return V::ldexp(p, n);
}

// out[i] = the sum of the lanes of a[i], i < n. AVX-512 sums 16 (or 4) registers at once by a tree of
// shuffles and adds, each level halving the lanes per register (46 instructions for 16 sums, against
// ~9 each alone); the order of the additions is a tree either way. Inlined and unrolled whole, so that
// a product tile's accumulators go into the tree from registers (called on them as an array, they
// were stored and loaded again: batch-8 bf16 products 2-15% slower with weights in cache)
#if defined(LLAMA_AVX512)
static inline __m512 halves(__m512 x, __m512 y) {  // (x.q0 + x.q2, x.q1 + x.q3, y.q0 + y.q2, y.q1 + y.q3)
  return _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x44), _mm512_shuffle_f32x4(x, y, 0xEE));
}
static inline __m512 quarters(__m512 x, __m512 y) {  // (x.q0 + x.q1, x.q2 + x.q3, y.q0 + y.q1, y.q2 + y.q3)
  return _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x88), _mm512_shuffle_f32x4(x, y, 0xDD));
}
#endif
__attribute__((always_inline)) static inline void lane_sums(const F* a, int n, float* out) {
#if defined(LLAMA_AVX512)
#pragma GCC unroll 4
  for (; n >= 16; n -= 16, a += 16, out += 16) {
    __m512 c[4];
    for (int i = 0; i < 4; ++i)  // quarter j of c[i]: 4 lanes summing to a[4i + j]'s sum
      c[i] = quarters(halves(a[4 * i], a[4 * i + 1]), halves(a[4 * i + 2], a[4 * i + 3]));
    __m512 d[2];
    for (int i = 0; i < 2; ++i)  // quarter j: (c[2i] lanes 0+2, c[2i+1] lanes 0+2, c[2i] 1+3, c[2i+1] 1+3)
      d[i] = _mm512_add_ps(_mm512_unpacklo_ps(c[2 * i], c[2 * i + 1]), _mm512_unpackhi_ps(c[2 * i], c[2 * i + 1]));
    // quarter j: the sums of a[j], a[4 + j], a[8 + j], a[12 + j]: lane 4j + k holds a[4k + j]'s
    const __m512 f = _mm512_add_ps(_mm512_shuffle_ps(d[0], d[1], 0x44), _mm512_shuffle_ps(d[0], d[1], 0xEE));
    _mm512_storeu_ps(out, _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), f));
  }
#pragma GCC unroll 4
  for (; n >= 4; n -= 4, a += 4, out += 4) {
    __m512 c = quarters(halves(a[0], a[1]), halves(a[2], a[3]));  // quarter j: 4 lanes of a[j]
    c = _mm512_add_ps(c, _mm512_permute_ps(c, 0x4E));
    c = _mm512_add_ps(c, _mm512_permute_ps(c, 0xB1));  // every lane of quarter j: a[j]'s sum
    _mm_storeu_ps(out, _mm512_castps512_ps128(_mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), c)));
  }
#endif
  for (int i = 0; i < n; ++i) out[i] = V::sum(a[i]);
}
#if defined(LLAMA_AVX512)
// o[k] = (r[0][k], ..., r[15][k]): 16 registers of 16 words transposed
static inline void transpose16(const __m512i* r, __m512i* o) {
  __m512i a[16], b[16];
#pragma GCC unroll 16
  for (int i = 0; i < 8; ++i) {  // pairs of rows interleaved: a[2i] lane l = r[2i][4l], r[2i+1][4l], r[2i][4l+1], ...
    a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
#pragma GCC unroll 16
  for (int i = 0; i < 4; ++i) {  // b[4i+c] lane l: rows 4i..4i+3 of word 4l+c
    b[4 * i] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
    b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
  }
#pragma GCC unroll 16
  for (int c = 0; c < 4; ++c) {  // lane l of b[c], b[4+c], b[8+c], b[12+c] -> word 4l+c of all 16 rows
    const __m512i e0 = _mm512_shuffle_i32x4(b[c], b[4 + c], 0x44), e1 = _mm512_shuffle_i32x4(b[c], b[4 + c], 0xEE);
    const __m512i e2 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0x44), e3 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0xEE);
    o[c] = _mm512_shuffle_i32x4(e0, e2, 0x88);
    o[4 + c] = _mm512_shuffle_i32x4(e0, e2, 0xDD);
    o[8 + c] = _mm512_shuffle_i32x4(e1, e3, 0x88);
    o[12 + c] = _mm512_shuffle_i32x4(e1, e3, 0xDD);
  }
}
#endif
// [primitives end]

// Keeps v in a register: without this the compiler folds the load of an input part into each of the
// R multiplies that take it (R loads in place of one: with 8 inputs, more loads than multiplies)
static inline void in_register(F& v) {
#if defined(LLAMA_ISA_NEON)
  __asm__("" : "+w"(v));
#else
  __asm__("" : "+v"(v));
#endif
}

// The products' software prefetches of their weight streams, one per cache line read: STREAM_PF
// bytes ahead in a one-row product's streams (stream_rows; 0: none), TILE_PF in a batch tile's
// (gemv_tile), with locality hint PF_HINT (3: into L1, 2: into L2). Measured on the Xeon without
// AVX512-BF16 (2 cores), the 160M shapes' step (16 layers, dim 768, vocab 32000), paired over 12-20
// interleaved rounds against 4 KB ahead into L2 at batch 1 for bf16/int8, none for fp32, and 8 KB
// ahead into L2 in the tiles: 1 KB ahead into L1 took the AVX-512 build's batch 1 1.08x (bf16),
// 1.08x (fp32), 1.10x (int8), batch 2 1.06x, batch 4 1.09x (bf16) and 1.07x (fp32), batch 6 1.03x,
// batch 8 1.00x; the AVX2 build's batch 1 (no prefetch before) 1.17x (bf16), 1.14x (fp32). 512 B to
// 2 KB ahead were within 2% of each other at batch 1; 2 KB ahead into L2 1.015x. At batch 8 the
// tiles multiply about as long as they read, and with no software prefetch the hardware prefetchers
// alone left them waiting (1.7x slower). On the AMD EPYC with AVX512-BF16 (2 cores, same shapes,
// both builds over the same weights), against no stream prefetch and 8 KB into L2 in the tiles:
// the tiles 2 KB ahead into L1 took batch 2 1.06x, batch 4 1.07x (fp32 1.10x, int8 1.06x), batch
// 6 1.22x, batch 8 1.06x (fp32 1.04x); 1 KB 1.03x and 3-4 KB 1.01-1.02x at batch 8, 2 KB into L2
// 1.06x. Its one-row streams keep no prefetch: 1 KB ahead into L1 was 1.01x, 2 KB 0.96x, 2-4 KB
// into L2 0.90-0.93x. Unmeasured on NEON, which keeps the earlier choice
#if defined(LLAMA_ISA_AVX512) || defined(LLAMA_ISA_AVX2)
constexpr int64_t STREAM_PF = 1024, TILE_PF = 1024;
constexpr int PF_HINT = 3;
#elif defined(LLAMA_ISA_AVX512BF16)
constexpr int64_t STREAM_PF = 0, TILE_PF = 2048;
constexpr int PF_HINT = 3;
#else
constexpr int64_t STREAM_PF = 0, TILE_PF = 8192;
constexpr int PF_HINT = 2;
#endif

// From TRANSPOSED_FROM input rows on, a tile writes each weight row's M sums side by side, TS = 8
// floats apart whatever M (y then is (N, TS), its first M columns the sums: column_block reads 16
// rows of it as 8 whole registers). Into y's rows (M, N) directly, a tile's R x M sums went to M
// rows N floats apart, where N is a multiple of 1024 all in one L1 set, and those stores stalled the
// next tile's loads: on the AMD EPYC with AVX512-BF16, paired over the 160M step, batch 8 1.085-1.112x
// (bf16), 1.135x (fp32), 1.049x (int8), batch 6 1.079x side by side; batch 4 even, batch 2 0.971-0.983x
constexpr int TRANSPOSED_FROM = 5;
constexpr int64_t TS = 8;  // (the decoding step takes up to 8 rows)

// y[m, n + i s] = sum_k x[m, k] w[n + i s, k] for one tile (at y[m ldy + n + i s], or from
// TRANSPOSED_FROM rows on at y[(n + i s) TS + m]): R weight rows s apart by M input rows. The R x M
// accumulators stay in registers while K is walked once, part by part of each dot block: the R
// weight parts widened once, then each input part loaded once into a
// register and used for R dots (untiled, a batch of 8 loads 9 blocks per 8 dots and the load ports,
// not the multiplies, set the pace; with the input parts folded into the multiplies as memory
// operands, the batch-8 step of a 12-layer dim-768 model on the Xeon without AVX512-BF16 was ~10%
// slower in bf16, ~5% in fp32). x holds the input rows block by block: dot block k / B of row m at
// x[k M + m B] (the M rows' blocks side by side, so one pointer reaches them all and x streams in
// order; with the rows apart, their M pointers spilled from the registers: 5-15% slower with the
// weights in cache), then the K % B tails row after row
template <typename D, typename WT, int M, int R>
static inline void gemv_tile(const typename D::X* x, int64_t K, const WT* w, int64_t n, int64_t s, float* y, int64_t ldy) {
  constexpr int B = D::W;
  const int64_t KB = K / B * B;
  const WT* r[R];
  F a[R][M];
  for (int i = 0; i < R; ++i) {
    r[i] = w + (n + i * s) * K;
    for (int m = 0; m < M; ++m) a[i][m] = V::zero();
  }
  // unrolled whole (the accumulators are registers only so); each stream prefetched TILE_PF ahead,
  // on into its next rows
  for (int64_t k = 0; k < KB; k += B) {
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i) __builtin_prefetch((const char*)(r[i] + k) + TILE_PF, 0, PF_HINT);
#pragma GCC unroll 4
    for (int p = 0; p < D::PARTS; ++p) {
      F wv[R];
#pragma GCC unroll 4
      for (int i = 0; i < R; ++i) wv[i] = D::wpart(r[i] + k, p);
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        F xv = D::xpart(x + k * M + m * B, p);
        if constexpr (M > 1) in_register(xv);
#pragma GCC unroll 4
        for (int i = 0; i < R; ++i) a[i][m] = D::mac(a[i][m], wv[i], xv);
      }
    }
  }
  float sums[R * M];
  lane_sums(&a[0][0], R * M, sums);
  for (int i = 0; i < R; ++i)
    for (int m = 0; m < M; ++m) {
      float v = sums[i * M + m];
      for (int64_t kk = KB; kk < K; ++kk) v += D::w(r[i][kk]) * D::x(x[KB * M + m * (K - KB) + kk - KB]);
      y[M >= TRANSPOSED_FROM ? (n + i * s) * TS + m : m * ldy + n + i * s] = v;
    }
}

// Rows n0..n1 for M input rows, in tiles of R weight rows (as many as V::ACC accumulators allow,
// up to 4: AVX-512 holds 3 rows x 8 inputs). The rows are cut into R equal sub-ranges and tile j
// takes row j of each, so the tiles read R weight streams, each contiguous from its sub-range's
// first row to its last: the hardware prefetchers follow long streams (here 2.5x the bandwidth of
// adjacent rows tile by tile, whose R streams jump every row). The AVX512-BF16 builds take 2 rows
// (streams) for 2-4 inputs: on the AMD EPYC with them, paired against 4 over the same weights, bf16
// batch 2 1.065x, 3 1.090x, 4 1.054x, fp32 batch 2 1.022x, 4 1.068x, int8 batch 4 1.020x; at batch 6
// and 8 two were no faster (8: 1.025x in a low-bandwidth minute, 0.967x in a high one; fp32 0.893x).
// Here tiles a..b of the range's unit_rows(M) = R, and with `rest` its last < R rows one by one
// One input row (stream_rows) is read as ONE_ROW_STREAMS streams a thread: 2 in the AVX512-BF16
// builds (against 4 on the AMD EPYC, paired: bf16 1.040x, int8 1.065x, fp32 1.026x at a probe of
// 74-85 GB/s; 1.022x, 1.008x, 0.998x at 48-51; 3 streams: 1.011-1.015x), 4 elsewhere
#if defined(LLAMA_ISA_AVX512BF16)
constexpr int FEW_ROWS_TILE = 2, ONE_ROW_STREAMS = 2;
#else
constexpr int FEW_ROWS_TILE = 4, ONE_ROW_STREAMS = 4;  // (unmeasured elsewhere: the choice before)
#endif
constexpr int unit_rows(int64_t M) {
  return M == 1 ? ONE_ROW_STREAMS : std::max(1, std::min(M <= 4 ? FEW_ROWS_TILE : 4, V::ACC / (int)M));
}
template <typename D, typename WT, int M>
static void gemv_rows(const typename D::X* x, int64_t K, const WT* w, int64_t n0, int64_t n1, int64_t a, int64_t b, bool rest,
                      float* y, int64_t ldy) {
  constexpr int R = unit_rows(M);
  const int64_t step = (n1 - n0) / R;
  for (int64_t j = a; j < b; ++j) gemv_tile<D, WT, M, R>(x, K, w, n0 + j, step, y, ldy);
  if (rest)
    for (int64_t n = n0 + R * step; n < n1; ++n) gemv_tile<D, WT, M, 1>(x, K, w, n, 0, y, ldy);
}

// One input row: the thread's rows are walked as S interleaved sub-ranges, S weight streams at
// once (more reads in flight: on the Xeon ~10% more bandwidth than one stream), two accumulators each to
// hide the dot latency. Here steps a..b (of S rows, S = unit_rows(1)), and with `rest` the last < S rows
// Rows first, first + step, ... (S of them) as S streams; step 0: S copies of one row, whose sums are
// then those the row gets in any unit (lane_sums reduces every register alike)
template <typename D, typename WT>
static inline void stream_rows(const typename D::X* x, int64_t K, const WT* w, int64_t first, int64_t step, float* y) {
  constexpr int B = D::W, S = unit_rows(1);
  const int64_t KB = K / B * B, K2 = K / (2 * B) * (2 * B);
  F a[S], b[S];
  const WT* r[S];
  for (int s = 0; s < S; ++s) { a[s] = V::zero(); b[s] = a[s]; r[s] = w + (first + s * step) * K; }
  for (int64_t k = 0; k < K2; k += 2 * B)
    for (int s = 0; s < S; ++s) {
      if constexpr (STREAM_PF > 0) {  // this step's weights (one or two cache lines), STREAM_PF on
        __builtin_prefetch((const char*)(r[s] + k) + STREAM_PF, 0, PF_HINT);
        if constexpr (2 * B * sizeof(WT) > 64) __builtin_prefetch((const char*)(r[s] + k + B) + STREAM_PF, 0, PF_HINT);
      }
      a[s] = D::dot(a[s], r[s] + k, x + k);
      b[s] = D::dot(b[s], r[s] + k + B, x + k + B);
    }
  if (K2 < KB)  // one whole block left
    for (int s = 0; s < S; ++s) a[s] = D::dot(a[s], r[s] + K2, x + K2);
  float sums[S];
  for (int s = 0; s < S; ++s) a[s] = V::add(a[s], b[s]);
  lane_sums(a, S, sums);
  for (int s = 0; s < S; ++s) {
    float v = sums[s];
    for (int64_t k = KB; k < K; ++k) v += D::w(r[s][k]) * D::x(x[k]);
    y[first + s * step] = v;
  }
}
template <typename D, typename WT>
static void gemv_streams(const typename D::X* x, int64_t K, const WT* w, int64_t n0, int64_t n1, int64_t i0, int64_t i1, bool rest,
                         float* y) {
  constexpr int S = unit_rows(1);
  const int64_t step = (n1 - n0) / S;
  for (int64_t i = i0; i < i1; ++i) stream_rows<D, WT>(x, K, w, n0 + i, step, y);
  if (rest)  // each row summed as in a unit, so that no result depends on the threads' ranges
    for (int64_t n = n0 + S * step; n < n1; ++n) stream_rows<D, WT>(x, K, w, n, 0, y);
}

// The decoding step's threads as one team (as_team, around run_step): one OpenMP region a step, in
// which thread 0 runs the step and the others wait, spinning, for its parallel pieces (par: the
// ranges at::parallel_for would give). A piece costs the threads meeting at two spin barriers where
// a region of its own costs OpenMP's fork and join (1.24-1.29 us a region with 2 threads against
// 0.17-0.18 us, timed alone), ~80 times a 160M step. Paired against a region a piece, the 160M
// bf16 step on the AMD EPYC with AVX512-BF16 (2 cores), five runs of ~10 rounds in high-bandwidth
// minutes (probe 70-85 GB/s): batch 1 1.005-1.039x (median 1.013x), batch 8 1.018-1.032x (1.028x);
// about even in low ones (batch 1 0.999x, batch 8 1.006x). The spare worker prefetching its next
// product's first 128-256 KB into L2 during the attention, batch 1: 0.98-1.01x of the team alone
static inline void relax() {
#if defined(__x86_64__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}
struct Team {
  int n = 1;  // threads, set by thread 0 before its first piece
  alignas(64) std::atomic<uint32_t> gen{0};
  alignas(64) std::atomic<int> done{0};
  void (*fn)(const void*, int) = nullptr;
  const void* ctx = nullptr;
  bool stop = false;
  std::atomic<bool> failed{false};
  std::exception_ptr err;
  static inline thread_local Team* current = nullptr;  // the team of this thread, while a step runs
  static inline thread_local bool in_piece = false;
  // run(t) on every thread t of the team, the caller being thread 0; back when all have run it (a
  // piece's exception is thrown again here, after the others finished theirs)
  template <typename R>
  void dispatch(const R& run) {
    fn = [](const void* c, int t) { (*static_cast<const R*>(c))(t); };
    ctx = &run;
    done.store(0, std::memory_order_relaxed);
    gen.fetch_add(1, std::memory_order_release);
    in_piece = true;
    try { run(0); } catch (...) { in_piece = false; wait(); throw; }
    in_piece = false;
    wait();
    if (failed.load()) std::rethrow_exception(err);
  }
  void wait() { while (done.load(std::memory_order_acquire) < n - 1) relax(); }
  void work(int t) {  // threads 1..n-1: each piece published (gen) until the team stops
    uint32_t seen = 0;
    for (;;) {
      uint32_t g;
      while ((g = gen.load(std::memory_order_acquire)) == seen) relax();
      seen = g;
      if (stop) return;
      in_piece = true;
      try { fn(ctx, t); } catch (...) { if (!failed.exchange(true)) err = std::current_exception(); }
      in_piece = false;
      done.fetch_add(1, std::memory_order_release);
    }
  }
};
static inline int64_t par_threads() { return Team::current ? Team::current->n : at::get_num_threads(); }
static inline bool par_nested() { return Team::current ? Team::in_piece : at::in_parallel_region(); }
// at::parallel_for, or within a step its team's piece with the same ranges
template <typename F>
static void par(int64_t b, int64_t e, int64_t grain, const F& f) {
  Team* tm = Team::current;
  if (!tm || Team::in_piece) return at::parallel_for(b, e, grain, f);
  if (b >= e) return;
  const int64_t n = e - b;
  if (n <= grain || n == 1 || tm->n == 1) return f(b, e);
  const int64_t nt = std::min<int64_t>(tm->n, grain > 0 ? (n + grain - 1) / grain : n), chunk = (n + nt - 1) / nt;
  tm->dispatch([&](int t) {
    const int64_t s = b + t * chunk;
    if (t < nt && s < e) {
      at::internal::ThreadIdGuard g(t);
      f(s, std::min(e, s + chunk));
    }
  });
}
// body() on thread 0 of a team of torch's threads (one OpenMP region), par's pieces on all of them;
// as it is where there is one thread or a region or team already
template <typename Fn>
static auto as_team(const Fn& body) -> decltype(body()) {
#if defined(_OPENMP)
  const int nth = (int)at::get_num_threads();
  if (nth > 1 && !at::in_parallel_region() && !Team::current) {
    Team tm;
    decltype(body()) out;
    std::exception_ptr err;
#pragma omp parallel
    {
      const int t = omp_get_thread_num();
      at::internal::ThreadIdGuard g(t);
      c10::ParallelGuard pg(true);
      Team::current = &tm;
      if (t == 0) {
        tm.n = omp_get_num_threads();  // (the workers read it only after the first piece is published)
        try { out = body(); } catch (...) { err = std::current_exception(); }
        tm.stop = true;
        tm.gen.fetch_add(1, std::memory_order_release);
      } else {
        tm.work(t);
      }
      Team::current = nullptr;
    }
    if (err) std::rethrow_exception(err);
    return out;
  }
#endif
  return body();
}
// Units 0..units(lo, hi) of every thread's rows lo..hi (N / threads of them, in order) run through
// run(lo, hi, a, b, rest) (units a..b; rest: also the rows past the last whole unit, once). A
// thread takes its own units from the front, a quarter of what it has left at a time (at least C),
// then helps: half of what is left at the back of whichever other range has the most, while that
// is at least 2C. Split once, by halves, a core slowed by another tenant of the machine left the
// other waiting: 1-6 ms of a ~20 ms bf16 batch-8 step on the 2-core Xeon. Each take is a locked
// exchange and a call; taking C at a time (a batch-1 bf16 take: 12 KB of weights, ~0.3 us of one
// thread's reading) and stealing C from any range with units left, the AMD EPYC with AVX512-BF16
// decoded slower: this way, paired over the 160M step in its high-bandwidth minutes (probe 75-85
// GB/s), bf16 batch 1 1.09-1.10x, batch 8 1.03x (fp32 and int8 1.00x at batch 1, 1.03-1.04x at 8;
// in the low minutes 0.96-1.04x, mostly 1.00-1.02x); one call a thread without help was ~1.01x
// faster still
template <int64_t C, typename U, typename F>
static void shared_rows(int64_t N, int64_t grain, U units, F run) {
  const int64_t nth = std::max<int64_t>(1, std::min<int64_t>(par_threads(), N / grain));
  if (nth == 1 || par_nested()) return run(0, N, 0, units(0, N), true);
  struct alignas(64) Left { std::atomic<uint64_t> v; };  // the unclaimed units: front (low half), back (high)
  std::unique_ptr<Left[]> left(new Left[nth]);
  auto lo = [&](int64_t t) { return N * t / nth; };
  for (int64_t t = 0; t < nth; ++t) left[t].v = (uint64_t)units(lo(t), lo(t + 1)) << 32;
  auto take = [&](int64_t t, bool back, int64_t& a, int64_t& b) {
    uint64_t v = left[t].v.load();
    for (;;) {
      const uint64_t f = v & 0xffffffffu, k = v >> 32;
      if (f >= k) return false;
      const uint64_t n = k - f;
      if (back && n < 2 * C) return false;
      const uint64_t h = back ? n / 2 : std::min(n, std::max<uint64_t>(C, n / 4));
      const uint64_t nf = back ? f : f + h, nk = back ? k - h : k;
      if (left[t].v.compare_exchange_weak(v, nk << 32 | nf)) {
        a = back ? (int64_t)nk : (int64_t)f;
        b = back ? (int64_t)k : (int64_t)nf;
        return true;
      }
    }
  };
  par(0, nth, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      int64_t a, b;
      run(lo(t), lo(t + 1), 0, 0, true);  // the range's last rows
      while (take(t, false, a, b)) run(lo(t), lo(t + 1), a, b, false);
      for (;;) {
        int64_t u = -1, most = 0;
        for (int64_t o = 0; o < nth; ++o) {
          const uint64_t v = left[o].v.load();
          const int64_t n = (int64_t)(v >> 32) - (int64_t)(v & 0xffffffffu);
          if (o != t && n >= 2 * C && n > most) { most = n; u = o; }
        }
        if (u < 0) break;
        if (take(u, true, a, b)) run(lo(u), lo(u + 1), a, b, false);
      }
    }
  });
}

// Columns n..n+c (c <= 16) of the transposed sums yt (columns, TS) (gemv_tile), their first M <= TS
// as rows 16 floats apart: b[m 16 + i] = yt[(n + i) TS + m]. AVX-512: a whole block is 8 registers
// (2 columns each), turned around by 3 rounds of 8 two-register permutes (a 16 x 16 transpose of
// M-float columns, 16 masked loads and 64 shuffles, left the 160M batch-8 bf16 step on the AMD EPYC
// with AVX512-BF16 1.017-1.028x slower, paired)
static inline void column_block(const float* yt, int64_t M, int64_t n, int64_t c, float* b) {
#if defined(LLAMA_AVX512)
  if (c == 16) {
    static_assert(TS == 8, "column_block's permutes take 2 columns of 8 a register");
    struct alignas(64) Ix { int32_t v[3][2][16]; };  // round s, half h: lane l's source (16 + i: the second register's lane i)
    static const Ix ix = [] {
      Ix x;
      for (int h = 0; h < 2; ++h)
        for (int l = 0; l < 16; ++l) {
          x.v[0][h][l] = (l % 4 / 2) * 16 + (l % 2) * 8 + 4 * h + l / 4;  // rows 4h..4h+3 of 4 columns: lane 4 row + column
          x.v[1][h][l] = (l % 8 / 4) * 16 + (2 * h + l / 8) * 4 + l % 4;   // rows 2h, 2h+1 of those: lane 8 row + column of 8
          x.v[2][h][l] = (l / 8) * 16 + h * 8 + l % 8;                    // row h of those two: 16 columns
        }
      return x;
    }();
    const __m512i i00 = _mm512_load_si512(ix.v[0][0]), i01 = _mm512_load_si512(ix.v[0][1]), i10 = _mm512_load_si512(ix.v[1][0]),
                  i11 = _mm512_load_si512(ix.v[1][1]), i20 = _mm512_load_si512(ix.v[2][0]), i21 = _mm512_load_si512(ix.v[2][1]);
    __m512 r[8], t[8], u[8];
    for (int j = 0; j < 8; ++j) r[j] = _mm512_loadu_ps(yt + (n + 2 * j) * TS);
    for (int k = 0; k < 4; ++k) {  // t[2k + h]: rows 4h..4h+3 of columns 4k..4k+3
      t[2 * k] = _mm512_permutex2var_ps(r[2 * k], i00, r[2 * k + 1]);
      t[2 * k + 1] = _mm512_permutex2var_ps(r[2 * k], i01, r[2 * k + 1]);
    }
    for (int p = 0; p < 2; ++p)  // u[4p + 2h + g]: rows 4h + 2g, +1 of columns 8p..8p+7
      for (int h = 0; h < 2; ++h) {
        u[4 * p + 2 * h] = _mm512_permutex2var_ps(t[4 * p + h], i10, t[4 * p + 2 + h]);
        u[4 * p + 2 * h + 1] = _mm512_permutex2var_ps(t[4 * p + h], i11, t[4 * p + 2 + h]);
      }
    for (int q = 0; q < 4; ++q) {  // rows 2q, 2q + 1: columns 0..7 from u[q], 8..15 from u[4 + q]
      if (2 * q < M) _mm512_store_ps(b + 2 * q * 16, _mm512_permutex2var_ps(u[q], i20, u[4 + q]));
      if (2 * q + 1 < M) _mm512_store_ps(b + (2 * q + 1) * 16, _mm512_permutex2var_ps(u[q], i21, u[4 + q]));
    }
    return;
  }
#endif
  for (int64_t i = 0; i < c; ++i)
    for (int64_t m = 0; m < M; ++m) b[m * 16 + i] = yt[(n + i) * TS + m];
}
// f(n, c, b) for the blocks of 16 columns of yt (cols, TS) (b: column_block's), threads over blocks
template <typename Fn>
static void by_columns(const float* yt, int64_t cols, int64_t M, int64_t grain, Fn f) {
  par(0, (cols + 15) / 16, grain, [&](int64_t j0, int64_t j1) {
    alignas(64) float b[16 * 16];
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t n = 16 * j, c = std::min<int64_t>(16, cols - n);
      column_block(yt, M, n, c, b);
      f(n, c, b);
    }
  });
}
// y (M, cols) = the first M columns of yt (cols, TS) transposed, with `round` rounded to T
template <typename T>
static void rows_of(const float* yt, int64_t cols, int64_t M, float* y, bool round) {
  by_columns(yt, cols, M, 64, [&](int64_t n, int64_t c, const float* b) {
    for (int64_t m = 0; m < M; ++m) {
      float* o = y + m * cols + n;
      const float* bm = b + m * 16;
      int64_t i = 0;
      for (; i + N <= c; i += N) V::store(o + i, round ? E<T>::rnd(V::load(bm + i)) : V::load(bm + i));
      for (; i < c; ++i) o[i] = round ? E<T>::rnd(bm[i]) : bm[i];
    }
  });
}

// What a product's caller takes (gemv): its rows y (M, N); those rows rounded to the model's dtype
// (the logits); or, from TRANSPOSED_FROM rows on, the tiles' (N, TS) sums as they are (y then needs
// room for N TS floats), for a consumer that reads them by column_block (silu_t)
enum class Out { ROWS, ROUNDED, EITHER };

// y (M, N) float = x (M, K) @ w (N, K)^T, output rows shared between threads (shared_rows). x is in the model's
// type T; the weights WT are T too, or int8 with `scales` (N,) in T, where y[m, n] =
// round_T(x[m] . w[n]) * scales[n]: Int8Linear's rounding of the product to the model's dtype before
// its scale (the caller rounds the result again, as it does for every product)
template <typename D, typename T, typename WT>
static bool gemv_as(const T* xt, int64_t M, int64_t K, const WT* w, int64_t N, float* y, const T* scales, Out out) {
  using X = typename D::X;
  const X* x = nullptr;
  if constexpr (std::is_same<X, T>::value && D::IN_ORDER)
    if (M == 1) x = xt;  // one row: its blocks in order are already the layout below
  if (!x) {  // the input rows as the tiles read them (gemv_tile), laid out once per product
    constexpr int64_t B = D::W;
    const int64_t KB = K / B * B;
    static thread_local avec<X> buf, row;
    buf.resize(M * K);
    row.resize(K);
    if (M == 1) D::prep(xt, 1, K, buf.data());  // one row: the layout is prep's
    else for (int64_t m = 0; m < M; ++m) {
      D::prep(xt + m * K, 1, K, row.data());
      for (int64_t k = 0; k < KB; k += B) std::memcpy(buf.data() + k * M + m * B, row.data() + k, B * sizeof(X));
      std::memcpy(buf.data() + KB * M + m * (K - KB), row.data() + KB, (K - KB) * sizeof(X));
    }
    x = buf.data();
  }
  // From TRANSPOSED_FROM rows on (gemv_tile) the sums go to yt (N, TS): y itself where the caller
  // takes them so (Out::EITHER), else a buffer, then into y
  static thread_local avec<float> ytb;
  const bool tr = M >= TRANSPOSED_FROM, keep = tr && out == Out::EITHER;
  if (tr && !keep) ytb.resize(N * TS);
  float* yt = tr && !keep ? ytb.data() : y;
  const int64_t R = unit_rows(M);
  shared_rows<4>(N, 64, [&](int64_t n0, int64_t n1) { return (n1 - n0) / R; }, [&](int64_t n0, int64_t n1, int64_t a, int64_t b, bool rest) {
    if constexpr (D::LUT) return gemv_streams<D, WT>(x, K, w, n0, n1, a, b, rest, y);  // one row only
    switch (M) {
      case 1: gemv_streams<D, WT>(x, K, w, n0, n1, a, b, rest, y); break;
      case 2: gemv_rows<D, WT, 2>(x, K, w, n0, n1, a, b, rest, yt, N); break;
      case 3: gemv_rows<D, WT, 3>(x, K, w, n0, n1, a, b, rest, yt, N); break;
      case 4: gemv_rows<D, WT, 4>(x, K, w, n0, n1, a, b, rest, yt, N); break;
      case 5: gemv_rows<D, WT, 5>(x, K, w, n0, n1, a, b, rest, yt, N); break;
      case 6: gemv_rows<D, WT, 6>(x, K, w, n0, n1, a, b, rest, yt, N); break;
      case 7: gemv_rows<D, WT, 7>(x, K, w, n0, n1, a, b, rest, yt, N); break;
      default: gemv_rows<D, WT, 8>(x, K, w, n0, n1, a, b, rest, yt, N); break;
    }
  });
  if (scales)
    par(0, N, 2048, [&](int64_t n0, int64_t n1) {
      if (tr)  // (N, TS)
        for (int64_t n = n0; n < n1; ++n)
          for (int64_t m = 0; m < M; ++m) yt[n * TS + m] = E<T>::rnd(yt[n * TS + m]) * E<T>::to(scales[n]);
      else
        for (int64_t m = 0; m < M; ++m)
          for (int64_t n = n0; n < n1; ++n) y[m * N + n] = E<T>::rnd(y[m * N + n]) * E<T>::to(scales[n]);
    });
  if (tr && !keep) rows_of<T>(yt, N, M, y, out == Out::ROUNDED);
  else if (!tr && out == Out::ROUNDED)  // on both threads past 4096 vectors
    par(0, (M * N + ::N - 1) / ::N, 4096, [&](int64_t b0, int64_t b1) {
      int64_t i = b0 * ::N;
      const int64_t e = std::min(b1 * ::N, M * N);
      for (; i + ::N <= e; i += ::N) V::store(y + i, E<T>::rnd(V::load(y + i)));
      for (; i < e; ++i) y[i] = E<T>::rnd(y[i]);
    });
  return keep;
}

// (true: y holds the (N, TS) sums, as Out::EITHER allows)
template <typename T, typename WT = T>
static bool gemv(const T* xt, int64_t M, int64_t K, const WT* w, int64_t N, float* y, const T* scales = nullptr,
                 Out out = Out::ROWS) {
  if constexpr (Dot<WT, T, true>::LUT)
    if (M == 1) return gemv_as<Dot<WT, T, true>>(xt, M, K, w, N, y, scales, out);
  return gemv_as<Dot<WT, T>>(xt, M, K, w, N, y, scales, out);
}

// The cached values as the decoding step's attention widens them to fp32: a head's whole blocks
// of W elements as PARTS registers each, the D % W tail one by one. bf16 (every ISA): a block is 2N
// elements, part 0 the even ones and part 1 the odd ones, one instruction a register (the pairs
// shifted or masked in place; widening N in order took two). So the values' sums are kept in that
// slot order: `join` lays them back in memory order and rounds them to T. fp32: N as they are
template <typename T> struct Wide;
template <> struct Wide<bf16> {
  static constexpr int W = 2 * N, PARTS = 2;
  static inline F part(const bf16* v, int p) { return V::pair_part(v, p); }
  static void join(const float* x, int64_t D, bf16* out) {
    int64_t d = 0;
    for (; d + W <= D; d += W) {
      bf16 e[N], o[N];
      V::store_bf16(e, V::load(x + d));
      V::store_bf16(o, V::load(x + d + N));
      for (int i = 0; i < N; ++i) { out[d + 2 * i] = e[i]; out[d + 2 * i + 1] = o[i]; }
    }
    for (; d < D; ++d) out[d] = f2b(x[d]);
  }
};
template <> struct Wide<float> {
  static constexpr int W = N, PARTS = 1;
  static inline F part(const float* v, int) { return V::load(v); }
  static void join(const float* x, int64_t D, float* out) { std::copy(x, x + D, out); }
};

// The decoding step's attention, for query heads h0..h1 of one row; query head hd reads kv head
// hd / rep, found by counting (a division per head and position was ~30% of the attention's time).
// head_scores: out[hd os] = scale q_hd . k_(hd / rep) against one position's keys k (kv head j at
// k + j D), q as E<T>::prep lays out an input row (head hd at q + hd D, exact in T: the query is
// rounded), so a head's dot is that of a product's: with AVX512-BF16, D / 32 native bf16 dots; else
// bf16 pairs widened in registers, fp32 FMAs. DB: D / E<T>::W where the caller knows it (0: any),
// so the dot blocks unroll. Up to 16 heads at once, their lanes summed together. Against q widened
// to fp32 pairs in every build (an inner loop of D / 16 FMAs a head), the 160M model's batch-8
// bf16 step on the AMD EPYC with AVX512-BF16 spent 1.34 -> 1.15 ms a step in its attention
// (paired, probe 72-86 GB/s), batch 1 0.22 -> 0.19 ms
template <typename T, int DB>
static inline void head_scores(const typename E<T>::X* q, const T* k, int64_t D, int64_t rep, int64_t h0, int64_t h1,
                               float scale, float* out, int64_t os) {
  constexpr int B = E<T>::W;
  const int64_t DW = DB ? DB * B : D / B * B;
  int64_t kh = h0 / rep, r = h0 % rep;
  for (int64_t g = h0; g < h1; g += 16) {
    const int n = (int)std::min<int64_t>(16, h1 - g);
    F a[16];
    const T* kr[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i)
      if (i < n) {
        kr[i] = k + kh * D;
        const typename E<T>::X* qi = q + (g + i) * D;
        F v = V::zero();
        if constexpr (DB > 0) {
#pragma GCC unroll 8
          for (int d = 0; d < DB; ++d) v = E<T>::dot(v, kr[i] + d * B, qi + d * B);
        } else {
          for (int64_t d = 0; d < DW; d += B) v = E<T>::dot(v, kr[i] + d, qi + d);
        }
        a[i] = v;
        if (++r == rep) { r = 0; ++kh; }
      }
    float sums[16];
    lane_sums(a, n, sums);
    for (int i = 0; i < n; ++i) {
      for (int64_t d = DW; d < D; ++d) sums[i] += E<T>::xto(q[(g + i) * D + d]) * E<T>::to(kr[i][d]);
      out[(g + i) * os] = sums[i] * scale;
    }
  }
}
template <typename T>
static inline void head_scores(const typename E<T>::X* q, const T* k, int64_t D, int64_t rep, int64_t h0, int64_t h1,
                               float scale, float* out, int64_t os) {
  if (D == 2 * E<T>::W) head_scores<T, 2>(q, k, D, rep, h0, h1, scale, out, os);
  else if (D == 4 * E<T>::W) head_scores<T, 4>(q, k, D, rep, h0, h1, scale, out, os);
  else head_scores<T, 0>(q, k, D, rep, h0, h1, scale, out, os);
}
// head_values: acc[hd D + d] += sum_t p[hd ps + t] v[t vs + (hd / rep) D + d], t ascending, for
// positions t < nt, acc in slot order, in blocks of TB positions: a block's value rows are read
// from memory once (into L1) and each head's sums stay in registers across the block. The block's
// rows are read head by head (D elements of each), so the hardware sees no stream in them: while a
// block is summed, the next one is asked for into L1, a share with each head (the values are
// already in L2 where the keys' pass fetched them). Without it, the 160M model's batch-8 bf16 step
// on the AMD EPYC with AVX512-BF16 spent 1.20 ms a step in its attention, with it 1.12 (paired)
template <typename T>
static inline void head_values(const float* p, int64_t ps, int64_t nt, const T* v, int64_t vs, int64_t D, int64_t rep,
                               int64_t h0, int64_t h1, float* acc) {
  using C = Wide<T>;
  constexpr int TB = 8;
  const int64_t DW = D / C::W * C::W;
  for (int64_t t0 = 0; t0 < nt; t0 += TB) {
    const int tb = (int)std::min<int64_t>(TB, nt - t0);
    int64_t kh = h0 / rep, r = h0 % rep;
    // the next block's rows (contiguous) asked for into L1 a share a head
    const char* next = (const char*)(v + (t0 + TB) * vs);
    const int64_t bytes = std::max<int64_t>(0, std::min<int64_t>(TB, nt - t0 - TB)) * vs * (int64_t)sizeof(T);
    const int64_t share = (bytes / 64 + (h1 - h0) - 1) / (h1 - h0) * 64;
    int64_t asked = 0;
    for (int64_t hd = h0; hd < h1; ++hd) {
      for (const int64_t upto = std::min(bytes, asked + share); asked < upto; asked += 64) __builtin_prefetch(next + asked, 0, 3);
      const T* vh = v + t0 * vs + kh * D;
      const float* ph = p + hd * ps + t0;
      float* ah = acc + hd * D;
      for (int64_t d = 0; d < DW; d += C::W) {
        F a[C::PARTS];
        for (int q = 0; q < C::PARTS; ++q) a[q] = V::load(ah + d + q * N);
        for (int t = 0; t < tb; ++t) {
          const F pt = V::set1(ph[t]);
          for (int q = 0; q < C::PARTS; ++q) a[q] = V::fma(pt, C::part(vh + t * vs + d, q), a[q]);
        }
        for (int q = 0; q < C::PARTS; ++q) V::store(ah + d + q * N, a[q]);
      }
      for (int64_t d = DW; d < D; ++d)
        for (int t = 0; t < tb; ++t) ah[d] += ph[t] * E<T>::to(vh[t * vs + d]);
      if (++r == rep) { r = 0; ++kh; }
    }
  }
}

// RMSNorm as the model computes it, for M rows: statistics in fp32, the normalised value rounded to
// the model's dtype, times the weight, rounded again. Threads over rows (from 16 rows)
template <typename T>
static void norm_rows(const T* h, int64_t M, int64_t dim, const T* w, double eps, T* out) {
  par(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const T* x = h + m * dim;
      F acc = V::zero();
      int64_t i = 0;
      for (; i + N <= dim; i += N) { const F v = E<T>::load(x + i); acc = V::fma(v, v, acc); }
      float ss = V::sum(acc);
      for (; i < dim; ++i) { const float v = E<T>::to(x[i]); ss += v * v; }
      const float inv = 1.f / std::sqrt(ss / dim + (float)eps);
      const F iv = V::set1(inv);
      T* o = out + m * dim;
      for (i = 0; i + N <= dim; i += N) E<T>::store(o + i, V::mul(E<T>::rnd(V::mul(E<T>::load(x + i), iv)), E<T>::load(w + i)));
      for (; i < dim; ++i) o[i] = E<T>::from(E<T>::rnd(E<T>::to(x[i]) * inv) * E<T>::to(w[i]));
    }
  });
}


// (M, 2 hidden) rows of a|b (Y: the model's type T, or fp32 sums still to be rounded to it) -> (M, hidden)
// rows of round(silu(a)) * b, rounded: the model's SwiGLU roundings. Threads over pieces of C columns
// of every row, from 16 pieces (a decoding step's few rows are shared too: 8 rows of 2048 on one
// thread were ~2.5% of the bf16 batch-8 step on the Xeon without AVX512-BF16)
template <typename T>
static inline F silu_times(F a, F b) {  // round(silu(a)) * b, a and b in T already (the caller rounds the product)
  return V::mul(E<T>::rnd(V::div(a, V::add(V::set1(1.f), vexp(V::sub(V::zero(), a))))), b);
}
template <typename T>
static inline float silu_times(float a, float b) { return E<T>::rnd(a / (1.f + std::exp(-a))) * b; }
template <typename T, typename Y>
static void silu_rows(const Y* y, int64_t M, int64_t hidden, T* out) {
  constexpr int64_t C = 512;
  const int64_t pieces = (hidden + C - 1) / C;
  par(0, M * pieces, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t m = it / pieces, c1 = std::min(hidden, (it % pieces + 1) * C);
      const Y* ya = y + m * 2 * hidden;
      const Y* yb = ya + hidden;
      T* o = out + m * hidden;
      int64_t i = it % pieces * C;
      for (; i + N <= c1; i += N) {  // (Y in T already: its values need no rounding)
        F a = E<Y>::load(ya + i), b = E<Y>::load(yb + i);
        if constexpr (!std::is_same<Y, T>::value) { a = E<T>::rnd(a); b = E<T>::rnd(b); }
        E<T>::store(o + i, silu_times<T>(a, b));
      }
      for (; i < c1; ++i) o[i] = E<T>::from(silu_times<T>(E<T>::rnd(E<Y>::to(ya[i])), E<T>::rnd(E<Y>::to(yb[i]))));
    }
  });
}

// silu_rows of the w1|w3 product's (2 hidden, TS) sums as gemv leaves them (Out::EITHER), read by
// column_block: the same vector and scalar columns, so the same values. With column_block's
// permutes, against the 16 x 16 transpose in rows_of then silu_rows (one pass and one parallel
// region more), the 160M batch-8 bf16 step on the AMD EPYC with AVX512-BF16 ran 1.017x in a
// high-bandwidth minute (probes 76-86 GB/s), 1.006x in a low one (paired; batch 5 1.008x, 6 1.004x,
// fp32 and int8 even). The residual adds read the same way were even (kept on rows)
template <typename T>
static void silu_t(const float* yt, int64_t M, int64_t hidden, T* out) {
  par(0, (hidden + 15) / 16, 32, [&](int64_t j0, int64_t j1) {
    alignas(64) float a[16 * 16], b[16 * 16];
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t n = 16 * j, c = std::min<int64_t>(16, hidden - n);
      column_block(yt, M, n, c, a);
      column_block(yt, M, hidden + n, c, b);
      for (int64_t m = 0; m < M; ++m) {
        T* o = out + m * hidden + n;
        const float *am = a + m * 16, *bm = b + m * 16;
        int64_t i = 0;
        for (; i + N <= c; i += N) E<T>::store(o + i, silu_times<T>(E<T>::rnd(V::load(am + i)), E<T>::rnd(V::load(bm + i))));
        for (; i < c; ++i) o[i] = E<T>::from(silu_times<T>(E<T>::rnd(am[i]), E<T>::rnd(bm[i])));
      }
    }
  });
}

// h[i] = h[i] + round(y[i]): a residual add in the model's dtype
template <typename T>
static void residual(T* h, const float* y, int64_t n) {
  int64_t i = 0;
  for (; i + N <= n; i += N) E<T>::store(h + i, V::add(E<T>::load(h + i), E<T>::rnd(V::load(y + i))));
  for (; i < n; ++i) h[i] = E<T>::from(E<T>::to(h[i]) + E<T>::rnd(y[i]));
}

// torch.argmax of n floats: the first index of the largest, a NaN counting as larger than any number
// (so the first NaN). A vector max, then a scan for its first index; where a NaN or an infinity is
// among them (some x - x not 0) the scalar loop decides
static int64_t argmax(const float* r, int64_t n) {
  if (n >= N) {
    F mx = V::load(r), bad = V::zero();
    int64_t i = 0;
    for (; i + N <= n; i += N) {
      const F v = V::load(r + i);
      mx = V::max(mx, v);
      bad = V::add(bad, V::sub(v, v));
    }
    float lanes[N], m, check = V::sum(bad);
    V::store(lanes, mx);
    m = *std::max_element(lanes, lanes + N);
    for (; i < n; ++i) { m = std::max(m, r[i]); check += r[i] - r[i]; }
    if (check == 0.f)
      for (i = 0; i < n; ++i)
        if (r[i] == m) return i;
  }
  int64_t best = 0;
  for (int64_t i = 1; i < n && !std::isnan(r[best]); ++i)
    if (r[i] > r[best] || std::isnan(r[i])) best = i;
  return best;
}

// greedy_step's argmax of each of the M rows of logits the step left transposed ((NV, TS), unrounded:
// Out::EITHER): argmax of the row rounded to T, without writing the rows. Threads take contiguous
// ranges of blocks of 32 columns; a block's largest value of each row comes from vector maxima,
// and where it (rounded) beats the row's best so far, the block's columns are searched one by one for
// the first that holds it (rounding keeps the order, so the rounded largest is the largest rounded).
// Ties keep the first index, as argmax does; a NaN or an infinity anywhere: each row gathered,
// rounded and given to argmax. Against turning the sums into rounded rows first, whole 160M greedy
// steps on the AMD EPYC with AVX512-BF16 (paired, high-bandwidth minutes): batch 8 bf16 1.022-1.024x,
// int8 1.024x, fp32 1.006x, batch 5 1.006-1.010x
template <typename T>
static void argmax_t(const float* yt, int64_t NV, int64_t M, int64_t* best) {
  constexpr int64_t CB = 32, VB = CB * TS / N;  // columns a block, vectors a block
  constexpr int A = N >= 8 ? 1 : 8 / N;         // registers that hold each row once (lane l of register a: row (a N + l) % 8)
  const int64_t nb = NV / CB;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(par_threads(), nb / 16));
  std::vector<float> pv(parts * M, -INFINITY);
  std::vector<int64_t> pi(parts * M, -1);
  std::atomic<bool> bad{false};
  par(0, parts, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* bv = pv.data() + t * M;
      int64_t* bi = pi.data() + t * M;
      auto offer = [&](int64_t m, float r, int64_t c0, int64_t c1) {  // the first column of c0..c1 holding r, if r beats row m's best
        if (bi[m] >= 0 && !(r > bv[m])) return;
        for (int64_t c = c0; c < c1; ++c)
          if (E<T>::rnd(yt[c * TS + m]) == r) { bv[m] = r; bi[m] = c; return; }
      };
      F chk[A];  // x - x summed: 0 unless some x is a NaN or an infinity (the columns' rows past M are not written)
      for (int a = 0; a < A; ++a) chk[a] = V::zero();
      for (int64_t b = nb * t / parts; b < nb * (t + 1) / parts; ++b) {
        const float* p = yt + b * CB * TS;
        F acc[A];
        for (int a = 0; a < A; ++a) acc[a] = V::set1(-INFINITY);
        for (int64_t k = 0; k < VB; ++k) {
          const F v = V::load(p + k * N);
          acc[k % A] = V::max(acc[k % A], v);
          chk[k % A] = V::add(chk[k % A], V::sub(v, v));
        }
        float lanes[A * N];
        for (int a = 0; a < A; ++a) V::store(lanes + a * N, acc[a]);
        for (int64_t m = 0; m < M; ++m) {
          float mx = -INFINITY;
          for (int l = (int)m; l < A * N; l += 8) mx = std::max(mx, lanes[l]);
          offer(m, E<T>::rnd(mx), b * CB, (b + 1) * CB);
        }
      }
      float cl[A * N];
      for (int a = 0; a < A; ++a) V::store(cl + a * N, chk[a]);
      for (int l = 0; l < A * N; ++l)
        if (l % 8 < M && cl[l] != 0.f) bad = true;
      if (t == parts - 1)  // the columns past the last whole block
        for (int64_t c = nb * CB; c < NV; ++c)
          for (int64_t m = 0; m < M; ++m) {
            const float v = yt[c * TS + m];
            if (v - v != 0.f) bad = true;
            offer(m, E<T>::rnd(v), c, c + 1);
          }
    }
  });
  if (bad) {
    std::vector<float> row(NV);
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t c = 0; c < NV; ++c) row[c] = E<T>::rnd(yt[c * TS + m]);
      best[m] = argmax(row.data(), NV);
    }
    return;
  }
  for (int64_t m = 0; m < M; ++m) {  // the parts in column order: a later one wins only by a larger value
    best[m] = pi[m];
    float v = pv[m];
    for (int64_t t = 1; t < parts; ++t)
      if (pv[t * M + m] > v) { v = pv[t * M + m]; best[m] = pi[t * M + m]; }
  }
}

template <typename T, typename WT>
static torch::Tensor step(torch::Tensor h, const std::vector<torch::Tensor>& layers, torch::Tensor norm_w,
                          torch::Tensor out_w, const std::vector<torch::Tensor>& scales, torch::Tensor cache_k, torch::Tensor cache_v, int64_t pos,
                          const float* fc, double eps, int64_t n_heads, int64_t split = 0, bool* logits_t = nullptr) {
  const int64_t M = h.size(0), dim = h.size(1), L = (int64_t)layers.size() / 6;
  const int64_t Bmax = cache_k.size(1), S = cache_k.size(2), Hkv = cache_k.size(3), D = cache_k.size(4);
  const int64_t H = n_heads, rep = H / Hkv, qdim = H * D, kvdim = Hkv * D, hidden = layers[4].size(0) / 2;
  const int64_t nqkv = qdim + 2 * kvdim;
  const float scale = 1.f / std::sqrt((float)D);
  T* hp = reinterpret_cast<T*>(h.data_ptr());
  T* ckp = reinterpret_cast<T*>(cache_k.data_ptr());
  T* cvp = reinterpret_cast<T*>(cache_v.data_ptr());
  avec<T> xn(M * std::max(dim, hidden)), att(M * qdim);
  avec<float> y(std::max<int64_t>(M, TS) * std::max(nqkv, 2 * hidden)), p, acc, stats;  // attention's: sized below
  avec<T> qt(M * qdim);
  avec<typename E<T>::X> qs(M * qdim);  // the queries as head_scores reads them
  auto W = [](const torch::Tensor& t) { return reinterpret_cast<const T*>(t.data_ptr()); };  // norms, scales
  auto Q = [](const torch::Tensor& t) { return reinterpret_cast<const WT*>(t.data_ptr()); };  // projections
  // int8 weights: 4 scale vectors per layer (q|k|v, wo, w1|w3, w2) and the output's; else none
  auto sc = [&](size_t i) { return scales.empty() ? nullptr : W(scales[i]); };

  for (int64_t l = 0; l < L; ++l) {
    const torch::Tensor* lw = &layers[6 * l];
    // each layer's shapes alone were checked on the way in (check_weights); here against the
    // cache's heads and layer 0's hidden size, which size the buffers above
    TORCH_CHECK(lw[1].size(0) == nqkv && lw[2].size(1) == qdim && lw[5].size(1) == hidden,
                "decoding step: layer ", l, "'s q|k|v, wo or w2 do not match the cache's heads or layer 0's hidden size");
    // attention: norm, q|k|v in one product, RoPE on q and k (fp32, rounded), k/v into the cache
    norm_rows<T>(hp, M, dim, W(lw[0]), eps, xn.data());
    gemv<T, WT>(xn.data(), M, dim, Q(lw[1]), nqkv, y.data(), sc(4 * l));
    // RoPE, the rounding and the cache writes of 4 rows or more on both threads (on one, the batch-8
    // step's 0.33 ms, on two 0.24)
    par(0, M, 4, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        float* r = y.data() + m * nqkv;
        int64_t i = 0;
        for (; i + N <= nqkv; i += N) V::store(r + i, E<T>::rnd(V::load(r + i)));
        for (; i < nqkv; ++i) r[i] = E<T>::rnd(r[i]);
        for (int64_t h0 = 0; h0 < qdim + kvdim; h0 += D)  // each head of q, then of k: pairs (2j, 2j+1) rotate by freqs[pos, j]
          for (int64_t j = 0; j < D / 2; ++j) {
            const float c = fc[2 * j], s = fc[2 * j + 1], re = r[h0 + 2 * j], im = r[h0 + 2 * j + 1];
            r[h0 + 2 * j] = E<T>::rnd(re * c - im * s);
            r[h0 + 2 * j + 1] = E<T>::rnd(re * s + im * c);
          }
        for (i = 0; i < qdim; ++i) qt[m * qdim + i] = E<T>::from(r[i]);  // exact: r holds T's values
        E<T>::prep(qt.data() + m * qdim, H, D, qs.data() + m * qdim);  // each head a row
        const int64_t off = ((l * Bmax + m) * S + pos) * kvdim;  // the rounded k and v, exact in T
        for (i = 0; i + N <= kvdim; i += N) {
          E<T>::store(ckp + off + i, V::load(r + qdim + i));
          E<T>::store(cvp + off + i, V::load(r + qdim + kvdim + i));
        }
        for (; i < kvdim; ++i) {
          ckp[off + i] = E<T>::from(r[qdim + i]);
          cvp[off + i] = E<T>::from(r[qdim + kvdim + i]);
        }
      }
    });
    // attention of each query head of each row over positions 0..pos of its kv head, fp32, in work
    // items (row m, chunk j of its positions, head). With fewer rows than threads each row's
    // positions are cut into P chunks, so that each thread streams its own contiguous part of the
    // cache (split by heads, the threads read alternate pieces of every position: 2x slower here
    // than one thread). An item keeps its chunk's largest score, the sum of exp(score - that) and
    // the values summed with those weights; a row's chunks are merged after. Within a chunk the cache
    // is read in memory order: the keys position by position (head_scores), the values in blocks of
    // positions (head_values). Threads take ranges of the items once there is enough work to pay for
    // waking them (a batch of 8 is 8 times the work of one row); with at least two groups (m, j) a
    // thread, whole groups one at a time from a shared counter
    const int64_t NT = pos + 1, nth = par_threads();
    // the keys are read ahead of head_scores by pf_rows positions, ~3 KB (at least one): on the Xeon
    // without AVX512-BF16, 207 -> 170 ns a position at batch 8 in bf16 (1.5-12 KB ahead: within 5%
    // of that). Past the chunk's last key the same stream goes on into its first values, so the
    // values start in cache; nothing past the chunk is touched. Prefetching the values within their
    // own loop (4-16 positions ahead) gained nothing
    // Where a chunk's values fit in 256 KB (a quarter of the Xeon's 1 MB L2; half of a 512 KB one), they
    // are also prefetched into L2 while the keys are read, 4 pf_rows ahead: the scores' loop then reads both at
    // the bandwidth of one thread, and the values' loop finds them in L2. Batch 8 in bf16, 136-144
    // positions (204 KB of values a row), per thread: scores 1.62 -> 2.45 ms a step, values 1.46 ->
    // 0.48, the attention's items 5% shorter. Longer chunks would lose their first values from L2
    const int64_t row_bytes = kvdim * (int64_t)sizeof(T), pf_rows = std::max<int64_t>(1, (3072 + row_bytes - 1) / row_bytes);
    // the chunks follow `split` where given (a thread count fixed by the caller: the sums then do not
    // depend on how many threads run this step), else the threads
    const int64_t ns = split > 0 ? split : nth;
    const int64_t P = M < ns ? std::max<int64_t>(1, std::min((ns + M - 1) / M, NT / 32)) : 1;
    const int64_t grain = M * NT * qdim >= (1 << 15) ? 1 : M * P * H;
    if ((int64_t)p.size() < M * P * H * NT) p.resize(M * P * H * NT);
    if ((int64_t)acc.size() < M * P * qdim) { acc.resize(M * P * qdim); stats.resize(2 * M * P * H); }
    auto items = [&](int64_t g, int64_t h0, int64_t h1) {  // heads h0..h1 of item group g = (m, j)
      const int64_t m = g / P, j = g % P, t0 = NT * j / P, nt = NT * (j + 1) / P - t0;
      const T* kb = ckp + ((l * Bmax + m) * S + t0) * kvdim;
      const T* vb = cvp + ((l * Bmax + m) * S + t0) * kvdim;
      const typename E<T>::X* q = qs.data() + m * qdim;
      float* pg = p.data() + g * H * NT;
      float* ag = acc.data() + g * qdim;
      const bool values_l2 = nt * row_bytes <= 256 * 1024;
      for (int64_t t = 0; t < nt; ++t) {  // the keys pf_rows positions ahead prefetched first, then the values' first ones
        const int64_t u = t + pf_rows;
        if (u < 2 * nt) {
          const char* ahead = (const char*)(u < nt ? kb + u * kvdim : vb + (u - nt) * kvdim);
          for (int64_t o = 0; o < row_bytes; o += 64) __builtin_prefetch(ahead + o, 0, 3);
        }
        if (values_l2 && t + 4 * pf_rows < nt) {
          const char* va = (const char*)(vb + (t + 4 * pf_rows) * kvdim);
          for (int64_t o = 0; o < row_bytes; o += 64) __builtin_prefetch(va + o, 0, 2);
        }
        head_scores<T>(q, kb + t * kvdim, D, rep, h0, h1, scale, pg + t, NT);
      }
      for (int64_t hd = h0; hd < h1; ++hd) {
        float* ph = pg + hd * NT;
        F mv = V::set1(-INFINITY);
        int64_t t = 0;
        for (; t + N <= nt; t += N) mv = V::max(mv, V::load(ph + t));
        float lanes[N], mx = -INFINITY;
        V::store(lanes, mv);
        for (int i = 0; i < N; ++i) mx = std::max(mx, lanes[i]);
        for (; t < nt; ++t) mx = std::max(mx, ph[t]);
        const F mxv = V::set1(mx);
        F sv = V::zero();
        t = 0;
        for (; t + N <= nt; t += N) {
          const F e = vexp(V::sub(V::load(ph + t), mxv));
          V::store(ph + t, e);
          sv = V::add(sv, e);
        }
        float sum = V::sum(sv);
        for (; t < nt; ++t) { ph[t] = std::exp(ph[t] - mx); sum += ph[t]; }
        if (P == 1)  // the probabilities themselves; else kept for the merge
          for (t = 0; t < nt; ++t) ph[t] /= sum;
        stats[2 * (g * H + hd)] = mx;
        stats[2 * (g * H + hd) + 1] = sum;
      }
      std::fill(ag + h0 * D, ag + h1 * D, 0.f);
      head_values<T>(pg, NT, nt, vb, kvdim, D, rep, h0, h1, ag);
      if (P == 1)  // the sums back in memory order
        for (int64_t hd = h0; hd < h1; ++hd) Wide<T>::join(ag + hd * D, D, att.data() + m * qdim + hd * D);
    };
    if (grain == 1 && nth > 1 && M * P >= 2 * nth) {  // whole groups from a shared counter: a core slowed by another tenant takes fewer
      std::atomic<int64_t> next{0};
      par(0, nth, 1, [&](int64_t, int64_t) {
        for (int64_t g; (g = next.fetch_add(1)) < M * P;) items(g, 0, H);
      });
    } else {
      par(0, M * P * H, grain, [&](int64_t i0, int64_t i1) {
        for (int64_t g = i0 / H; g * H < i1; ++g) items(g, std::max(i0 - g * H, (int64_t)0), std::min(i1 - g * H, H));
      });
    }
    // merge each head's chunks: sum_j w_j acc_j / sum_j w_j sum_j, w_j = exp(max_j - max), on one thread,
    // vectorised (element by element it took 15 us a layer at batch 1, a quarter of the attention's time)
    std::vector<float> w(P), o(D);
    for (int64_t m = 0; m < M && P > 1; ++m)
      for (int64_t hd = 0; hd < H; ++hd) {
        const float* st = stats.data() + 2 * (m * P * H + hd);
        float mx = st[0], den = 0.f;
        for (int64_t j = 1; j < P; ++j) mx = std::max(mx, st[2 * j * H]);
        for (int64_t j = 0; j < P; ++j) den += (w[j] = std::exp(st[2 * j * H] - mx)) * st[2 * j * H + 1];
        const float* a = acc.data() + m * P * qdim + hd * D;  // chunk j's sums at a + j qdim, in slot order, as o
        int64_t d = 0;
        for (; d + N <= D; d += N) {
          F v = V::zero();
          for (int64_t j = 0; j < P; ++j) v = V::add(v, V::mul(V::set1(w[j]), V::load(a + j * qdim + d)));
          V::store(o.data() + d, V::div(v, V::set1(den)));
        }
        for (; d < D; ++d) {
          float v = 0.f;
          for (int64_t j = 0; j < P; ++j) v += w[j] * a[j * qdim + d];
          o[d] = v / den;
        }
        Wide<T>::join(o.data(), D, att.data() + m * qdim + hd * D);  // memory order, rounded to T
      }
    gemv<T, WT>(att.data(), M, qdim, Q(lw[2]), dim, y.data(), sc(4 * l + 1));
    residual<T>(hp, y.data(), M * dim);
    // feed-forward: norm, w1|w3 in one product, silu(a) * b with the model's roundings, w2, residual
    norm_rows<T>(hp, M, dim, W(lw[3]), eps, xn.data());
    if (gemv<T, WT>(xn.data(), M, dim, Q(lw[4]), 2 * hidden, y.data(), sc(4 * l + 2), Out::EITHER))
      silu_t<T>(y.data(), M, hidden, xn.data());
    else silu_rows<T, float>(y.data(), M, hidden, xn.data());
    gemv<T, WT>(xn.data(), M, hidden, Q(lw[5]), dim, y.data(), sc(4 * l + 3));
    residual<T>(hp, y.data(), M * dim);
  }
  norm_rows<T>(hp, M, dim, W(norm_w), eps, xn.data());
  const int64_t NV = out_w.size(0);
  // the logits rows rounded as the model's output is; or, where the caller takes them so (logits_t,
  // set to whether they are), from TRANSPOSED_FROM rows on the (NV, TS) sums unrounded (argmax_t)
  const bool keep = logits_t && M >= TRANSPOSED_FROM;
  auto logits = torch::empty({keep ? NV : M, keep ? TS : NV}, torch::dtype(torch::kFloat32));
  const bool tr = gemv<T, WT>(xn.data(), M, dim, Q(out_w), NV, logits.data_ptr<float>(), sc(4 * L), keep ? Out::EITHER : Out::ROUNDED);
  if (logits_t) *logits_t = tr;
  return logits;
}

// The checks of a decoding step's weights for a model of dtype dt and width dim; true where the
// projections are int8 (with scales)
static bool check_weights(at::ScalarType dt, int64_t dim, const std::vector<torch::Tensor>& layers, const torch::Tensor& norm_w,
                          const torch::Tensor& out_w, const std::vector<torch::Tensor>& scales) {
  const int64_t L = (int64_t)layers.size() / 6;
  TORCH_CHECK(dt == at::kBFloat16 || dt == at::kFloat, "decoding step: the model's dtype must be bf16 or fp32");
  TORCH_CHECK(L >= 1 && (int64_t)layers.size() == 6 * L, "decoding step: 6 tensors per layer");
  const bool q8 = !scales.empty();  // int8 projections
  const auto wdt = q8 ? at::kChar : dt;
  TORCH_CHECK(!q8 || (int64_t)scales.size() == 4 * L + 1, "decoding step: scales: 4 per layer and the output's");
  const int scale_of[6] = {-1, 0, 1, -1, 2, 3};  // a layer's tensor -> its scales (-1: a norm)
  for (int64_t i = 0; i < (int64_t)layers.size(); ++i) {
    const int j = scale_of[i % 6];
    TORCH_CHECK(layers[i].scalar_type() == (j < 0 ? dt : wdt) && layers[i].is_contiguous() && layers[i].device().is_cpu(),
                "decoding step: weights contiguous on the CPU; norms in the model's dtype, projections too or int8 with scales");
    TORCH_CHECK(!q8 || j < 0 || scales[i / 6 * 4 + j].numel() == layers[i].size(0), "decoding step: one scale per int8 weight row");
  }
  for (int64_t l = 0; l < L; ++l)
    TORCH_CHECK(layers[6 * l].numel() == dim && layers[6 * l + 1].dim() == 2 && layers[6 * l + 1].size(1) == dim &&
                layers[6 * l + 2].dim() == 2 && layers[6 * l + 2].size(0) == dim && layers[6 * l + 3].numel() == dim &&
                layers[6 * l + 4].dim() == 2 && layers[6 * l + 4].size(1) == dim && layers[6 * l + 4].size(0) % 2 == 0 &&
                layers[6 * l + 5].dim() == 2 && layers[6 * l + 5].size(0) == dim &&
                layers[6 * l + 5].size(1) == layers[6 * l + 4].size(0) / 2, "decoding step: layer ", l, "'s weight shapes");
  for (auto& s : scales) TORCH_CHECK(s.scalar_type() == dt && s.is_contiguous(), "decoding step: scales in the model's dtype");
  TORCH_CHECK(norm_w.scalar_type() == dt && norm_w.numel() == dim && out_w.scalar_type() == wdt && out_w.is_contiguous() &&
              out_w.dim() == 2 && out_w.size(1) == dim && (!q8 || scales.back().numel() == out_w.size(0)),
              "decoding step: the final norm, and the output weight as the layers' projections");
  return q8;
}

// The checks of a decoding step's cache for M rows at position pos
static void check_cache(at::ScalarType dt, int64_t M, int64_t dim, int64_t L, const torch::Tensor& cache_k, const torch::Tensor& cache_v,
                        int64_t pos, int64_t n_heads, int64_t n_kv_heads) {
  TORCH_CHECK(M >= 1 && M <= 8, "decoding step: 1..8 rows, not ", M);
  TORCH_CHECK(cache_k.dim() == 5 && cache_k.size(0) == L && cache_k.size(1) >= M && cache_k.is_contiguous() &&
              cache_v.is_contiguous() && cache_k.sizes() == cache_v.sizes() && cache_k.scalar_type() == dt &&
              cache_v.scalar_type() == dt, "decoding step: the cache must be contiguous (L, B, S, Hkv, D) in the model's dtype");
  const int64_t S = cache_k.size(2), D = cache_k.size(4);
  TORCH_CHECK(cache_k.size(3) == n_kv_heads && n_heads % n_kv_heads == 0 && n_heads * D == dim && pos >= 0 && pos < S,
              "decoding step: shapes (heads, head size, position ", pos, " within the cache's ", S, ")");
}

template <typename... A>
static torch::Tensor run_step(at::ScalarType dt, bool q8, A&&... a) {
  return as_team([&] {
    if (dt == at::kBFloat16) return q8 ? step<bf16, int8_t>(a...) : step<bf16, bf16>(a...);
    return q8 ? step<float, int8_t>(a...) : step<float, float>(a...);
  });
}

// One decoding step of the whole model for M rows at position `pos` (the same for every row).
// h: (M, dim) token embeddings, updated in place. layers: 6 tensors per layer (attention_norm,
// wq|wk|wv packed, wo, ffn_norm, w1|w3 packed, w2). cache_k/v: (L, B_max, S, Hkv, D). All of them
// bf16, or all fp32; or int8 projections (the 4 per layer and out_w) with `scales`: 4 per layer
// ((out,) for q|k|v, wo, w1|w3, w2) then out_w's, in the model's dtype (empty for bf16/fp32 weights).
// freqs: (D/2, 2) fp32 cos/sin of position pos. Returns (M, vocab) fp32 logits (holding bf16 values
// for a bf16 model, as the model's).
torch::Tensor decode_step(torch::Tensor h, std::vector<torch::Tensor> layers, torch::Tensor norm_w, torch::Tensor out_w,
                          std::vector<torch::Tensor> scales, torch::Tensor cache_k, torch::Tensor cache_v, int64_t pos, torch::Tensor freqs,
                          double eps, int64_t n_heads, int64_t n_kv_heads) {
  TORCH_CHECK(h.dim() == 2 && h.is_contiguous(), "decode_step: h must be contiguous (M, dim)");
  const auto dt = h.scalar_type();
  const bool q8 = check_weights(dt, h.size(1), layers, norm_w, out_w, scales);
  check_cache(dt, h.size(0), h.size(1), (int64_t)layers.size() / 6, cache_k, cache_v, pos, n_heads, n_kv_heads);
  TORCH_CHECK(freqs.numel() == cache_k.size(4) && freqs.scalar_type() == at::kFloat && freqs.is_contiguous(),
              "decode_step: freqs must be contiguous fp32 (D/2, 2)");
  return run_step(dt, q8, h, layers, norm_w, out_w, scales, cache_k, cache_v, pos, freqs.data_ptr<float>(), eps, n_heads);
}

// A model as greedy_step and decode_ids read it, checked once: decode_step's weights, the token embedding
// `emb` ((V, dim) in the model's dtype, or int8 with `emb_scales` (V,): quantize.py's Int8Embedding),
// the RoPE table `freqs` (positions, D/2, 2) fp32, the norms' eps and the heads. Held by the Python
// decoder, so that a step converts no list of ~100 tensors (~0.1 ms a call, right after a step)
struct Weights {
  std::vector<torch::Tensor> layers, scales;
  torch::Tensor norm_w, out_w, emb, emb_scales, freqs;
  double eps;
  int64_t n_heads, n_kv_heads, dim, L;
  int64_t split = 0;  // the thread count the attention's position chunks follow (0: the threads of each step)
  at::ScalarType dt;
  bool q8;
  Weights(std::vector<torch::Tensor> layers_, torch::Tensor norm_w_, torch::Tensor out_w_, std::vector<torch::Tensor> scales_,
          torch::Tensor emb_, torch::Tensor emb_scales_, torch::Tensor freqs_, double eps_, int64_t n_heads_, int64_t n_kv_heads_)
      : layers(std::move(layers_)), scales(std::move(scales_)), norm_w(norm_w_), out_w(out_w_), emb(emb_), emb_scales(emb_scales_),
        freqs(freqs_), eps(eps_), n_heads(n_heads_), n_kv_heads(n_kv_heads_) {
    dt = norm_w.scalar_type();
    TORCH_CHECK(emb.dim() == 2 && emb.is_contiguous() && (emb.scalar_type() == at::kChar ? emb_scales.scalar_type() == dt &&
                emb_scales.is_contiguous() && emb_scales.numel() == emb.size(0) : emb.scalar_type() == dt),
                "Weights: the embedding must be contiguous (V, dim) in the model's dtype, or int8 with (V,) scales in it");
    dim = emb.size(1);
    L = (int64_t)layers.size() / 6;
    q8 = check_weights(dt, dim, layers, norm_w, out_w, scales);
    TORCH_CHECK(n_heads > 0 && n_kv_heads > 0 && n_heads % n_kv_heads == 0 && dim % n_heads == 0 && freqs.scalar_type() == at::kFloat &&
                freqs.is_contiguous() && freqs.dim() == 3 && freqs.size(1) * freqs.size(2) == dim / n_heads,
                "Weights: heads, and freqs contiguous fp32 (positions, head size / 2, 2)");
  }
};

// The embedding rows of M token ids (each must be within the table) as the model looks them up:
// Int8Embedding's row times its scale, rounded to the model's dtype
static torch::Tensor embed(const Weights& w, const int64_t* ids, int64_t M, const char* who) {
  const int64_t V = w.emb.size(0), dim = w.dim;
  auto h = torch::empty({M, dim}, torch::dtype(w.dt));
  const int64_t es = h.element_size();
  for (int64_t b = 0; b < M; ++b) {
    const int64_t t = ids[b];
    TORCH_CHECK(t >= 0 && t < V, who, ": token id ", t, " of row ", b, " is outside the embedding's ", V, " rows");
    char* row = (char*)h.data_ptr() + b * dim * es;
    if (w.emb.scalar_type() != at::kChar) {
      std::memcpy(row, (const char*)w.emb.data_ptr() + t * dim * es, dim * es);
      continue;
    }
    const int8_t* q = w.emb.data_ptr<int8_t>() + t * dim;
    if (w.dt == at::kBFloat16) {
      const float s = b2f(reinterpret_cast<const bf16*>(w.emb_scales.data_ptr())[t]);
      for (int64_t d = 0; d < dim; ++d) reinterpret_cast<bf16*>(row)[d] = f2b((float)q[d] * s);
    } else {
      const float s = w.emb_scales.data_ptr<float>()[t];
      for (int64_t d = 0; d < dim; ++d) reinterpret_cast<float*>(row)[d] = (float)q[d] * s;
    }
  }
  return h;
}

// decode_step for a model held as Weights: ids (B,) or (B, 1) int64 looked up here, at position pos
// (the RoPE row from the table). The Python decoder's one-token step when it samples (a greedy one
// runs greedy_step): one look-up and no list of weights converted per call
torch::Tensor decode_ids(const Weights& w, torch::Tensor ids, int64_t pos, torch::Tensor cache_k, torch::Tensor cache_v) {
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.is_contiguous() && ids.numel() >= 1 && ids.size(0) == ids.numel(),
              "decode_ids: token ids must be contiguous int64, one per row");
  const int64_t M = ids.numel(), D = w.dim / w.n_heads;
  TORCH_CHECK(pos >= 0 && pos < w.freqs.size(0), "decode_ids: position ", pos, " is beyond the RoPE table's ", w.freqs.size(0));
  check_cache(w.dt, M, w.dim, w.L, cache_k, cache_v, pos, w.n_heads, w.n_kv_heads);
  auto h = embed(w, ids.data_ptr<int64_t>(), M, "decode_ids");
  return run_step(w.dt, w.q8, h, w.layers, w.norm_w, w.out_w, w.scales, cache_k, cache_v, pos,
                  w.freqs.data_ptr<float>() + pos * D, w.eps, w.n_heads, w.split);
}

// A whole greedy step of the batch in one call, in place, as llama.inference.decoders.greedy_step
// computes it: c = cur[0]; each row's token at c - 1 (pads, -1, as 0) is looked up in the embedding
// (Int8Embedding's: the row times its scale, rounded), decoded at position c - 1, and the first index
// of the row's largest logit is written at c, except that a row still inside its prompt
// (in_prompt[b, c]) or already done keeps its own token there; a row becomes done when it writes
// `eos` outside its prompt or reaches its end (c + 1 >= ends[b]); cur becomes c + 1. tokens,
// in_prompt: (B, W) int64, bool; done (B,) bool; ends (B,) int64; cur (1,) int64; the cache as
// decode_step's. Returns whether every row is done. One call in place of the dozen small torch
// operations of a step in Python, each slow right after a step has streamed the weights through the caches
bool greedy_step(const Weights& w, torch::Tensor tokens, torch::Tensor in_prompt, torch::Tensor done, torch::Tensor ends,
                 torch::Tensor cur, torch::Tensor cache_k, torch::Tensor cache_v, int64_t eos) {
  TORCH_CHECK(tokens.dim() == 2 && tokens.scalar_type() == at::kLong && tokens.is_contiguous() &&
              in_prompt.sizes() == tokens.sizes() && in_prompt.scalar_type() == at::kBool && in_prompt.is_contiguous(),
              "greedy_step: tokens and in_prompt must be contiguous (B, W) int64 and bool");
  const int64_t M = tokens.size(0), W = tokens.size(1);
  TORCH_CHECK(done.numel() == M && done.scalar_type() == at::kBool && done.is_contiguous() && ends.numel() == M &&
              ends.scalar_type() == at::kLong && ends.is_contiguous() && cur.numel() == 1 && cur.scalar_type() == at::kLong,
              "greedy_step: done (B,) bool, ends (B,) int64 and cur (1,) int64");
  const int64_t c = cur.data_ptr<int64_t>()[0], pos = c - 1;
  TORCH_CHECK(c >= 1 && c < W, "greedy_step: cur ", c, " must be within 1..", W - 1, ", the tokens' width");
  TORCH_CHECK(pos < w.freqs.size(0), "greedy_step: position ", pos, " is beyond the RoPE table's ", w.freqs.size(0));
  const auto dt = w.dt;
  const int64_t dim = w.dim, D = dim / w.n_heads;
  check_cache(dt, M, dim, w.L, cache_k, cache_v, pos, w.n_heads, w.n_kv_heads);
  int64_t* tk = tokens.data_ptr<int64_t>();
  const bool* ip = in_prompt.data_ptr<bool>();
  bool* dn = done.data_ptr<bool>();
  const int64_t* en = ends.data_ptr<int64_t>();
  std::vector<int64_t> ids(M);  // the pads (-1) as 0
  for (int64_t b = 0; b < M; ++b) ids[b] = std::max<int64_t>(tk[b * W + pos], 0);
  auto h = embed(w, ids.data(), M, "greedy_step");
  bool tr = false;  // (from 5 rows the argmax reads the logits transposed, as the product leaves them)
  const int64_t NV = w.out_w.size(0);
  std::vector<int64_t> bests(M);
  as_team([&] {  // the step and the argmax in one team
    const auto logits = run_step(dt, w.q8, h, w.layers, w.norm_w, w.out_w, w.scales, cache_k, cache_v, pos,
                                 w.freqs.data_ptr<float>() + pos * D, w.eps, w.n_heads, w.split, &tr);
    const float* lp = logits.data_ptr<float>();
    if (tr && dt == at::kBFloat16) argmax_t<bf16>(lp, NV, M, bests.data());
    else if (tr) argmax_t<float>(lp, NV, M, bests.data());
    else
      for (int64_t b = 0; b < M; ++b) bests[b] = argmax(lp + b * NV, NV);
    return true;
  });
  bool all = true;
  for (int64_t b = 0; b < M; ++b) {
    const int64_t best = bests[b];
    const bool prompt = ip[b * W + c];
    const int64_t nxt = prompt || dn[b] ? tk[b * W + c] : best;
    tk[b * W + c] = nxt;
    dn[b] = dn[b] || (!prompt && nxt == eos) || c + 1 >= en[b];
    all = all && dn[b];
  }
  cur.data_ptr<int64_t>()[0] = c + 1;
  return all;
}

// The training loss's forward and the logits' gradient in one pass over the logits (llama/train/recipe.py's
// linear_cross_entropy): each row x of logits (R, Vn), bf16 or fp32, becomes softmax(x) - one_hot(target)
// in place (computed in fp32, rounded once), and the summed cross-entropy (max + log sum exp - x[target])
// of the rows is returned; a row with target -100 becomes 0 and adds nothing. Per row: a max pass, an
// exp-and-sum pass into a thread's fp32 row buffer (from L2), a scaling pass that writes the row back.
template <typename T>
static double softmax_gradient_rows(T* x, const int64_t* targets, int64_t R, int64_t Vn) {
  std::vector<double> part(at::get_num_threads(), 0.0);
  const int64_t VB = Vn / N * N;
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
    static thread_local std::vector<float> e;
    e.resize(Vn);
    double loss = 0.0;
    for (int64_t row = r0; row < r1; ++row) {
      T* xr = x + row * Vn;
      const int64_t t = targets[row];
      if (t == -100) {
        std::fill(xr, xr + Vn, E<T>::from(0.f));
        continue;
      }
      F mv = V::set1(-std::numeric_limits<float>::infinity());
      for (int64_t k = 0; k < VB; k += N) mv = V::max(mv, E<T>::load(xr + k));
      alignas(64) float lanes[N];
      V::store(lanes, mv);
      float m = -std::numeric_limits<float>::infinity();
      for (int i = 0; i < N; ++i) m = std::max(m, lanes[i]);
      for (int64_t k = VB; k < Vn; ++k) m = std::max(m, E<T>::to(xr[k]));
      const F mb = V::set1(m);
      F sv = V::zero();
      for (int64_t k = 0; k < VB; k += N) {
        const F v = vexp(V::sub(E<T>::load(xr + k), mb));
        V::store(e.data() + k, v);
        sv = V::add(sv, v);
      }
      double s = V::sum(sv);
      for (int64_t k = VB; k < Vn; ++k) s += (e[k] = std::exp(E<T>::to(xr[k]) - m));
      loss += m + std::log(s) - E<T>::to(xr[t]);
      const float inv = (float)(1.0 / s);
      const F ib = V::set1(inv);
      for (int64_t k = 0; k < VB; k += N) E<T>::store(xr + k, V::mul(V::load(e.data() + k), ib));
      for (int64_t k = VB; k < Vn; ++k) xr[k] = E<T>::from(e[k] * inv);
      xr[t] = E<T>::from(e[t] * inv - 1.f);
    }
    part[at::get_thread_num()] += loss;
  });
  double total = 0.0;
  for (double v : part) total += v;
  return total;
}

double softmax_gradient(torch::Tensor logits, torch::Tensor targets) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() && (logits.scalar_type() == at::kBFloat16 ||
              logits.scalar_type() == at::kFloat), "logits: contiguous (rows, vocab), bf16 or fp32");
  TORCH_CHECK(targets.dim() == 1 && targets.is_contiguous() && targets.scalar_type() == at::kLong &&
              targets.size(0) == logits.size(0), "targets: contiguous int64 (rows,)");
  const int64_t R = logits.size(0), Vn = logits.size(1);
  const int64_t* t = targets.data_ptr<int64_t>();
  for (int64_t i = 0; i < R; ++i)
    TORCH_CHECK(t[i] == -100 || (t[i] >= 0 && t[i] < Vn), "target ", t[i], " of row ", i, " is outside 0..", Vn - 1);
  if (logits.scalar_type() == at::kBFloat16)
    return softmax_gradient_rows<bf16>(reinterpret_cast<bf16*>(logits.data_ptr<at::BFloat16>()), t, R, Vn);
  return softmax_gradient_rows<float>(logits.data_ptr<float>(), t, R, Vn);
}

#if defined(LLAMA_AVX512)
// Causal attention for training, bf16 or fp32 (llama/blocked_attention.py's CPU path): the "blocked"
// backend without its copies. Per (batch, kv head), queries are taken in blocks of `block` rows; a
// block's scores against the keys it can see, its softmax, and its products with V are computed
// here, the products by one register-tiled kernel with fp32 sums: on the native bf16 dot (vdpbf16ps)
// in bf16 (its pairs widened to fp32 in the AVX-512 build without it: V::dot_pairs), on FMAs in
// fp32. That kernel multiplies A (rows, its reduced dimension in steps of KS elements: pairs in
// bf16, the operand order of the instruction) by B laid out as [K/KS][N] 32-bit words. K and V are
// laid out once per head; the probabilities and their gradient are written in the layout the next
// product reads. Scores and softmax are fp32 (in bf16 the probabilities are rounded
// once, as flash attention rounds them before their product with V); the gradients of K and V
// accumulate in fp32 over blocks and query heads. The forward keeps every block's probabilities
// (rows rounded up to KS, columns padded to 16) for the backward.
namespace attn {

constexpr int MR = 4, NV = 4;  // a product tile: 4 rows x 64 fp32 columns = 16 accumulators (measured best of 4x4, 5x4, 6x4, 8x2)

static inline int64_t up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// How a product reads its operands: KS elements of A per step, broadcast as one 32-bit word, against
// one word per column of B
template <typename T> struct Op;
template <> struct Op<bf16> {
  static constexpr int KS = 2;
  static F a(const bf16* p) { int32_t x; std::memcpy(&x, p, 4); return _mm512_castsi512_ps(_mm512_set1_epi32(x)); }
  static F fma(F acc, F a, F b) { return V::dot_pairs(acc, a, b); }
  static void store(bf16* p, F v) { V::store_bf16(p, v); }
};
template <> struct Op<float> {
  static constexpr int KS = 1;
  static F a(const float* p) { return _mm512_set1_ps(*p); }
  static F fma(F acc, F a, F b) { return _mm512_fmadd_ps(a, b, acc); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
};

// C (M x 16 W, fp32, ldc) = [C +] A (M x KS K) B (K x 16 W words, ldb). A: rows (step p of row i at
// A + i lda + KS p), or with AP laid out as B is (step p of row i at word p lda + i)
template <typename T, int M, int W, bool AP>
static void tile(const T* A, int64_t lda, const uint32_t* B, int64_t ldb, int64_t K, float* C, int64_t ldc, bool add) {
  constexpr int KS = Op<T>::KS;
  F acc[M][W];
#pragma GCC unroll 4
  for (int i = 0; i < M; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < W; ++v) acc[i][v] = add ? _mm512_loadu_ps(C + i * ldc + 16 * v) : V::zero();
  for (int64_t p = 0; p < K; ++p) {
    F b[W];
#pragma GCC unroll 4
    for (int v = 0; v < W; ++v) b[v] = _mm512_castsi512_ps(_mm512_loadu_si512(B + p * ldb + 16 * v));
#pragma GCC unroll 4
    for (int i = 0; i < M; ++i) {
      const F a = Op<T>::a(AP ? A + KS * (p * lda + i) : A + i * lda + KS * p);
#pragma GCC unroll 4
      for (int v = 0; v < W; ++v) acc[i][v] = Op<T>::fma(acc[i][v], a, b[v]);
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < M; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < W; ++v) _mm512_storeu_ps(C + i * ldc + 16 * v, acc[i][v]);
}

template <typename T>
using Tile = void (*)(const T*, int64_t, const uint32_t*, int64_t, int64_t, float*, int64_t, bool);
template <typename T> struct Tiles { static inline Tile<T> at[2][MR + 1][NV + 1]; };  // by A's layout, rows, vectors
template <typename T, int M, int W> struct Fill {
  static bool run() {
    Tiles<T>::at[0][M][W] = tile<T, M, W, false>;
    Tiles<T>::at[1][M][W] = tile<T, M, W, true>;
    if constexpr (W > 1) return Fill<T, M, W - 1>::run();
    else if constexpr (M > 1) return Fill<T, M - 1, NV>::run();
    return true;
  }
};
static const bool filled = Fill<bf16, MR, NV>::run() && Fill<float, MR, NV>::run();

// What a causal product may skip (exactly: the skipped terms are masked or zero). Row i of the
// product (a query at position off + i, or with KEYS a key at position i):
//   COLUMNS: its columns are keys; it needs those < off + i + 1 (the scores, dO V^T)
//   REDUCED: its reduced dimension is keys; it needs those < off + i + 1 (P V, dS K)
//   QUERIES: it is key i, its reduced dimension is queries at off + r; it needs r >= i - off (P^T dO, dS^T Q)
enum Skip { NONE, COLUMNS, REDUCED, QUERIES };

// C (M x N, ldc) = [C +] A (M x KS K, lda; laid out as B with ap) B (K x N words, ldb); N a multiple of 16
template <typename T>
static void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const uint32_t* B, int64_t ldb,
                 float* C, int64_t ldc, bool add, bool ap = false, Skip skip = NONE, int64_t off = 0) {
  constexpr int KS = Op<T>::KS;
  for (int64_t i = 0; i < M; i += MR) {
    const int64_t mr = std::min<int64_t>(MR, M - i);
    const int64_t n = skip == COLUMNS ? std::min(N, up(off + i + mr, 16)) : N;
    const int64_t k1 = skip == REDUCED ? std::min(K, up(off + i + mr, KS) / KS) : K;
    const int64_t k0 = skip == QUERIES ? std::min(k1, std::max<int64_t>(0, i - off) / KS) : 0;
    const T* a = (ap ? A + KS * i : A + i * lda) + (ap ? KS * k0 * lda : KS * k0);
    for (int64_t j = 0; j < n; j += 16 * NV) {
      const int w = (int)std::min<int64_t>(NV, (n - j) / 16);
      Tiles<T>::at[ap][mr][w](a, lda, B + k0 * ldb + j, ldb, k1 - k0, C + i * ldc + j, ldc, add);
    }
  }
}

// X (rows x D, row stride ld; D / KS words a row, a multiple of 16) as the B operand of X^T: out[p][j]
// = word p of row j (X[j][KS p ..]), zero past rows; 16 rows at a time by 16 x 16 word transposes
// (a 16-row gather per word was 15% of the prefill attention's time on the AMD EPYC)
template <typename T>
static void columns(const T* X, int64_t rows, int64_t ld, int64_t D, uint32_t* out, int64_t ldo) {
  constexpr int KS = Op<T>::KS;
  const int64_t words = D / KS, whole = rows / 16 * 16;
  for (int64_t j = 0; j < whole; j += 16)
    for (int64_t p0 = 0; p0 < words; p0 += 16) {
      __m512i r[16], o[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(X + (j + i) * ld + KS * p0);
      transpose16(r, o);
#pragma GCC unroll 16
      for (int c = 0; c < 16; ++c) _mm512_storeu_si512(out + (p0 + c) * ldo + j, o[c]);
    }
  for (int64_t p = 0; p < words; ++p) {
    uint32_t* o = out + p * ldo;
    for (int64_t j = whole; j < rows; ++j) std::memcpy(o + j, X + j * ld + KS * p, 4);
    std::fill(o + rows, o + ldo, 0u);
  }
}
// 16 bf16 of row a and of row b -> 16 pairs (a, b)
static inline __m512i interleave(__m256i a, __m256i b) {
  return _mm512_or_si512(_mm512_cvtepu16_epi32(a), _mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}
// X (rows x D, row stride ld; D a multiple of 16) as the B operand of X: bf16 rows in pairs,
// out[q][d] = (X[2q][d], X[2q+1][d]), zero past rows; fp32 rows are that operand as they are
static const uint32_t* rows_operand(const bf16* X, int64_t rows, int64_t ld, int64_t D, uint32_t* out, int64_t& ldb) {
  for (int64_t q = 0; 2 * q < rows; ++q) {
    const bf16* a = X + 2 * q * ld;
    for (int64_t d = 0; d < D; d += 16)
      _mm512_storeu_si512(out + q * D + d, interleave(_mm256_loadu_si256((const __m256i*)(a + d)),
                          2 * q + 1 < rows ? _mm256_loadu_si256((const __m256i*)(a + ld + d)) : _mm256_setzero_si256()));
  }
  ldb = D;
  return out;
}
static const uint32_t* rows_operand(const float* X, int64_t, int64_t ld, int64_t, uint32_t*, int64_t& ldb) {
  ldb = ld;
  return reinterpret_cast<const uint32_t*>(X);
}

// elements the forward keeps per (batch, head); block a multiple of 16 (llama/blocked_attention.py
// computes the same in closed form)
int64_t saved_per_head(int64_t T, int64_t start, int64_t block, int64_t ks) {
  int64_t s = 0;
  for (int64_t i0 = 0; i0 < T; i0 += block) {
    const int64_t r = std::min(block, T - i0);
    s += up(r, ks) * up(start + i0 + r, 16);
  }
  return s;
}

static void check(const torch::Tensor& t, const char* name, at::ScalarType dt, int64_t B, int64_t L, int64_t D) {
  TORCH_CHECK(t.dim() == 4 && t.scalar_type() == dt && t.stride(3) == 1 && t.size(0) == B && t.size(1) == L &&
              t.size(3) == D, "causal_attention: ", name, " must be ", dt, " (", B, ", ", L, ", heads, ", D,
              ") with unit stride in the last dimension, got ", t.sizes(), " ", t.scalar_type());
}

template <typename T>
static void forward(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, int64_t start, int64_t block,
                    torch::Tensor& out, torch::Tensor& probs, bool keep = true) {  // keep: write probs for the backward
  constexpr int KS = Op<T>::KS;
  const int64_t B = q.size(0), T_ = q.size(1), H = q.size(2), D = q.size(3), S = start + T_, Hkv = k.size(2), G = H / Hkv;
  const int64_t per = saved_per_head(T_, start, block, KS), S16 = up(S, 16), SK = up(S, KS);
  const T *Q = (const T*)q.data_ptr(), *K = (const T*)k.data_ptr(), *Vv = (const T*)v.data_ptr();
  T *O = (T*)out.data_ptr(), *P = (T*)probs.data_ptr();
  const float scale = 1.f / std::sqrt((float)D);
  // (batch row, kv head) units from a shared counter: a core slowed by another tenant of the machine takes fewer
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(B * Hkv, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    std::vector<uint32_t> Kp(D / KS * S16), Vb(KS == 2 ? SK / 2 * D : 0);
    std::vector<float> Sc(block * S16), Ot(block * D);
    std::vector<T> Pr(block * S16);
    for (int64_t w; (w = next.fetch_add(1)) < B * Hkv;) {
      const int64_t b = w / Hkv, g = w % Hkv;
      columns(K + b * k.stride(0) + g * k.stride(2), S, k.stride(1), D, Kp.data(), S16);  // for Q K^T
      int64_t ldv;
      const uint32_t* Vp = rows_operand(Vv + b * v.stride(0) + g * v.stride(2), S, v.stride(1), D, Vb.data(), ldv);  // for P V
      for (int64_t h = g * G; h < (g + 1) * G; ++h) {
        T* saved = keep ? P + (b * H + h) * per : nullptr;
        for (int64_t i0 = 0; i0 < T_; i0 += block) {
          const int64_t r = std::min(block, T_ - i0), n = start + i0 + r, n16 = up(n, 16);
          T* pr = KS == 2 || !keep ? Pr.data() : saved;  // fp32: the kept rows are the A operand of P V as they are
          gemm<T>(r, n16, D / KS, Q + b * q.stride(0) + i0 * q.stride(1) + h * q.stride(2), q.stride(1), Kp.data(), S16,
                  Sc.data(), n16, false, false, COLUMNS, start + i0);
          for (int64_t i = 0; i < r; ++i) {  // softmax of row i over the keys it sees: start + i0 + i + 1
            const int64_t seen = start + i0 + i + 1, whole = seen / 16 * 16, end = up(seen, 16);
            const __mmask16 tail = (__mmask16)((1u << (seen - whole)) - 1);
            float* s = Sc.data() + i * n16;
            F mv = V::set1(-std::numeric_limits<float>::infinity());
            for (int64_t j = 0; j < whole; j += 16) mv = V::max(mv, V::load(s + j));
            if (tail) mv = V::max(mv, _mm512_mask_loadu_ps(mv, tail, s + whole));
            const F mb = V::set1(_mm512_reduce_max_ps(mv) * scale), sc = V::set1(scale);
            F sum = V::zero();
            for (int64_t j = 0; j < end; j += 16) {
              F e = vexp(_mm512_fmsub_ps(V::load(s + j), sc, mb));
              if (j == whole) e = _mm512_maskz_mov_ps(tail, e);
              V::store(s + j, e);
              sum = V::add(sum, e);
            }
            const F inv = V::set1(1.f / V::sum(sum));
            T* row = pr + i * n16;
            for (int64_t j = 0; j < n16; j += 16) Op<T>::store(row + j, j < end ? V::mul(V::load(s + j), inv) : V::zero());
          }
          gemm<T>(r, D, up(n, KS) / KS, pr, n16, Vp, ldv, Ot.data(), D, false, false, REDUCED, start + i0);
          for (int64_t i = 0; i < r; ++i)
            for (int64_t d = 0; d < D; d += 16) Op<T>::store(O + ((b * T_ + i0 + i) * H + h) * D + d, V::load(Ot.data() + i * D + d));
          if (!keep) continue;
          if constexpr (KS == 2) {  // kept as pairs of rows: the A operand of P^T dO in the backward
            uint32_t* sv = reinterpret_cast<uint32_t*>(saved);
            for (int64_t i = 0; i < r; i += 2)
              for (int64_t j = 0; j < n16; j += 16)
                _mm512_storeu_si512(sv + i / 2 * n16 + j, interleave(_mm256_loadu_si256((const __m256i*)(pr + i * n16 + j)),
                                    i + 1 < r ? _mm256_loadu_si256((const __m256i*)(pr + (i + 1) * n16 + j)) : _mm256_setzero_si256()));
          }
          saved += up(r, KS) * n16;
        }
      }
    }
  });
}

template <typename T>
static void backward(const torch::Tensor& grad, const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                     const torch::Tensor& probs, int64_t start, int64_t block, torch::Tensor& dq, torch::Tensor& dk,
                     torch::Tensor& dv) {
  constexpr int KS = Op<T>::KS;
  const int64_t B = q.size(0), T_ = q.size(1), H = q.size(2), D = q.size(3), S = start + T_, Hkv = k.size(2), G = H / Hkv;
  const int64_t per = saved_per_head(T_, start, block, KS), S16 = up(S, 16), SK = up(S, KS);
  const T *Q = (const T*)q.data_ptr(), *K = (const T*)k.data_ptr(), *Vv = (const T*)v.data_ptr();
  const T *Gd = (const T*)grad.data_ptr(), *P = (const T*)probs.data_ptr();
  T *DQ = (T*)dq.data_ptr(), *DK = (T*)dk.data_ptr(), *DV = (T*)dv.data_ptr();
  const float scale = 1.f / std::sqrt((float)D);
  std::atomic<int64_t> next{0};  // units from a shared counter, as in the forward
  at::parallel_for(0, std::min<int64_t>(B * Hkv, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    const bool pairs = KS == 2;
    std::vector<uint32_t> Kb(pairs ? SK / 2 * D : 0), Vp(D / KS * S16), dSp(pairs ? block / 2 * S16 : 0);
    std::vector<uint32_t> Qb(pairs ? block / 2 * D : 0), dOb(pairs ? block / 2 * D : 0);
    std::vector<float> dK(S * D), dV(S * D), dP((block + 1) * S16), dQt(block * D);
    std::vector<T> dS(block * S16);
    for (int64_t w; (w = next.fetch_add(1)) < B * Hkv;) {
      const int64_t b = w / Hkv, g = w % Hkv;
      int64_t ldk;
      const uint32_t* Kp = rows_operand(K + b * k.stride(0) + g * k.stride(2), S, k.stride(1), D, Kb.data(), ldk);  // for dS K
      columns(Vv + b * v.stride(0) + g * v.stride(2), S, v.stride(1), D, Vp.data(), S16);  // for dO V^T
      std::fill(dK.begin(), dK.end(), 0.f);  // fp32, summed over blocks and query heads
      std::fill(dV.begin(), dV.end(), 0.f);
      for (int64_t h = g * G; h < (g + 1) * G; ++h) {
        const T* dO = Gd + b * grad.stride(0) + h * grad.stride(2);
        const T* saved = P + (b * H + h) * per;
        for (int64_t i0 = 0; i0 < T_; i0 += block) {
          const int64_t r = std::min(block, T_ - i0), n = start + i0 + r, n16 = up(n, 16), rk = up(r, KS) / KS;
          int64_t ldo, ldq;
          const uint32_t* dOp = rows_operand(dO + i0 * grad.stride(1), r, grad.stride(1), D, dOb.data(), ldo);
          const uint32_t* Qp = rows_operand(Q + b * q.stride(0) + i0 * q.stride(1) + h * q.stride(2), r, q.stride(1), D, Qb.data(), ldq);
          gemm<T>(n, D, rk, saved, n16, dOp, ldo, dV.data(), D, true, true, QUERIES, start + i0);  // dV += P^T dO
          gemm<T>(r, n16, D / KS, dO + i0 * grad.stride(1), grad.stride(1), Vp.data(), S16, dP.data(), n16, false, false,
                  COLUMNS, start + i0);  // dP = dO V^T (columns a row does not see are left as they were: P is 0 there)
          const F sc = V::set1(scale);
          if constexpr (KS == 2) {
            if (r % 2) std::fill(dP.data() + r * n16, dP.data() + (r + 1) * n16, 0.f);  // the pad row pairs with zeros
            const __m512i hi = _mm512_set1_epi32((int)0xffff0000u);  // the upper bf16 of a pair, as fp32
            const uint32_t* sv = reinterpret_cast<const uint32_t*>(saved);
            for (int64_t i = 0; i < r; i += 2) {  // dS = P (dP - sum_j P dP) scale, rows i and i + 1 at once
              const uint32_t* p = sv + i / 2 * n16;
              const float *d0 = dP.data() + i * n16, *d1 = d0 + n16;
              const int64_t end = std::min(n16, up(start + i0 + i + 2, 16));  // past it P is 0 in both rows
              F s0 = V::zero(), s1 = V::zero();
              for (int64_t j = 0; j < end; j += 16) {
                const __m512i x = _mm512_loadu_si512(p + j);
                s0 = V::fma(_mm512_castsi512_ps(_mm512_slli_epi32(x, 16)), V::load(d0 + j), s0);
                s1 = V::fma(_mm512_castsi512_ps(_mm512_and_si512(x, hi)), V::load(d1 + j), s1);
              }
              const F m0 = V::set1(V::sum(s0)), m1 = V::set1(V::sum(s1));
              T* o = dS.data() + i * n16;
              for (int64_t j = 0; j < end; j += 16) {
                const __m512i x = _mm512_loadu_si512(p + j);
                const __m256i a = V::bf16_bits(V::mul(V::mul(_mm512_castsi512_ps(_mm512_slli_epi32(x, 16)), V::sub(V::load(d0 + j), m0)), sc));
                const __m256i c = V::bf16_bits(V::mul(V::mul(_mm512_castsi512_ps(_mm512_and_si512(x, hi)), V::sub(V::load(d1 + j), m1)), sc));
                _mm256_storeu_si256((__m256i*)(o + j), a);
                if (i + 1 < r) _mm256_storeu_si256((__m256i*)(o + n16 + j), c);
                _mm512_storeu_si512(dSp.data() + i / 2 * n16 + j, interleave(a, c));  // pairs of rows, for dS^T Q
              }
              std::fill(o + end, o + n16, (T)0);
              if (i + 1 < r) std::fill(o + n16 + end, o + 2 * n16, (T)0);
              std::fill(dSp.data() + i / 2 * n16 + end, dSp.data() + (i / 2 + 1) * n16, 0u);
            }
          } else {
            for (int64_t i = 0; i < r; ++i) {  // dS = P (dP - sum_j P dP) scale
              const float *p = saved + i * n16, *d = dP.data() + i * n16;
              const int64_t end = std::min(n16, up(start + i0 + i + 1, 16));  // past it P is 0
              F s = V::zero();
              for (int64_t j = 0; j < end; j += 16) s = V::fma(V::load(p + j), V::load(d + j), s);
              const F m = V::set1(V::sum(s));
              for (int64_t j = 0; j < end; j += 16) V::store(dS.data() + i * n16 + j, V::mul(V::mul(V::load(p + j), V::sub(V::load(d + j), m)), sc));
              std::fill(dS.data() + i * n16 + end, dS.data() + (i + 1) * n16, 0.f);
            }
          }
          gemm<T>(r, D, up(n, KS) / KS, dS.data(), n16, Kp, ldk, dQt.data(), D, false, false, REDUCED, start + i0);  // dQ = dS K
          for (int64_t i = 0; i < r; ++i)
            for (int64_t d = 0; d < D; d += 16) Op<T>::store(DQ + ((b * T_ + i0 + i) * H + h) * D + d, V::load(dQt.data() + i * D + d));
          const T* dSa = KS == 2 ? reinterpret_cast<const T*>(dSp.data()) : dS.data();  // dS^T, laid out as B
          gemm<T>(n, D, rk, dSa, n16, Qp, ldq, dK.data(), D, true, true, QUERIES, start + i0);  // dK += dS^T Q
          saved += up(r, KS) * n16;
        }
      }
      for (int64_t j = 0; j < S; ++j)
        for (int64_t d = 0; d < D; d += 16) {
          Op<T>::store(DK + ((b * S + j) * Hkv + g) * D + d, V::load(dK.data() + j * D + d));
          Op<T>::store(DV + ((b * S + j) * Hkv + g) * D + d, V::load(dV.data() + j * D + d));
        }
    }
  });
}

}  // namespace attn

// Prefill's products (AVX-512; bf16 or fp32, weights in that dtype or int8): Y (M x N) = X (M x K) W^T
// with W (N x K) read as the model stores it. The attention's tile scheme, turned around: each step broadcasts one word of a
// weight row (a bf16 pair or one fp32) against 16 positions of X laid out as columns, so the
// positions are the lanes and the weights are never repacked (torch's oneDNN packs every weight for
// every call). A tile is 6 weight rows x 64 positions (24 accumulators; on the AMD EPYC with
// AVX512-BF16, 1-2% faster than the 4 rows before); while it runs it prefetches the same columns of
// the next tile's rows at the pace of its own reads, so the weights stream from memory under the
// products. X is laid out and Y written by 16 x 16 word transposes in registers (a 16-row gather
// thrashes L1 where the row stride is a power of two). Threads split the weight rows.
namespace rowlin {
// tile: R weight rows x W vectors of positions; rows per task (96: at 1024 positions 2-4% faster
// than 48 on the AMD EPYC; 144 left 768 rows in 5.3 tasks, 10% slower there); a weight panel's
// words (KC: its B block, KC x CB words, 32 KB, stays in L1 while the tile walks the task's rows;
// 128 against 64 on the AMD EPYC: 2-4% faster in bf16, 3-4% in fp32, as the tiles carry their sums
// in C from panel to panel half as often; 160 and 192 were within 1% of 128)
constexpr int R = 6, W = 4, CB = 16 * W, CHUNK = 96, KC = 128;

// X (rows x kw words, row stride ld words; or kw bf16, each widened to an fp32 word) as columns:
// out[p][j] (row stride cb) = word p of row j, zero past rows (cb a multiple of 16)
static inline __m512i words16(const uint32_t* p, __mmask16 km) { return _mm512_maskz_loadu_epi32(km, p); }
static inline __m512i words16(const bf16* p, __mmask16 km) {
  const __m256i h = _mm512_castsi512_si256(_mm512_maskz_loadu_epi16((__mmask32)km, p));
  return _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
}
template <typename S>
static void pack(const S* X, int64_t rows, int64_t ld, int64_t kw, uint32_t* out, int64_t cb) {
  for (int64_t j = 0; j < cb; j += 16)
    for (int64_t p0 = 0; p0 < kw; p0 += 16) {
      const int64_t kn = std::min<int64_t>(16, kw - p0);
      const __mmask16 km = (__mmask16)((1u << kn) - 1);
      __m512i r[16], o[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) r[i] = j + i < rows ? words16(X + (j + i) * ld + p0, km) : _mm512_setzero_si512();
      transpose16(r, o);
      for (int k = 0; k < kn; ++k) _mm512_storeu_si512(out + (p0 + k) * cb + j, o[k]);
    }
}

// C (RR x 16 WW fp32, row stride ldc) = [C +] w (RR rows, stride ldw) . B (kp x 16 WW words); pf: RR
// rows (pfl bytes apart, pfs bytes a step) whose same columns the tile prefetches, a cache line of
// each per 16 steps (or null)
template <typename T, int RR, int WW>
static void tile(const T* w, int64_t ldw, const uint32_t* B, int64_t kp, float* C, int64_t ldc, const char* pf,
                 int64_t pfl, int64_t pfs, bool add) {
  using Op = attn::Op<T>;
  F acc[RR][WW];
#pragma GCC unroll 16
  for (int i = 0; i < RR; ++i)
#pragma GCC unroll 16
    for (int v = 0; v < WW; ++v) acc[i][v] = add ? _mm512_loadu_ps(C + i * ldc + 16 * v) : V::zero();
  for (int64_t p0 = 0; p0 < kp; p0 += 16) {
    if (pf)
#pragma GCC unroll 16
      for (int i = 0; i < RR; ++i) _mm_prefetch(pf + i * pfl + pfs * p0, _MM_HINT_T0);
    const int64_t p1 = std::min(kp, p0 + 16);
    for (int64_t p = p0; p < p1; ++p) {
      F b[WW];
#pragma GCC unroll 16
      for (int v = 0; v < WW; ++v) b[v] = _mm512_castsi512_ps(_mm512_loadu_si512(B + p * 16 * WW + 16 * v));
#pragma GCC unroll 16
      for (int i = 0; i < RR; ++i) {
        const F a = Op::a(w + i * ldw + Op::KS * p);
#pragma GCC unroll 16
        for (int v = 0; v < WW; ++v) acc[i][v] = Op::fma(acc[i][v], a, b[v]);
      }
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < RR; ++i)
#pragma GCC unroll 16
    for (int v = 0; v < WW; ++v) _mm512_storeu_ps(C + i * ldc + 16 * v, acc[i][v]);
}
#define LLAMA_TILE_ARGS const T *w, int64_t ldw, const uint32_t *B, int64_t kp, float *C, int64_t ldc, const char *pf, int64_t pfl, int64_t pfs, bool add
template <typename T, int RR>
static void tile_w(int ww, LLAMA_TILE_ARGS) {
  switch (ww) {
    case 1: return tile<T, RR, 1>(w, ldw, B, kp, C, ldc, pf, pfl, pfs, add);
    case 2: return tile<T, RR, 2>(w, ldw, B, kp, C, ldc, pf, pfl, pfs, add);
    case 3: return tile<T, RR, 3>(w, ldw, B, kp, C, ldc, pf, pfl, pfs, add);
    default: return tile<T, RR, W>(w, ldw, B, kp, C, ldc, pf, pfl, pfs, add);
  }
}
template <typename T>
static void tile_rw(int rr, int ww, LLAMA_TILE_ARGS) {
  switch (rr) {
    case 1: return tile_w<T, 1>(ww, w, ldw, B, kp, C, ldc, pf, pfl, pfs, add);
    case 2: return tile_w<T, 2>(ww, w, ldw, B, kp, C, ldc, pf, pfl, pfs, add);
    case 3: return tile_w<T, 3>(ww, w, ldw, B, kp, C, ldc, pf, pfl, pfs, add);
    case 4: return tile_w<T, 4>(ww, w, ldw, B, kp, C, ldc, pf, pfl, pfs, add);
    case 5: return tile_w<T, 5>(ww, w, ldw, B, kp, C, ldc, pf, pfl, pfs, add);
    default: return tile_w<T, R>(ww, w, ldw, B, kp, C, ldc, pf, pfl, pfs, add);
  }
}
#undef LLAMA_TILE_ARGS

// The type a product of T inputs and WT weights multiplies in: T with bf16 dots, else fp32 (bf16 and
// int8 widen exactly; the sums' order is the bf16 pairs' either way: k, k + 1, ...). Without bf16 dots a
// bf16 pair's product takes two fp32 multiplies and four integer ops to widen both sides in registers,
// which bound rowlin's bf16 tile; widened beforehand (the weights a panel at a time, the inputs once),
// 160M's products at 128 rows on the Xeon without AVX512-BF16 ran 1.10-1.17x faster (best of 150
// interleaved calls), its batch-1 prefill 1.13x
#if defined(LLAMA_ISA_AVX512BF16)
template <typename T, typename WT> using Compute = T;
#else
template <typename T, typename WT> using Compute = float;
#endif

// Elements k0 .. k0 + kn of nr weight rows (row stride K; int8, or bf16 where the compute type is fp32) ->
// out (nr x kn, contiguous), widened exactly to the compute type CT (|int8| <= 127 fits bf16's
// significand)
template <typename CT, typename WT>
static void panel(const WT* rows, int64_t nr, int64_t K, int64_t k0, int64_t kn, CT* out) {
  for (int64_t n = 0; n < nr; ++n) {
    const WT* r = rows + n * K + k0;
    CT* o = out + n * kn;
    int64_t k = 0;
    if constexpr (std::is_same<WT, int8_t>::value) {
      for (; k + 16 <= kn; k += 16) E<CT>::store(o + k, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(r + k)))));
      for (; k < kn; ++k) o[k] = E<CT>::from((float)r[k]);
    } else {
      for (; k + 16 <= kn; k += 16) E<CT>::store(o + k, E<WT>::load(r + k));
      for (; k < kn; ++k) o[k] = E<CT>::from(E<WT>::to(r[k]));
    }
  }
}

// Y rows (row stride ldy) at the columns of C's nr rows (C: nr x gq fp32, positions < gm valid) =
// round(C^T), or with add round(Y + round(C^T)), as the model's residual add rounds; with int8 weights
// each column's product rounded, times its scale (sc: the nr columns'), rounded, as Int8Linear computes it.
// 16 positions at a time: their nr sums transposed into a buffer, then each row of Y written in one
// go. Written 16 columns at a time, as transposed, 16 rows of Y a store each were touched where the
// row stride is a power of two (w1|w3's 4096 columns: 8 KB) all in one L1 set, more than its ways,
// and every store missed: that product ran 5-8% slower than at 4080 columns
template <typename T>
static void write(const float* C, int64_t nr, int64_t gq, int64_t gm, T* Y, int64_t ldy, bool add, const T* sc) {
  alignas(64) float st[16][attn::up(CHUNK, 16)];  // 16 positions' sums of the nr columns
  for (int64_t m0 = 0; m0 < gm; m0 += 16) {
    const int64_t mk = std::min<int64_t>(16, gm - m0);
    for (int64_t n0 = 0; n0 < nr; n0 += 16) {
      const int64_t nn = std::min<int64_t>(16, nr - n0);
      __m512i r[16], o[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i)
        r[i] = i < nn ? _mm512_loadu_si512(C + (n0 + i) * gq + m0) : _mm512_setzero_si512();
      transpose16(r, o);
      for (int64_t k = 0; k < mk; ++k) _mm512_store_si512(&st[k][n0], o[k]);
    }
    for (int64_t k = 0; k < mk; ++k) {
      T* y = Y + (m0 + k) * ldy;
      int64_t n = 0;
      for (; n + 16 <= nr; n += 16) {
        F v = E<T>::rnd(V::load(&st[k][n]));
        if (sc) v = E<T>::rnd(V::mul(v, E<T>::load(sc + n)));
        E<T>::store(y + n, add ? V::add(E<T>::load(y + n), v) : v);
      }
      for (; n < nr; ++n) {
        float v = E<T>::rnd(st[k][n]);
        if (sc) v = E<T>::rnd(v * E<T>::to(sc[n]));
        y[n] = E<T>::from(add ? E<T>::to(y[n]) + v : v);
      }
    }
  }
}

// Y rows (row stride ldy) at nr columns = round(round(silu(a)) * b), a and b the rounded sums of C's
// rows 0..nr and nr..2 nr (C: 2 nr x gq fp32, positions < gm valid): silu_rows of the w1|w3 product
// as write and silu_rows compute it, without the product in memory between them
template <typename T>
static void write_gated(const float* C, int64_t nr, int64_t gq, int64_t gm, T* Y, int64_t ldy) {
  alignas(64) float st[2][16][attn::up(CHUNK / 2, 16)];  // 16 positions' sums of a, of b
  for (int64_t m0 = 0; m0 < gm; m0 += 16) {
    const int64_t mk = std::min<int64_t>(16, gm - m0);
    for (int h = 0; h < 2; ++h)
      for (int64_t n0 = 0; n0 < nr; n0 += 16) {
        const int64_t nn = std::min<int64_t>(16, nr - n0);
        __m512i r[16], o[16];
#pragma GCC unroll 16
        for (int i = 0; i < 16; ++i)
          r[i] = i < nn ? _mm512_loadu_si512(C + (h * nr + n0 + i) * gq + m0) : _mm512_setzero_si512();
        transpose16(r, o);
        for (int64_t k = 0; k < mk; ++k) _mm512_store_si512(&st[h][k][n0], o[k]);
      }
    for (int64_t k = 0; k < mk; ++k) {
      T* y = Y + (m0 + k) * ldy;
      int64_t n = 0;
      for (; n + 16 <= nr; n += 16)
        E<T>::store(y + n, silu_times<T>(E<T>::rnd(V::load(&st[0][k][n])), E<T>::rnd(V::load(&st[1][k][n]))));
      for (; n < nr; ++n) y[n] = E<T>::from(silu_times<T>(E<T>::rnd(st[0][k][n]), E<T>::rnd(st[1][k][n])));
    }
  }
}

// Y (M x N, row stride ldy) = round(X (M x K, contiguous) W^T), or with add round(Y + round(X W^T)); W
// (N x K) contiguous, in T or int8 with `scales` (N, in T), multiplied in Compute<T, WT> (X's rows
// widened to fp32 as they are laid out where that is fp32 and T is not); bf16 needs K even. Positions go in
// groups whose columns (kp x group words) stay within L2 (1 MB: 128 positions at K = 2048 in fp32);
// threads share tasks of CHUNK weight rows (shared_rows). A task walks K in panels of KC words: for each panel and
// block of 64 positions, the tile walks the task's rows with the block's KC x 64 words in L1, the sums
// carried in C from panel to panel (the same sums, in the same order, as without panels). Without
// panels the tiles read their whole block from L2: on the Xeon without AVX512-BF16 at 1024 rows,
// 1.15-1.3x slower in fp32. Weights in the compute type are read in place (each tile prefetching the
// next tile's rows); others are widened a panel of the task's rows at a time (`panel`), the next
// panel's rows prefetched while the last block's tiles run (while the first block's: 2-3% slower;
// widening a whole task at once, unfetched, stalled on memory: ~10% of the product)
template <typename T, typename WT = T>
static void linear(const T* X, int64_t M, int64_t K, const WT* Wt, int64_t N, T* Y, int64_t ldy, bool add,
                   const T* scales = nullptr, int64_t gate = 0) {
  using CT = Compute<T, WT>;
  constexpr bool in_place = std::is_same<CT, WT>::value;
  TORCH_CHECK(!gate || (in_place && !add && !scales && N == 2 * gate),
              "rowlin::linear: a gated product takes w1|w3 in the compute type");
  // a task's Y columns (gated: half a task's weight rows are w1's, half w3's) and Y's width
  const int64_t TC = gate ? CHUNK / 2 : CHUNK, NY = gate ? gate : N;
  constexpr int KS = attn::Op<CT>::KS;
  const int64_t kp = K / KS, G = std::max<int64_t>(CB, (1024 * 1024 / (4 * kp)) / CB * CB);
  // every word of these is written before it is read: left uninitialized (zeroing them was ~2% of prefill)
  std::unique_ptr<uint32_t[]> cols(new uint32_t[kp * attn::up(std::min(M, G), CB)]);
  for (int64_t g0 = 0; g0 < M; g0 += G) {
    const int64_t gm = std::min(G, M - g0), gq = attn::up(gm, 16), nb = (gq + CB - 1) / CB;
    at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {  // block b: kp x min(CB, gq - b CB) words
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t rows = std::min<int64_t>(CB, gm - b * CB), cb = std::min<int64_t>(CB, gq - b * CB);
        const T* x = X + (g0 + b * CB) * K;
        if constexpr (std::is_same<CT, T>::value) pack(reinterpret_cast<const uint32_t*>(x), rows, kp, kp, cols.get() + b * kp * CB, cb);
        else pack(x, rows, K, K, cols.get() + b * kp * CB, cb);  // bf16 rows widened to fp32 words
      }
    });
    auto tasks = [&](int64_t c0, int64_t c1) {  // tasks c0..c1, in order, on one thread
      std::unique_ptr<float[]> ct(new float[CHUNK * gq]);
      std::vector<CT> pw(in_place ? 0 : CHUNK * KS * KC);  // a panel of the task's rows, widened
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t n0 = c * TC, nr = std::min<int64_t>(TC, NY - n0);
        for (int64_t k0 = 0; k0 < kp; k0 += KC) {
          const int64_t kn = std::min<int64_t>(KC, kp - k0);
          // where weights are widened, the next panel's rows (this task's at k0 + KC, or the next task's
          // first): rows from nx0, from element nxk, nxb bytes each
          const bool last = k0 + KC >= kp;
          const int64_t nx0 = last ? n0 + CHUNK : n0, nxk = last ? 0 : KS * (k0 + KC);
          const int64_t nxb = KS * std::min<int64_t>(KC, last ? kp : kp - k0 - KC) * (int64_t)sizeof(WT);
          if constexpr (!in_place) panel<CT, WT>(Wt + n0 * K, nr, K, KS * k0, KS * kn, pw.data());
          for (int64_t b = 0; b < nb; ++b) {
            const int64_t ww = std::min<int64_t>(CB, gq - b * CB);
            for (int64_t h = 0; h < (gate ? 2 : 1); ++h)  // gated: w1's nr rows, then w3's
            for (int64_t i = 0; i < nr; i += R) {
              const int rr = (int)std::min<int64_t>(R, nr - i);
              float* C = ct.get() + (h * nr + i) * gq + b * CB;
              const uint32_t* B = cols.get() + b * kp * CB + k0 * ww;
              if constexpr (in_place) {  // weight row `row`, panel k0; the next tile's rows (from `next`)
                                         // prefetched while the first block runs
                const int64_t row = h * gate + n0 + i, next = i + R < nr ? row + R : gate && !h ? gate + n0 : n0 + TC;
                const CT* w = reinterpret_cast<const CT*>(Wt) + row * K + KS * k0;
                const CT* nw = reinterpret_cast<const CT*>(Wt) + next * K + KS * k0;
                const char* pf = b == 0 && next + R <= N ? (const char*)nw : nullptr;
                tile_rw<CT>(rr, (int)(ww / 16), w, K, B, kn, C, gq, pf, K * sizeof(CT), KS * sizeof(CT), k0 > 0);
              } else {
                if (b == nb - 1)
                  for (int64_t r = nx0 + i; r < std::min<int64_t>(nx0 + i + R, N); ++r)
                    for (int64_t o = 0; o < nxb; o += 64) _mm_prefetch((const char*)(Wt + r * K + nxk) + o, _MM_HINT_T0);
                tile_rw<CT>(rr, (int)(ww / 16), pw.data() + KS * i * kn, KS * kn, B, kn, C, gq, nullptr, 0, 0, k0 > 0);
              }
            }
          }
        }
        if (gate) write_gated<T>(ct.get(), nr, gq, gm, Y + g0 * ldy + n0, ldy);
        else write<T>(ct.get(), nr, gq, gm, Y + g0 * ldy + n0, ldy, add, scales ? scales + n0 : nullptr);
      }
    };
    // each thread takes its own range's tasks from the front, then helps with the back of another's
    // (shared_rows): split once, by halves, a core slowed by another tenant of the machine left the
    // other waiting (160M's batch-1 bf16 prefill on the 2-core Xeon: 1.03-1.17x, paired medians).
    // A task is long enough to be taken one at a time (C = 1; against 4: prefill 0.98-1.01x, AMD EPYC)
    shared_rows<1>((NY + TC - 1) / TC, 1, [](int64_t lo, int64_t hi) { return hi - lo; },
                [&](int64_t lo, int64_t, int64_t a, int64_t b, bool) { tasks(lo + a, lo + b); });
  }
}

}  // namespace rowlin

// q (B, T, H, D) at positions start.., k and v (B, start + T, Hkv, D) (H a multiple of Hkv), bf16 or
// fp32, unit stride in D -> (out (B, T, H, D), the kept probabilities (B H saved,)); scale 1/sqrt(D)
std::vector<torch::Tensor> causal_attention_forward(torch::Tensor q, torch::Tensor k, torch::Tensor v, int64_t start,
                                                    int64_t block) {
  using namespace attn;
  const auto dt = q.scalar_type();
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3), S = start + T;
  TORCH_CHECK((dt == at::kBFloat16 || dt == at::kFloat) && block > 0 && block % 16 == 0 && D % 32 == 0 && start >= 0,
              "causal_attention: bf16 or fp32, block a multiple of 16, head size a multiple of 32, start >= 0");
  check(q, "q", dt, B, T, D);
  check(k, "k", dt, B, S, D);
  check(v, "v", dt, B, S, D);
  const int64_t Hkv = k.size(2);
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0 && v.size(2) == Hkv, "causal_attention: k and v heads must divide q's");
  auto out = torch::empty({B, T, H, D}, q.options());
  const int64_t ks = dt == at::kBFloat16 ? 2 : 1;
  auto probs = torch::empty({B * H * saved_per_head(T, start, block, ks)}, q.options());
  if (dt == at::kBFloat16) forward<bf16>(q, k, v, start, block, out, probs);
  else forward<float>(q, k, v, start, block, out, probs);
  return {out, probs};
}

// The gradients of causal_attention_forward's q, k, v for the gradient `grad` (B, T, H, D) of its output
std::vector<torch::Tensor> causal_attention_backward(torch::Tensor grad, torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                                     torch::Tensor probs, int64_t start, int64_t block) {
  using namespace attn;
  const auto dt = q.scalar_type();
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3), S = start + T;
  TORCH_CHECK((dt == at::kBFloat16 || dt == at::kFloat) && block > 0 && block % 16 == 0 && D % 32 == 0 && start >= 0,
              "causal_attention: bf16 or fp32, block a multiple of 16, head size a multiple of 32, start >= 0");
  check(grad, "grad", dt, B, T, D);
  check(q, "q", dt, B, T, D);
  check(k, "k", dt, B, S, D);
  check(v, "v", dt, B, S, D);
  const int64_t Hkv = k.size(2), ks = dt == at::kBFloat16 ? 2 : 1;
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0 && v.size(2) == Hkv, "causal_attention: k and v heads must divide q's");
  TORCH_CHECK(probs.scalar_type() == dt && probs.is_contiguous() && probs.numel() == B * H * saved_per_head(T, start, block, ks),
              "causal_attention: probs are not the forward's");
  auto dq = torch::empty({B, T, H, D}, q.options());
  auto dk = torch::empty({B, S, Hkv, D}, q.options());
  auto dv = torch::empty({B, S, Hkv, D}, q.options());
  if (dt == at::kBFloat16) backward<bf16>(grad, q, k, v, probs, start, block, dq, dk, dv);
  else backward<float>(grad, q, k, v, probs, start, block, dq, dk, dv);
  return {dq, dk, dv};
}

template <typename T>
static void linear_rows_as(const torch::Tensor& x, const torch::Tensor& w, torch::Tensor& out, bool add, const torch::Tensor& scales) {
  auto P = [](const torch::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); };
  if (scales.numel())
    rowlin::linear<T, int8_t>(P(x), x.size(0), x.size(1), w.data_ptr<int8_t>(), w.size(0), P(out), out.size(1), add, P(scales));
  else
    rowlin::linear<T>(P(x), x.size(0), x.size(1), P(w), w.size(0), P(out), out.size(1), add);
}
// out (M, N) = round(x (M, K) w (N, K)^T), or with add round(out + round(x w^T)): prefill's product
// (rowlin::linear), bf16 or fp32, all contiguous; bf16 needs K even. w in x's dtype, or int8 with
// `scales` (N,) in x's dtype (an empty tensor otherwise), as Int8Linear computes it
void linear_rows(torch::Tensor x, torch::Tensor w, torch::Tensor out, bool add, torch::Tensor scales) {
  const auto dt = x.scalar_type();
  const bool q8 = scales.numel() > 0;
  TORCH_CHECK((dt == at::kBFloat16 || dt == at::kFloat) && x.dim() == 2 && w.dim() == 2 && out.dim() == 2 &&
              w.scalar_type() == (q8 ? at::kChar : dt) && out.scalar_type() == dt && x.is_contiguous() && w.is_contiguous() &&
              out.is_contiguous() && w.size(1) == x.size(1) && out.size(0) == x.size(0) && out.size(1) == w.size(0) &&
              (dt == at::kFloat || x.size(1) % 2 == 0) &&
              (!q8 || (scales.scalar_type() == dt && scales.is_contiguous() && scales.numel() == w.size(0))),
              "linear_rows: contiguous x (M, K), w (N, K), out (M, N) of one dtype (or int8 w with N scales)");
  if (dt == at::kBFloat16) linear_rows_as<bf16>(x, w, out, add, scales);
  else linear_rows_as<float>(x, w, out, add, scales);
}

#endif

// Prefill: the model's forward over T new positions of B rows in one call (bf16 or fp32 activations;
// weights in that dtype or int8 with scales), for generation's first chunk. The products take the
// packed q|k|v and w1|w3: in the AVX-512 builds rowlin::linear (weights not in the compute type
// widened a panel at a time; the residual add fused into wo's and w2's) except where torch's fp32 product
// is faster (see `lin`), elsewhere torch's at::linear (int8 weights cast for the call, as Int8Linear
// does); the output product of up to 8 rows is the decoding step's.
// Everything between the products is here, one pass each over rows in parallel: RMSNorm, RoPE
// (written into q in place and into the cache for k), the cache write of v, SiLU(a) * b, and the
// causal attention over the cache's prefix (the blocked kernel where the build has it, nothing kept
// for a backward; else torch's sdpa). The rounding points
// are the model's, as in the decoding step. Returns the last position's logits (B, vocab), fp32.
namespace prefill_ops {

// y (M = B T, q|k|v) rows: each pair (2j, 2j+1) of every q and k head rotated by its position's angle
// j in fp32 and rounded (into y for q, into the cache for k); v copied into the cache. freqs (T, D/2, 2)
// cos, sin. AVX-512 with D a multiple of 16: 8 pairs per register (the angles duplicated into both
// lanes of a pair, the pair swapped in-lane); else pair by pair.
template <typename T>
static void rope_rows(T* y, int64_t B, int64_t Tn, int64_t qdim, int64_t kvdim, int64_t D, const float* freqs,
                      T* ck, T* cv, int64_t S, int64_t start) {
  const int64_t nqkv = qdim + 2 * kvdim;
  at::parallel_for(0, B * Tn, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const int64_t b = m / Tn, t = m % Tn;
      const float* f = freqs + t * D;
      T* r = y + m * nqkv;
      T* kc = ck + (b * S + start + t) * kvdim;
      T* vc = cv + (b * S + start + t) * kvdim;
#if defined(LLAMA_AVX512)
      if (D % 16 == 0) {
        for (int64_t d = 0; d < D; d += 16) {
          const F fv = V::load(f + d), c = _mm512_moveldup_ps(fv), sh = _mm512_movehdup_ps(fv);
          const F sn = _mm512_mask_sub_ps(sh, 0x5555, V::zero(), sh);  // (-sin, sin) per pair
          auto rot = [&](const T* x) {
            const F v = E<T>::load(x);
            return V::add(V::mul(v, c), V::mul(_mm512_permute_ps(v, 0xB1), sn));  // (re c - im s, re s + im c)
          };
          for (int64_t i = d; i < qdim; i += D) E<T>::store(r + i, rot(r + i));
          for (int64_t i = d; i < kvdim; i += D) E<T>::store(kc + i, rot(r + qdim + i));
        }
        std::memcpy(vc, r + qdim + kvdim, kvdim * sizeof(T));
        continue;
      }
#endif
      auto rot = [&](const T* x, T* out, int64_t n) {  // pairs in scalar code (other ISAs, other head sizes)
        for (int64_t i = 0; i < n; i += 2) {
          const int64_t j = (i % D) / 2;
          const float c = f[2 * j], sn = f[2 * j + 1], re = E<T>::to(x[i]), im = E<T>::to(x[i + 1]);
          out[i] = E<T>::from(re * c - im * sn);
          out[i + 1] = E<T>::from(re * sn + im * c);
        }
      };
      rot(r, r, qdim);
      rot(r + qdim, kc, kvdim);
      std::memcpy(vc, r + qdim + kvdim, kvdim * sizeof(T));
    }
  });
}

// Causal attention of q (B, T, H, D) at positions start.. over k, v (B, start + T, Hkv, D) into out
// (B, T, H, D): the blocked kernel where this build has it (AVX512-BF16, D a multiple of 32), else
// torch's sdpa as the model calls it
template <typename T>
static void attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, int64_t start,
                      int64_t block, torch::Tensor& out, torch::Tensor& none) {
#if defined(LLAMA_AVX512)
  if (q.size(3) % 32 == 0) return attn::forward<T>(q, k, v, start, block, out, none, false);
#endif
  const int64_t Tn = q.size(1), G = q.size(2) / k.size(2);
  auto kh = k.transpose(1, 2), vh = v.transpose(1, 2);  // (B, Hkv, S, D)
  if (G > 1) { kh = kh.repeat_interleave(G, 1); vh = vh.repeat_interleave(G, 1); }
  std::optional<torch::Tensor> mask;
  if (start > 0) mask = torch::ones({Tn, start + Tn}, q.options().dtype(torch::kBool)).tril(start);
  out.copy_(at::scaled_dot_product_attention(q.transpose(1, 2), kh, vh, mask, 0.0, start == 0).transpose(1, 2));
}

// a (M, K) w (N, K)^T into a new tensor, or with `into` round(into + round(a w^T)), through torch's
// fp32 product (at::linear: MKL's sgemm in torch's CPU wheels): w (bf16, or int8 with `scales`:
// round(round(a w^T) scales), as Int8Linear computes it) widened to fp32 a slice of rows at a time
// (up to 8 MB), a once. For the AVX-512 build without bf16 dots from WIDE_ROWS rows on, where those
// products beat rowlin's (on that 2-core Xeon, 160M's layer products at 1024 rows: 1.2-1.4x; at 256
// rows rowlin's were faster). Each sum is fp32 over exact products, as rowlin's and the model's are,
// in sgemm's order
#if defined(LLAMA_AVX512) && !defined(LLAMA_ISA_AVX512BF16)
constexpr int64_t WIDE_ROWS = 512, FP32_ROWLIN_ROWS = 256;
static torch::Tensor wide_linear(const torch::Tensor& a, const torch::Tensor& w, torch::Tensor* into,
                                 const torch::Tensor* scales) {
  const int64_t N = w.size(0), K = w.size(1), NS = std::max<int64_t>(64, (8 << 20) / (4 * K));
  auto af = a.to(at::kFloat);
  auto y = into ? *into : torch::empty({a.size(0), N}, a.options());
  auto ws = torch::empty({std::min(N, NS), K}, af.options());
  for (int64_t n0 = 0; n0 < N; n0 += NS) {
    const int64_t nn = std::min(NS, N - n0);
    auto wn = ws.narrow(0, 0, nn);
    wn.copy_(w.narrow(0, n0, nn));
    auto part = at::linear(af, wn).to(a.scalar_type());  // (M, nn), rounded to nearest even
    if (scales) part.mul_(scales->narrow(0, n0, nn));  // rounded again
    auto out = y.narrow(1, n0, nn);
    if (into) out.add_(part);  // round(into + round(product)), as the model's residual add
    else out.copy_(part);
  }
  return y;
}
#endif

template <typename T>
static torch::Tensor run(torch::Tensor h, const std::vector<torch::Tensor>& layers, const torch::Tensor& norm_w,
                         const torch::Tensor& out_w, const std::vector<torch::Tensor>& scales, torch::Tensor& cache_k,
                         torch::Tensor& cache_v, int64_t start, const torch::Tensor& freqs, double eps, int64_t H, int64_t block) {
  const int64_t B = h.size(0), Tn = h.size(1), dim = h.size(2), M = B * Tn, L = (int64_t)layers.size() / 6;
  const int64_t S = cache_k.size(2), Hkv = cache_k.size(3), D = cache_k.size(4), qdim = H * D, kvdim = Hkv * D;
  const int64_t hidden = layers[4].size(0) / 2;
  auto P = [](const torch::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); };
  // product i of a (rows) with w, into a new tensor, or with `into` added into it (the residual add,
  // round(into + round(a w^T))); on AVX-512 through rowlin::linear, else at::linear. int8 weights
  // (scales[i]) as Int8Linear computes them: the product rounded, then scaled. The AVX-512 build
  // without bf16 dots leaves fp32 weights of FP32_ROWLIN_ROWS rows or more to at::linear (its fp32
  // products, MKL's, were faster there: a 2-core Xeon, 160M at batch 8, 926 against 700 prompt
  // tokens/s; on the Xeon model 207, 160M's four layer products paired over 25 rounds, at::linear
  // against rowlin: 128 rows 0.93-0.95x, 256 rows 0.98x, 512 rows 1.10x), and bf16
  // and int8 weights too from WIDE_ROWS rows on, widened (`wide_linear`: 160M's bf16 prefill at
  // batch 8, 1.37x rowlin's); oneDNN's own bf16 products were 3.5x slower than rowlin's
  // products, q|k|v's and w1|w3's written into buffers kept over the layers (`to`): into fresh
  // ones each layer, the 16 layers' products ran 2-3% slower here (their first writes)
  auto lin = [&](const torch::Tensor& a, const torch::Tensor& w, int64_t i, torch::Tensor* into = nullptr,
                 torch::Tensor* to = nullptr) {
#if defined(LLAMA_AVX512)
#if defined(LLAMA_ISA_AVX512BF16)
    constexpr bool fp32_rowlin = true;
#else
    const bool fp32_rowlin = a.size(0) < FP32_ROWLIN_ROWS;
    if ((std::is_same<T, bf16>::value || !scales.empty()) && a.size(0) >= WIDE_ROWS)
      return wide_linear(a, w, into, scales.empty() ? nullptr : &scales[i]);
#endif
    if (std::is_same<T, float>::value ? (fp32_rowlin || !scales.empty()) : a.size(1) % 2 == 0) {
      auto y = into ? *into : to ? *to : torch::empty({a.size(0), w.size(0)}, a.options());
      if (scales.empty()) rowlin::linear<T>(P(a), a.size(0), a.size(1), P(w), w.size(0), P(y), w.size(0), into != nullptr);
      else rowlin::linear<T, int8_t>(P(a), a.size(0), a.size(1), w.data_ptr<int8_t>(), w.size(0), P(y), w.size(0),
                                     into != nullptr, P(scales[i]));
      return y;
    }
#endif
    auto y = scales.empty() ? at::linear(a, w) : at::linear(a, w.to(a.scalar_type())).mul_(scales[i]);
    return into ? into->add_(y) : y;
  };
  auto x = h.view({M, dim});
  auto xn = torch::empty_like(x), gated = torch::empty({M, hidden}, x.options());
  auto att = torch::empty({B, Tn, H, D}, x.options()), none = torch::empty({0}, x.options());
  // w1|w3 and SiLU as one product where rowlin multiplies the weights as stored (gated: the two
  // halves' sums of a task's columns meet in its write; the same values as the product into memory
  // and silu_rows over it, 160M's batch-8 prefill 1.02x faster in bf16, 1.03x in fp32, batch 1 even)
#if defined(LLAMA_ISA_AVX512BF16)
  const bool gated_ff = scales.empty() && (std::is_same<T, float>::value || dim % 2 == 0);
#else
  const bool gated_ff = false;
#endif
  auto yqkv = torch::empty({M, qdim + 2 * kvdim}, x.options());
  auto yff = gated_ff ? none : torch::empty({M, 2 * hidden}, x.options());
  for (int64_t l = 0; l < L; ++l) {
    const torch::Tensor* lw = &layers[6 * l];
    norm_rows<T>(P(x), M, dim, P(lw[0]), eps, P(xn));
    auto y = lin(xn, lw[1], 4 * l, nullptr, &yqkv);  // (M, q|k|v)
    auto ck = cache_k.select(0, l), cv = cache_v.select(0, l);  // (B_max, S, Hkv, D)
    rope_rows<T>(P(y), B, Tn, qdim, kvdim, D, freqs.data_ptr<float>(), P(ck), P(cv), S, start);
    auto q = y.view({B, Tn, qdim + 2 * kvdim}).narrow(2, 0, qdim).view({B, Tn, H, D});
    auto k = ck.narrow(0, 0, B).narrow(1, 0, start + Tn), v = cv.narrow(0, 0, B).narrow(1, 0, start + Tn);
    attention<T>(q, k, v, start, block, att, none);
    lin(att.view({M, qdim}), lw[2], 4 * l + 1, &x);
    norm_rows<T>(P(x), M, dim, P(lw[3]), eps, P(xn));
#if defined(LLAMA_AVX512)
    if (gated_ff) rowlin::linear<T>(P(xn), M, dim, P(lw[4]), 2 * hidden, P(gated), hidden, false, nullptr, hidden);
    else
#endif
    {
      auto y13 = lin(xn, lw[4], 4 * l + 2, nullptr, &yff);  // (M, w1|w3)
      silu_rows<T, T>(P(y13), M, hidden, P(gated));
    }
    lin(gated, lw[5], 4 * l + 3, &x);
  }
  auto last = h.select(1, Tn - 1).contiguous(), lastn = torch::empty_like(last);  // (B, dim)
  norm_rows<T>(P(last), B, dim, P(norm_w), eps, P(lastn));
  if (B > 8) return lin(lastn, out_w, 4 * L).to(at::kFloat);
  // up to 8 rows: the decoding step's output product (fp32 sums, rounded as the model rounds them)
  const int64_t NV = out_w.size(0);
  auto logits = torch::empty({B, NV}, torch::dtype(torch::kFloat32));
  float* lp = logits.data_ptr<float>();
  if (scales.empty()) gemv<T, T>(P(lastn), B, dim, P(out_w), NV, lp, nullptr, Out::ROUNDED);
  else gemv<T, int8_t>(P(lastn), B, dim, out_w.data_ptr<int8_t>(), NV, lp, P(scales.back()), Out::ROUNDED);
  return logits;
}

}  // namespace prefill_ops

// h: (B, T, dim) token embeddings, contiguous, updated in place; layers, norm_w, out_w, scales, cache
// as for decode_step; the T positions start at `start`; freqs: (T, D/2, 2) fp32; block: the
// attention's query rows per block (a multiple of 16).
torch::Tensor prefill(torch::Tensor h, std::vector<torch::Tensor> layers, torch::Tensor norm_w, torch::Tensor out_w,
                      std::vector<torch::Tensor> scales, torch::Tensor cache_k, torch::Tensor cache_v, int64_t start,
                      torch::Tensor freqs, double eps, int64_t n_heads, int64_t block) {
  const auto dt = h.scalar_type();
  TORCH_CHECK((dt == at::kBFloat16 || dt == at::kFloat) && h.dim() == 3 && h.is_contiguous() && h.size(1) >= 1,
              "prefill: h must be contiguous (B, T, dim) bf16 or fp32");
  const int64_t B = h.size(0), Tn = h.size(1), dim = h.size(2), L = (int64_t)layers.size() / 6;
  TORCH_CHECK(L >= 1 && (int64_t)layers.size() == 6 * L, "prefill: 6 tensors per layer");
  TORCH_CHECK(cache_k.dim() == 5 && cache_k.size(0) == L && cache_k.size(1) >= B && cache_k.is_contiguous() &&
              cache_v.is_contiguous() && cache_k.sizes() == cache_v.sizes() && cache_k.scalar_type() == dt &&
              cache_v.scalar_type() == dt, "prefill: cache must be contiguous (L, B, S, Hkv, D) in the model's dtype");
  const int64_t S = cache_k.size(2), Hkv = cache_k.size(3), D = cache_k.size(4);
  TORCH_CHECK(n_heads % Hkv == 0 && n_heads * D == dim && start >= 0 && start + Tn <= S &&
              block > 0 && block % 16 == 0 && D % 2 == 0, "prefill: shapes (heads, head size, positions within the cache)");
  TORCH_CHECK(freqs.scalar_type() == at::kFloat && freqs.is_contiguous() && freqs.numel() == Tn * D,
              "prefill: freqs must be contiguous fp32 (T, D/2, 2)");
  const int64_t nqkv = dim + 2 * Hkv * D;
  const bool q8 = !scales.empty();
  const auto wdt = q8 ? at::kChar : dt;
  TORCH_CHECK(!q8 || (int64_t)scales.size() == 4 * L + 1, "prefill: scales: 4 per layer and the output's");
  for (auto& s : scales) TORCH_CHECK(s.scalar_type() == dt && s.dim() == 1, "prefill: scales in the model's dtype");
  const int scale_of[6] = {-1, 0, 1, -1, 2, 3};
  for (int64_t l = 0; l < L; ++l) {
    const torch::Tensor* lw = &layers[6 * l];
    for (int i = 0; i < 6; ++i)
      TORCH_CHECK(lw[i].scalar_type() == (scale_of[i] < 0 ? dt : wdt) && lw[i].is_contiguous() &&
                  (scale_of[i] < 0 || !q8 || scales[4 * l + scale_of[i]].numel() == lw[i].size(0)),
                  "prefill: norms in the model's dtype, projections too or int8 with one scale per row");
    TORCH_CHECK(lw[0].numel() == dim && lw[1].size(0) == nqkv && lw[1].size(1) == dim && lw[2].size(0) == dim &&
                lw[2].size(1) == dim && lw[3].numel() == dim && lw[4].size(1) == dim && lw[4].size(0) % 2 == 0 &&
                lw[5].size(0) == dim && lw[5].size(1) == lw[4].size(0) / 2, "prefill: layer weight shapes");
  }
  TORCH_CHECK(norm_w.scalar_type() == dt && norm_w.numel() == dim && out_w.scalar_type() == wdt && out_w.dim() == 2 &&
              out_w.size(1) == dim && (!q8 || scales.back().numel() == out_w.size(0)), "prefill: final norm and output weight");
  if (dt == at::kBFloat16)
    return prefill_ops::run<bf16>(h, layers, norm_w, out_w, scales, cache_k, cache_v, start, freqs, eps, n_heads, block);
  return prefill_ops::run<float>(h, layers, norm_w, out_w, scales, cache_k, cache_v, start, freqs, eps, n_heads, block);
}


#include <chrono>

// Read bandwidth as the decoding step reads its weights, for the benchmarks' memory ceiling: this
// build's vector loads (V::load), on every thread at::parallel_for runs, each thread's share walked as
// unit_rows(1) interleaved streams with 2 accumulators each, prefetched STREAM_PF ahead (as
// gemv_streams walks a one-row product). buf: a contiguous fp32 tensor (make it several times the
// last-level cache).
// Returns (bytes/s over the timed read, the sum of every element: the result the loads feed, so they
// cannot be optimised away, and a checksum that the whole buffer was read; lanes are summed in fp32,
// threads' partials in double).
std::tuple<double, double> read_bandwidth(torch::Tensor buf) {
  TORCH_CHECK(buf.scalar_type() == at::kFloat && buf.is_contiguous() && buf.numel() >= 4 * N,
              "read_bandwidth: a contiguous fp32 tensor of at least ", 4 * N, " elements");
  constexpr int S = unit_rows(1);
  const float* x = buf.data_ptr<float>();
  const int64_t n = buf.numel(), blocks = n / (2 * N);  // whole blocks of 2 registers; the tail scalar
  std::vector<double> part(at::get_num_threads() + 1, 0.0);
  const auto t0 = std::chrono::steady_clock::now();
  at::parallel_for(0, blocks, 4096, [&](int64_t b0, int64_t b1) {
    const int64_t step = (b1 - b0) / S;
    F a[S], b[S];
    const float* r[S];
    for (int s = 0; s < S; ++s) { a[s] = V::zero(); b[s] = a[s]; r[s] = x + (b0 + s * step) * 2 * N; }
    for (int64_t i = 0; i < step * 2 * N; i += 2 * N)
      for (int s = 0; s < S; ++s) {
        if constexpr (STREAM_PF > 0) {  // as stream_rows prefetches (1.03x here with it)
          __builtin_prefetch((const char*)(r[s] + i) + STREAM_PF, 0, PF_HINT);
          if constexpr (2 * N * 4 > 64) __builtin_prefetch((const char*)(r[s] + i + N) + STREAM_PF, 0, PF_HINT);
        }
        a[s] = V::add(a[s], V::load(r[s] + i));
        b[s] = V::add(b[s], V::load(r[s] + i + N));
      }
    for (int64_t k = (b0 + S * step) * 2 * N; k < b1 * 2 * N; k += N) a[0] = V::add(a[0], V::load(x + k));
    double sum = 0.0;
    for (int s = 0; s < S; ++s) sum += V::sum(V::add(a[s], b[s]));
    part[at::get_thread_num()] += sum;
  });
  for (int64_t k = blocks * 2 * N; k < n; ++k) part.back() += x[k];
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  double total = 0.0;
  for (double v : part) total += v;
  return {n * 4.0 / secs, total};
}

// For the tests: which thread ran each of N rows when shared_rows hands them out as a batch product
// does (units of R rows, C = 4), the thread numbered 1 spinning slow_us before each of its units (a
// core another process slows); -2 marks a row run twice, -1 one never run
static torch::Tensor shared_rows_owners(int64_t N, int64_t R, double slow_us) {
  TORCH_CHECK(N > 0 && R > 0, "shared_rows_owners: N and R must be positive, got ", N, " and ", R);
  std::unique_ptr<std::atomic<int>[]> who(new std::atomic<int>[N]);
  for (int64_t n = 0; n < N; ++n) who[n] = -1;
  auto mark = [&](int64_t n, int me) {
    int none = -1;
    if (!who[n].compare_exchange_strong(none, me)) who[n] = -2;
  };
  as_team([&] {  // as a step runs it
    shared_rows<4>(N, 1, [&](int64_t n0, int64_t n1) { return (n1 - n0) / R; }, [&](int64_t n0, int64_t n1, int64_t a, int64_t b, bool rest) {
      const int me = at::get_thread_num();
      const int64_t step = (n1 - n0) / R;
      for (int64_t j = a; j < b; ++j) {
        if (me == 1 && slow_us > 0) {
          const auto until = std::chrono::steady_clock::now() + std::chrono::duration<double, std::micro>(slow_us);
          while (std::chrono::steady_clock::now() < until) {}
        }
        for (int64_t i = 0; i < R; ++i) mark(n0 + j + i * step, me);
      }
      if (rest)
        for (int64_t n = n0 + R * step; n < n1; ++n) mark(n, me);
    });
    return true;
  });
  auto out = torch::empty({N}, torch::kInt32);
  int* o = out.data_ptr<int>();
  for (int64_t n = 0; n < N; ++n) o[n] = who[n].load();
  return out;
}

// For the tests: a team's pieces (as_team, par) over n items with grain `grain`, `rounds` pieces in a
// row, each item marked in its round's row with the thread that ran it (-2: run twice in that
// round, -1: never run); where fail_at >= 0, the thread running that item throws in the first
// round (the error must come back and the team end)
static torch::Tensor team_owners(int64_t n, int64_t grain, int64_t rounds, int64_t fail_at) {
  TORCH_CHECK(n > 0 && grain >= 0 && rounds > 0, "team_owners: n and rounds must be positive and grain not negative");
  auto out = torch::full({rounds, n}, -1, torch::kInt32);
  int* o = out.data_ptr<int>();
  as_team([&] {
    for (int64_t r = 0; r < rounds; ++r)
      par(0, n, grain, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          if (r == 0 && i == fail_at) throw std::runtime_error("team_owners: item " + std::to_string(i) + " failed");
          o[r * n + i] = o[r * n + i] == -1 ? at::get_thread_num() : -2;
        }
      });
    return true;
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_step", &decode_step, "one fused decoding step of a LLaMA model (bf16 or fp32)");
  py::class_<Weights>(m, "Weights", py::module_local())  // one per build: several builds load in one process
      .def(py::init<std::vector<torch::Tensor>, torch::Tensor, torch::Tensor, std::vector<torch::Tensor>, torch::Tensor,
                    torch::Tensor, torch::Tensor, double, int64_t, int64_t>())
      .def_readwrite("split", &Weights::split);
  m.def("decode_ids", &decode_ids, "decode_step for a model held as Weights, from token ids");
  m.def("greedy_step", &greedy_step, "a whole greedy step of the batch in place: look-up, decoding step, argmax, bookkeeping");
  m.def("softmax_gradient", &softmax_gradient, "logits -> softmax - one_hot(targets) in place; the summed loss");
  m.def("read_bandwidth", &read_bandwidth, "(bytes/s, sum) of one read of an fp32 buffer, as decode_step reads");
  m.def("shared_rows_owners", &shared_rows_owners, "for the tests: the thread that ran each row as shared_rows hands out a product's rows");
  m.def("team_owners", &team_owners, "for the tests: the thread that ran each item of a decoding step's team's pieces");
  m.def("prefill", &prefill, "the model's forward over a prompt chunk (bf16 or fp32, or int8 weights): the last position's logits");
#if defined(LLAMA_AVX512)
  m.def("causal_attention_forward", &causal_attention_forward, "blocked causal attention, bf16 or fp32: (out, kept probabilities)");
  m.def("causal_attention_backward", &causal_attention_backward, "the gradients of q, k, v of causal_attention_forward");
  m.def("linear_rows", &linear_rows, "prefill's product: out = x w^T (or out + x w^T with add), rounded as the model rounds");
  m.def("causal_attention_saved", &attn::saved_per_head, "elements the forward keeps per (batch, head): (T, start, block, 2 for bf16 / 1 for fp32)");
#endif
  m.attr("ISA") = V::ISA;  // the instruction set this build was compiled for
}
