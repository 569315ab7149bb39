// Selective scan on the CPU: the fast path behind encoder.scan.selective_scan.
//
// The whole of mamba-ssm's selective_scan_fn is fused here, forward and backward:
//   Δ = softplus(delta + delta_bias)      (each part optional)
//   h_t = exp(Δ_t·A) ⊙ h_{t-1} + Δ_t·u_t·B_t,   y_t = <C_t, h_t> + D·u_t,   out = y ⊙ silu(z)
// so no elementwise pass over (b, d, l) runs outside the kernel and nothing is copied to another
// layout: every tensor is read and written through its strides, in mamba-ssm's logical layouts
//   u, delta, z, out: (b, d, l)   A: (d, n)   B, C: (b, g, n, l)   D, delta_bias: (d)
//   last state: (b, d, n).
// A Mamba mixer that keeps its activations as (b, l, d) passes transposed views at no cost, and a
// single-group or time-invariant B/C comes in as a broadcast (stride-0) view. `reverse` runs the
// recurrence from the last step to the first (a bidirectional mixer's backward direction) by
// reading every time axis with a negated stride, so nothing is flipped in memory.
//
// Work unit: a block of up to W=16 channels of one batch row and one B/C group. The n states of
// the block's W channels are n·W independent recurrences that share B_t[k] and C_t[k], so a time
// step is n vector updates over W lanes with no cross-lane work in the forward. Time runs in tiles
// of kChunk steps: a tile of u, delta, z (and dout) is gathered into lane-major vectors, B and C
// into (step, n) rows, and the output tile is scattered back, so the strided access is paid once
// per element and the recurrence runs on unit-stride, L1-resident data. Blocks are spread over
// threads with at::parallel_for. A block narrower than W is padded with zero lanes: u = 0 keeps
// their states at zero, dout = 0 their adjoints, so they add nothing to the sums over lanes, and
// they are never stored.
//
// Backward: like mamba-ssm's CUDA kernel it recomputes states instead of storing (b, d, n, l).
// The forward keeps the state at every tile start; the backward walks the tiles in reverse,
// recomputes one tile's states into a small buffer and runs the adjoint recurrence through it.
// dB and dC sum over a group's channels and dA, dD, d(delta_bias) over the batch: each thread owns
// accumulators for them and the parts are added at the end.
//
// Stability: exp's argument is clamped to the float range, so a large delta·|A| underflows to 0
// exactly as the reference's exp does; softplus is max(x, 0) + log1p(e^-|x|), finite everywhere.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// Explicit SIMD through GCC/Clang vector extensions: one `vf` is the W=16 lanes of a channel
// block. The compiler maps it to one AVX-512 register, two AVX2 registers or four NEON registers,
// so the kernel is vectorised on any target without intrinsics.
constexpr int64_t W = 16;
typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(W * sizeof(int32_t))));

constexpr int64_t kChunk = 64;  // time tile; also the backward's recompute span

// e^x lane by lane: range reduction x = k·ln2 + r, a degree-6 polynomial for e^r on
// |r| <= ln2/2 (Cephes' expf coefficients, ~1 ulp), then 2^k through the exponent bits.
// Arguments below -87.3 give exactly 0 (e^-87.3 is the smallest normal float).
inline vf vexp(vf x) {
  const float lo = -87.3f, hi = 88.0f;
  const vi under = x < lo;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  // floor(x·log2e + 0.5) by truncating a positive value: x·log2e >= -126, so +200.5 keeps it > 0.
  const vi ki = __builtin_convertvector(x * 1.44269504088896341f + 200.5f, vi) - 200;
  const vf k = __builtin_convertvector(ki, vf);
  vf r = x - k * 0.693359375f;
  r = r - k * (-2.12194440e-4f);
  vf p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const vf scale = (vf)((ki + 127) << 23);
  return (vf)((vi)(p * scale) & ~under);
}

inline vf vabs(vf x) { return (vf)((vi)x & 0x7fffffff); }
inline vf vmax0(vf x) { return x > 0.0f ? x : 0.0f; }

// softplus(x) = max(x, 0) + log1p(e^-|x|), and its derivative sigmoid(x). With e = e^-|x| in
// (0, 1], log1p(e) = 2·atanh(s), s = e / (2 + e) <= 1/3: the odd series to s^13 is within 1e-7.
inline void vsoftplus(vf x, vf& sp, vf& sig) {
  const vf e = vexp(-vabs(x));
  const vf s = e / (2.0f + e), s2 = s * s;
  vf p = s2 * (1.0f / 13) + 1.0f / 11;
  p = p * s2 + 1.0f / 9;
  p = p * s2 + 1.0f / 7;
  p = p * s2 + 1.0f / 5;
  p = p * s2 + 1.0f / 3;
  p = p * s2 + 1.0f;
  sp = vmax0(x) + 2.0f * s * p;
  const vf inv = 1.0f / (1.0f + e);
  sig = x >= 0.0f ? inv : e * inv;
}

inline vf vsigmoid(vf x) {
  const vf e = vexp(-vabs(x));
  const vf inv = 1.0f / (1.0f + e);
  return x >= 0.0f ? inv : e * inv;
}

// Sixteen horizontal sums at once: lane j of the result is the sum of v[j]'s lanes. Four rounds
// of "add the two halves of each pair of vectors" (30 shuffles, 15 adds for 16 sums) instead of
// 16 separate lane-by-lane reductions.
inline vf hsum16(const vf* v) {
  vf a[8], b[4], c[2];
  for (int j = 0; j < 8; ++j)
    a[j] = __builtin_shufflevector(v[2 * j], v[2 * j + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(v[2 * j], v[2 * j + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int j = 0; j < 4; ++j)
    b[j] = __builtin_shufflevector(a[2 * j], a[2 * j + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(a[2 * j], a[2 * j + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  for (int j = 0; j < 2; ++j)
    c[j] = __builtin_shufflevector(b[2 * j], b[2 * j + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           __builtin_shufflevector(b[2 * j], b[2 * j + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  return __builtin_shufflevector(c[0], c[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(c[0], c[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

// A (b, d, l) tensor seen through its strides; `at(bi, d0)` is the block's origin.
struct View3 {
  const float* p;
  int64_t sb, sd, sl;
  explicit View3(const at::Tensor& t)
      : p(t.defined() ? t.data_ptr<float>() : nullptr),
        sb(t.defined() ? t.stride(0) : 0), sd(t.defined() ? t.stride(1) : 0),
        sl(t.defined() ? t.stride(2) : 0) {}
  const float* at(int64_t bi, int64_t d0) const { return p + bi * sb + d0 * sd; }
  // Read time backwards: step t of the view is step l-1-t of the tensor.
  View3& reversed(bool reverse, int64_t l) {
    if (reverse && p) {
      p += (l - 1) * sl;
      sl = -sl;
    }
    return *this;
  }
};

// Gather steps [t0, t0+T) of wn channels from `src` (the block origin) into T lane vectors.
// Lanes are written as plain floats: inserting into a vector lane by lane compiles to a vector
// load/insert/store per element.
inline void load_tile(vf* dst, const float* src, int64_t sd, int64_t sl, int64_t t0, int64_t T,
                      int64_t wn) {
  src += t0 * sl;
  float* d = reinterpret_cast<float*>(dst);
  if (wn < W) std::fill(d, d + T * W, 0.0f);
  if (sd == 1) {
    for (int64_t t = 0; t < T; ++t)
      for (int64_t w = 0; w < wn; ++w) d[t * W + w] = src[t * sl + w];
  } else {
    for (int64_t w = 0; w < wn; ++w)
      for (int64_t t = 0; t < T; ++t) d[t * W + w] = src[w * sd + t * sl];
  }
}

inline void store_tile(float* dst, const vf* src, int64_t sd, int64_t sl, int64_t t0, int64_t T,
                       int64_t wn) {
  dst += t0 * sl;
  const float* s = reinterpret_cast<const float*>(src);
  if (sd == 1) {
    for (int64_t t = 0; t < T; ++t)
      for (int64_t w = 0; w < wn; ++w) dst[t * sl + w] = s[t * W + w];
  } else {
    for (int64_t w = 0; w < wn; ++w)
      for (int64_t t = 0; t < T; ++t) dst[w * sd + t * sl] = s[t * W + w];
  }
}

inline vf load_lanes(const float* src, int64_t stride, int64_t wn) {
  alignas(64) float v[W] = {};
  for (int64_t w = 0; w < wn; ++w) v[w] = src[w * stride];
  vf out;
  std::memcpy(&out, v, sizeof(out));
  return out;
}

struct Options {
  bool has_D, has_z, has_bias, softplus;
};

struct Dims {
  int64_t b, l, d, n, g, d_per_group, blocks_per_group;
  int64_t nblocks() const { return b * g * blocks_per_group; }
  int64_t nchunks() const { return (l + kChunk - 1) / kChunk; }
};

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, "selective_scan_cpu: ", name, " must be float32");
  TORCH_CHECK(t.device().is_cpu(), "selective_scan_cpu: ", name, " must be on the CPU");
}

Dims check_inputs(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                  const at::Tensor& B, const at::Tensor& C, const at::Tensor& D,
                  const at::Tensor& z, const at::Tensor& bias) {
  check_float(u, "u");
  check_float(delta, "delta");
  check_float(A, "A");
  check_float(B, "B");
  check_float(C, "C");
  TORCH_CHECK(u.dim() == 3 && delta.sizes() == u.sizes(), "u, delta must be (b, d, l)");
  Dims s{u.size(0), u.size(2), u.size(1), A.size(1), B.size(1), 0, 0};
  TORCH_CHECK(A.dim() == 2 && A.size(0) == s.d, "A must be (d, n)");
  TORCH_CHECK(B.dim() == 4 && C.sizes() == B.sizes(), "B, C must be (b, g, n, l)");
  TORCH_CHECK(B.size(0) == s.b && B.size(2) == s.n && B.size(3) == s.l, "B, C must be (b, g, n, l)");
  TORCH_CHECK(s.g > 0 && s.d % s.g == 0, "groups must divide d");
  if (D.defined()) {
    check_float(D, "D");
    TORCH_CHECK(D.dim() == 1 && D.size(0) == s.d, "D must be (d)");
  }
  if (bias.defined()) {
    check_float(bias, "delta_bias");
    TORCH_CHECK(bias.dim() == 1 && bias.size(0) == s.d, "delta_bias must be (d)");
  }
  if (z.defined()) {
    check_float(z, "z");
    TORCH_CHECK(z.sizes() == u.sizes(), "z must be (b, d, l)");
  }
  s.d_per_group = s.d / s.g;
  s.blocks_per_group = (s.d_per_group + W - 1) / W;
  return s;
}

// Block index → (batch, first channel, width, group).
struct Block {
  int64_t bi, d0, wn, gi;
};

Block block_at(const Dims& s, int64_t idx) {
  const int64_t per_batch = s.g * s.blocks_per_group;
  const int64_t bi = idx / per_batch, r = idx % per_batch;
  const int64_t gi = r / s.blocks_per_group, j = r % s.blocks_per_group;
  const int64_t d0 = gi * s.d_per_group + j * W;
  return {bi, d0, std::min(W, (gi + 1) * s.d_per_group - d0), gi};
}

// Per-thread scratch for one tile of one block.
struct Tile {
  std::vector<vf> u, dt, sig, z, Ab;   // (kChunk) lanes each; Ab: (n)
  std::vector<float> B, C;             // (kChunk, n)
  Tile(int64_t n) : u(kChunk), dt(kChunk), sig(kChunk), z(kChunk), Ab(n), B(kChunk * n), C(kChunk * n) {}
};

struct Inputs {
  View3 u, delta, z;
  const float *A, *D, *bias;
  int64_t sAd, sAn, sD, sbias;
  const float *B, *C;
  int64_t sBb, sBg, sBn, sBl, sCb, sCg, sCn, sCl;
  Options o;

  Inputs(const at::Tensor& u_, const at::Tensor& delta_, const at::Tensor& A_, const at::Tensor& B_,
         const at::Tensor& C_, const at::Tensor& D_, const at::Tensor& z_, const at::Tensor& bias_,
         bool softplus, bool reverse)
      : u(u_), delta(delta_), z(z_), A(A_.data_ptr<float>()),
        D(D_.defined() ? D_.data_ptr<float>() : nullptr),
        bias(bias_.defined() ? bias_.data_ptr<float>() : nullptr), sAd(A_.stride(0)), sAn(A_.stride(1)),
        sD(D_.defined() ? D_.stride(0) : 0), sbias(bias_.defined() ? bias_.stride(0) : 0),
        B(B_.data_ptr<float>()), C(C_.data_ptr<float>()), sBb(B_.stride(0)), sBg(B_.stride(1)),
        sBn(B_.stride(2)), sBl(B_.stride(3)), sCb(C_.stride(0)), sCg(C_.stride(1)), sCn(C_.stride(2)),
        sCl(C_.stride(3)), o{D_.defined(), z_.defined(), bias_.defined(), softplus} {
    if (reverse) {  // every time-indexed input is read from its last step back
      const int64_t l = u_.size(2);
      u.reversed(true, l);
      delta.reversed(true, l);
      z.reversed(true, l);
      B += (l - 1) * sBl;
      sBl = -sBl;
      C += (l - 1) * sCl;
      sCl = -sCl;
    }
  }

  void load_A(Tile& tl, const Block& bk, int64_t n) const {
    for (int64_t k = 0; k < n; ++k) tl.Ab[k] = load_lanes(A + bk.d0 * sAd + k * sAn, sAd, bk.wn);
  }

  // Fill the tile for steps [t0, t0+T): u, Δ (and softplus' derivative), z, B and C rows.
  void load(Tile& tl, const Block& bk, int64_t n, int64_t t0, int64_t T) const {
    load_tile(tl.u.data(), u.at(bk.bi, bk.d0), u.sd, u.sl, t0, T, bk.wn);
    load_tile(tl.dt.data(), delta.at(bk.bi, bk.d0), delta.sd, delta.sl, t0, T, bk.wn);
    if (o.has_bias) {
      const vf bv = load_lanes(bias + bk.d0 * sbias, sbias, bk.wn);
      for (int64_t t = 0; t < T; ++t) tl.dt[t] += bv;
    }
    if (o.softplus)
      for (int64_t t = 0; t < T; ++t) vsoftplus(tl.dt[t], tl.dt[t], tl.sig[t]);
    if (o.has_z) load_tile(tl.z.data(), z.at(bk.bi, bk.d0), z.sd, z.sl, t0, T, bk.wn);
    const float* Bp = B + bk.bi * sBb + bk.gi * sBg + t0 * sBl;
    const float* Cp = C + bk.bi * sCb + bk.gi * sCg + t0 * sCl;
    for (int64_t k = 0; k < n; ++k)
      for (int64_t t = 0; t < T; ++t) {
        tl.B[t * n + k] = Bp[k * sBn + t * sBl];
        tl.C[t * n + k] = Cp[k * sCn + t * sCl];
      }
  }

  vf D_lanes(const Block& bk) const { return o.has_D ? load_lanes(D + bk.d0 * sD, sD, bk.wn) : vf{}; }
};

// Forward. Returns out (b, d, l) in u's memory layout, the last state (b, d, n) and, if
// `save_states`, the state at every tile start (blocks, chunks, n, W) for the backward
// (3 MB at b=1, d=768, l=4096).
std::vector<at::Tensor> scan_fwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                 const at::Tensor& B, const at::Tensor& C,
                                 const c10::optional<at::Tensor>& D_, const c10::optional<at::Tensor>& z_,
                                 const c10::optional<at::Tensor>& bias_, bool softplus, bool reverse,
                                 bool save_states) {
  const at::Tensor D = D_.value_or(at::Tensor()), z = z_.value_or(at::Tensor()),
                   bias = bias_.value_or(at::Tensor());
  const Dims s = check_inputs(u, delta, A, B, C, D, z, bias);
  const Inputs in(u, delta, A, B, C, D, z, bias, softplus, reverse);
  auto out = at::empty_like(u);
  auto last = at::empty({s.b, s.d, s.n}, u.options());
  auto states = save_states ? at::empty({s.nblocks(), s.nchunks(), s.n, W}, u.options())
                            : at::empty({0}, u.options());
  vf* statesp = save_states ? reinterpret_cast<vf*>(states.data_ptr<float>()) : nullptr;
  float* lastp = last.data_ptr<float>();
  View3 ov(out);
  ov.reversed(reverse, s.l);
  const int64_t n = s.n;

  at::parallel_for(0, s.nblocks(), 1, [&](int64_t i0, int64_t i1) {
    Tile tl(n);
    std::vector<vf> h(n), y(kChunk);
    for (int64_t i = i0; i < i1; ++i) {
      const Block bk = block_at(s, i);
      in.load_A(tl, bk, n);
      const vf Dv = in.D_lanes(bk);
      std::fill(h.begin(), h.end(), vf{});
      vf* ck = statesp ? statesp + i * s.nchunks() * n : nullptr;
      float* ob = const_cast<float*>(ov.at(bk.bi, bk.d0));
      for (int64_t c = 0; c < s.nchunks(); ++c) {
        const int64_t t0 = c * kChunk, T = std::min(kChunk, s.l - t0);
        if (ck) std::copy(h.begin(), h.end(), ck + c * n);
        in.load(tl, bk, n, t0, T);
        for (int64_t t = 0; t < T; ++t) {
          const vf dt = tl.dt[t], ut = tl.u[t], x = dt * ut;
          const float *Bt = tl.B.data() + t * n, *Ct = tl.C.data() + t * n;
          vf acc = Dv * ut;
          for (int64_t k = 0; k < n; ++k) {
            const vf hk = vexp(dt * tl.Ab[k]) * h[k] + x * Bt[k];
            h[k] = hk;
            acc += hk * Ct[k];
          }
          if (in.o.has_z) acc *= tl.z[t] * vsigmoid(tl.z[t]);
          y[t] = acc;
        }
        store_tile(ob, y.data(), ov.sd, ov.sl, t0, T, bk.wn);
      }
      for (int64_t w = 0; w < bk.wn; ++w)
        for (int64_t k = 0; k < n; ++k) lastp[(bk.bi * s.d + bk.d0 + w) * n + k] = h[k][w];
    }
  });
  return {out, last, states};
}

// Split [0, total) into one contiguous range per thread; fn(tid, begin, end).
template <typename Fn>
void for_each_thread(int64_t total, int64_t nthreads, const Fn& fn) {
  at::parallel_for(0, nthreads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t tid = t0; tid < t1; ++tid) fn(tid, total * tid / nthreads, total * (tid + 1) / nthreads);
  });
}

// Backward from the tile-start states the forward saved. dout (b, d, l) any layout; dlast
// (b, d, n) is the gradient of the returned last state (undefined if unused). Returns du, ddelta
// (u's layout), dA (d, n), dB, dC (b, g, n, l), dD (d), dz (z's layout), d(delta_bias) (d); the
// last three are undefined when the input was not given. With `return_out`, also the forward's
// out (u's layout), which the backward recomputes on the way (so a caller need not keep it).
std::vector<at::Tensor> scan_bwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                 const at::Tensor& B, const at::Tensor& C,
                                 const c10::optional<at::Tensor>& D_, const c10::optional<at::Tensor>& z_,
                                 const c10::optional<at::Tensor>& bias_, bool softplus, bool reverse,
                                 const at::Tensor& states, const at::Tensor& dout,
                                 const c10::optional<at::Tensor>& dlast_, bool return_out) {
  const at::Tensor D = D_.value_or(at::Tensor()), z = z_.value_or(at::Tensor()),
                   bias = bias_.value_or(at::Tensor()), dlast = dlast_.value_or(at::Tensor());
  const Dims s = check_inputs(u, delta, A, B, C, D, z, bias);
  const Inputs in(u, delta, A, B, C, D, z, bias, softplus, reverse);
  TORCH_CHECK(states.is_contiguous() && states.dim() == 4 && states.size(0) == s.nblocks() &&
                  states.size(1) == s.nchunks() && states.size(2) == s.n && states.size(3) == W,
              "states must be the tile-start states saved by fwd");
  check_float(dout, "dout");
  TORCH_CHECK(dout.sizes() == u.sizes(), "dout must be (b, d, l)");
  if (dlast.defined()) {
    check_float(dlast, "dlast");
    TORCH_CHECK(dlast.sizes() == at::IntArrayRef({s.b, s.d, s.n}), "dlast must be (b, d, n)");
  }
  const int64_t n = s.n, l = s.l, nblocks = s.nblocks(), nchunks = s.nchunks();
  auto du = at::empty_like(u), ddelta = at::empty_like(delta);
  auto dz = z.defined() ? at::empty_like(z) : at::Tensor();
  auto out = return_out ? at::empty_like(u) : at::Tensor();
  const int64_t nthreads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), nblocks));
  // Per-thread accumulators: dA, dD, dbias sum over b; dB/dC over a group's channels.
  auto dA_parts = at::zeros({nthreads, s.d, n}, u.options());
  auto dD_parts = at::zeros({nthreads, s.d}, u.options());
  auto dbias_parts = at::zeros({nthreads, s.d}, u.options());
  auto dB_parts = at::zeros({nthreads, s.b, s.g, n, l}, u.options());
  auto dC_parts = at::zeros({nthreads, s.b, s.g, n, l}, u.options());
  View3 gv(dout), duv(du), ddv(ddelta), dzv(dz), ov(out);
  const View3 dlv(dlast);
  for (View3* v : {&gv, &duv, &ddv, &dzv, &ov}) v->reversed(reverse, s.l);
  const vf* statesp = reinterpret_cast<const vf*>(states.data_ptr<float>());
  const int64_t part = s.b * s.g * n * l;

  for_each_thread(nblocks, nthreads, [&](int64_t tid, int64_t i0, int64_t i1) {
    Tile tl(n);
    // buf[j]: state before step t0 + j of the tile; decay[j]: exp(Δ·A) of that step.
    std::vector<vf> buf((kChunk + 1) * n), decay(kChunk * n), g(n), dAacc(n);
    std::vector<vf> go(kChunk), du_t(kChunk), ddt_t(kChunk), dz_t(kChunk), out_t(kChunk);
    // pb/pc: one step's per-state products, padded to whole vectors (zeros past n); dBt/dCt: the
    // tile's lane sums, (step, n) as vectors, added to the group's dB/dC at the end of the tile.
    const int64_t nw = (n + W - 1) / W;
    std::vector<vf> pb(nw * W), pc(nw * W), dBt(kChunk * nw), dCt(kChunk * nw);
    float* dAp = dA_parts.data_ptr<float>() + tid * s.d * n;
    float* dDp = dD_parts.data_ptr<float>() + tid * s.d;
    float* dbp = dbias_parts.data_ptr<float>() + tid * s.d;
    for (int64_t i = i0; i < i1; ++i) {
      const Block bk = block_at(s, i);
      in.load_A(tl, bk, n);
      const vf Dv = in.D_lanes(bk);
      const int64_t off = (bk.bi * s.g + bk.gi) * n * l;
      float* dBb = dB_parts.data_ptr<float>() + tid * part + off;  // (n, l) of this group
      float* dCb = dC_parts.data_ptr<float>() + tid * part + off;
      const vf* ckpt = statesp + i * nchunks * n;
      vf dDacc = {}, dbacc = {};
      for (int64_t k = 0; k < n; ++k) {  // g holds dL/dh_t through all later steps
        dAacc[k] = vf{};
        g[k] = dlast.defined() ? load_lanes(dlv.at(bk.bi, bk.d0) + k * dlv.sl, dlv.sd, bk.wn) : vf{};
      }
      for (int64_t c = nchunks - 1; c >= 0; --c) {
        const int64_t t0 = c * kChunk, T = std::min(l, t0 + kChunk) - t0;
        in.load(tl, bk, n, t0, T);
        load_tile(go.data(), gv.at(bk.bi, bk.d0), gv.sd, gv.sl, t0, T, bk.wn);
        std::copy(ckpt + c * n, ckpt + (c + 1) * n, buf.begin());
        for (int64_t t = 0; t < T; ++t) {  // recompute the tile's states
          const vf dt = tl.dt[t], x = dt * tl.u[t];
          const vf* hin = buf.data() + t * n;
          vf *hout = buf.data() + (t + 1) * n, *e = decay.data() + t * n;
          const float* Bt = tl.B.data() + t * n;
          for (int64_t k = 0; k < n; ++k) {
            e[k] = vexp(dt * tl.Ab[k]);
            hout[k] = e[k] * hin[k] + x * Bt[k];
          }
        }
        for (int64_t t = T - 1; t >= 0; --t) {
          const vf dt = tl.dt[t], ut = tl.u[t], x = dt * ut;
          vf dy = go[t], silu_z = {}, sig_z = {};
          if (in.o.has_z) {
            sig_z = vsigmoid(tl.z[t]);
            silu_z = tl.z[t] * sig_z;
            dy = go[t] * silu_z;  // gradient of y = <C, h> + D·u
          }
          const vf* hprev = buf.data() + t * n;
          const vf* hcur = hprev + n;
          const vf* et = decay.data() + t * n;
          const float *Bt = tl.B.data() + t * n, *Ct = tl.C.data() + t * n;
          vf dub = {}, ddt = {}, y = Dv * ut;
          for (int64_t k = 0; k < n; ++k) {
            const vf gt = g[k] + dy * Ct[k];  // dL/dh_t
            const vf ghe = gt * et[k] * hprev[k];
            y += hcur[k] * Ct[k];
            pc[k] = dy * hcur[k];  // dC_t[k], dB_t[k] before summing over the lanes
            pb[k] = gt * x;
            dub += gt * Bt[k];
            ddt += ghe * tl.Ab[k];
            dAacc[k] += ghe * dt;
            g[k] = gt * et[k];  // becomes dL/dh_{t-1}
          }
          for (int64_t k0 = 0; k0 < n; k0 += W) {
            dCt[t * nw + k0 / W] = hsum16(pc.data() + k0);
            dBt[t * nw + k0 / W] = hsum16(pb.data() + k0);
          }
          ddt += dub * ut;
          if (in.o.has_z) dz_t[t] = go[t] * y * sig_z * (1.0f + tl.z[t] * (1.0f - sig_z));
          out_t[t] = in.o.has_z ? y * silu_z : y;
          dDacc += dy * ut;
          du_t[t] = dub * dt + dy * Dv;
          if (in.o.softplus) ddt *= tl.sig[t];
          dbacc += ddt;
          ddt_t[t] = ddt;
        }
        for (int64_t k = 0; k < n; ++k) {
          float *dBk = dBb + k * l + t0, *dCk = dCb + k * l + t0;
          for (int64_t t = 0; t < T; ++t) {
            dBk[t] += reinterpret_cast<const float*>(dBt.data())[(t * nw) * W + k];
            dCk[t] += reinterpret_cast<const float*>(dCt.data())[(t * nw) * W + k];
          }
        }
        store_tile(const_cast<float*>(duv.at(bk.bi, bk.d0)), du_t.data(), duv.sd, duv.sl, t0, T, bk.wn);
        store_tile(const_cast<float*>(ddv.at(bk.bi, bk.d0)), ddt_t.data(), ddv.sd, ddv.sl, t0, T, bk.wn);
        if (in.o.has_z)
          store_tile(const_cast<float*>(dzv.at(bk.bi, bk.d0)), dz_t.data(), dzv.sd, dzv.sl, t0, T, bk.wn);
        if (return_out) store_tile(const_cast<float*>(ov.at(bk.bi, bk.d0)), out_t.data(), ov.sd, ov.sl, t0, T, bk.wn);
      }
      for (int64_t w = 0; w < bk.wn; ++w) {
        for (int64_t k = 0; k < n; ++k) dAp[(bk.d0 + w) * n + k] += dAacc[k][w];
        dDp[bk.d0 + w] += dDacc[w];
        dbp[bk.d0 + w] += dbacc[w];
      }
    }
  });
  // dB/dC were accumulated in scan order; put them back in time order.
  auto dB = dB_parts.sum(0), dC = dC_parts.sum(0);
  if (reverse) {
    dB = dB.flip(-1);
    dC = dC.flip(-1);
  }
  return {du, ddelta, dA_parts.sum(0), dB, dC,
          D.defined() ? dD_parts.sum(0) : at::Tensor(), dz,
          bias.defined() ? dbias_parts.sum(0) : at::Tensor(), out};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fwd", &scan_fwd, "fused selective scan forward (CPU)");
  m.def("bwd", &scan_bwd, "fused selective scan backward (CPU)");
}
