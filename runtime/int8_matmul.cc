// Int8MatMul: one projection of an int8 graph (MatMulInteger and the RowDequantize after it) in
// one node, on weights packed for the CPU's integer dot products (AVX-512 VNNI, or AVX2).
//
// onnxruntime's quantized GEMM spends a decode step of 8 rows mostly on arithmetic it cannot
// overlap with reading the weights (README, "What 8 rows cost"). Here a tile of 8 rows by 32
// columns keeps 16 accumulators in registers: each 64 bytes of weights read feed 8 `vpdpbusd`
// (one a row), and each row's 4 codes are broadcast once for both column blocks. The weights are
// packed once, when a session is made (`attar_pack_int8`, called by kernels.py), so that one
// load is 16 columns × 4 consecutive inputs, the order `vpdpbusd` multiplies in; the packed copy
// replaces the graph's (no second copy in memory).
//
// On a CPU with AVX2 and no VNNI (AMD Zen 2 and 3, Intel before Ice Lake) onnxruntime's
// MatMulInteger multiplies with `vpmaddubsw`, whose 16-bit pair sums saturate: on the default's
// real activations every projection had wrong sums (2.4% of them, off by up to a fifth of the
// largest). There this node multiplies 16-bit codes by sign-extended weights with `vpmaddwd`,
// whose 32-bit pair sums cannot overflow.
//
// The sums are exact integers, so they are MatMulInteger's where its own are exact, and the
// scaling back is RowDequantize's expression in its order: the outputs are the same bits
// (tests/test_int8_rows.py), on every CPU this builds for.
#include <cstdint>
#include <vector>

// Where the CPU has AMX, onnxruntime's quantized GEMM runs on it (far more multiply-adds a cycle
// from a few rows up than VNNI's); where it has AVX-VNNI (256-bit), its GEMM is exact and does
// twice the multiply-adds of `vpmaddwd` an instruction. This build packs nothing there and
// MatMulInteger stays.
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && !defined(__AMX_INT8__)
#define ATTAR_VNNI 1
#elif defined(__AVX2__) && !defined(__AVXVNNI__) && !defined(__AMX_INT8__)
#define ATTAR_AVX2 1
#endif
#if defined(ATTAR_VNNI) || defined(ATTAR_AVX2)
#include <immintrin.h>
#define ATTAR_PACKS 1
#endif

#include "kernels.h"

namespace attar {
namespace {

constexpr int64_t BLOCK = 16;     // columns a block: one AVX-512 register of int32 sums, or two AVX2 ones
constexpr int64_t GROUP = 4;      // inputs a block's packed 64 bytes hold for each of its columns
constexpr int TILE_ROWS = 8;      // rows a tile: 8 rows × 2 blocks = 16 accumulators (AVX2: in passes of PASS)
constexpr int64_t ITEM_ROWS = 64;  // rows a work item: its weights stay in cache across its tiles

#ifdef ATTAR_AVX2
using Code = int16_t;  // the codes widened (Compute): `vpmaddwd` multiplies 16-bit numbers
#else
using Code = uint8_t;  // the codes as RowQuantize wrote them
#endif

#ifdef ATTAR_VNNI
// Rows [0, R) × blocks [0, B) of y: the packed weights of the first block at w (the next one
// `stride` bytes on), codes at a (rows of k), outputs at y (rows of n, at the tile's column).
template <int R, int B>
void tile(const Code* a, int64_t k, const int8_t* w, int64_t stride, const int32_t* offsets, const float* row_scale,
          const float* column_scale, float* y, int64_t n) {
  __m512i acc[R][B];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < B; ++b) acc[r][b] = _mm512_setzero_si512();
  for (int64_t g = 0; g < k / GROUP; ++g) {
    __m512i weights[B];
    for (int b = 0; b < B; ++b) weights[b] = _mm512_loadu_si512(w + b * stride + g * 64);
    for (int r = 0; r < R; ++r) {
      int32_t four;
      std::memcpy(&four, a + r * k + g * GROUP, sizeof four);
      const __m512i codes = _mm512_set1_epi32(four);
      for (int b = 0; b < B; ++b) acc[r][b] = _mm512_dpbusd_epi32(acc[r][b], codes, weights[b]);
    }
  }
  for (int b = 0; b < B; ++b) {
    const __m512i offset = _mm512_loadu_si512(offsets + b * BLOCK);
    const __m512 column = _mm512_loadu_ps(column_scale + b * BLOCK);
    for (int r = 0; r < R; ++r) {
      // RowDequantize's (float(sum) * row scale) * column scale, in that order.
      const __m512 sum = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][b], offset));
      _mm512_storeu_ps(y + r * n + b * BLOCK, _mm512_mul_ps(_mm512_mul_ps(sum, _mm512_set1_ps(row_scale[r])), column));
    }
  }
}
#endif

#ifdef ATTAR_AVX2
// Rows [0, R) × one block of 16 columns, R ≤ PASS. A block's group of 4 inputs is packed as two
// pairs, each 16 columns × 2 inputs: sign-extended 8 columns at a time, one `vpmaddwd` with a
// row's two codes gives 8 columns' sums of two products.
template <int R>
void block(const Code* a, int64_t k, const int8_t* w, const int32_t* offsets, const float* row_scale,
           const float* column_scale, float* y, int64_t n) {
  __m256i acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  for (int64_t pair = 0; pair < k / 2; ++pair) {
    const int8_t* at = w + pair * 32;
    const __m256i low = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(at)));
    const __m256i high = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(at + 16)));
    for (int r = 0; r < R; ++r) {
      int32_t two;
      std::memcpy(&two, a + r * k + pair * 2, sizeof two);
      const __m256i codes = _mm256_set1_epi32(two);
      acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(codes, low));
      acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(codes, high));
    }
  }
  for (int h = 0; h < 2; ++h) {
    const __m256i offset = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(offsets + h * 8));
    const __m256 column = _mm256_loadu_ps(column_scale + h * 8);
    for (int r = 0; r < R; ++r) {
      const __m256 sum = _mm256_cvtepi32_ps(_mm256_sub_epi32(acc[r][h], offset));
      _mm256_storeu_ps(y + r * n + h * 8, _mm256_mul_ps(_mm256_mul_ps(sum, _mm256_set1_ps(row_scale[r])), column));
    }
  }
}

// The same tile as the VNNI path's, one block and PASS rows at a time: 3 rows' 6 sums, 2 weight
// vectors, 3 code pairs and their products fit AVX2's 16 registers; with 4 rows GCC kept a sum on
// the stack, and an 8-row product took twice as long.
constexpr int PASS = 3;

template <int R, int B>
void tile(const Code* a, int64_t k, const int8_t* w, int64_t stride, const int32_t* offsets, const float* row_scale,
          const float* column_scale, float* y, int64_t n) {
  for (int b = 0; b < B; ++b) {
    block<std::min(R, PASS)>(a, k, w + b * stride, offsets + b * BLOCK, row_scale, column_scale + b * BLOCK, y + b * BLOCK, n);
    if constexpr (R > PASS)
      tile<R - PASS, 1>(a + PASS * k, k, w + b * stride, stride, offsets + b * BLOCK, row_scale + PASS, column_scale + b * BLOCK,
                        y + PASS * n + b * BLOCK, n);
  }
}
#endif

#ifdef ATTAR_PACKS
template <int B>
using Tile = void (*)(const Code*, int64_t, const int8_t*, int64_t, const int32_t*, const float*, const float*,
                      float*, int64_t);

template <int B>
constexpr Tile<B> TILES[TILE_ROWS + 1] = {nullptr,      tile<1, B>, tile<2, B>, tile<3, B>, tile<4, B>,
                                          tile<5, B>,   tile<6, B>, tile<7, B>, tile<8, B>};
#endif

// Int8MatMul(codes uint8 (..., K), weights int8 (N/16, K/4, 64), offsets int32 (N),
//            row_scale float (..., 1), column_scale float (N)) -> float (..., N)
// = (float(Σ_k codes·w - offsets) * row_scale) * column_scale, offsets being the codes' zero
// point times each column's sum of weights (MatMulInteger's a_zero_point, folded in by the packing).
struct Int8MatMul {
  explicit Int8MatMul(const OrtKernelInfo*) {}

  struct Work {
    const Code* codes;
    const int8_t* weights;
    const int32_t* offsets;
    const float *row_scale, *column_scale;
    float* y;
    int64_t rows, k, n, blocks;  // blocks: of ITEM_ROWS rows
  };

  static void part(void* data, size_t item) {  // a strip of 32 columns × up to ITEM_ROWS rows
#ifdef ATTAR_PACKS
    const Work& w = *static_cast<const Work*>(data);
    // Consecutive items share a strip, so a thread's weights come from memory once (a prefill's rows
    // are read again for each strip instead: far fewer bytes, and from cache).
    const int64_t strip = static_cast<int64_t>(item) / w.blocks, first = static_cast<int64_t>(item) % w.blocks * ITEM_ROWS;
    const int64_t column = strip * 2 * BLOCK, stride = w.k * BLOCK;
    const int8_t* weights = w.weights + (column / BLOCK) * stride;
    const bool two = column + BLOCK < w.n;
    for (int64_t r = first; r < std::min(w.rows, first + ITEM_ROWS); r += TILE_ROWS) {
      const int64_t rows = std::min<int64_t>(TILE_ROWS, w.rows - r);
      (two ? TILES<2>[rows] : TILES<1>[rows])(w.codes + r * w.k, w.k, weights, stride, w.offsets + column,
                                              w.row_scale + r, w.column_scale + column, w.y + r * w.n + column, w.n);
    }
#else
    (void)data, (void)item;
#endif
  }

  void Compute(OrtKernelContext* context) {
#ifndef ATTAR_PACKS
    fail("Int8MatMul", "this build packs no weights (a CPU with AMX, AVX-VNNI or neither VNNI nor AVX2)");
#endif
    const OrtValue* codes = input(context, 0);
    std::vector<int64_t> shape = dims(codes);
    const std::vector<int64_t> packed = dims(input(context, 1));
    if (shape.empty() || packed.size() != 3 || packed[2] != BLOCK * GROUP || packed[1] * GROUP != shape.back())
      fail("Int8MatMul", "the weights must be packed (N/16, K/4, 64) for codes of K inputs");
    const int64_t k = shape.back(), n = packed[0] * BLOCK;
    int64_t rows = 1;
    for (size_t i = 0; i + 1 < shape.size(); ++i) rows *= shape[i];
    std::vector<int64_t> per_row = shape;
    per_row.back() = 1;
    if (dims(input(context, 3)) != per_row) fail("Int8MatMul", "the row scale must hold one scale a row");
    if (dims(input(context, 2)) != std::vector<int64_t>{n} || dims(input(context, 4)) != std::vector<int64_t>{n})
      fail("Int8MatMul", "the offsets and column scale must hold one value a column");
    shape.back() = n;
    OrtValue* out = nullptr;
    check(g_api->KernelContext_GetOutput(context, 0, shape.data(), shape.size(), &out));
#ifdef ATTAR_AVX2
    // Widened once for all the strips; kept by the thread, so a step allocates nothing.
    thread_local std::vector<Code> wide;
    const uint8_t* narrow = data<uint8_t>(codes);
    wide.assign(narrow, narrow + rows * k);
    const Code* a = wide.data();
#else
    const Code* a = data<uint8_t>(codes);
#endif
    Work w{a, data<int8_t>(input(context, 1)), data<int32_t>(input(context, 2)),
           data<float>(input(context, 3)), data<float>(input(context, 4)), data<float>(out), rows, k, n,
           (rows + ITEM_ROWS - 1) / ITEM_ROWS};
    if (rows == 0 || n == 0) return;
    const int64_t items = w.blocks * ((n + 2 * BLOCK - 1) / (2 * BLOCK));
    check(g_api->KernelContext_ParallelFor(context, part, static_cast<size_t>(items), 0, &w));
  }
};

struct Int8MatMulOp : Ort::CustomOpBase<Int8MatMulOp, Int8MatMul> {
  void* CreateKernel(const OrtApi&, const OrtKernelInfo* info) const { return new Int8MatMul(info); }
  const char* GetName() const { return "Int8MatMul"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 5; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    static const ONNXTensorElementDataType types[] = {ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8,
                                                      ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
                                                      ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};
    return types[i];
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

}  // namespace

void add_int8_matmul(Ort::CustomOpDomain& domain) {
  static Int8MatMulOp op;
  domain.Add(&op);
}

}  // namespace attar

// Pack MatMulInteger's weights w (k × n, int8, row-major) for Int8MatMul, and offsets[c] = zero ×
// Σ_k w[k][c]. Block j's group g (64 bytes) holds w[4g .. 4g+3][16j .. 16j+15]: for VNNI as
// packed[j][g][c][i] = w[4g + i][16j + c], for AVX2 as packed[j][g][p][c][i] = w[4g + 2p + i][16j + c].
// Returns 0, or 1 where this build packs nothing (the graph then keeps MatMulInteger) or the shape
// does not pack (k % 4, n % 16).
extern "C" int attar_pack_int8(const int8_t* __restrict w, int64_t k, int64_t n, int32_t zero, int8_t* __restrict packed,
                               int32_t* __restrict offsets) {
#ifdef ATTAR_PACKS
  using attar::BLOCK, attar::GROUP;
  if (k <= 0 || n <= 0 || k % GROUP != 0 || n % BLOCK != 0) return 1;
  for (int64_t c = 0; c < n; ++c) offsets[c] = 0;
  for (int64_t row = 0; row < k; ++row)
    for (int64_t c = 0; c < n; ++c) offsets[c] += w[row * n + c];
  for (int64_t c = 0; c < n; ++c) offsets[c] *= zero;
  // Each block's 4 × 16 bytes interleaved, a band of blocks at a time: the band's
  // packed bytes (~512 KB) stay in cache while four rows at a time are read across it.
  const int64_t band = std::max<int64_t>(1, (512 << 10) / (k * BLOCK));
  for (int64_t first = 0; first < n / BLOCK; first += band)
  for (int64_t g = 0; g < k / GROUP; ++g) {
    const int8_t* row = w + g * GROUP * n;
    for (int64_t j = first; j < std::min(n / BLOCK, first + band); ++j) {
      const int8_t* at = row + j * BLOCK;
      const __m128i r0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(at));
      const __m128i r1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(at + n));
      const __m128i r2 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(at + 2 * n));
      const __m128i r3 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(at + 3 * n));
      const __m128i low01 = _mm_unpacklo_epi8(r0, r1), high01 = _mm_unpackhi_epi8(r0, r1);
      const __m128i low23 = _mm_unpacklo_epi8(r2, r3), high23 = _mm_unpackhi_epi8(r2, r3);
      __m128i* out = reinterpret_cast<__m128i*>(packed + (j * (k / GROUP) + g) * BLOCK * GROUP);
#ifdef ATTAR_VNNI
      _mm_storeu_si128(out, _mm_unpacklo_epi16(low01, low23));      // columns 0-3, 4 inputs each
      _mm_storeu_si128(out + 1, _mm_unpackhi_epi16(low01, low23));  // columns 4-7
      _mm_storeu_si128(out + 2, _mm_unpacklo_epi16(high01, high23));
      _mm_storeu_si128(out + 3, _mm_unpackhi_epi16(high01, high23));
#else
      _mm_storeu_si128(out, low01);       // inputs 0-1 of columns 0-7
      _mm_storeu_si128(out + 1, high01);  // inputs 0-1 of columns 8-15
      _mm_storeu_si128(out + 2, low23);   // inputs 2-3
      _mm_storeu_si128(out + 3, high23);
#endif
    }
  }
  return 0;
#else
  (void)w, (void)k, (void)n, (void)zero, (void)packed, (void)offsets;
  return 1;
#endif
}
