// The residual add and RMS norm between a layer's blocks (onnxruntime's
// SkipSimplifiedLayerNormalization, com.microsoft), computed to the same bits, rows side by side.
//
// Why: onnxruntime sums each row's squares one after another in a scalar chain (an order no
// compiler may change), one row a task: ~1 µs a row of 896 on this CPU, twice a layer. A decode
// step of 8 rows spent ~1.3 ms of its ~30 in these nodes. Here the additions and squares are vector
// operations, and the chains of several rows advance together, so a step of 8 rows waits for one
// chain, not eight.
//
// The arithmetic is onnxruntime's (contrib_ops/cpu/skip_layer_norm.cc, float): v = x + skip, each
// square rounded, then added to the row's sum in order from the first channel; d = sqrt(sum / n +
// epsilon); y = v / d * gamma, a division then a product. So the outputs are its bits
// (tests/test_int8_rows.py compares them), and `kernels.use_norm` swaps it in for the nodes whose
// form it computes: three inputs (no beta nor bias), float, neither the mean nor the inverse
// deviation asked for.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "kernels.h"

namespace attar {
namespace {

constexpr int GROUP = 8;  // rows whose sums advance together, as the lanes of one register

typedef float Lanes __attribute__((vector_size(4 * GROUP)));  // one lane a row of a group

// Each row's sum of squares (already rounded), in order from the first channel: the rows' chains
// advance side by side, one lane each. (Written as separate sums, GCC made them one loop a row,
// each addition waiting on the last's store.)
void sum_in_order(const float* squares, int64_t n, float* sums) {
  Lanes acc = {};
  for (int64_t h = 0; h < n; ++h) {
    const float* s = squares + h;
    acc += Lanes{s[0], s[n], s[2 * n], s[3 * n], s[4 * n], s[5 * n], s[6 * n], s[7 * n]};
  }
  for (int r = 0; r < GROUP; ++r) sums[r] = acc[r];
}

struct SkipNorm {
  float epsilon;

  explicit SkipNorm(const OrtKernelInfo* info) : epsilon(attribute(info, "epsilon", 1e-5f)) {}

  void Compute(OrtKernelContext* context) {
    const OrtValue* x = input(context, 0);
    const OrtValue* skip = input(context, 1);
    const OrtValue* gamma = input(context, 2);
    const std::vector<int64_t> shape = dims(x);
    if (shape.empty() || shape.back() == 0) fail("norm", "the input needs a last dimension");
    const int64_t n = shape.back();
    const int64_t rows = leading(shape);
    const int64_t skip_size = elements(dims(skip));  // the input's shape, or one row repeated (onnxruntime's)
    if (skip_size != rows * n && skip_size != n) fail("norm", "skip must have the input's shape or one row's");
    if (dims(gamma) != std::vector<int64_t>{n}) fail("norm", "gamma must hold one number a channel");
    OrtValue *out = nullptr, *sum = nullptr;
    check(g_api->KernelContext_GetOutput(context, 0, shape.data(), shape.size(), &out));
    check(g_api->KernelContext_GetOutput(context, 1, shape.data(), shape.size(), &sum));
    const float *a = data<float>(x), *b = data<float>(skip), *g = data<float>(gamma);
    float *y = data<float>(out), *v = data<float>(sum);

    std::vector<float> squares(static_cast<size_t>(GROUP * n), 0.0f);  // rows past the last: zeros
    float sums[GROUP];
    for (int64_t r0 = 0; r0 < rows; r0 += GROUP) {
      const int count = static_cast<int>(std::min<int64_t>(GROUP, rows - r0));
      const int64_t at = r0 * n;
      for (int r = 0; r < count; ++r) {  // lane by lane: no sum crosses channels here
        const float* xr = a + at + r * n;
        const float* sr = b + (at + r * n) % skip_size;
        float* vr = v + at + r * n;
        float* square = squares.data() + r * n;
        int64_t h = 0;
        for (; h + LANES <= n; h += LANES) {
          const vec sum = load_vec(xr + h) + load_vec(sr + h);
          store_vec(vr + h, sum);
          store_vec(square + h, sum * sum);
        }
        for (; h < n; ++h) vr[h] = xr[h] + sr[h], square[h] = vr[h] * vr[h];
      }
      sum_in_order(squares.data(), n, sums);  // lanes past `count`: summed, not read
      for (int r = 0; r < count; ++r) {
        const float d = std::sqrt(sums[r] / static_cast<float>(n) + epsilon);
        const float* vr = v + at + r * n;
        float* yr = y + at + r * n;
        int64_t h = 0;
        for (; h + LANES <= n; h += LANES) store_vec(yr + h, load_vec(vr + h) / d * load_vec(g + h));
        for (; h < n; ++h) yr[h] = vr[h] / d * g[h];
      }
    }
  }
};

struct SkipNormOp : Ort::CustomOpBase<SkipNormOp, SkipNorm> {
  void* CreateKernel(const OrtApi&, const OrtKernelInfo* info) const { return new SkipNorm(info); }
  const char* GetName() const { return "SkipRMSNorm"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  size_t GetOutputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

}  // namespace

void add_norm(Ort::CustomOpDomain& domain) {
  static SkipNormOp op;
  domain.Add(&op);
}

}  // namespace attar
