// What attar's onnxruntime kernels share: the C API, read once when the library is registered,
// and small wrappers that turn its statuses into exceptions (onnxruntime reports those as the
// session's error).
#pragma once

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__AVX2__) && !defined(__AVX512F__)
#include <immintrin.h>
#define ATTAR_HALVES 1  // 16 floats are two registers: see vec below
#endif

namespace attar {

inline const OrtApi* g_api = nullptr;  // set by RegisterCustomOps (kernels.cc)

inline void check(OrtStatus* status) {
  if (status != nullptr) {
    std::string message = g_api->GetErrorMessage(status);
    g_api->ReleaseStatus(status);
    throw Ort::Exception(std::move(message), ORT_FAIL);
  }
}

// A bad input: one line naming the kernel, as the session's error.
inline void fail(const char* kernel, const std::string& message) {
  throw Ort::Exception(std::string("attar ") + kernel + ": " + message, ORT_INVALID_ARGUMENT);
}

inline int64_t attribute(const OrtKernelInfo* info, const char* name, int64_t otherwise) {
  int64_t value = 0;
  OrtStatus* status = g_api->KernelInfoGetAttribute_int64(info, name, &value);
  if (status != nullptr) {  // absent
    g_api->ReleaseStatus(status);
    return otherwise;
  }
  return value;
}

inline float attribute(const OrtKernelInfo* info, const char* name, float otherwise) {
  float value = 0.0f;
  OrtStatus* status = g_api->KernelInfoGetAttribute_float(info, name, &value);
  if (status != nullptr) {
    g_api->ReleaseStatus(status);
    return otherwise;
  }
  return value;
}

inline std::vector<int64_t> dims(const OrtValue* value) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  check(g_api->GetTensorTypeAndShape(value, &info));
  size_t count = 0;
  check(g_api->GetDimensionsCount(info, &count));
  std::vector<int64_t> shape(count);
  check(g_api->GetDimensions(info, shape.data(), count));
  g_api->ReleaseTensorTypeAndShapeInfo(info);
  return shape;
}

// How many numbers a shape holds, and how many rows it is read as (all but the last dimension).
inline int64_t elements(const std::vector<int64_t>& shape) {
  int64_t count = 1;
  for (int64_t d : shape) count *= d;
  return count;
}

inline int64_t leading(const std::vector<int64_t>& shape) {
  return shape.empty() ? 1 : elements(std::vector<int64_t>(shape.begin(), shape.end() - 1));
}

inline ONNXTensorElementDataType element_type(const OrtValue* value) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  check(g_api->GetTensorTypeAndShape(value, &info));
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  check(g_api->GetTensorElementType(info, &type));
  g_api->ReleaseTensorTypeAndShapeInfo(info);
  return type;
}

inline const OrtValue* input(OrtKernelContext* context, size_t i) {  // nullptr: an optional input left out
  const OrtValue* value = nullptr;
  check(g_api->KernelContext_GetInput(context, i, &value));
  return value;
}

template <typename T>
T* data(const OrtValue* value) {
  void* p = nullptr;
  check(g_api->GetTensorMutableData(const_cast<OrtValue*>(value), &p));
  return static_cast<T*>(p);
}

// Sixteen floats as one value: GCC/Clang vector extensions compile to one AVX-512 register, two
// AVX2 ones or four SSE ones, so the kernels are portable C++ that still vectorizes everywhere.
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i16 __attribute__((vector_size(64)));

inline v16 load(const float* p) {
  v16 x;
  std::memcpy(&x, p, sizeof x);
  return x;
}

inline void store(float* p, v16 x) { std::memcpy(p, &x, sizeof x); }

// One register of floats: 16 where the CPU has AVX-512 (or none of this), 8 with AVX2. Where a
// register holds 8, GCC lowers a select or a shuffle of 16 lanes to moves of one float at a time
// through memory, and reads them back whole (a stalled load each), so work on 16 lanes (a block of
// attention's scores) is PARTS registers of LANES. Lane by lane the width changes nothing; where
// lanes meet (the trees below and in attention.cc) both widths add or compare the same lanes in
// the same order: the same bits (tests/test_attention_kernel.py compiles both and compares).
#ifdef ATTAR_HALVES
typedef float vec __attribute__((vector_size(32)));
typedef int32_t ivec __attribute__((vector_size(32)));
constexpr ivec LANE = {0, 1, 2, 3, 4, 5, 6, 7};
inline vec swap_quads(vec x) { return (vec)_mm256_permute2f128_ps((__m256)x, (__m256)x, 0x01); }  // lanes 4-7, 0-3
inline vec swap_pairs(vec x) { return (vec)_mm256_permute_ps((__m256)x, 0x4E); }                  // 2, 3, 0, 1 in each quad
#else
typedef v16 vec;
typedef i16 ivec;
constexpr ivec LANE = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
#endif
constexpr int LANES = sizeof(vec) / sizeof(float);
constexpr int PARTS = 16 / LANES;  // registers of 16 floats

inline vec load_vec(const float* p) {
  vec x;
  std::memcpy(&x, p, sizeof x);
  return x;
}

inline void store_vec(float* p, vec x) { std::memcpy(p, &x, sizeof x); }

// The largest of a register's lanes, always in the same order: a halving tree (on 8 lanes, the
// last three steps of the 16-lane tree, whose first step is the caller's maximum of two halves).
inline float max_lanes(vec x) {
#ifdef ATTAR_HALVES
  vec y = swap_quads(x);
  x = x > y ? x : y;
  y = swap_pairs(x);
  x = x > y ? x : y;
#else
  v16 y = __builtin_shuffle(x, i16{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
  x = x > y ? x : y;
  y = __builtin_shuffle(x, i16{4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
  x = x > y ? x : y;
  y = __builtin_shuffle(x, i16{2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
  x = x > y ? x : y;
#endif
  return std::max(x[0], x[1]);
}

// The sum of a register's lanes, in the same order as max_lanes.
inline float add_lanes(vec x) {
#ifdef ATTAR_HALVES
  x += swap_quads(x);
  x += swap_pairs(x);
#else
  x += __builtin_shuffle(x, i16{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
  x += __builtin_shuffle(x, i16{4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
  x += __builtin_shuffle(x, i16{2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
#endif
  return x[0] + x[1];
}

// exp(x) for x <= 0 (attention's scores less their maximum, Q8MatMul's gate), lane by lane: 2^n
// by the exponent bits, e^r on |r| <= ln2/2 by its Taylor series to degree 7 (relative error under
// 1e-7, as good as the float scores it is applied to). The rounding adds and removes 1.5 * 2^23,
// which leaves x * log2(e) rounded to the nearest integer in float arithmetic.
inline vec exp_nonpositive(vec x) {
  x = x < -87.0f ? vec{} - 87.0f : x;
  const vec n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const vec r = x - n * 0.693147180559945309f;
  vec p = r * (1.0f / 5040.0f) + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const ivec bits = (__builtin_convertvector(n, ivec) + 127) << 23;
  return p * (vec)bits;  // the bits as floats: 2^n
}

// The int8 graph's quantization of one row (int8_rows.cc): x (times smooth, one factor a channel,
// when given: SmoothQuant's division, folded into the weights) to uint8 codes around 128,
// round_half_to_even(x / step) + 128, step = max(max|x|, 1e-8) / 127, which it returns. `scratch`
// holds `width` floats.
float quantize_row(const float* x, const float* smooth, int64_t width, float* scratch, uint8_t* codes);

// Each source file adds its ops to the library's one domain, "attar".
void add_attention(Ort::CustomOpDomain& domain);
void add_int8_rows(Ort::CustomOpDomain& domain);
void add_int8_matmul(Ort::CustomOpDomain& domain);
void add_norm(Ort::CustomOpDomain& domain);
void add_top(Ort::CustomOpDomain& domain);

}  // namespace attar
