// The int8 graph's per-row activation quantization, and the scaling back of its integer sums, as
// two ops of one pass each.
//
// attar's int8 graphs (gguf_import.py, `int8_matmul`) round each row (token) of a projection's
// input to uint8 codes around 128 with a scale of its own, max|x| / 127, multiply them on
// MatMulInteger (onnxruntime's quantized GEMM, the integer matrix units), and scale the int32
// sums back by the row's scale and the weight column's. In onnxruntime's own ops that is eight
// nodes before the product and three after it, each a pass over memory and a dispatch. These ops
// compute the same expressions in the same order, so the graph's outputs are the same bits
// (tests/test_int8_rows.py checks it): `kernels.use_int8_rows` swaps them in, in memory. Where the
// weights pack, Int8MatMul (int8_matmul.cc) then takes in both, with `quantize_row`.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "kernels.h"

namespace attar {
namespace {

// max |x[i]| over a row, NaNs passed over (as std::max(peak, NaN) does). A register's lanes side
// by side: a maximum is exact in any order, so this is the one-at-a-time loop's result, which the
// compiler leaves scalar (a chain of dependent maxima, most of RowQuantize's time).
float largest_magnitude(const float* x, int64_t n) {
  vec top = {};
  int64_t i = 0;
  for (; i + LANES <= n; i += LANES) {
    const vec a = (vec)((ivec)load_vec(x + i) & 0x7fffffff);  // |x|: the sign bit cleared
    top = a > top ? a : top;
  }
  float peak = max_lanes(top);
  for (; i < n; ++i) peak = std::max(peak, std::fabs(x[i]));
  return peak;
}

}  // namespace

float quantize_row(const float* x, const float* smooth, int64_t width, float* scratch, uint8_t* codes) {
  if (smooth != nullptr) {
    for (int64_t i = 0; i < width; ++i) scratch[i] = x[i] * smooth[i];
    x = scratch;
  }
  const float peak = largest_magnitude(x, width);
  const float step = std::max(peak, 1e-8f) / 127.0f;
  // In [-127, 127] after rounding, so +128 and the conversion are exact.
  for (int64_t i = 0; i < width; ++i) codes[i] = static_cast<uint8_t>(static_cast<int>(std::nearbyint(x[i] / step)) + 128);
  return step;
}

namespace {

// RowQuantize(x[, smooth]) -> (codes uint8, scale float (..., 1)): `quantize_row` for each row of
// x. (Where the products pack, `Int8MatMul` quantizes its own input and this node is not used.)
struct RowQuantize {
  explicit RowQuantize(const OrtKernelInfo*) {}

  void Compute(OrtKernelContext* context) {
    const OrtValue* x = input(context, 0);
    const OrtValue* smooth = input(context, 1);
    std::vector<int64_t> shape = dims(x);
    if (shape.empty() || shape.back() == 0) fail("RowQuantize", "the input needs a last dimension");
    const int64_t width = shape.back(), rows = leading(shape);
    const float* s = nullptr;
    if (smooth != nullptr) {
      if (dims(smooth) != std::vector<int64_t>{width}) fail("RowQuantize", "smooth must hold one factor a channel");
      s = data<float>(smooth);
    }
    OrtValue *codes = nullptr, *scales = nullptr;
    check(g_api->KernelContext_GetOutput(context, 0, shape.data(), shape.size(), &codes));
    shape.back() = 1;
    check(g_api->KernelContext_GetOutput(context, 1, shape.data(), shape.size(), &scales));
    const float* in = data<float>(x);
    uint8_t* out = data<uint8_t>(codes);
    float* scale = data<float>(scales);
    std::vector<float> row(static_cast<size_t>(width));
    for (int64_t r = 0; r < rows; ++r) scale[r] = quantize_row(in + r * width, s, width, row.data(), out + r * width);
  }
};

// RowDequantize(sums int32, row_scale (..., 1), column_scale (N)) -> (float(sums) * row_scale) * column_scale.
struct RowDequantize {
  explicit RowDequantize(const OrtKernelInfo*) {}

  struct Work {
    const int32_t* sums;
    const float *rows, *columns;
    float* out;
    int64_t width, chunk, count;
  };

  static void part(void* data, size_t item) {  // elements [item * chunk, +chunk) of the flat output
    const Work& w = *static_cast<const Work*>(data);
    const int64_t end = std::min(w.count, static_cast<int64_t>(item + 1) * w.chunk);
    for (int64_t at = static_cast<int64_t>(item) * w.chunk; at < end;) {
      const int64_t r = at / w.width, from = at % w.width, to = std::min(w.width, from + (end - at));
      const int32_t* a = w.sums + r * w.width;
      float* o = w.out + r * w.width;
      const float rs = w.rows[r];
      for (int64_t i = from; i < to; ++i) o[i] = (static_cast<float>(a[i]) * rs) * w.columns[i];
      at += to - from;
    }
  }

  void Compute(OrtKernelContext* context) {
    const OrtValue* sums = input(context, 0);
    const std::vector<int64_t> shape = dims(sums);
    if (shape.empty()) fail("RowDequantize", "the sums need a last dimension");
    std::vector<int64_t> per_row = shape;
    per_row.back() = 1;
    if (dims(input(context, 1)) != per_row) fail("RowDequantize", "the row scale must hold one scale a row");
    if (dims(input(context, 2)) != std::vector<int64_t>{shape.back()})
      fail("RowDequantize", "the column scale must hold one scale a column");
    OrtValue* out = nullptr;
    check(g_api->KernelContext_GetOutput(context, 0, shape.data(), shape.size(), &out));
    Work w{data<int32_t>(sums), data<float>(input(context, 1)), data<float>(input(context, 2)), data<float>(out),
           shape.back(), 0, leading(shape) * shape.back()};
    if (w.count == 0) return;
    // A few parts per thread: the LM head's sums (rows x 151,936) are worth sharing; a projection's
    // are small, and the threads are onnxruntime's own, already awake for the GEMM around it.
    w.chunk = std::max<int64_t>(4096, (w.count + 7) / 8);
    check(g_api->KernelContext_ParallelFor(context, part, static_cast<size_t>((w.count + w.chunk - 1) / w.chunk), 0, &w));
  }
};

struct RowQuantizeOp : Ort::CustomOpBase<RowQuantizeOp, RowQuantize> {
  void* CreateKernel(const OrtApi&, const OrtKernelInfo* info) const { return new RowQuantize(info); }
  const char* GetName() const { return "RowQuantize"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i == 1 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetOutputType(size_t i) const {
    return i == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
};

struct RowDequantizeOp : Ort::CustomOpBase<RowDequantizeOp, RowDequantize> {
  void* CreateKernel(const OrtApi&, const OrtKernelInfo* info) const { return new RowDequantize(info); }
  const char* GetName() const { return "RowDequantize"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    return i == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

}  // namespace

void add_int8_rows(Ort::CustomOpDomain& domain) {
  static RowQuantizeOp quantize;
  static RowDequantizeOp dequantize;
  domain.Add(&quantize);
  domain.Add(&dequantize);
}

}  // namespace attar
