// y = x·Wᵀ (+ s·(x·Aᵀ)·Bᵀ) for a weight kept in GGUF's Q4_1 or Q8_0 blocks: the LLM's decoding step.
//
// Decoding one token multiplies one activation row by every weight of the LLM, so its speed is the
// speed at which the weights stream through memory. fp32 weights are 32 bits a weight; the GGUF
// the default LLM ships in holds them as Q4_1 (5 bits a weight: 32 four-bit codes q and two fp16
// numbers d, m a block, w = d·q + m) and Q8_0 (8.5 bits: w = d·q, q int8). videollm.packed keeps
// those blocks only where they give back the model's fp32 weights exactly, so this kernel reads
// the same weight values in a fifth to a quarter of the bytes. Activations stay fp32 (no int8
// rounding of x): per block  Σ w_j x_j = d·Σ q_j x_j + m·Σ x_j,  the Σ x_j of each block computed
// once per row of x.
//
// Layouts: x (M, K) fp32 contiguous; blocks (N, K/32·bytes) uint8, row-major, one output row's
// blocks in a row — Q4_1: d fp16, m fp16, 16 bytes of codes (byte j: element j in the low nibble,
// element j+16 in the high); Q8_0: d fp16, 32 int8 codes. LoRA (optional): A (r, K), B (N, r)
// fp32, scale s. Output (M, N) fp32. Rows of W are split over threads with at::parallel_for; LoRA's
// x·Aᵀ is computed once, its ·Bᵀ in each output row's thread.
//
// SIMD through GCC/Clang vector extensions (as in encoder/csrc/selective_scan.cpp): a `vf` is the
// 16 lanes of half a block, one AVX-512 register, two AVX2 or four NEON registers.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace {

typedef float vf __attribute__((vector_size(16 * sizeof(float))));
typedef uint8_t vu8 __attribute__((vector_size(16)));
typedef int8_t vi8 __attribute__((vector_size(16)));

constexpr int64_t kBlock = 32;
constexpr int64_t kQ41Bytes = 20;  // fp16 d, fp16 m, 16 bytes of nibbles
constexpr int64_t kQ80Bytes = 34;  // fp16 d, 32 int8

inline float half_to_float(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

inline vf load_vf(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(vf));
  return v;
}

inline float hsum(vf v) {
  float s = 0.f;
  for (int i = 0; i < 16; ++i) s += v[i];
  return s;
}

// Σ a_i b_i over n numbers, 16 lanes at a time.
inline float dot(const float* a, const float* b, int64_t n) {
  vf acc{};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) acc += load_vf(a + i) * load_vf(b + i);
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// One block's contribution d·Σ q_j x_j to a row's accumulator, per instruction set: x86 builds use
// AVX-512 or AVX2 + F16C intrinsics (GCC turns the generic code's byte → float conversions into
// scalar loops); other targets use the generic vector code. `XB` is a block of x loaded
// once and shared by the rows computed together.
#if defined(__AVX512F__) && defined(__F16C__)
struct Simd {
  using Acc = __m512;
  struct XB { __m512 a, b; };
  static Acc zero() { return _mm512_setzero_ps(); }
  static XB load_x(const float* x) { return {_mm512_loadu_ps(x), _mm512_loadu_ps(x + 16)}; }
  static float reduce(Acc v) { return _mm512_reduce_add_ps(v); }
  static float half(const uint8_t* p) { uint16_t h; std::memcpy(&h, p, 2); return _cvtsh_ss(h); }
  static void q4_1(Acc& acc, const uint8_t* blk, const XB& x) {
    const __m128i low = _mm_set1_epi8(0x0F);
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 4));
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(raw, low)));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(raw, 4), low)));
    acc = _mm512_fmadd_ps(_mm512_set1_ps(half(blk)), _mm512_fmadd_ps(hi, x.b, _mm512_mul_ps(lo, x.a)), acc);
  }
  static void q8_0(Acc& acc, const uint8_t* blk, const XB& x) {
    const __m512 q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2))));
    const __m512 q1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 18))));
    acc = _mm512_fmadd_ps(_mm512_set1_ps(half(blk)), _mm512_fmadd_ps(q1, x.b, _mm512_mul_ps(q0, x.a)), acc);
  }
};
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
struct Simd {
  using Acc = __m256;
  struct XB { __m256 v[4]; };
  static Acc zero() { return _mm256_setzero_ps(); }
  static XB load_x(const float* x) {
    return {{_mm256_loadu_ps(x), _mm256_loadu_ps(x + 8), _mm256_loadu_ps(x + 16), _mm256_loadu_ps(x + 24)}};
  }
  static float reduce(Acc v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static float half(const uint8_t* p) { uint16_t h; std::memcpy(&h, p, 2); return _cvtsh_ss(h); }
  static __m256 u8(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)); }
  static __m256 s8(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)); }
  static void q4_1(Acc& acc, const uint8_t* blk, const XB& x) {
    const __m128i low = _mm_set1_epi8(0x0F);
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 4));
    const __m128i lo = _mm_and_si128(raw, low), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low);
    __m256 part = _mm256_mul_ps(u8(lo), x.v[0]);
    part = _mm256_fmadd_ps(u8(_mm_srli_si128(lo, 8)), x.v[1], part);
    part = _mm256_fmadd_ps(u8(hi), x.v[2], part);
    part = _mm256_fmadd_ps(u8(_mm_srli_si128(hi, 8)), x.v[3], part);
    acc = _mm256_fmadd_ps(_mm256_set1_ps(half(blk)), part, acc);
  }
  static void q8_0(Acc& acc, const uint8_t* blk, const XB& x) {
    const __m128i q0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2));
    const __m128i q1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 18));
    __m256 part = _mm256_mul_ps(s8(q0), x.v[0]);
    part = _mm256_fmadd_ps(s8(_mm_srli_si128(q0, 8)), x.v[1], part);
    part = _mm256_fmadd_ps(s8(q1), x.v[2], part);
    part = _mm256_fmadd_ps(s8(_mm_srli_si128(q1, 8)), x.v[3], part);
    acc = _mm256_fmadd_ps(_mm256_set1_ps(half(blk)), part, acc);
  }
};
#else
struct Simd {
  using Acc = vf;
  struct XB { vf a, b; };
  static Acc zero() { return vf{}; }
  static XB load_x(const float* x) { return {load_vf(x), load_vf(x + 16)}; }
  static float reduce(Acc v) { return hsum(v); }
  static float half(const uint8_t* p) { return half_to_float(p); }
  static void q4_1(Acc& acc, const uint8_t* blk, const XB& x) {
    vu8 raw;
    std::memcpy(&raw, blk + 4, 16);
    acc += half(blk) * (__builtin_convertvector(raw & 0x0F, vf) * x.a + __builtin_convertvector(raw >> 4, vf) * x.b);
  }
  static void q8_0(Acc& acc, const uint8_t* blk, const XB& x) {
    vi8 q0, q1;
    std::memcpy(&q0, blk + 2, 16);
    std::memcpy(&q1, blk + 18, 16);
    acc += half(blk) * (__builtin_convertvector(q0, vf) * x.a + __builtin_convertvector(q1, vf) * x.b);
  }
};
#endif

// One group of kRows output rows against one row of x, into out[0..kRows). A group's blocks are
// interleaved (block b of rows 0..3, then block b + 1 of rows 0..3, …), so the group is one
// sequential stream, and its kRows independent accumulators keep the FMA pipeline full and share
// each load of x. Q4_1 adds m·Σx per block (xsum); Q8_0 has no offset.
constexpr int kRows = 4;

template <int kind>
inline void dot_group(const uint8_t* group, const float* x, const float* xsum, int64_t nb, float* out) {
  constexpr int64_t bytes = kind == 0 ? kQ41Bytes : kQ80Bytes;
  typename Simd::Acc acc[kRows];
  float macc[kRows];
  for (int r = 0; r < kRows; ++r) {
    acc[r] = Simd::zero();
    macc[r] = 0.f;
  }
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = group + b * kRows * bytes;
    __builtin_prefetch(blk + 8 * kRows * bytes);
    const typename Simd::XB xb = Simd::load_x(x + b * kBlock);
    for (int r = 0; r < kRows; ++r) {
      if (kind == 0) {
        Simd::q4_1(acc[r], blk + r * bytes, xb);
        macc[r] += Simd::half(blk + r * bytes + 2) * xsum[b];
      } else {
        Simd::q8_0(acc[r], blk + r * bytes, xb);
      }
    }
  }
  for (int r = 0; r < kRows; ++r) out[r] = Simd::reduce(acc[r]) + macc[r];
}

// LoRA's side path for output rows: lora_t (M, r) = s·x·Aᵀ computed once per call, B (N, r); nullptr
// when the layer has none. Added to each output as it is written, inside the row's thread.
struct Lora {
  const float* b = nullptr;
  const float* t = nullptr;
  int64_t r = 0;
};

template <int kind>
void groups_range(const uint8_t* wp, int64_t g0, int64_t g1, const float* xp, const float* xsum, int64_t M,
                  int64_t K, int64_t N, float* op, const Lora& lora) {
  const int64_t nb = K / kBlock, group_bytes = nb * kRows * (kind == 0 ? kQ41Bytes : kQ80Bytes);
  float part[kRows];
  for (int64_t g = g0; g < g1; ++g) {
    for (int64_t m = 0; m < M; ++m) {
      dot_group<kind>(wp + g * group_bytes, xp + m * K, xsum + m * nb, nb, part);
      for (int64_t r = 0; r < kRows && g * kRows + r < N; ++r) {
        const int64_t n = g * kRows + r;
        float side = 0.f;
        for (int64_t j = 0; j < lora.r; ++j) side += lora.b[n * lora.r + j] * lora.t[m * lora.r + j];
        op[m * N + n] = part[r] + side;
      }
    }
  }
}

// s·x·Aᵀ (M, r) for x (M, K), A (r, K): r dot products of length K per row of x.
std::vector<float> lora_down(const float* xp, const float* ap, int64_t M, int64_t K, int64_t r, float scale) {
  std::vector<float> t(M * r);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t j = 0; j < r; ++j) t[m * r + j] = scale * dot(ap + j * K, xp + m * K, K);
  }
  return t;
}

torch::Tensor packed_linear(torch::Tensor x, torch::Tensor blocks, int64_t kind, int64_t N, torch::Tensor lora_a,
                            torch::Tensor lora_b, double scale) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x: (M, K) contiguous fp32");
  TORCH_CHECK(blocks.dim() == 2 && blocks.scalar_type() == torch::kUInt8 && blocks.is_contiguous(),
              "blocks: (ceil(N/4), K/32 * 4 * bytes) contiguous uint8, as `interleave` makes them");
  TORCH_CHECK(kind == 0 || kind == 1, "kind: 0 (Q4_1) or 1 (Q8_0)");
  const int64_t M = x.size(0), K = x.size(1), G = blocks.size(0);
  const int64_t bytes = kind == 0 ? kQ41Bytes : kQ80Bytes;
  TORCH_CHECK(K % kBlock == 0 && blocks.size(1) == K / kBlock * kRows * bytes && G == (N + kRows - 1) / kRows,
              "blocks do not match x's width or N");
  const int64_t nb = K / kBlock;
  auto out = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* wp = blocks.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();

  std::vector<float> xsum(M * nb, 0.f);
  if (kind == 0) {
    for (int64_t i = 0; i < M * nb; ++i) {
      const vf s = load_vf(xp + i * kBlock) + load_vf(xp + i * kBlock + 16);
      xsum[i] = hsum(s);
    }
  }
  Lora lora;
  std::vector<float> lora_t;
  if (lora_a.defined() && lora_a.numel() > 0) {
    TORCH_CHECK(lora_a.dim() == 2 && lora_a.size(1) == K && lora_b.dim() == 2 && lora_b.size(0) == N &&
                    lora_b.size(1) == lora_a.size(0) && lora_a.is_contiguous() && lora_b.is_contiguous() &&
                    lora_a.scalar_type() == torch::kFloat && lora_b.scalar_type() == torch::kFloat,
                "LoRA: A (r, K), B (N, r) contiguous fp32");
    lora.r = lora_a.size(0);
    lora_t = lora_down(xp, lora_a.data_ptr<float>(), M, K, lora.r, static_cast<float>(scale));
    lora.t = lora_t.data();
    lora.b = lora_b.data_ptr<float>();
  }
  // A thread's share is at least ~4k blocks (tens of microseconds): small matrices run on one thread.
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, nb * kRows * M));
  at::parallel_for(0, G, grain, [&](int64_t g0, int64_t g1) {
    if (kind == 0) {
      groups_range<0>(wp, g0, g1, xp, xsum.data(), M, K, N, op, lora);
    } else {
      groups_range<1>(wp, g0, g1, xp, xsum.data(), M, K, N, op, lora);
    }
  });
  return out;
}

// The rest of a decoding step for one token, in place of a dozen small torch operators per layer
// (each a few microseconds of dispatch for a few hundred numbers).

// RMSNorm of each row of x (M, D), as LlamaRMSNorm in fp32: (x · 1/√(mean(x²) + eps)) · w.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x: (M, D) contiguous fp32");
  const int64_t M = x.size(0), D = x.size(1);
  TORCH_CHECK(w.dim() == 1 && w.size(0) == D && w.scalar_type() == torch::kFloat && w.is_contiguous(), "w: (D) fp32");
  auto out = torch::empty_like(x);
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    const float* row = xp + m * D;
    const float r = 1.f / std::sqrt(dot(row, row, D) / static_cast<float>(D) + static_cast<float>(eps));
    for (int64_t d = 0; d < D; ++d) op[m * D + d] = wp[d] * (row[d] * r);
  }
  return out;
}

// x·cos + rotate_half(x)·sin for one head's hd numbers: `sin` carries rotate_half's sign (−sin on the
// first half), so the second term is the halves of x swapped times sin.
inline void rope(const float* x, const float* cos, const float* sin, int64_t hd, float* out) {
  const int64_t half = hd / 2;
  for (int64_t d = 0; d < hd; ++d) out[d] = x[d] * cos[d] + x[d < half ? d + half : d - half] * sin[d];
}

typedef int32_t vi32 __attribute__((vector_size(16 * sizeof(int32_t))));

// e^x for 16 lanes, x ≤ 0 (softmax's x − max): 2^n · e^r with n = round(x / ln 2), r = x − n·ln 2
// (ln 2 in two parts, so r is exact) and a degree-6 polynomial for e^r on |r| ≤ ln 2 / 2, within
// about an ulp of expf; below −87 it is 0 (expf's smallest normal is e^−87.3).
inline vf exp_neg(vf x) {
  const vf n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest (|n| < 2^22)
  const vf r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  vf p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  vf y = p * r * r + r + 1.f;
  vi32 bits;
  std::memcpy(&bits, &y, sizeof(y));
  bits += __builtin_convertvector(n, vi32) << 23;
  bits &= (x >= -87.f);  // lanes below: 0
  std::memcpy(&y, &bits, sizeof(y));
  return y;
}

// One query token through one attention layer with a static cache: RoPE on q (H·hd) and k (KV·hd)
// at position pos (the query's tables carry the attention scale), k and v written to the cache at
// pos, then softmax(q·Kᵀ)·V over positions 0 … pos, query head h reading key head h / (H / KV).
// Keys are kept transposed, (KV, hd, capacity), so q·Kᵀ runs 16 positions a vector with no
// horizontal sums; values (KV, capacity, hd). Returns (1, H·hd). Heads are split over threads when
// the context is long.
torch::Tensor attend(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor keys_t, torch::Tensor values,
                     int64_t pos, torch::Tensor cos, torch::Tensor sin, torch::Tensor cos_q, torch::Tensor sin_q) {
  TORCH_CHECK(values.dim() == 3 && values.is_contiguous() && values.scalar_type() == torch::kFloat,
              "values: (KV, capacity, hd) contiguous fp32");
  const int64_t KV = values.size(0), capacity = values.size(1), hd = values.size(2);
  TORCH_CHECK(keys_t.dim() == 3 && keys_t.size(0) == KV && keys_t.size(1) == hd && keys_t.size(2) == capacity &&
                  keys_t.is_contiguous() && keys_t.scalar_type() == torch::kFloat,
              "keys_t: (KV, hd, capacity) contiguous fp32");
  TORCH_CHECK(pos >= 0 && pos < capacity && hd % 2 == 0, "pos outside the cache");
  for (const auto& t : {q, k, v, cos, sin, cos_q, sin_q})
    TORCH_CHECK(t.scalar_type() == torch::kFloat && t.is_contiguous(), "q, k, v and the RoPE tables: contiguous fp32");
  TORCH_CHECK(k.numel() == KV * hd && v.numel() == KV * hd && q.numel() % hd == 0, "k, v: KV·hd numbers; q: H·hd");
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) >= capacity && cos.size(1) == hd && sin.sizes() == cos.sizes() &&
                  cos_q.sizes() == cos.sizes() && sin_q.sizes() == cos.sizes(),
              "RoPE tables: (capacity, hd)");
  const int64_t H = q.numel() / hd, group = H / KV, L = pos + 1;
  TORCH_CHECK(group * KV == H, "query heads must be a multiple of key heads");
  float* kp = keys_t.data_ptr<float>();
  float* vp = values.data_ptr<float>();
  const float *c = cos.data_ptr<float>() + pos * hd, *s = sin.data_ptr<float>() + pos * hd;
  std::vector<float> kr(hd);
  for (int64_t j = 0; j < KV; ++j) {
    rope(k.data_ptr<float>() + j * hd, c, s, hd, kr.data());
    for (int64_t d = 0; d < hd; ++d) kp[(j * hd + d) * capacity + pos] = kr[d];
    std::memcpy(vp + (j * capacity + pos) * hd, v.data_ptr<float>() + j * hd, hd * sizeof(float));
  }
  auto out = torch::empty({1, H * hd}, q.options());
  const float *qp = q.data_ptr<float>(), *cq = cos_q.data_ptr<float>() + pos * hd, *sq = sin_q.data_ptr<float>() + pos * hd;
  float* op = out.data_ptr<float>();
  const int64_t L16 = L / 16 * 16;
  at::parallel_for(0, H, std::max<int64_t>(1, 32768 / (L * hd)), [&](int64_t h0, int64_t h1) {
    std::vector<float> qr(hd), score(L);
    for (int64_t h = h0; h < h1; ++h) {
      rope(qp + h * hd, cq, sq, hd, qr.data());
      const float* kh = kp + (h / group) * hd * capacity;  // (hd, capacity)
      const float* vh = vp + (h / group) * capacity * hd;  // (capacity, hd)
      vf top16 = vf{} - INFINITY;
      int64_t t = 0;
      for (; t + 64 <= L16; t += 64) {  // four independent sums keep the FMA pipeline full
        vf acc[4] = {};
        for (int64_t d = 0; d < hd; ++d) {
          const float* row = kh + d * capacity + t;
          for (int c = 0; c < 4; ++c) acc[c] += qr[d] * load_vf(row + 16 * c);
        }
        for (int c = 0; c < 4; ++c) {
          std::memcpy(score.data() + t + 16 * c, &acc[c], sizeof(vf));
          top16 = acc[c] > top16 ? acc[c] : top16;
        }
      }
      for (; t < L16; t += 16) {
        vf acc{};
        for (int64_t d = 0; d < hd; ++d) acc += qr[d] * load_vf(kh + d * capacity + t);
        std::memcpy(score.data() + t, &acc, sizeof(acc));
        top16 = acc > top16 ? acc : top16;
      }
      float top = -INFINITY;
      for (int i = 0; i < 16; ++i) top = std::max(top, top16[i]);
      for (int64_t t = L16; t < L; ++t) {
        float dot = 0.f;
        for (int64_t d = 0; d < hd; ++d) dot += qr[d] * kh[d * capacity + t];
        score[t] = dot;
        top = std::max(top, dot);
      }
      vf sum16{};
      for (int64_t t = 0; t < L16; t += 16) {
        const vf e = exp_neg(load_vf(score.data() + t) - top);
        std::memcpy(score.data() + t, &e, sizeof(e));
        sum16 += e;
      }
      float total = hsum(sum16);
      for (int64_t t = L16; t < L; ++t) total += (score[t] = std::exp(score[t] - top));
      for (int64_t t = 0; t < L; ++t) score[t] /= total;
      float* oh = op + h * hd;
      int64_t d0 = 0;
      for (; d0 + 64 <= hd; d0 += 64) {  // 64 of the head's numbers in four registers over all positions
        vf acc[4] = {};
        for (int64_t t = 0; t < L; ++t) {
          const float* vt = vh + t * hd + d0;
          for (int c = 0; c < 4; ++c) acc[c] += score[t] * load_vf(vt + 16 * c);
        }
        std::memcpy(oh + d0, acc, sizeof(acc));
      }
      for (int64_t d = d0; d < hd; ++d) {
        float acc = 0.f;
        for (int64_t t = 0; t < L; ++t) acc += score[t] * vh[t * hd + d];
        oh[d] = acc;
      }
    }
  });
  return out;
}

// silu(g)·u, the gated MLP's middle, for (M, F) rows.
torch::Tensor silu_mul(torch::Tensor g, torch::Tensor u) {
  TORCH_CHECK(g.scalar_type() == torch::kFloat && g.is_contiguous() && u.sizes() == g.sizes() && u.is_contiguous() &&
                  u.scalar_type() == torch::kFloat, "g, u: same shape, contiguous fp32");
  auto out = torch::empty_like(g);
  const float *gp = g.data_ptr<float>(), *up = u.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t i = 0; i < g.numel(); ++i) op[i] = gp[i] / (1.f + std::exp(-gp[i])) * up[i];
  return out;
}

inline void put_half(uint8_t* p, float v) {
  const uint16_t bits = c10::Half(v).x;
  std::memcpy(p, &bits, 2);
}

// One block of 32 weights → its Q4_1 (kind 0) or Q8_0 (kind 1) bytes; false if they do not give
// back every weight exactly. GGUF's quantizers set m = min, d = (max − min)/15 (Q4_1) and
// d = max|w|/127 (Q8_0), so d and m are read off the weights; dequantization is d·q (+ m) in fp32
// as transformers' GGUF loader does it. std::fma(d, q, 0) is the rounded product: the build's
// -ffp-contract=fast must not fuse the check's multiply and add.
bool pack_block(const float* w, uint8_t* out, int64_t kind) {
  float lo = w[0], hi = w[0], amax = 0.f;
  for (int j = 0; j < kBlock; ++j) {
    lo = std::min(lo, w[j]);
    hi = std::max(hi, w[j]);
    amax = std::max(amax, std::fabs(w[j]));
  }
  if (kind == 0) {
    const float m = lo, d = static_cast<float>(c10::Half((hi - lo) / 15.f));
    if (static_cast<float>(c10::Half(m)) != m) return false;
    put_half(out, d);
    put_half(out + 2, m);
    uint8_t q[kBlock];
    for (int j = 0; j < kBlock; ++j) {
      const float v = d > 0.f ? std::nearbyint((w[j] - m) / d) : 0.f;
      q[j] = static_cast<uint8_t>(std::min(15.f, std::max(0.f, v)));
      if (std::fma(d, static_cast<float>(q[j]), 0.f) + m != w[j]) return false;
    }
    for (int j = 0; j < 16; ++j) out[4 + j] = static_cast<uint8_t>(q[j] | (q[j + 16] << 4));
  } else {
    const float d = static_cast<float>(c10::Half(amax / 127.f));
    put_half(out, d);
    for (int j = 0; j < kBlock; ++j) {
      const float v = d > 0.f ? std::min(127.f, std::max(-127.f, std::nearbyint(w[j] / d))) : 0.f;
      if (std::fma(v, d, 0.f) != w[j]) return false;
      out[2 + j] = static_cast<uint8_t>(static_cast<int8_t>(v));
    }
  }
  return true;
}

// weight (N, K) fp32 → (blocks (N, K/32·bytes) uint8, exact (N) bool); a row that is not exact has
// all-zero blocks (d = m = 0: it adds nothing in `packed_linear`).
std::vector<torch::Tensor> pack(torch::Tensor weight, int64_t kind) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kFloat && weight.is_contiguous(),
              "weight: (N, K) contiguous fp32");
  TORCH_CHECK(kind == 0 || kind == 1, "kind: 0 (Q4_1) or 1 (Q8_0)");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(K % kBlock == 0, "K must be a multiple of 32");
  const int64_t nb = K / kBlock, bytes = kind == 0 ? kQ41Bytes : kQ80Bytes;
  auto blocks = torch::zeros({N, nb * bytes}, weight.options().dtype(torch::kUInt8));
  auto exact = torch::empty({N}, weight.options().dtype(torch::kBool));
  const float* wp = weight.data_ptr<float>();
  uint8_t* bp = blocks.data_ptr<uint8_t>();
  bool* ep = exact.data_ptr<bool>();
  at::parallel_for(0, N, std::max<int64_t>(1, 4096 / nb), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      bool ok = true;
      for (int64_t b = 0; b < nb && ok; ++b) ok = pack_block(wp + n * K + b * kBlock, bp + (n * nb + b) * bytes, kind);
      ep[n] = ok;
      if (!ok) std::memset(bp + n * nb * bytes, 0, nb * bytes);
    }
  });
  return {blocks, exact};
}

// Row-major blocks (N, nb·bytes) → groups of kRows rows with their blocks interleaved
// (ceil(N/kRows), nb·kRows·bytes); missing rows of the last group are zero blocks.
torch::Tensor interleave(torch::Tensor blocks, int64_t kind) {
  TORCH_CHECK(blocks.dim() == 2 && blocks.scalar_type() == torch::kUInt8, "blocks: (N, nb * bytes) uint8");
  const int64_t bytes = kind == 0 ? kQ41Bytes : kQ80Bytes, N = blocks.size(0), nb = blocks.size(1) / bytes;
  const int64_t G = (N + kRows - 1) / kRows;
  auto padded = torch::zeros({G * kRows, nb * bytes}, blocks.options());
  padded.narrow(0, 0, N).copy_(blocks);
  return padded.view({G, kRows, nb, bytes}).permute({0, 2, 1, 3}).contiguous().view({G, nb * kRows * bytes});
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("interleave", &interleave, "row-major blocks -> groups of 4 rows, blocks interleaved (the layout `linear` reads)");
  m.def("pack", &pack, "fp32 weight -> (Q4_1 / Q8_0 blocks, rows given back exactly)");
  m.def("rms_norm", &rms_norm, "RMSNorm of each row (LlamaRMSNorm in fp32)");
  m.def("attend", &attend, "one query token through one attention layer with a static cache (RoPE, GQA, softmax)");
  m.def("silu_mul", &silu_mul, "silu(g) * u");
  m.def("linear", &packed_linear, "y = x W^T (+ s (x A^T) B^T), W in Q4_1 (kind 0) or Q8_0 (kind 1) blocks");
}
