// uint8 frames (T, H, W, 3) → the encoder's input (3, T, S, S) float: antialiased bilinear resize of
// the shorter side to S, centre crop S × S, scale to [0, 1], normalise per channel — what
// encoder.transforms.frames_to_tensor computes with torch's interpolate, in one pass per frame.
//
// interpolate resizes whole frames in float: a 720p frame becomes 2.8 M floats before the resize
// and 44 % of the resized width of a 16:9 frame (100 of 228 columns) is cropped away afterwards. Here each
// output pixel of the crop is computed from the uint8 frame directly: a horizontal pass over the
// rows the crop needs (into a small per-frame buffer), then a vertical pass that also normalises.
// The weights are torch's antialiased bilinear weights (triangle filter stretched by the scale when
// shrinking, normalised to sum 1), computed the same way in float, so the result agrees with the
// reference to float rounding (tested).
//
// Frames are split over threads with at::parallel_for.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

// Taps of output indices first … first+n−1 of a resize from `in` to `out` samples: output i reads
// inputs start[i] … start[i]+count[i]−1 with weights w[i·width …].
struct Taps {
  std::vector<int64_t> start, count;
  std::vector<float> w;
  int64_t width = 0;
};

Taps make_taps(int64_t in, int64_t out, int64_t first, int64_t n) {
  const float scale = static_cast<float>(in) / static_cast<float>(out);
  const float support = scale >= 1.f ? scale : 1.f;  // the triangle's half-width in input samples
  const float invscale = scale >= 1.f ? 1.f / scale : 1.f;
  Taps t;
  t.width = static_cast<int64_t>(std::ceil(support)) * 2 + 1;
  t.start.resize(n);
  t.count.resize(n);
  t.w.assign(n * t.width, 0.f);
  for (int64_t k = 0; k < n; ++k) {
    const int64_t i = first + k;
    const float center = scale * (static_cast<float>(i) + 0.5f);
    const int64_t lo = std::max<int64_t>(static_cast<int64_t>(center - support + 0.5f), 0);
    const int64_t count = std::min<int64_t>(static_cast<int64_t>(center + support + 0.5f), in) - lo;
    float* w = t.w.data() + k * t.width;
    float total = 0.f;
    for (int64_t j = 0; j < count; ++j) {
      const float x = std::abs((static_cast<float>(j + lo) - center + 0.5f) * invscale);
      w[j] = x < 1.f ? 1.f - x : 0.f;
      total += w[j];
    }
    if (total != 0.f)
      for (int64_t j = 0; j < count; ++j) w[j] /= total;
    t.start[k] = lo;
    t.count[k] = count;
  }
  return t;
}

}  // namespace

// frames (T, H, W, 3) uint8 contiguous → (3, T, size, size) float32. (new_h, new_w): the resized
// frame; (top, left): the crop's corner in it; mean, std: 3 values each.
torch::Tensor resize_crop(torch::Tensor frames, int64_t new_h, int64_t new_w, int64_t top, int64_t left,
                          int64_t size, std::vector<double> mean, std::vector<double> std) {
  TORCH_CHECK(frames.dtype() == torch::kUInt8 && frames.dim() == 4 && frames.size(3) == 3,
              "frames must be uint8 (T, H, W, 3)");
  TORCH_CHECK(mean.size() == 3 && std.size() == 3, "mean and std need 3 values");
  frames = frames.contiguous();
  const int64_t T = frames.size(0), H = frames.size(1), W = frames.size(2);
  const Taps cols = make_taps(W, new_w, left, size);
  const Taps rows = make_taps(H, new_h, top, size);
  const int64_t row_lo = rows.start[0];
  const int64_t row_hi = rows.start[size - 1] + rows.count[size - 1];
  const int64_t R = row_hi - row_lo;  // input rows the crop reads

  float unit[256];  // v / 255 as the reference's float division gives it
  for (int v = 0; v < 256; ++v) unit[v] = static_cast<float>(v) / 255.f;
  float m[3], s[3];
  for (int c = 0; c < 3; ++c) {
    m[c] = static_cast<float>(mean[c]);
    s[c] = static_cast<float>(std[c]);
  }

  auto out = torch::empty({3, T, size, size}, torch::kFloat32);
  const uint8_t* src = frames.data_ptr<uint8_t>();
  float* dst = out.data_ptr<float>();
  const int64_t plane = T * size * size;  // one channel of the output

  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> h(R * size * 3);  // (R, size, 3): the horizontal pass
    for (int64_t t = t0; t < t1; ++t) {
      const uint8_t* frame = src + t * H * W * 3;
      for (int64_t r = 0; r < R; ++r) {
        const uint8_t* row = frame + (row_lo + r) * W * 3;
        float* hr = h.data() + r * size * 3;
        for (int64_t x = 0; x < size; ++x) {
          const uint8_t* p = row + cols.start[x] * 3;
          const float* w = cols.w.data() + x * cols.width;
          float a0 = unit[p[0]] * w[0], a1 = unit[p[1]] * w[0], a2 = unit[p[2]] * w[0];
          for (int64_t j = 1; j < cols.count[x]; ++j) {
            a0 += unit[p[3 * j]] * w[j];
            a1 += unit[p[3 * j + 1]] * w[j];
            a2 += unit[p[3 * j + 2]] * w[j];
          }
          hr[3 * x] = a0;
          hr[3 * x + 1] = a1;
          hr[3 * x + 2] = a2;
        }
      }
      for (int64_t y = 0; y < size; ++y) {
        const float* w = rows.w.data() + y * rows.width;
        const float* base = h.data() + (rows.start[y] - row_lo) * size * 3;
        float* o = dst + (t * size + y) * size;
        for (int64_t x = 0; x < size; ++x) {
          const float* q = base + 3 * x;
          float a0 = q[0] * w[0], a1 = q[1] * w[0], a2 = q[2] * w[0];
          for (int64_t j = 1; j < rows.count[y]; ++j) {
            a0 += q[j * size * 3] * w[j];
            a1 += q[j * size * 3 + 1] * w[j];
            a2 += q[j * size * 3 + 2] * w[j];
          }
          o[x] = (a0 - m[0]) / s[0];
          o[plane + x] = (a1 - m[1]) / s[1];
          o[2 * plane + x] = (a2 - m[2]) / s[2];
        }
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The GIL is let go: a reader thread decodes the next frame while this one is resized.
  m.def("resize_crop", &resize_crop, "uint8 frames (T,H,W,3) -> normalised centre crop (3,T,S,S), antialiased bilinear",
        py::call_guard<py::gil_scoped_release>());
}
