// The k largest logits of each position, largest first, and their ids (onnx's TopK, on the last
// axis, largest and sorted): what the engine samples from (`engine.add_top`).
//
// Why: onnxruntime's TopK keeps a heap per row: 0.75 ms of a decode step of 8 rows over the
// default's 151,936 logits (its profile). Here a row is read once against a bar, the k-th largest
// value seen so far: 64 logits at a time are compared to it (one vector compare each), and only
// those above it (a few hundred in a row, mostly near its start) join a list, which is cut back
// to its k best whenever it holds 2k; rows go to both threads. ~0.37 ms of the same step, most of
// it the read of the logits, which the LM head has just written from both cores.
//
// The order is onnx's: larger values first, equal values by the lower index first. A value that
// equals the bar and comes later loses to every kept one (its index is higher), so the bar is
// strict. NaN, which no order ranks, comes first (as numpy's descending order puts it); a row of
// NaNs still gives k ids, each in range.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "kernels.h"
#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace attar {
namespace {

constexpr int64_t AHEAD = 1024;  // floats: 4 KB ahead

struct Entry {
  float value;
  int64_t index;
};

inline bool before(const Entry& a, const Entry& b) {  // a ranks before b
  const bool an = std::isnan(a.value), bn = std::isnan(b.value);
  if (an != bn) return an;
  if (!an && a.value != b.value) return a.value > b.value;
  return a.index < b.index;
}

// Whether any of the 64 values from x is above the bar, or NaN (a comparison that is not <=).
inline bool any_above(const float* x, float bar) {
#ifdef __AVX512F__
  const __m512 b = _mm512_set1_ps(bar);
  __mmask16 m = 0;
  for (int i = 0; i < 64; i += 16) m |= _mm512_cmp_ps_mask(_mm512_loadu_ps(x + i), b, _CMP_NLE_UQ);
  return m != 0;
#elif defined(__AVX2__)
  const __m256 b = _mm256_set1_ps(bar);
  __m256 m = _mm256_setzero_ps();
  for (int i = 0; i < 64; i += 8) m = _mm256_or_ps(m, _mm256_cmp_ps(_mm256_loadu_ps(x + i), b, _CMP_NLE_UQ));
  return _mm256_movemask_ps(m) != 0;
#else
  for (int i = 0; i < 64; ++i)
    if (!(x[i] <= bar)) return true;
  return false;
#endif
}

// Row x of n values: its k best into values and indices (k <= n).
void top_row(const float* x, int64_t n, int64_t k, std::vector<Entry>& list, float* values, int64_t* indices) {
  if (k == 0) return;
  list.clear();
  float bar = -INFINITY;
  bool full = false;  // the bar is the k-th best so far (before that, every value joins)
  const auto take = [&](int64_t from, int64_t to) {
    for (int64_t i = from; i < to; ++i) {
      if (full && x[i] <= bar) continue;
      list.push_back({x[i], i});
      if (static_cast<int64_t>(list.size()) == 2 * k) {
        std::nth_element(list.begin(), list.begin() + (k - 1), list.end(), before);
        list.resize(k);
        bar = list[k - 1].value;  // NaN when the k best are all NaN: then every value joins
        full = !std::isnan(bar);
      }
    }
  };
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    __builtin_prefetch(x + i + AHEAD, 0, 2);  // the row was just written, by both cores: into L2
    if (!full || any_above(x + i, bar)) take(i, i + 64);
  }
  take(i, n);
  std::sort(list.begin(), list.end(), before);
  for (int64_t j = 0; j < k; ++j) values[j] = list[j].value, indices[j] = list[j].index;
}

struct Top {
  explicit Top(const OrtKernelInfo* info) {
    const int64_t axis = attribute(info, "axis", int64_t{-1});
    if (attribute(info, "largest", int64_t{1}) != 1 || attribute(info, "sorted", int64_t{1}) != 1)
      fail("TopK", "only the largest values, sorted, are computed");
    if (axis != -1) fail("TopK", "only the last axis (-1) is computed");
  }

  void Compute(OrtKernelContext* context) {
    const OrtValue* x = input(context, 0);
    const OrtValue* count = input(context, 1);
    std::vector<int64_t> shape = dims(x);
    if (shape.empty()) fail("TopK", "the input needs a last dimension");
    if (elements(dims(count)) != 1) fail("TopK", "k must be one number");
    const int64_t n = shape.back(), k = data<int64_t>(count)[0];
    if (k < 0 || k > n) fail("TopK", "k must be between 0 and the last dimension");
    const int64_t rows = leading(shape);
    shape.back() = k;
    OrtValue *values = nullptr, *indices = nullptr;
    check(g_api->KernelContext_GetOutput(context, 0, shape.data(), shape.size(), &values));
    check(g_api->KernelContext_GetOutput(context, 1, shape.data(), shape.size(), &indices));
    if (rows == 0) return;
    Work w{data<float>(x), data<float>(values), data<int64_t>(indices), n, k};
    // A row a work item: reading the logits is most of it, and two cores read twice as fast.
    check(g_api->KernelContext_ParallelFor(context, part, static_cast<size_t>(rows), 1, &w));
  }

  struct Work {
    const float* x;
    float* values;
    int64_t* indices;
    int64_t n, k;
  };

  static void part(void* data, size_t item) {
    const Work& w = *static_cast<const Work*>(data);
    const int64_t r = static_cast<int64_t>(item);
    thread_local std::vector<Entry> list;  // kept by the thread: a step allocates nothing
    list.reserve(static_cast<size_t>(2 * w.k));
    top_row(w.x + r * w.n, w.n, w.k, list, w.values + r * w.k, w.indices + r * w.k);
  }
};

struct TopOp : Ort::CustomOpBase<TopOp, Top> {
  void* CreateKernel(const OrtApi&, const OrtKernelInfo* info) const { return new Top(info); }
  const char* GetName() const { return "TopK"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    return i == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
  }
  size_t GetOutputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetOutputType(size_t i) const {
    return i == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
  }
};

}  // namespace

void add_top(Ort::CustomOpDomain& domain) {
  static TopOp op;
  domain.Add(&op);
}

}  // namespace attar
