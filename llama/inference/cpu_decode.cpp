// The fused decoding step of llama/inference/cpu_decode.py: every layer of a LLaMA model, the final
// norm and the output projection for up to 8 rows of one new token each, in one call, with the
// model's rounding points (bf16: bf16 activations, fp32 norms / RoPE / softmax / accumulation).
// Built on first use by torch.utils.cpp_extension.load with -mavx512f -mavx512bw -mavx512bf16.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

using bf16 = uint16_t;
static inline float b2f(bf16 v) { uint32_t u = (uint32_t)v << 16; float f; std::memcpy(&f, &u, 4); return f; }
static inline bf16 f2b(float f) {  // round to nearest even, as torch does
  uint32_t u; std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  u += 0x7fffu + ((u >> 16) & 1u);
  return (bf16)(u >> 16);
}

// What the step needs from an element type (bf16 or fp32 weights and activations): 16-lane fp32
// loads/stores, the round trip that the model's dtype imposes (none in fp32), and a 64-byte dot step
template <typename T> struct E;
template <> struct E<bf16> {
  static constexpr int W = 32;  // elements per 64-byte block
  static inline float to(bf16 v) { return b2f(v); }
  static inline bf16 from(float f) { return f2b(f); }
  static inline float rnd(float f) { return b2f(f2b(f)); }
  static inline __m512 load(const bf16* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
  }
  static inline void store(bf16* p, __m512 v) { _mm256_storeu_si256((__m256i*)p, (__m256i)_mm512_cvtneps_pbh(v)); }
  static inline __m512 rnd(__m512 v) {  // round to nearest even in hardware
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
  }
  static inline __m512 dot(__m512 acc, const bf16* w, const bf16* x) {
    return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(w), (__m512bh)_mm512_loadu_si512(x));
  }
};
template <> struct E<float> {
  static constexpr int W = 16;
  static inline float to(float v) { return v; }
  static inline float from(float f) { return f; }
  static inline float rnd(float f) { return f; }
  static inline __m512 load(const float* p) { return _mm512_loadu_ps(p); }
  static inline void store(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
  static inline __m512 rnd(__m512 v) { return v; }
  static inline __m512 dot(__m512 acc, const float* w, const float* x) {
    return _mm512_fmadd_ps(_mm512_loadu_ps(w), _mm512_loadu_ps(x), acc);
  }
};

// e^x: x = n ln2 + r with |r| <= ln2 / 2, e^r by a degree-6 polynomial (Cephes' coefficients),
// times 2^n; relative error ~1e-7
static inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.7f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

// y[m, n] = sum_k x[m, k] w[n, k] for rows n0..n1: each weight block is loaded once and used for
// all M input rows; two accumulators per row hide the dot-product latency.
template <typename T, int M>
static void gemv_rows(const T* x, int64_t K, const T* w, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  constexpr int B = E<T>::W;
  const int64_t KB = K / B * B;
  for (int64_t n = n0; n < n1; ++n) {
    const T* r = w + n * K;
    __m512 a[M], b[M];
    for (int m = 0; m < M; ++m) { a[m] = _mm512_setzero_ps(); b[m] = _mm512_setzero_ps(); }
    int64_t k = 0;
    for (; k + 2 * B <= KB; k += 2 * B)
      for (int m = 0; m < M; ++m) {
        a[m] = E<T>::dot(a[m], r + k, x + m * K + k);
        b[m] = E<T>::dot(b[m], r + k + B, x + m * K + k + B);
      }
    for (; k < KB; k += B)
      for (int m = 0; m < M; ++m) a[m] = E<T>::dot(a[m], r + k, x + m * K + k);
    for (int m = 0; m < M; ++m) {
      float s = _mm512_reduce_add_ps(_mm512_add_ps(a[m], b[m]));
      for (int64_t kk = KB; kk < K; ++kk) s += E<T>::to(r[kk]) * E<T>::to(x[m * K + kk]);
      y[m * ldy + n] = s;
    }
  }
}

// One input row: the thread's rows are walked as S interleaved sub-ranges, S weight streams at
// once (more reads in flight: ~10% more bandwidth than one stream here)
template <typename T, int S>
static void gemv_streams(const T* x, int64_t K, const T* w, int64_t n0, int64_t n1, float* y) {
  constexpr int B = E<T>::W;
  const int64_t step = (n1 - n0) / S, K2 = K / (2 * B) * (2 * B);
  for (int64_t i = 0; i < step; ++i) {
    __m512 a[S], b[S];
    const T* r[S];
    for (int s = 0; s < S; ++s) { a[s] = _mm512_setzero_ps(); b[s] = a[s]; r[s] = w + (n0 + s * step + i) * K; }
    for (int64_t k = 0; k < K2; k += 2 * B)
      for (int s = 0; s < S; ++s) {
        a[s] = E<T>::dot(a[s], r[s] + k, x + k);
        b[s] = E<T>::dot(b[s], r[s] + k + B, x + k + B);
      }
    for (int s = 0; s < S; ++s) {
      float v = _mm512_reduce_add_ps(_mm512_add_ps(a[s], b[s]));
      for (int64_t k = K2; k < K; ++k) v += E<T>::to(r[s][k]) * E<T>::to(x[k]);
      y[n0 + s * step + i] = v;
    }
  }
  gemv_rows<T, 1>(x, K, w, n0 + S * step, n1, y, 0);  // the last < S rows
}

// y (M, N) float = x (M, K) @ w (N, K)^T, split over threads by output rows
template <typename T>
static void gemv(const T* x, int64_t M, int64_t K, const T* w, int64_t N, float* y) {
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    switch (M) {
      case 1: gemv_streams<T, 4>(x, K, w, n0, n1, y); break;
      case 2: gemv_rows<T, 2>(x, K, w, n0, n1, y, N); break;
      case 3: gemv_rows<T, 3>(x, K, w, n0, n1, y, N); break;
      case 4: gemv_rows<T, 4>(x, K, w, n0, n1, y, N); break;
      case 5: gemv_rows<T, 5>(x, K, w, n0, n1, y, N); break;
      case 6: gemv_rows<T, 6>(x, K, w, n0, n1, y, N); break;
      case 7: gemv_rows<T, 7>(x, K, w, n0, n1, y, N); break;
      default: gemv_rows<T, 8>(x, K, w, n0, n1, y, N); break;
    }
  });
}

// sum_d q[d] k[d] (q fp32) and acc[d] += p v[d]
template <typename T>
static inline float dot_f32(const float* q, const T* k, int64_t D) {
  __m512 a = _mm512_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) a = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), E<T>::load(k + d), a);
  float s = _mm512_reduce_add_ps(a);
  for (; d < D; ++d) s += q[d] * E<T>::to(k[d]);
  return s;
}
template <typename T>
static inline void axpy(float p, const T* v, float* acc, int64_t D) {
  const __m512 pv = _mm512_set1_ps(p);
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) _mm512_storeu_ps(acc + d, _mm512_fmadd_ps(pv, E<T>::load(v + d), _mm512_loadu_ps(acc + d)));
  for (; d < D; ++d) acc[d] += p * E<T>::to(v[d]);
}

// RMSNorm as the model computes it: statistics in fp32, the normalised value rounded to the
// model's dtype, times the weight, rounded again
template <typename T>
static void rmsnorm(const T* h, int64_t M, int64_t dim, const T* wt, double eps, T* out) {
  for (int64_t m = 0; m < M; ++m) {
    const T* x = h + m * dim;
    float ss = 0.f;
    for (int64_t i = 0; i < dim; ++i) { float v = E<T>::to(x[i]); ss += v * v; }
    const float inv = 1.f / std::sqrt(ss / dim + (float)eps);
    for (int64_t i = 0; i < dim; ++i) out[m * dim + i] = E<T>::from(E<T>::rnd(E<T>::to(x[i]) * inv) * E<T>::to(wt[i]));
  }
}

// h[i] = h[i] + round(y[i]): a residual add in the model's dtype
template <typename T>
static void residual(T* h, const float* y, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) E<T>::store(h + i, _mm512_add_ps(E<T>::load(h + i), E<T>::rnd(_mm512_loadu_ps(y + i))));
  for (; i < n; ++i) h[i] = E<T>::from(E<T>::to(h[i]) + E<T>::rnd(y[i]));
}

template <typename T>
static torch::Tensor step(torch::Tensor h, const std::vector<torch::Tensor>& layers, torch::Tensor norm_w,
                          torch::Tensor out_w, torch::Tensor cache_k, torch::Tensor cache_v, int64_t pos,
                          torch::Tensor freqs, double eps, int64_t n_heads) {
  const int64_t M = h.size(0), dim = h.size(1), L = (int64_t)layers.size() / 6;
  const int64_t Bmax = cache_k.size(1), S = cache_k.size(2), Hkv = cache_k.size(3), D = cache_k.size(4);
  const int64_t H = n_heads, rep = H / Hkv, qdim = H * D, kvdim = Hkv * D, hidden = layers[4].size(0) / 2;
  const int64_t nqkv = qdim + 2 * kvdim;
  const float scale = 1.f / std::sqrt((float)D);
  T* hp = reinterpret_cast<T*>(h.data_ptr());
  T* ckp = reinterpret_cast<T*>(cache_k.data_ptr());
  T* cvp = reinterpret_cast<T*>(cache_v.data_ptr());
  const float* fc = freqs.data_ptr<float>();
  std::vector<T> xn(M * std::max(dim, hidden)), att(M * qdim);
  std::vector<float> y(M * std::max(nqkv, 2 * hidden)), p(H * (pos + 1)), acc(qdim);
  auto W = [](const torch::Tensor& t) { return reinterpret_cast<const T*>(t.data_ptr()); };

  for (int64_t l = 0; l < L; ++l) {
    const torch::Tensor* lw = &layers[6 * l];
    TORCH_CHECK(lw[1].size(0) == nqkv && lw[1].size(1) == dim && lw[2].size(0) == dim && lw[2].size(1) == qdim &&
                lw[4].size(1) == dim && lw[5].size(0) == dim && lw[5].size(1) == hidden, "layer weight shapes");
    // attention: norm, q|k|v in one product, RoPE on q and k (fp32, rounded), k/v into the cache
    rmsnorm<T>(hp, M, dim, W(lw[0]), eps, xn.data());
    gemv<T>(xn.data(), M, dim, W(lw[1]), nqkv, y.data());
    for (int64_t m = 0; m < M; ++m) {
      float* r = y.data() + m * nqkv;
      for (int64_t i = 0; i < nqkv; ++i) r[i] = E<T>::rnd(r[i]);
      for (int64_t i = 0; i < qdim + kvdim; i += 2) {  // q then k: pairs (2j, 2j+1) rotate by freqs[pos, j]
        const int64_t j = (i % D) / 2;
        const float c = fc[2 * j], s = fc[2 * j + 1], re = r[i], im = r[i + 1];
        r[i] = E<T>::rnd(re * c - im * s);
        r[i + 1] = E<T>::rnd(re * s + im * c);
      }
      const int64_t off = ((l * Bmax + m) * S + pos) * kvdim;
      for (int64_t i = 0; i < kvdim; ++i) {
        ckp[off + i] = E<T>::from(r[qdim + i]);
        cvp[off + i] = E<T>::from(r[qdim + kvdim + i]);
      }
    }
    // attention of each query head over positions 0..pos of its kv head, fp32. Threads take ranges
    // of heads (once there is enough work to pay for waking them); each reads the cache in memory
    // order (position by position), so it streams
    const int64_t NT = pos + 1, heads_grain = NT * qdim >= (1 << 18) ? 1 : H;
    for (int64_t m = 0; m < M; ++m) {
      const T* kb = ckp + (l * Bmax + m) * S * kvdim;
      const T* vb = cvp + (l * Bmax + m) * S * kvdim;
      const float* q = y.data() + m * nqkv;
      at::parallel_for(0, H, heads_grain, [&](int64_t h0, int64_t h1) {
        for (int64_t t = 0; t < NT; ++t)
          for (int64_t hd = h0; hd < h1; ++hd)
            p[hd * NT + t] = dot_f32<T>(q + hd * D, kb + t * kvdim + hd / rep * D, D) * scale;
        for (int64_t hd = h0; hd < h1; ++hd) {
          float* ph = p.data() + hd * NT;
          const float mx = *std::max_element(ph, ph + NT);
          const __m512 mxv = _mm512_set1_ps(mx);
          __m512 sv = _mm512_setzero_ps();
          int64_t t = 0;
          for (; t + 16 <= NT; t += 16) {
            const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(ph + t), mxv));
            _mm512_storeu_ps(ph + t, e);
            sv = _mm512_add_ps(sv, e);
          }
          float sum = _mm512_reduce_add_ps(sv);
          for (; t < NT; ++t) { ph[t] = std::exp(ph[t] - mx); sum += ph[t]; }
          for (t = 0; t < NT; ++t) ph[t] /= sum;
        }
        std::fill(acc.begin() + h0 * D, acc.begin() + h1 * D, 0.f);
        for (int64_t t = 0; t < NT; ++t)
          for (int64_t hd = h0; hd < h1; ++hd)
            axpy<T>(p[hd * NT + t], vb + t * kvdim + hd / rep * D, acc.data() + hd * D, D);
        for (int64_t i = h0 * D; i < h1 * D; ++i) att[m * qdim + i] = E<T>::from(acc[i]);
      });
    }
    gemv<T>(att.data(), M, qdim, W(lw[2]), dim, y.data());
    residual<T>(hp, y.data(), M * dim);
    // feed-forward: norm, w1|w3 in one product, silu(a) * b with the model's roundings, w2, residual
    rmsnorm<T>(hp, M, dim, W(lw[3]), eps, xn.data());
    gemv<T>(xn.data(), M, dim, W(lw[4]), 2 * hidden, y.data());
    for (int64_t m = 0; m < M; ++m) {
      const float* ya = y.data() + m * 2 * hidden;
      const float* yb = ya + hidden;
      T* out = xn.data() + m * hidden;
      int64_t i = 0;
      for (; i + 16 <= hidden; i += 16) {
        const __m512 a = E<T>::rnd(_mm512_loadu_ps(ya + i)), b = E<T>::rnd(_mm512_loadu_ps(yb + i));
        const __m512 sa = _mm512_div_ps(a, _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), a))));
        E<T>::store(out + i, _mm512_mul_ps(E<T>::rnd(sa), b));
      }
      for (; i < hidden; ++i) {
        const float a = E<T>::rnd(ya[i]), b = E<T>::rnd(yb[i]);
        out[i] = E<T>::from(E<T>::rnd(a / (1.f + std::exp(-a))) * b);
      }
    }
    gemv<T>(xn.data(), M, hidden, W(lw[5]), dim, y.data());
    residual<T>(hp, y.data(), M * dim);
  }
  rmsnorm<T>(hp, M, dim, W(norm_w), eps, xn.data());
  const int64_t V = out_w.size(0);
  auto logits = torch::empty({M, V}, torch::dtype(torch::kFloat32));
  float* lp = logits.data_ptr<float>();
  gemv<T>(xn.data(), M, dim, W(out_w), V, lp);
  int64_t i = 0;
  for (; i + 16 <= M * V; i += 16) _mm512_storeu_ps(lp + i, E<T>::rnd(_mm512_loadu_ps(lp + i)));
  for (; i < M * V; ++i) lp[i] = E<T>::rnd(lp[i]);
  return logits;
}

// One decoding step of the whole model for M rows at position `pos` (the same for every row).
// h: (M, dim) token embeddings, updated in place. layers: 6 tensors per layer (attention_norm,
// wq|wk|wv packed, wo, ffn_norm, w1|w3 packed, w2). cache_k/v: (L, B_max, S, Hkv, D). All of them
// bf16, or all fp32. freqs: (D/2, 2) fp32 cos/sin of position pos. Returns (M, vocab) fp32 logits
// (holding bf16 values for a bf16 model, as the model's).
torch::Tensor decode_step(torch::Tensor h, std::vector<torch::Tensor> layers, torch::Tensor norm_w, torch::Tensor out_w,
                          torch::Tensor cache_k, torch::Tensor cache_v, int64_t pos, torch::Tensor freqs,
                          double eps, int64_t n_heads, int64_t n_kv_heads) {
  const auto dt = h.scalar_type();
  TORCH_CHECK((dt == at::kBFloat16 || dt == at::kFloat) && h.dim() == 2 && h.is_contiguous(), "h: contiguous (M, dim)");
  const int64_t M = h.size(0), dim = h.size(1), L = (int64_t)layers.size() / 6;
  TORCH_CHECK(M >= 1 && M <= 8 && (int64_t)layers.size() == 6 * L, "1..8 rows and 6 tensors per layer");
  TORCH_CHECK(cache_k.dim() == 5 && cache_k.size(0) == L && cache_k.size(1) >= M && cache_k.is_contiguous() &&
              cache_v.is_contiguous() && cache_k.sizes() == cache_v.sizes() && cache_k.scalar_type() == dt &&
              cache_v.scalar_type() == dt, "cache: contiguous (L, B, S, Hkv, D) in the model's dtype");
  const int64_t S = cache_k.size(2), D = cache_k.size(4);
  TORCH_CHECK(cache_k.size(3) == n_kv_heads && n_heads % n_kv_heads == 0 && n_heads * D == dim && pos >= 0 && pos < S &&
              freqs.numel() == D && freqs.scalar_type() == at::kFloat && freqs.is_contiguous(), "shapes");
  for (auto& t : layers) TORCH_CHECK(t.scalar_type() == dt && t.is_contiguous(), "weights: contiguous, the model's dtype");
  TORCH_CHECK(norm_w.scalar_type() == dt && out_w.scalar_type() == dt && out_w.is_contiguous() && out_w.size(1) == dim,
              "output weight: the model's dtype");
  if (dt == at::kBFloat16) return step<bf16>(h, layers, norm_w, out_w, cache_k, cache_v, pos, freqs, eps, n_heads);
  return step<float>(h, layers, norm_w, out_w, cache_k, cache_v, pos, freqs, eps, n_heads);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_step", &decode_step, "one fused decoding step of a LLaMA model (bf16 or fp32)");
}
