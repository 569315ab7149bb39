// Selective scan on the CPU: the fast path behind encoder.scan.selective_scan.
//
// Only the recurrence itself lives here; softplus/delta_bias, D·u and the silu(z) gate stay in
// PyTorch (elementwise, autograd for free). Layouts (all fp32, contiguous), chosen so the inner
// loop runs over channels with unit stride:
//   u, delta, y: (b, l, d)   A: (n, d)   B, C: (b, g, l, n)   last state: (b, d, n)
//
// Work unit: a block of up to W=16 channels of one batch row and one B/C group. Within a block the
// n states of the W channels are n·W independent recurrences that share B_t[k] and C_t[k], so each
// time step is n vector updates over W lanes with no cross-lane work (the forward has no
// reductions at all). Blocks are spread over threads with at::parallel_for. A block narrower than
// W (a group of fewer channels) is padded with zero lanes: delta = u = 0 leaves them at zero.
//
// Backward: mamba-ssm's CUDA kernel recomputes states instead of storing (b, d, n, l) of them;
// here each block runs the forward once keeping only the state at every chunk start (every 64
// steps), then walks the chunks in reverse, recomputing a chunk's states into a small buffer and
// running the adjoint recurrence through it. dB and dC sum over the channels of a group: each
// thread owns a (b, g, l, n) accumulator and the parts are added at the end.
//
// Stability: exp's argument is clamped to the float range, so a large delta·|A| underflows to 0
// exactly as the reference's exp does; no step divides or takes a log.

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

inline float hsum(vf v) {
  float s = 0.0f;
  for (int64_t w = 0; w < W; ++w) s += v[w];
  return s;
}

// Split [0, total) into one contiguous range per thread; fn(tid, begin, end).
template <typename Fn>
void for_each_thread(int64_t total, int64_t nthreads, const Fn& fn) {
  at::parallel_for(0, nthreads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t tid = t0; tid < t1; ++tid) {
      const int64_t begin = total * tid / nthreads, end = total * (tid + 1) / nthreads;
      fn(tid, begin, end);
    }
  });
}

constexpr int64_t kChunk = 64;   // backward recompute chunk (steps)

struct Dims {
  int64_t b, l, d, n, g, d_per_group, blocks_per_group;
};

Dims check_inputs(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                  const at::Tensor& B, const at::Tensor& C) {
  for (const auto* t : {&u, &delta, &A, &B, &C}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat, "selective_scan_cpu: inputs must be float32");
    TORCH_CHECK(t->is_contiguous(), "selective_scan_cpu: inputs must be contiguous");
    TORCH_CHECK(t->device().is_cpu(), "selective_scan_cpu: inputs must be on the CPU");
  }
  TORCH_CHECK(u.dim() == 3 && delta.sizes() == u.sizes(), "u, delta must be (b, l, d)");
  Dims s{u.size(0), u.size(1), u.size(2), A.size(0), B.size(1), 0, 0};
  TORCH_CHECK(A.dim() == 2 && A.size(1) == s.d, "A must be (n, d)");
  TORCH_CHECK(B.dim() == 4 && C.sizes() == B.sizes(), "B, C must be (b, g, l, n)");
  TORCH_CHECK(B.size(0) == s.b && B.size(2) == s.l && B.size(3) == s.n, "B, C must be (b, g, l, n)");
  TORCH_CHECK(s.g > 0 && s.d % s.g == 0, "groups must divide d");
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

// wn lanes of row `src`, zero-padded to W.
inline vf load_lanes(const float* src, int64_t wn) {
  vf v = {};
  for (int64_t w = 0; w < wn; ++w) v[w] = src[w];
  return v;
}

inline void store_lanes(float* dst, vf v, int64_t wn) {
  for (int64_t w = 0; w < wn; ++w) dst[w] = v[w];
}

// One forward step for a block: h ← exp(Δ·A) ⊙ h + Δ·u·B_t; returns y_t = <C_t, h> if C_t given.
inline vf step(vf* h_out, const vf* h_in, const vf* Ab, vf dt, vf x, const float* Bt,
               const float* Ct, int64_t n) {
  vf acc = {};
  for (int64_t k = 0; k < n; ++k) {
    const vf hk = vexp(dt * Ab[k]) * h_in[k] + x * Bt[k];
    h_out[k] = hk;
    if (Ct) acc += hk * Ct[k];
  }
  return acc;
}

struct BlockInputs {
  std::vector<vf> Ab;  // (n) lanes of A for the block's channels
  const float *u, *delta, *B, *C;  // u/delta at (bi, t=0, d0), B/C at (bi, gi)
};

BlockInputs block_inputs(const Dims& s, const Block& bk, const float* up, const float* dp,
                         const float* Ap, const float* Bp, const float* Cp) {
  BlockInputs in{std::vector<vf>(s.n), up + bk.bi * s.l * s.d + bk.d0,
                 dp + bk.bi * s.l * s.d + bk.d0, Bp + (bk.bi * s.g + bk.gi) * s.l * s.n,
                 Cp + (bk.bi * s.g + bk.gi) * s.l * s.n};
  for (int64_t k = 0; k < s.n; ++k) in.Ab[k] = load_lanes(Ap + k * s.d + bk.d0, bk.wn);
  return in;
}

int64_t num_blocks(const Dims& s) { return s.b * s.g * s.blocks_per_group; }
int64_t num_chunks(const Dims& s) { return (s.l + kChunk - 1) / kChunk; }

// Forward. Returns y (b, l, d), the last state (b, d, n) and, if `save_states`, the state at
// every chunk start (blocks, chunks, n, W) for the backward (3 MB at b=1, d=768, l=4096).
std::vector<at::Tensor> scan_fwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                 const at::Tensor& B, const at::Tensor& C, bool save_states) {
  const Dims s = check_inputs(u, delta, A, B, C);
  auto y = at::empty({s.b, s.l, s.d}, u.options());
  auto last = at::empty({s.b, s.d, s.n}, u.options());
  auto states = save_states ? at::empty({num_blocks(s), num_chunks(s), s.n, W}, u.options())
                            : at::empty({0}, u.options());
  vf* statesp = save_states ? reinterpret_cast<vf*>(states.data_ptr<float>()) : nullptr;
  const float *up = u.data_ptr<float>(), *dp = delta.data_ptr<float>(), *Ap = A.data_ptr<float>();
  const float *Bp = B.data_ptr<float>(), *Cp = C.data_ptr<float>();
  float *yp = y.data_ptr<float>(), *lastp = last.data_ptr<float>();
  const int64_t n = s.n;

  at::parallel_for(0, s.b * s.g * s.blocks_per_group, 1, [&](int64_t i0, int64_t i1) {
    std::vector<vf> h(n);
    for (int64_t i = i0; i < i1; ++i) {
      const Block bk = block_at(s, i);
      const BlockInputs in = block_inputs(s, bk, up, dp, Ap, Bp, Cp);
      std::fill(h.begin(), h.end(), vf{});
      float* yb = yp + bk.bi * s.l * s.d + bk.d0;
      vf* ck = statesp ? statesp + i * num_chunks(s) * n : nullptr;
      for (int64_t t = 0; t < s.l; ++t) {
        if (ck && t % kChunk == 0) std::copy(h.begin(), h.end(), ck + (t / kChunk) * n);
        const vf dt = load_lanes(in.delta + t * s.d, bk.wn);
        const vf x = dt * load_lanes(in.u + t * s.d, bk.wn);
        store_lanes(yb + t * s.d, step(h.data(), h.data(), in.Ab.data(), dt, x, in.B + t * n,
                                       in.C + t * n, n), bk.wn);
      }
      for (int64_t w = 0; w < bk.wn; ++w)
        for (int64_t k = 0; k < n; ++k) lastp[(bk.bi * s.d + bk.d0 + w) * n + k] = h[k][w];
    }
  });
  return {y, last, states};
}

// Backward, from the chunk-start states the forward saved. dy (b, l, d); dlast (b, d, n) is the gradient of the returned last state (zeros if
// unused). Returns du, ddelta (b, l, d), dA (n, d) summed over the batch, dB, dC (b, g, l, n).
std::vector<at::Tensor> scan_bwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                 const at::Tensor& B, const at::Tensor& C, const at::Tensor& states,
                                 const at::Tensor& dy, const at::Tensor& dlast) {
  const Dims s = check_inputs(u, delta, A, B, C);
  TORCH_CHECK(states.is_contiguous() && states.dim() == 4 && states.size(0) == num_blocks(s) &&
                  states.size(1) == num_chunks(s) && states.size(2) == s.n && states.size(3) == W,
              "states must be the chunk-start states saved by fwd");
  TORCH_CHECK(dy.sizes() == u.sizes() && dy.is_contiguous() && dy.scalar_type() == at::kFloat,
              "dy must be a contiguous float (b, l, d)");
  TORCH_CHECK(dlast.dim() == 3 && dlast.size(0) == s.b && dlast.size(1) == s.d &&
                  dlast.size(2) == s.n && dlast.is_contiguous() && dlast.scalar_type() == at::kFloat,
              "dlast must be a contiguous float (b, d, n)");
  const int64_t n = s.n, l = s.l, nblocks = num_blocks(s), nchunks = num_chunks(s);
  auto du = at::empty_like(u), ddelta = at::empty_like(u);
  const int64_t nthreads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), nblocks));
  // Per-thread accumulators: dA per batch row is summed over b, dB/dC over a group's channels.
  auto dA_parts = at::zeros({nthreads, n, s.d}, u.options());
  auto dB_parts = at::zeros({nthreads, s.b, s.g, l, n}, u.options());
  auto dC_parts = at::zeros({nthreads, s.b, s.g, l, n}, u.options());

  const float *up = u.data_ptr<float>(), *dp = delta.data_ptr<float>(), *Ap = A.data_ptr<float>();
  const float *Bp = B.data_ptr<float>(), *Cp = C.data_ptr<float>();
  const float *dyp = dy.data_ptr<float>(), *dlp = dlast.data_ptr<float>();
  float *dup = du.data_ptr<float>(), *ddp = ddelta.data_ptr<float>();
  const int64_t part = s.b * s.g * l * n;

  for_each_thread(nblocks, nthreads, [&](int64_t tid, int64_t i0, int64_t i1) {
    // buf[j]: state before step t0 + j of the current chunk; decay[j]: exp(Δ·A) of that step.
    std::vector<vf> buf((kChunk + 1) * n), decay(kChunk * n), g(n), dAacc(n);
    const vf* statesp = reinterpret_cast<const vf*>(states.data_ptr<float>());
    float* dAp = dA_parts.data_ptr<float>() + tid * n * s.d;
    for (int64_t i = i0; i < i1; ++i) {
      const Block bk = block_at(s, i);
      const BlockInputs in = block_inputs(s, bk, up, dp, Ap, Bp, Cp);
      const int64_t off = (bk.bi * s.g + bk.gi) * l * n;
      float* dBb = dB_parts.data_ptr<float>() + tid * part + off;
      float* dCb = dC_parts.data_ptr<float>() + tid * part + off;
      const int64_t row = bk.bi * l * s.d + bk.d0;  // (bi, t=0, d0) in (b, l, d)
      const vf* ckpt = statesp + i * nchunks * n;

      // Adjoint, chunk by chunk from the end: recompute the chunk's states, then walk it back. g holds dL/dh_t through all later steps.
      for (int64_t k = 0; k < n; ++k) {
        g[k] = vf{};
        dAacc[k] = vf{};
        for (int64_t w = 0; w < bk.wn; ++w) g[k][w] = dlp[(bk.bi * s.d + bk.d0 + w) * n + k];
      }
      for (int64_t c = nchunks - 1; c >= 0; --c) {
        const int64_t t0 = c * kChunk, t1 = std::min(l, t0 + kChunk);
        std::copy(ckpt + c * n, ckpt + (c + 1) * n, buf.begin());
        for (int64_t t = t0; t < t1; ++t) {
          const vf dt = load_lanes(in.delta + t * s.d, bk.wn);
          const vf x = dt * load_lanes(in.u + t * s.d, bk.wn);
          const vf* hin = buf.data() + (t - t0) * n;
          vf *hout = buf.data() + (t - t0 + 1) * n, *e = decay.data() + (t - t0) * n;
          for (int64_t k = 0; k < n; ++k) {
            e[k] = vexp(dt * in.Ab[k]);
            hout[k] = e[k] * hin[k] + x * in.B[t * n + k];
          }
        }
        for (int64_t t = t1 - 1; t >= t0; --t) {
          const vf dt = load_lanes(in.delta + t * s.d, bk.wn);
          const vf ut = load_lanes(in.u + t * s.d, bk.wn);
          const vf dy = load_lanes(dyp + row + t * s.d, bk.wn);
          const vf x = dt * ut;
          const vf* hprev = buf.data() + (t - t0) * n;
          const vf* hcur = hprev + n;
          const vf* et = decay.data() + (t - t0) * n;
          const float *Bt = in.B + t * n, *Ct = in.C + t * n;
          vf du_t = {}, ddt_t = {};
          for (int64_t k = 0; k < n; ++k) {
            const vf gt = g[k] + dy * Ct[k];  // dL/dh_t
            const vf e = et[k];
            const vf ghe = gt * e * hprev[k];
            dCb[t * n + k] += hsum(dy * hcur[k]);
            dBb[t * n + k] += hsum(gt * x);
            du_t += gt * Bt[k];
            ddt_t += gt * ut * Bt[k] + ghe * in.Ab[k];
            dAacc[k] += ghe * dt;
            g[k] = gt * e;  // becomes dL/dh_{t-1}
          }
          store_lanes(dup + row + t * s.d, du_t * dt, bk.wn);
          store_lanes(ddp + row + t * s.d, ddt_t, bk.wn);
        }
      }
      for (int64_t k = 0; k < n; ++k)
        for (int64_t w = 0; w < bk.wn; ++w) dAp[k * s.d + bk.d0 + w] += dAacc[k][w];
    }
  });
  return {du, ddelta, dA_parts.sum(0), dB_parts.sum(0), dC_parts.sum(0)};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fwd", &scan_fwd, "selective scan forward (CPU)");
  m.def("bwd", &scan_bwd, "selective scan backward (CPU)");
}
