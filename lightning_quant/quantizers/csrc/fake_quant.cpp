// Fused CPU fake quantization for eager training: one pass per tensor, one ATen call per quantizer and step.
//
// The Python paths issue five to thirty ATen calls per quantizer and step (range, qparams, quantize, mask),
// and on small layers each call costs more than its work. These functions do the same float32 arithmetic in
// one loop: nearbyint(x * (1/s)) as torch's fake-quant kernels, the observer and qparams formulas of
// observers.py / functional.py operation by operation (built with -ffp-contract=off, so no operation is fused
// into another and every result is rounded as in the tensor code). Tests compare them bit for bit.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <vector>

namespace {

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr int64_t kGrain = 32768;  // as ATen's element-wise kernels: below it, one thread
constexpr float kEps = std::numeric_limits<float>::epsilon();

// x laid out so that its memory order is (outer, channels, inner): for one channel a channels-last tensor is
// read as it lies (an activation between convolutions), anything else is made contiguous.
Tensor laid_out(const Tensor& x, int64_t channels) {
  const bool as_is =
      x.is_contiguous() || (channels == 1 && x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast));
  return as_is ? x : x.contiguous();
}

// torch.minimum / torch.maximum: NaN wins.
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
float nan_min(float a, float b) { return (a != a || b != b) ? kNaN : std::min(a, b); }
float nan_max(float a, float b) { return (a != a || b != b) ? kNaN : std::max(a, b); }

// qparams_from_range for one group: scale and zero point of [lo, hi] on [qmin, qmax].
std::pair<float, int64_t> qparams(float lo, float hi, int64_t qmin, int64_t qmax, bool symmetric) {
  if (symmetric) {
    float scale = qmin < 0 ? nan_max(-lo, hi) / static_cast<float>((qmax - qmin) / 2.0)
                           : nan_max(hi, 0.0f) / static_cast<float>(qmax);
    return {nan_max(scale, kEps), 0};
  }
  const float l = nan_min(lo, 0.0f), h = nan_max(hi, 0.0f);
  const float scale = nan_max((h - l) / static_cast<float>(qmax - qmin), kEps);
  const float zp = static_cast<float>(qmin) - std::nearbyint(l / scale);
  if (zp != zp) throw std::invalid_argument("the observed range holds NaN: the quantized tensor had NaN values");
  return {scale, static_cast<int64_t>(std::min(std::max(zp, static_cast<float>(qmin)), static_cast<float>(qmax)))};
}

// The values of a small integer (or integral float) tensor, whatever its dtype.
std::vector<int64_t> integers(const Tensor& t) {
  const bool integral = t.scalar_type() == torch::kInt || t.scalar_type() == torch::kLong;
  const Tensor c = integral ? t.contiguous() : t.to(torch::kLong);
  std::vector<int64_t> out(c.numel());
  for (int64_t i = 0; i < c.numel(); ++i) {
    out[i] = c.scalar_type() == torch::kInt ? c.data_ptr<int32_t>()[i] : c.data_ptr<int64_t>()[i];
  }
  return out;
}

// Runs body(row, begin, end) over the flat elements of a (rows, inner) layout in parallel chunks of about
// kGrain elements, each chunk cut at row boundaries so that the inner loop sees one row's constants.
template <typename Body>
void for_segments(int64_t rows, int64_t inner, const Body& body) {
  at::parallel_for(0, rows * inner, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end;) {
      const int64_t row = i / inner;
      const int64_t stop = std::min(end, (row + 1) * inner);
      body(row, i, stop);
      i = stop;
    }
  });
}

// Fake quantization of x viewed as (outer, channels, inner), one scale and zero point per channel; writes the
// output and the straight-through mask (1 where the code is inside [qmin, qmax]).
void quantize_rows(const float* x, float* out, float* mask, const float* scale,
                   const std::vector<int64_t>& zero_point, int64_t outer, int64_t channels, int64_t inner,
                   int64_t qmin, int64_t qmax) {
  for_segments(outer * channels, inner, [&](int64_t row, int64_t begin, int64_t end) {
    const int64_t c = row % channels;
    const float s = scale[c], inv = 1.0f / s;
    const float lo = static_cast<float>(qmin - zero_point[c]), hi = static_cast<float>(qmax - zero_point[c]);
    for (int64_t i = begin; i < end; ++i) {
      const float code = std::nearbyint(x[i] * inv);
      const float kept = std::min(std::max(code, lo), hi);
      mask[i] = code == kept ? 1.0f : 0.0f;
      out[i] = kept * s;
    }
  });
}

struct AffineFakeQuant : public torch::autograd::Function<AffineFakeQuant> {
  // x viewed as (outer, channels, inner); scale (float32) and zero_point (any integer dtype), one per channel
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& scale, const Tensor& zero_point,
                        int64_t channels, int64_t inner, int64_t qmin, int64_t qmax) {
    const Tensor xd = laid_out(x, channels);
    Tensor out = torch::empty_like(xd);
    Tensor mask = torch::empty_like(xd);
    const Tensor s = scale.contiguous();
    const int64_t outer = xd.numel() / (channels * inner);
    quantize_rows(xd.data_ptr<float>(), out.data_ptr<float>(), mask.data_ptr<float>(), s.data_ptr<float>(),
                  integers(zero_point), outer, channels, inner, qmin, qmax);
    ctx->save_for_backward({mask});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor mask = ctx->get_saved_variables()[0];
    return {grads[0] * mask, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

struct LSQFakeQuant : public torch::autograd::Function<LSQFakeQuant> {
  // s·clamp(round(x/s)); the step's gradient is Σ grad·(code - x/s) inside the range, Σ grad·code outside,
  // times grad_factor, per channel of (outer, channels, inner). The forward writes only the output; the
  // backward recomputes code and range from the saved input (less memory traffic than saving two masks).
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& scale, double grad_factor,
                        int64_t channels, int64_t inner, int64_t qmin, int64_t qmax) {
    const Tensor xd = laid_out(x, channels);
    Tensor out = torch::empty_like(xd);
    const Tensor s = scale.detach().contiguous();
    const float* ps = s.data_ptr<float>();
    const float* px = xd.data_ptr<float>();
    float* po = out.data_ptr<float>();
    const float lo = static_cast<float>(qmin), hi = static_cast<float>(qmax);
    const int64_t outer = xd.numel() / (channels * inner);
    for_segments(outer * channels, inner, [&](int64_t row, int64_t begin, int64_t end) {
      const float sc = ps[row % channels];
      for (int64_t i = begin; i < end; ++i) po[i] = std::min(std::max(std::nearbyint(px[i] / sc), lo), hi) * sc;
    });
    ctx->save_for_backward({xd, scale});
    ctx->saved_data["grad_factor"] = grad_factor;
    ctx->saved_data["shape"] = std::vector<int64_t>{outer, channels, inner, qmin, qmax};
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto shape = ctx->saved_data["shape"].toIntVector();
    const int64_t channels = shape[1], inner = shape[2], rows = shape[0] * shape[1];
    const float lo = static_cast<float>(shape[3]), hi = static_cast<float>(shape[4]);
    const Tensor& xd = saved[0];
    const Tensor s = saved[1].detach().contiguous();
    const Tensor grad = grads[0].contiguous(xd.suggest_memory_format());
    Tensor grad_x = torch::empty_like(xd);
    // fixed segments of at most kSegment elements within a row, each summed on its own: deterministic
    constexpr int64_t kSegment = 4096;
    const int64_t per_row = (inner + kSegment - 1) / kSegment;
    std::vector<double> partial(rows * per_row, 0.0);
    const float *px = xd.data_ptr<float>(), *pg = grad.data_ptr<float>(), *ps = s.data_ptr<float>();
    float* pgx = grad_x.data_ptr<float>();
    at::parallel_for(0, rows * per_row, std::max<int64_t>(1, kGrain / kSegment), [&](int64_t first, int64_t last) {
      for (int64_t seg = first; seg < last; ++seg) {
        const int64_t row = seg / per_row;
        const int64_t begin = row * inner + (seg % per_row) * kSegment;
        const int64_t end = std::min(begin + kSegment, (row + 1) * inner);
        const float sc = ps[row % channels];
        float term[kSegment];  // grad·(code - v) inside the range, grad·code outside
        const int64_t n = end - begin;
        for (int64_t j = 0; j < n; ++j) {
          const int64_t i = begin + j;
          const float v = px[i] / sc;
          const float code = std::min(std::max(std::nearbyint(v), lo), hi);
          const bool inside = v >= lo && v <= hi;
          pgx[i] = inside ? pg[i] : 0.0f;
          term[j] = pg[i] * (inside ? code - v : code);
        }
        float lanes[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};  // eight partial sums: one vector add
        int64_t j = 0;
        for (; j + 8 <= n; j += 8) {
          for (int k = 0; k < 8; ++k) lanes[k] += term[j + k];
        }
        double sum = 0.0;
        for (; j < n; ++j) sum += term[j];
        for (float lane : lanes) sum += lane;
        partial[seg] = sum;
      }
    });
    Tensor grad_step = torch::zeros({channels}, torch::kDouble);
    double* pstep = grad_step.data_ptr<double>();
    for (int64_t seg = 0; seg < rows * per_row; ++seg) pstep[(seg / per_row) % channels] += partial[seg];
    grad_step = grad_step.mul_(ctx->saved_data["grad_factor"].toDouble()).to(torch::kFloat);
    return {grad_x, grad_step, Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// Per-tensor observer step (mode 0 running min-max, 1 EMA, 2 a fresh range for weights) and the new scale
// and zero point, written to the buffers.
void observe_per_tensor(const Tensor& x, Tensor& min_val, Tensor& max_val, Tensor& count, Tensor& scale,
                        Tensor& zero_point, int64_t mode, double momentum, bool has_range, int64_t qmin, int64_t qmax,
                        bool symmetric) {
  const auto [lo_t, hi_t] = at::aminmax(x.detach());
  float lo = lo_t.item<float>(), hi = hi_t.item<float>();
  float* pmin = min_val.data_ptr<float>();
  float* pmax = max_val.data_ptr<float>();
  if (mode != 2 && has_range) {
    if (mode == 0) {
      lo = nan_min(pmin[0], lo);
      hi = nan_max(pmax[0], hi);
    } else {
      const float w = static_cast<float>(momentum);
      lo = pmin[0] + w * (lo - pmin[0]);
      hi = pmax[0] + w * (hi - pmax[0]);
    }
  }
  pmin[0] = lo;
  pmax[0] = hi;
  int64_t* pcount = count.data_ptr<int64_t>();
  pcount[0] = mode == 2 ? 1 : pcount[0] + 1;
  const auto [s, zp] = qparams(lo, hi, qmin, qmax, symmetric);
  scale.data_ptr<float>()[0] = s;
  if (!symmetric) zero_point.data_ptr<int32_t>()[0] = static_cast<int32_t>(zp);
}

// An observer quantizer's step on one tensor: observe it (mode >= 0; -1: ranges frozen), then fake-quantize
// it with the buffers' scale and zero point.
Tensor per_tensor_step(const Tensor& x, Tensor min_val, Tensor max_val, Tensor count, Tensor scale, Tensor zero_point,
                       int64_t mode, double momentum, bool has_range, int64_t qmin, int64_t qmax, bool symmetric) {
  if (mode >= 0) {
    observe_per_tensor(x, min_val, max_val, count, scale, zero_point, mode, momentum, has_range, qmin, qmax, symmetric);
  }
  return AffineFakeQuant::apply(x, scale, zero_point, 1, x.numel(), qmin, qmax);
}

// Symmetric signed per-channel weights (axis 0): with observe, each row's min and max into the observer's
// buffers and the row's scale max(-min, max) / ((qmax - qmin) / 2); then the fake-quantized weight.
Tensor rows_symmetric_step(const Tensor& w, Tensor min_val, Tensor max_val, Tensor scale, Tensor zero_point,
                           bool observe, int64_t qmin, int64_t qmax) {
  if (observe) {
    const Tensor rows = w.detach().reshape({w.size(0), -1});
    at::amin_out(min_val, rows, 1);
    at::amax_out(max_val, rows, 1);
    const float* pmin = min_val.data_ptr<float>();
    const float* pmax = max_val.data_ptr<float>();
    float* ps = scale.data_ptr<float>();
    for (int64_t c = 0; c < scale.numel(); ++c) ps[c] = qparams(pmin[c], pmax[c], qmin, qmax, true).first;
  }
  return AffineFakeQuant::apply(w, scale, zero_point, w.size(0), w.numel() / w.size(0), qmin, qmax);
}

Tensor affine_fake_quant(const Tensor& x, const Tensor& scale, const Tensor& zero_point, int64_t channels,
                         int64_t inner, int64_t qmin, int64_t qmax) {
  return AffineFakeQuant::apply(x, scale, zero_point, channels, inner, qmin, qmax);
}

Tensor lsq_fake_quant(const Tensor& x, const Tensor& scale, double grad_factor, int64_t channels, int64_t inner,
                      int64_t qmin, int64_t qmax) {
  return LSQFakeQuant::apply(x, scale, grad_factor, channels, inner, qmin, qmax);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("affine_fake_quant", &affine_fake_quant, "fake quantization with fixed qparams per channel");
  m.def("lsq_fake_quant", &lsq_fake_quant, "LSQ fake quantization with the step gradient");
  m.def("per_tensor_step", &per_tensor_step, "per-tensor observer step and fake quantization");
  m.def("rows_symmetric_step", &rows_symmetric_step, "per-channel symmetric weight observer step and fake quant");
}
