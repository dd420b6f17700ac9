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
#define ATTAR_HALVES 1  // 16 floats are two registers: see v8 below
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
// AVX2 ones or four SSE ones, so the kernel is portable C++ that still vectorizes everywhere.
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i16 __attribute__((vector_size(64)));

inline v16 load(const float* p) {
  v16 x;
  std::memcpy(&x, p, sizeof x);
  return x;
}

inline void store(float* p, v16 x) { std::memcpy(p, &x, sizeof x); }

#ifdef ATTAR_HALVES
// Where a register holds 8 floats, GCC lowers a shuffle of 16 lanes to moves of one float at a
// time, through memory: the lane trees below (here and in attention.cc) then work on the two
// halves with AVX2's own shuffles. The same additions and maxima of the same lanes: the same bits.
typedef float v8 __attribute__((vector_size(32)));
inline v8 low(v16 x) { return __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7); }
inline v8 high(v16 x) { return __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15); }
inline v16 join(v8 a, v8 b) { return __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
inline v8 swap_quads(v8 x) { return (v8)_mm256_permute2f128_ps((__m256)x, (__m256)x, 0x01); }  // lanes 4-7, 0-3
inline v8 swap_pairs(v8 x) { return (v8)_mm256_permute_ps((__m256)x, 0x4E); }                  // 2, 3, 0, 1 in each quad
#endif

// The largest of the 16 lanes, always in the same order (a halving tree).
inline float max_lanes(v16 x) {
#ifdef ATTAR_HALVES
  v8 a = low(x), b = high(x);
  a = a > b ? a : b;
  b = swap_quads(a);
  a = a > b ? a : b;
  b = swap_pairs(a);
  a = a > b ? a : b;
  return std::max(a[0], a[1]);
#else
  v16 y = __builtin_shuffle(x, i16{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
  x = x > y ? x : y;
  y = __builtin_shuffle(x, i16{4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
  x = x > y ? x : y;
  y = __builtin_shuffle(x, i16{2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
  x = x > y ? x : y;
  return std::max(x[0], x[1]);
#endif
}

// Each source file adds its ops to the library's one domain, "attar".
void add_attention(Ort::CustomOpDomain& domain);
void add_int8_rows(Ort::CustomOpDomain& domain);
void add_int8_matmul(Ort::CustomOpDomain& domain);

}  // namespace attar
