// Fused CPU fake quantization for eager training: one pass per tensor, one ATen call per quantizer and step.
//
// The Python paths issue five to thirty ATen calls per quantizer and step (range, qparams, quantize, mask),
// and on small layers each call costs more than its work. These functions do the same float32 arithmetic in
// one loop: nearbyint(x * (1/s)) as torch's fake-quant kernels, the observer and qparams formulas of
// observers/ and functional.py operation by operation (built with -ffp-contract=off, so no operation is fused
// into another and every result is rounded as in the tensor code). Tests compare them bit for bit.
//
// Each kernel is a torch operator (namespace lightning_quant, TORCH_LIBRARY): the Python entry points below call
// them through the dispatcher, so torch.jit.trace, make_fx and torch.export record them like any ATen op. The
// autograd kernels call the forward and backward operators through the dispatcher too, so tracers below autograd
// see those. Observation checks the range before writing it: a NaN or Inf input raises a ValueError (non-finite
// input) and leaves every buffer as it was.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
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

// The message of the ValueError raised for a non-finite input; the Python side adds the quantizer's name.
constexpr const char* kNonFinite = "non-finite input (NaN or Inf)";
constexpr float kMax = std::numeric_limits<float>::max();
bool finite(float v) { return std::fabs(v) <= kMax; }  // false for NaN and +-Inf

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

// ---- operator kernels (CPU) ------------------------------------------------------------------------------------

// Fake quantization with fixed qparams per channel: the output and the straight-through mask.
std::tuple<Tensor, Tensor> affine_forward(const Tensor& x, const Tensor& scale, const Tensor& zero_point,
                                          int64_t channels, int64_t inner, int64_t qmin, int64_t qmax) {
  const Tensor xd = laid_out(x, channels);
  Tensor out = torch::empty_like(xd);
  Tensor mask = torch::empty_like(xd);
  const Tensor s = scale.contiguous();
  const int64_t outer = xd.numel() / (channels * inner);
  quantize_rows(xd.data_ptr<float>(), out.data_ptr<float>(), mask.data_ptr<float>(), s.data_ptr<float>(),
                integers(zero_point), outer, channels, inner, qmin, qmax);
  return {out, mask};
}

// The same without autograd (inference mode): the output only.
Tensor affine_fake_quant_cpu(const Tensor& x, const Tensor& scale, const Tensor& zero_point, int64_t channels,
                             int64_t inner, int64_t qmin, int64_t qmax) {
  return std::get<0>(affine_forward(x, scale, zero_point, channels, inner, qmin, qmax));
}

// LSQ's forward s·clamp(round(x/s)) per channel of (outer, channels, inner). With check (the step learns), the same
// pass checks the input: the output would hide an Inf (clamped to qmax) and the step's gradient would turn a NaN
// into a NaN step.
Tensor lsq_forward(const Tensor& x, const Tensor& scale, int64_t channels, int64_t inner, int64_t qmin, int64_t qmax,
                   bool check) {
  const Tensor xd = laid_out(x, channels);
  Tensor out = torch::empty_like(xd);
  const Tensor s = scale.detach().contiguous();
  const float* ps = s.data_ptr<float>();
  const float* px = xd.data_ptr<float>();
  float* po = out.data_ptr<float>();
  const float lo = static_cast<float>(qmin), hi = static_cast<float>(qmax);
  const int64_t outer = xd.numel() / (channels * inner);
  std::atomic<bool> bad{false};
  for_segments(outer * channels, inner, [&](int64_t row, int64_t begin, int64_t end) {
    const float sc = ps[row % channels];
    int ok = 1;
    for (int64_t i = begin; i < end; ++i) {
      po[i] = std::min(std::max(std::nearbyint(px[i] / sc), lo), hi) * sc;
      ok &= static_cast<int>(std::fabs(px[i]) <= kMax);
    }
    if (!ok) bad.store(true, std::memory_order_relaxed);
  });
  TORCH_CHECK_VALUE(!check || !bad.load(), kNonFinite);
  return out;
}

// LSQ's backward: grad_x (the gradient inside the range) and the step's gradient Σ grad·(code - x/s) inside the
// range, Σ grad·code outside, times grad_factor, per channel. Summed in fixed segments: deterministic.
std::tuple<Tensor, Tensor> lsq_backward(const Tensor& grad_out, const Tensor& x, const Tensor& scale,
                                        double grad_factor, int64_t channels, int64_t inner, int64_t qmin,
                                        int64_t qmax) {
  const Tensor xd = laid_out(x, channels);
  const int64_t rows = xd.numel() / inner;
  const float lo = static_cast<float>(qmin), hi = static_cast<float>(qmax);
  const Tensor s = scale.detach().contiguous();
  const Tensor grad = grad_out.contiguous(xd.suggest_memory_format());
  Tensor grad_x = torch::empty_like(xd);
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
  grad_step = grad_step.mul_(grad_factor).to(torch::kFloat).reshape(scale.sizes());
  return {grad_x, grad_step};
}

// LSQ without autograd (inference mode).
Tensor lsq_fake_quant_cpu(const Tensor& x, const Tensor& scale, double grad_factor, int64_t channels, int64_t inner,
                          int64_t qmin, int64_t qmax, bool check) {
  return lsq_forward(x, scale, channels, inner, qmin, qmax, check);
}

// Per-tensor observer step (mode 0 running min-max, 1 EMA, 2 a fresh range for weights) and the new scale and zero
// point, written to the buffers; a non-finite input raises before anything is written.
void observe_per_tensor(const Tensor& x, const Tensor& min_val, const Tensor& max_val, const Tensor& count,
                        const Tensor& scale, const Tensor& zero_point, int64_t mode, double momentum, bool has_range,
                        int64_t qmin, int64_t qmax, bool symmetric) {
  const auto [lo_t, hi_t] = at::aminmax(x.detach());
  float lo = lo_t.item<float>(), hi = hi_t.item<float>();
  TORCH_CHECK_VALUE(finite(lo) && finite(hi), kNonFinite);
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
  const auto [s, zp] = qparams(lo, hi, qmin, qmax, symmetric);
  pmin[0] = lo;
  pmax[0] = hi;
  int64_t* pcount = count.data_ptr<int64_t>();
  pcount[0] = mode == 2 ? 1 : pcount[0] + 1;
  scale.data_ptr<float>()[0] = s;
  if (!symmetric) zero_point.data_ptr<int32_t>()[0] = static_cast<int32_t>(zp);
}

// Symmetric signed per-channel weights (axis 0): each row's min and max into the observer's buffers and the row's
// scale max(-min, max) / ((qmax - qmin) / 2); a non-finite row raises before anything is written.
void observe_rows_symmetric(const Tensor& w, const Tensor& min_val, const Tensor& max_val, const Tensor& scale,
                            int64_t qmin, int64_t qmax) {
  const Tensor rows = w.detach().reshape({w.size(0), -1});
  const Tensor lo = at::amin(rows, 1), hi = at::amax(rows, 1);
  const float* plo = lo.data_ptr<float>();
  const float* phi = hi.data_ptr<float>();
  for (int64_t c = 0; c < lo.numel(); ++c) TORCH_CHECK_VALUE(finite(plo[c]) && finite(phi[c]), kNonFinite);
  min_val.copy_(lo);
  max_val.copy_(hi);
  float* ps = scale.data_ptr<float>();
  for (int64_t c = 0; c < scale.numel(); ++c) ps[c] = qparams(plo[c], phi[c], qmin, qmax, true).first;
}

// ---- operator handles and autograd ------------------------------------------------------------------------------

using AffineForwardFn = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, int64_t, int64_t,
                                                   int64_t, int64_t);
using AffineFn = Tensor(const Tensor&, const Tensor&, const Tensor&, int64_t, int64_t, int64_t, int64_t);
using LSQForwardFn = Tensor(const Tensor&, const Tensor&, int64_t, int64_t, int64_t, int64_t, bool);
using LSQBackwardFn = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, double, int64_t,
                                                 int64_t, int64_t, int64_t);
using LSQFn = Tensor(const Tensor&, const Tensor&, double, int64_t, int64_t, int64_t, int64_t, bool);
using ObserveFn = void(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                       int64_t, double, bool, int64_t, int64_t, bool);
using ObserveRowsFn = void(const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t, int64_t);

template <typename Fn>
c10::TypedOperatorHandle<Fn> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

struct AffineFakeQuant : public torch::autograd::Function<AffineFakeQuant> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& scale, const Tensor& zero_point,
                        int64_t channels, int64_t inner, int64_t qmin, int64_t qmax) {
    static const auto forward_op = op<AffineForwardFn>("lightning_quant::affine_forward");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, mask] = forward_op.call(x, scale, zero_point, channels, inner, qmin, qmax);
    ctx->save_for_backward({mask});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor mask = ctx->get_saved_variables()[0];
    return {grads[0] * mask, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

struct LSQFakeQuant : public torch::autograd::Function<LSQFakeQuant> {
  // The forward writes only the output; the backward recomputes code and range from the saved input.
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& scale, double grad_factor,
                        int64_t channels, int64_t inner, int64_t qmin, int64_t qmax, bool check) {
    static const auto forward_op = op<LSQForwardFn>("lightning_quant::lsq_forward");
    at::AutoDispatchBelowADInplaceOrView guard;
    Tensor out = forward_op.call(x, scale, channels, inner, qmin, qmax, check);
    ctx->save_for_backward({x, scale});
    ctx->saved_data["grad_factor"] = grad_factor;
    ctx->saved_data["shape"] = std::vector<int64_t>{channels, inner, qmin, qmax};
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto backward_op = op<LSQBackwardFn>("lightning_quant::lsq_backward");
    const auto saved = ctx->get_saved_variables();
    const auto p = ctx->saved_data["shape"].toIntVector();
    auto [grad_x, grad_step] = backward_op.call(grads[0], saved[0], saved[1],
                                                ctx->saved_data["grad_factor"].toDouble(), p[0], p[1], p[2], p[3]);
    return {grad_x, grad_step, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor affine_fake_quant_autograd(const Tensor& x, const Tensor& scale, const Tensor& zero_point, int64_t channels,
                                  int64_t inner, int64_t qmin, int64_t qmax) {
  return AffineFakeQuant::apply(x, scale, zero_point, channels, inner, qmin, qmax);
}

Tensor lsq_fake_quant_autograd(const Tensor& x, const Tensor& scale, double grad_factor, int64_t channels,
                               int64_t inner, int64_t qmin, int64_t qmax, bool check) {
  return LSQFakeQuant::apply(x, scale, grad_factor, channels, inner, qmin, qmax, check);
}

// ---- Python entry points: one call each, through the dispatcher ------------------------------------------------

Tensor affine_fake_quant(const Tensor& x, const Tensor& scale, const Tensor& zero_point, int64_t channels,
                         int64_t inner, int64_t qmin, int64_t qmax) {
  static const auto affine_op = op<AffineFn>("lightning_quant::affine_fake_quant");
  return affine_op.call(x, scale, zero_point, channels, inner, qmin, qmax);
}

Tensor lsq_fake_quant(const Tensor& x, const Tensor& scale, double grad_factor, int64_t channels, int64_t inner,
                      int64_t qmin, int64_t qmax, bool check) {
  static const auto lsq_op = op<LSQFn>("lightning_quant::lsq_fake_quant");
  return lsq_op.call(x, scale, grad_factor, channels, inner, qmin, qmax, check);
}

// An observer quantizer's step on one tensor: observe it (mode >= 0; -1: ranges frozen), then fake-quantize it
// with the buffers' scale and zero point.
Tensor per_tensor_step(const Tensor& x, const Tensor& min_val, const Tensor& max_val, const Tensor& count,
                       const Tensor& scale, const Tensor& zero_point, int64_t mode, double momentum, bool has_range,
                       int64_t qmin, int64_t qmax, bool symmetric) {
  static const auto observe_op = op<ObserveFn>("lightning_quant::observe_per_tensor");
  if (mode >= 0) {
    observe_op.call(x, min_val, max_val, count, scale, zero_point, mode, momentum, has_range, qmin, qmax, symmetric);
  }
  return affine_fake_quant(x, scale, zero_point, 1, x.numel(), qmin, qmax);
}

// Symmetric signed per-channel weights (axis 0): observe (if asked), then the fake-quantized weight.
Tensor rows_symmetric_step(const Tensor& w, const Tensor& min_val, const Tensor& max_val, const Tensor& scale,
                           const Tensor& zero_point, bool observe, int64_t qmin, int64_t qmax) {
  static const auto observe_op = op<ObserveRowsFn>("lightning_quant::observe_rows_symmetric");
  if (observe) observe_op.call(w, min_val, max_val, scale, qmin, qmax);
  return affine_fake_quant(w, scale, zero_point, w.size(0), w.numel() / w.size(0), qmin, qmax);
}

}  // namespace

TORCH_LIBRARY(lightning_quant, m) {
  m.def("affine_fake_quant(Tensor x, Tensor scale, Tensor zero_point, int channels, int inner, int qmin, int qmax)"
        " -> Tensor");
  m.def("affine_forward(Tensor x, Tensor scale, Tensor zero_point, int channels, int inner, int qmin, int qmax)"
        " -> (Tensor, Tensor)");
  m.def("lsq_fake_quant(Tensor x, Tensor scale, float grad_factor, int channels, int inner, int qmin, int qmax,"
        " bool check) -> Tensor");
  m.def("lsq_forward(Tensor x, Tensor scale, int channels, int inner, int qmin, int qmax, bool check) -> Tensor");
  m.def("lsq_backward(Tensor grad, Tensor x, Tensor scale, float grad_factor, int channels, int inner, int qmin,"
        " int qmax) -> (Tensor, Tensor)");
  m.def("observe_per_tensor(Tensor x, Tensor(a!) min_val, Tensor(b!) max_val, Tensor(c!) count, Tensor(d!) scale,"
        " Tensor(e!) zero_point, int mode, float momentum, bool has_range, int qmin, int qmax, bool symmetric) -> ()");
  m.def("observe_rows_symmetric(Tensor w, Tensor(a!) min_val, Tensor(b!) max_val, Tensor(c!) scale, int qmin,"
        " int qmax) -> ()");
}

TORCH_LIBRARY_IMPL(lightning_quant, CPU, m) {
  m.impl("affine_fake_quant", &affine_fake_quant_cpu);
  m.impl("affine_forward", &affine_forward);
  m.impl("lsq_fake_quant", &lsq_fake_quant_cpu);
  m.impl("lsq_forward", &lsq_forward);
  m.impl("lsq_backward", &lsq_backward);
  m.impl("observe_per_tensor", &observe_per_tensor);
  m.impl("observe_rows_symmetric", &observe_rows_symmetric);
}

TORCH_LIBRARY_IMPL(lightning_quant, Autograd, m) {
  m.impl("affine_fake_quant", &affine_fake_quant_autograd);
  m.impl("lsq_fake_quant", &lsq_fake_quant_autograd);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("affine_fake_quant", &affine_fake_quant, "fake quantization with fixed qparams per channel");
  m.def("lsq_fake_quant", &lsq_fake_quant, "LSQ fake quantization with the step gradient");
  m.def("per_tensor_step", &per_tensor_step, "per-tensor observer step and fake quantization");
  m.def("rows_symmetric_step", &rows_symmetric_step, "per-channel symmetric weight observer step and fake quant");
}
