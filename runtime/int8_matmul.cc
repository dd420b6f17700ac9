// Int8MatMul: one projection of an int8 graph in one node (its input's row quantization, the
// MatMulInteger, the dequantization of its sums, and where the graph has them a bias and the MLP's
// SwiGLU), on weights packed for the CPU's integer dot products (AVX-512 VNNI, or AVX2). At 97
// projections a step, the nodes around each product were ~8% of a decode step of the default.
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
//
// Q8MatMul (further down) runs the exact graph's MatMulNBits on AVX2, with `vpmaddubsw` products
// of its own (exact too: GGUF's codes are small enough), or with AVX-512 VNNI's `vpdpbusd` on
// the same registers.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <iterator>
#include <type_traits>
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
// Q8MatMul's products are AVX2's (`vpmaddubsw`), and on both kinds of CPU measured they beat
// onnxruntime's MatMulNBits and its offset term: on AVX2 without VNNI (Zen 2), and with AVX-512
// VNNI (Zen 4: the 1.5B's exact graph ×0.74 a step at 1 and at 8 rows).
#define ATTAR_Q8 1
#endif

#include "kernels.h"

namespace attar {
namespace {

constexpr int64_t BLOCK = 16;     // columns a block: one AVX-512 register of int32 sums, or two AVX2 ones
constexpr int64_t GROUP = 4;      // inputs a block's packed 64 bytes hold for each of its columns
constexpr int TILE_ROWS = 8;      // rows a tile: 8 rows × 2 blocks = 16 accumulators (AVX2: in passes of PASS)
constexpr int64_t ITEM_ROWS = 64;  // rows a work item: its weights stay in cache across its tiles
constexpr int64_t QUANTIZE_ROWS = 32;  // rows of an input a thread quantizes at a time (a prefill's)
// Bytes of a block's weights a pass asks for ahead of those it multiplies, into L2 (`prefetcht1`),
// in both products: the hardware prefetcher alone falls behind the weights' stream. Into L1
// (`prefetcht0`) such requests had cost a one-row step ×1.05 and won little at 8 rows; into L2
// they win at every width (Zen 4; streaming 512 MB through the 8-row VNNI tile alone, 24 → 28
// GB/s). The distances are measured: Int8MatMul's one-row tile consumes its bytes fastest, and
// 2 KB beat 4 KB there; Q8MatMul's passes do more arithmetic a byte, and 8 KB beat 2 and 4 KB
// (the 1.5B's exact step ×0.86-0.91 at one row, ×0.96-0.98 at 8 rows, against 2 and 4 KB).
constexpr int64_t ahead(int rows) { return rows == 1 ? 2048 : 4096; }
constexpr int64_t Q8_AHEAD = 8192;
constexpr int64_t Q8_OFFSETS = 32;  // Q8MatMul: inputs that share an offset (GGUF's k-quants with a minimum)
// Q8MatMul: rows a pass computes together, each unpacking its weights once for all of them. With
// AVX2's 16 registers, 3 (against 2: ×0.94 at 8 rows on 6-bit codes, even on 8-bit ones; GCC keeps
// some of 3 rows' float sums on the stack). AVX-512 gives 32, and `vpdpbusd` needs no 16-bit sums
// beside the 32-bit ones: a whole tile in one pass (Zen 4, against 3: the default's exact graph
// ×0.85-0.87 a step at 8 rows, ×0.90 at 16, a 256-token prefill ×0.81-0.85; the 1.5B's ×0.83 at
// 8 rows; one row even; 4 and 6 rows a pass were slower at 8 rows or even).
#ifdef ATTAR_VNNI
constexpr int Q8_PASS = TILE_ROWS;
#else
constexpr int Q8_PASS = 3;
#endif

// How Q8MatMul's weights are packed (`attar_pack_q8`): 8 bits, as they are (SIGNED) or plus the
// matrix's largest |w| where that is at most BIASED_UP_TO (BIASED: unsigned); 4 bits plus 8
// (NIBBLES); 8-bit codes of -16 to 15 (Q5_0's) as 5 bits plus 16 (FIVE: nibbles and a bit plane).
// With VNNI every 8-bit matrix is BIASED: `vpdpbusd` adds its products into 32 bits, which hold
// any c = w + 128 (to 255), and a signed one costs each row two `vpsignb` a group of 4 inputs
// (Zen 4: the default's exact graph ×0.90-0.93 a step at 8 rows, its Q8_0 LM head; one row even).
enum Weights { SIGNED, BIASED, NIBBLES, FIVE };
#ifdef ATTAR_VNNI
constexpr int BIASED_UP_TO = 128;
#else
constexpr int BIASED_UP_TO = 64;
#endif

#ifdef ATTAR_AVX2
using Code = int16_t;  // the codes widened (Compute): `vpmaddwd` multiplies 16-bit numbers
#else
using Code = uint8_t;  // the codes as RowQuantize wrote them
#endif

// How a product's work is split for ParallelFor: strips of 2 blocks of columns, each cut into
// items of up to ITEM_ROWS rows. Consecutive items share a strip, so a thread's weights come from
// memory once (a prefill's rows are read again for each strip instead: far fewer bytes, and from
// cache).
inline size_t work_items(int64_t rows, int64_t n) {
  return static_cast<size_t>((rows + ITEM_ROWS - 1) / ITEM_ROWS * ((n + 2 * BLOCK - 1) / (2 * BLOCK)));
}

// Item `item`'s tiles of up to TILE_ROWS rows: tile(first row, rows, the strip's first block,
// whether the strip has a second block).
template <typename Tile>
inline void each_tile(size_t item, int64_t rows, int64_t n, Tile tile) {
  const int64_t items = (rows + ITEM_ROWS - 1) / ITEM_ROWS;  // a strip's
  const int64_t block = static_cast<int64_t>(item) / items * 2, first = static_cast<int64_t>(item) % items * ITEM_ROWS;
  for (int64_t r = first; r < std::min(rows, first + ITEM_ROWS); r += TILE_ROWS)
    tile(r, std::min<int64_t>(TILE_ROWS, rows - r), block, (block + 1) * BLOCK < n);
}

// Q8MatMul's input as its products read it: per row, k codes (|code| <= 127), a scale for each
// group of inputs, where the weights have offsets the sum of each Q8_OFFSETS inputs, and where
// they are 4-bit codes the sum of each group's codes.
struct Q8Rows {
  const int8_t* codes;
  const float *scales, *sums;
  const int32_t* totals;
  int64_t k;

  Q8Rows skip(int64_t rows, int64_t group) const {
    return {codes + rows * k, scales + rows * (k / group), sums ? sums + rows * (k / Q8_OFFSETS) : nullptr,
            totals ? totals + rows * (k / group) : nullptr, k};
  }
};

// Q8MatMul's column scales (a number per G inputs × column) and offsets (per 32 inputs × column),
// in blocks of 16 columns, in the fewest bytes that hold the same numbers (`kernels.use_q8_matmul`
// chooses, and checks): int8 factors of a float16 unit per UNIT inputs × column where every number
// is exactly such a product (GGUF's k-quants: d times an integer sub-scale; an offset zero × its
// scale minus dmin times a minimum); scales as float16 where every one is a float16 number (Q8_0's
// and Q5_0's d); else floats. A one-row step reads them with the weights: for the 1.5B's 4-bit
// blocks a float scale and a float offset per 32 inputs were 2 of their 6 bits a weight. The
// passes read them as given (Factored) where an item has one pass of rows; an item of more has
// them made floats a strip at a time first (`widen`; Plain: a pass making them as it went had
// cost the 1.5B's 8-row step ×1.25, and a branch on the numbers' kind in every pass a prefill
// ×1.05).
constexpr int64_t UNIT = 256;  // GGUF's k-quant super-block
enum Numbers { FLOATS, HALVES, FACTORS };

struct Factors {  // the numbers as given
  const void* at;        // nullptr: none (a product without offsets)
  const uint16_t* unit;  // FACTORS: a float16 unit per UNIT inputs × column, (N/16, K/UNIT, 16)
  Numbers kind;
  int shift;  // FACTORS: a group's unit is the (group >> shift)-th (groups a unit covers: 8 or 16)
  // Offsets only: each is zero × its 32 inputs' scale plus the number here (GGUF's Q4_K and Q5_K:
  // zero·d·sc − dmin·m, the minimums factored), so that they take the scales' factors, not floats.
  float zero;

  // The numbers of `n` further groups × 16 columns on (a block's, in the units' order too).
  Factors skip(int64_t n) const {
    const int64_t size = kind == FLOATS ? 4 : kind == HALVES ? 2 : 1;
    return {at ? static_cast<const char*>(at) + n * size : nullptr, kind == FACTORS ? unit + (n >> shift) : unit, kind,
            shift, zero};
  }
};

struct Scales {  // floats or float16s
  const void* at;
  bool half;

  Scales skip(int64_t n) const { return {static_cast<const char*>(at) + n * (half ? 2 : 4), half}; }
};

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
    for (int b = 0; b < B; ++b) _mm_prefetch(reinterpret_cast<const char*>(w + b * stride + g * 64 + ahead(R)), _MM_HINT_T1);
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
inline void add_pairs(const Code* a, int64_t k, const int8_t* w, int64_t first, int64_t last, __m256i (&acc)[R][2]) {
  for (int64_t pair = first; pair < last; ++pair) {  // inputs 2 pair, 2 pair + 1
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
}

template <int R>
void block(const Code* a, int64_t k, const int8_t* w, const int32_t* offsets, const float* row_scale,
           const float* column_scale, float* y, int64_t n) {
  __m256i acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  add_pairs<R>(a, k, w, 0, k / 2, acc);
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

#ifdef ATTAR_Q8

// Group of 4 inputs q's packed weights, columns 0-7 (half 0) or 8-15 (half 1); a row's 4 codes of
// it in every 32-bit lane.
inline __m256i load_quads(const int8_t* w, int64_t q, int half) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + q * 64 + half * 32));
}
inline __m256i broadcast_quad(const int8_t* codes, int64_t q) {
  int32_t four;
  std::memcpy(&four, codes + q * 4, sizeof four);
  return _mm256_set1_epi32(four);
}
// Bit t of each byte of a FIVE plane, as 16 (bit 4): a code's fifth bit (t = 2 × quad + half).
inline __m256i fifth(__m256i plane, int t) {
  const __m256i bit = _mm256_and_si256(plane, _mm256_set1_epi8(static_cast<char>(1 << t)));
  return t < 4 ? _mm256_slli_epi16(bit, 4 - t) : _mm256_srli_epi16(bit, t - 4);  // within the byte either way
}

// Quad q of FIVE weights as bytes c = w + 16, columns 0-7 in c0 and 8-15 in c1; i = q % 4, its
// place among the 4 quads that share a plane (a constant where the caller's loop is unrolled).
inline void five_quads(const int8_t* w, int64_t q, int i, __m256i& c0, __m256i& c1) {
  const int8_t* four = w + q / 4 * 160;  // 4 quads: their fifth bits (a plane), then their nibbles
  const __m256i low = _mm256_set1_epi8(15), plane = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(four)),
                both = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(four + 32 + i * 32));
  c0 = _mm256_or_si256(_mm256_and_si256(both, low), fifth(plane, 2 * i));
  c1 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(both, 4), low), fifth(plane, 2 * i + 1));
}

// One block of FIVE weights (k inputs) as BIASED ones, c = w + 16 a byte (64 bytes a quad): what a
// pass of FIVE weights unpacks, done once for all the passes of an item of many rows.
inline void unpack_five(const int8_t* w, int64_t k, int8_t* out) {
  for (int64_t q = 0; q < k / 4; ++q) {
    __m256i c0, c1;
    five_quads(w, q, static_cast<int>(q % 4), c0, c1);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + q * 64), c0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + q * 64 + 32), c1);
  }
}

// How a pass reads its columns' scales and offsets, two forms (a template parameter of the
// products, so that neither branches on the other's kind): Plain, floats or float16 scales and
// float offsets; Factored, int8 factors times float16 units as given, for a pass of an item of
// at most Q8_PASS rows (one pass), where making them floats first cost more than it saved (the 1.5B's
// one-row step ×1.03-1.06). `skip`: the numbers `blocks` blocks of 16 columns (of k inputs) on;
// `scale`: columns 8h .. 8h + 7 of group g's scales; `offset`: of the offsets of inputs 32b ..
// 32b + 31, where `has_offsets`.
struct Plain {
  Scales scales;
  const float* offsets;

  Plain skip(int64_t blocks, int64_t k, int64_t group) const {
    return {scales.skip(blocks * k / group * BLOCK), offsets ? offsets + blocks * k / Q8_OFFSETS * BLOCK : nullptr};
  }
  bool has_offsets() const { return offsets != nullptr; }
  __m256 scale(int64_t g, int h) const {
    const int64_t at = g * BLOCK + h * 8;
    return scales.half ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(scales.at) + at)))
                       : _mm256_loadu_ps(static_cast<const float*>(scales.at) + at);
  }
  __m256 offset(int64_t b, int h) const { return _mm256_loadu_ps(offsets + b * BLOCK + h * 8); }
};

struct Factored {
  Factors scales, offsets;  // both FACTORS, or offsets none

  Factored skip(int64_t blocks, int64_t k, int64_t group) const {
    return {scales.skip(blocks * k / group * BLOCK), offsets.skip(blocks * k / Q8_OFFSETS * BLOCK)};
  }
  bool has_offsets() const { return offsets.at != nullptr; }
  static __m256 number(const Factors& f, int64_t g, int h) {  // a factor times its unit: exact (kernels.py)
    const __m128i eight = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(static_cast<const int8_t*>(f.at) + g * BLOCK + h * 8));
    const __m128i unit = _mm_loadu_si128(reinterpret_cast<const __m128i*>(f.unit + (g >> f.shift) * BLOCK + h * 8));
    return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(eight)), _mm256_cvtph_ps(unit));
  }
  __m256 scale(int64_t g, int h) const { return number(scales, g, h); }
  __m256 offset(int64_t b, int h) const {  // zero × the scale of the same 32 inputs (a scale per 32: checked) added
    const __m256 own = number(offsets, b, h);
    return offsets.zero == 0.0f ? own : _mm256_add_ps(_mm256_mul_ps(_mm256_set1_ps(offsets.zero), scale(b, h)), own);
  }
};

// Q8MatMul's rows [0, R) × one block of 16 columns: per group of G inputs (16 or 32) the exact
// sums of the codes' products, scaled by the row's and the columns' scales of those inputs and
// added in float, in the inputs' order, into y; where there are offsets, after each 32 inputs
// the row's sum of them times the columns' offsets. A row's outputs do not depend on the rows
// beside it.
//
// The products: the weights are packed 8 columns × 4 inputs a register, and `vpmaddubsw`
// multiplies an unsigned byte by a signed one, 32 products a multiply, summed in pairs to 16 bits.
// - GGUF's weights are mostly small (Q5_0 within 16, Q6_K 32, Q4_K 8). Packed as unsigned c = w + b
//   (b = the largest |w|, or 8 for 4 bits), they multiply the row's codes as they are, and
//   Σ w·code = Σ c·code - b Σ code, the row's sum of the group's codes times b (`totals`). Up to
//   SPAN groups of 4 inputs add up in 16 bits before one `vpmaddwd` by ones widens them to 32:
//   SPAN × 2 × 127 × max c <= 32,767, max c being 2 × the node's `peak` (15 for 4 bits).
// - 4-bit weights stay 4 bits in memory, columns 0-7 in the low nibbles and 8-15 in the high ones,
//   half the bytes a one-row step reads. Q5_0's (-16 to 15) are 5 bits: the same nibbles, and
//   before each 4 quads a plane of their fifth bits (bit 2q + h of byte b: quad q, half h), 40
//   bytes a quad instead of 64.
// - Larger weights (Q8_0: up to 128) stay signed without VNNI: `vpmaddubsw` takes |w| and the
//   codes given w's signs (`vpsignb`), a pair at most 2 × 127 × 128 = 32,512, widened at once.
// Zen 2 runs one multiply a cycle, and the other vector instructions beside it (the adds, the
// signs) are what keeps it from that: 16-bit codes by `vpmaddwd` gave 16 products a multiply; a
// Q5_0 matrix's gave 28 through `vpsignb` and give 26 without (×0.91-0.97 at 8-16 rows).
// With AVX-512 VNNI, `vpdpbusd` multiplies the same bytes and adds each 4 products into 32 bits
// at once: no 16-bit sums to widen, one instruction where there were two to four, the same exact
// sums (the default's exact graph ×0.85-0.89 a step at 8 rows, the same logits to the bit);
// nothing to saturate, so every 8-bit matrix is BIASED, c = w + b up to 255.
template <int R, int G, int SPAN, Weights KIND, typename Numbers>
void q8_block(const Q8Rows& a, const int8_t* w, Numbers numbers, float* y, int64_t n) {
  static_assert(KIND != SIGNED || SPAN == 1, "signed pairs reach 32,512: widened at once");
  constexpr int QUADS = G / 4, QUAD_BYTES = KIND == NIBBLES ? 32 : KIND == FIVE ? 40 : 64;
  const int64_t k = a.k, groups = k / G;
  [[maybe_unused]] const __m256i ones = _mm256_set1_epi16(1);  // widens 16-bit sums (not with VNNI)
  __m256 sum[R][2];
  for (int r = 0; r < R; ++r) sum[r][0] = sum[r][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256i acc[R][2];
    if constexpr (KIND == SIGNED) {  // not with VNNI (BIASED_UP_TO): never instantiated there
      for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
#pragma GCC unroll 8
      for (int q = g * QUADS; q < (g + 1) * QUADS; ++q) {
        _mm_prefetch(reinterpret_cast<const char*>(w + q * 64 + Q8_AHEAD), _MM_HINT_T1);
        const __m256i w0 = load_quads(w, q, 0), w1 = load_quads(w, q, 1);
        const __m256i u0 = _mm256_abs_epi8(w0), u1 = _mm256_abs_epi8(w1);
        for (int r = 0; r < R; ++r) {
          const __m256i codes = broadcast_quad(a.codes + r * k, q);
          const __m256i p0 = _mm256_maddubs_epi16(u0, _mm256_sign_epi8(codes, w0));
          const __m256i p1 = _mm256_maddubs_epi16(u1, _mm256_sign_epi8(codes, w1));
          acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(p0, ones));
          acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(p1, ones));
        }
      }
    } else {
#pragma GCC unroll 8
      for (int s = 0; s < QUADS; s += SPAN) {
#ifndef ATTAR_VNNI
        __m256i part[R][2];  // SPAN groups' sums in 16 bits
        for (int r = 0; r < R; ++r) part[r][0] = part[r][1] = _mm256_setzero_si256();
#endif
#pragma GCC unroll 4  // 8 (a nibble group) spilled: the compiler hoisted every unpacking
        for (int i = 0; i < SPAN; ++i) {
          const int64_t q = g * QUADS + s + i;
          _mm_prefetch(reinterpret_cast<const char*>(w + q * QUAD_BYTES + Q8_AHEAD), _MM_HINT_T1);
          __m256i c0, c1;
          if constexpr (KIND == NIBBLES) {
            const __m256i low = _mm256_set1_epi8(15), both = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + q * 32));
            c0 = _mm256_and_si256(both, low), c1 = _mm256_and_si256(_mm256_srli_epi16(both, 4), low);
          } else if constexpr (KIND == FIVE) {
            static_assert(SPAN == 4, "a plane holds 4 quads' fifth bits: q % 4 is i");
            five_quads(w, q, i, c0, c1);
          } else {
            c0 = load_quads(w, q, 0), c1 = load_quads(w, q, 1);
          }
          for (int r = 0; r < R; ++r) {
            const __m256i codes = broadcast_quad(a.codes + r * k, q);
#ifdef ATTAR_VNNI
            acc[r][0] = _mm256_dpbusd_epi32(s + i == 0 ? _mm256_setzero_si256() : acc[r][0], c0, codes);
            acc[r][1] = _mm256_dpbusd_epi32(s + i == 0 ? _mm256_setzero_si256() : acc[r][1], c1, codes);
#else
            part[r][0] = _mm256_add_epi16(part[r][0], _mm256_maddubs_epi16(c0, codes));
            part[r][1] = _mm256_add_epi16(part[r][1], _mm256_maddubs_epi16(c1, codes));
#endif
          }
        }
#ifndef ATTAR_VNNI
        for (int r = 0; r < R; ++r)
          for (int h = 0; h < 2; ++h) {
            const __m256i wide = _mm256_madd_epi16(part[r][h], ones);
            acc[r][h] = s == 0 ? wide : _mm256_add_epi32(acc[r][h], wide);
          }
#endif
      }
      for (int r = 0; r < R; ++r) {
        const __m256i bias = _mm256_set1_epi32(a.totals[r * groups + g]);
        acc[r][0] = _mm256_sub_epi32(acc[r][0], bias), acc[r][1] = _mm256_sub_epi32(acc[r][1], bias);
      }
    }
    for (int h = 0; h < 2; ++h) {
      const __m256 column = numbers.scale(g, h);
      for (int r = 0; r < R; ++r) {
        const __m256 scale = _mm256_mul_ps(column, _mm256_set1_ps(a.scales[r * groups + g]));
        sum[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][h]), scale, sum[r][h]);
      }
    }
    const int64_t end = (g + 1) * G;  // inputs done
    if (numbers.has_offsets() && end % Q8_OFFSETS == 0) {
      const int64_t b = end / Q8_OFFSETS - 1;
      for (int h = 0; h < 2; ++h) {
        const __m256 offset = numbers.offset(b, h);
        for (int r = 0; r < R; ++r)
          sum[r][h] = _mm256_fmadd_ps(_mm256_set1_ps(a.sums[r * (k / Q8_OFFSETS) + b]), offset, sum[r][h]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int h = 0; h < 2; ++h) _mm256_storeu_ps(y + r * n + h * 8, sum[r][h]);
}

// Rows [0, R) × blocks [0, B), R ≤ TILE_ROWS, Q8_PASS rows at a time.
template <int R, int B, int G, int SPAN, Weights KIND, typename Numbers>
void q8_tile(const Q8Rows& a, const int8_t* w, int64_t stride, Numbers numbers, float* y, int64_t n) {
  for (int b = 0; b < B; ++b) {
    const Numbers block = numbers.skip(b, a.k, G);
    q8_block<std::min(R, Q8_PASS), G, SPAN, KIND>(a, w + b * stride, block, y + b * BLOCK, n);
    if constexpr (R > Q8_PASS)
      q8_tile<R - Q8_PASS, 1, G, SPAN, KIND>(a.skip(Q8_PASS, G), w + b * stride, stride, block,
                                             y + Q8_PASS * n + b * BLOCK, n);
  }
}

template <typename Numbers>
using Q8Tile = void (*)(const Q8Rows&, const int8_t*, int64_t, Numbers, float*, int64_t);
template <int B, int G, int SPAN, Weights KIND, typename N>
constexpr Q8Tile<N> Q8_TILES[TILE_ROWS + 1] = {
    nullptr,                            q8_tile<1, B, G, SPAN, KIND, N>, q8_tile<2, B, G, SPAN, KIND, N>,
    q8_tile<3, B, G, SPAN, KIND, N>,    q8_tile<4, B, G, SPAN, KIND, N>, q8_tile<5, B, G, SPAN, KIND, N>,
    q8_tile<6, B, G, SPAN, KIND, N>,    q8_tile<7, B, G, SPAN, KIND, N>, q8_tile<8, B, G, SPAN, KIND, N>};

// The tile for `rows` rows, B blocks, groups of `group` inputs, weights of `kind` summed `span`
// groups of 4 in 16 bits, numbers read as N.
template <int B, typename N>
Q8Tile<N> q8_tile_for(int rows, int64_t group, int span, Weights kind) {
#ifndef ATTAR_VNNI  // with VNNI no matrix is SIGNED
  if (kind == SIGNED) return group == 16 ? Q8_TILES<B, 16, 1, SIGNED, N>[rows] : Q8_TILES<B, 32, 1, SIGNED, N>[rows];
#endif
  if (kind == NIBBLES) return group == 16 ? Q8_TILES<B, 16, 4, NIBBLES, N>[rows] : Q8_TILES<B, 32, 8, NIBBLES, N>[rows];
  if (kind == FIVE) return group == 16 ? Q8_TILES<B, 16, 4, FIVE, N>[rows] : Q8_TILES<B, 32, 4, FIVE, N>[rows];  // 4 × 2 × 127 × 31
  if (group == 16)
    return span >= 4 ? Q8_TILES<B, 16, 4, BIASED, N>[rows] : span == 2 ? Q8_TILES<B, 16, 2, BIASED, N>[rows] : Q8_TILES<B, 16, 1, BIASED, N>[rows];
  return span >= 8 ? Q8_TILES<B, 32, 8, BIASED, N>[rows] : span == 4 ? Q8_TILES<B, 32, 4, BIASED, N>[rows]
       : span == 2 ? Q8_TILES<B, 32, 2, BIASED, N>[rows] : Q8_TILES<B, 32, 1, BIASED, N>[rows];
}

// One block's `groups` factored numbers × 16 columns as floats, into `out` (laid out as float
// inputs are): each factor times its unit (`Factored::number`, the multiply a pass of an item of
// one pass makes as it goes), which `kernels.use_q8_matmul` checked gives each number exactly.
inline void widen(const Factors& f, int64_t groups, float* out) {
  for (int64_t g = 0; g < groups; ++g)
    for (int h = 0; h < 2; ++h) _mm256_storeu_ps(out + g * BLOCK + h * 8, Factored::number(f, g, h));
}

// One group of `group` inputs (a multiple of 8) as codes, as onnxruntime's int8 path (and
// llama.cpp's Q8_0) quantize: times 127 / max|in|, to nearest even, so |code| <= 127. Returns the
// group's scale, max|in| / 127; NaN, with codes 0, where an input is not finite (its row is NaN).
inline float quantize(const float* in, int64_t group, int8_t* codes) {
  const __m256 sign = _mm256_set1_ps(-0.0f), largest = _mm256_set1_ps(3.40282347e38f);
  __m256 top = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
  for (int64_t i = 0; i < group; i += 8) {
    const __m256 size = _mm256_andnot_ps(sign, _mm256_loadu_ps(in + i));
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(size, largest, _CMP_NLE_UQ));  // NaN or infinite
    top = _mm256_max_ps(top, size);
  }
  const bool finite = _mm256_movemask_ps(bad) == 0;
  const __m128 half = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
  const __m128 quarter = _mm_max_ps(half, _mm_movehl_ps(half, half));
  const float peak = _mm_cvtss_f32(_mm_max_ss(quarter, _mm_shuffle_ps(quarter, quarter, 1)));
  const __m256 inverse = _mm256_set1_ps(finite && peak > 0.0f ? 127.0f / peak : 0.0f);
  for (int64_t i = 0; i < group; i += 8) {
    const __m256 scaled = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(in + i), inverse), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i whole = finite ? _mm256_cvtps_epi32(scaled) : _mm256_setzero_si256();
    const __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(whole), _mm256_extracti128_si256(whole, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(codes + i), _mm_packs_epi16(words, words));
  }
  return finite ? peak / 127.0f : NAN;
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

// A gated projection's outputs from its two halves, row by row: silu(gate) × up, as the graph
// wrote it, (gate × sigmoid(gate)) × up, with sigmoid(g) = 1 / (1 + e) where g >= 0 and
// e / (1 + e) where not, e = exp(-|g|). `both` holds a row's 16 gate then its 16 up values.
inline void gate(const float* both, int64_t rows, float* y, int64_t n) {
  for (int64_t r = 0; r < rows; ++r)
    for (int h = 0; h < BLOCK; h += LANES) {
      const vec g = load_vec(both + r * 2 * BLOCK + h), up = load_vec(both + r * 2 * BLOCK + BLOCK + h);
      const vec e = exp_nonpositive(g < 0.0f ? g : -g);
      const vec sigmoid = (g < 0.0f ? e : vec{} + 1.0f) / (e + 1.0f);
      store_vec(y + r * n + h, g * sigmoid * up);
    }
}

// Int8MatMul(x float (..., K), weights int8 (N/16, K/4, 64), offsets int32 (N), column_scale float (N)
//            [, smooth float (K)][, bias float (N)]) -> float (..., N), attribute gated (0 or 1)
// The int8 graph's projection from its float input to its float output, the nodes between them in
// one: each row of x quantized as RowQuantize quantizes it (`quantize_row`: codes around 128, a
// step a row), then (float(Σ_k codes·w - offsets) * step) * column_scale, RowDequantize's
// expression in its order, offsets being the codes' zero point times each column's sum of weights
// (MatMulInteger's a_zero_point, folded in by the packing); plus the column's bias where there is
// one (the graph's Add). So far the same bits as the graph's nodes. `gated`: the columns are a
// gate's and an up projection's blocks of 16 in pairs (`attar_pack_int8`), and the output is
// silu(gate) × up, N/2 columns: the SwiGLU after the product (onnxruntime's Split, Sigmoid and two
// Muls) on each tile's sums while they are in cache, to float rounding.
struct Int8MatMul {
  bool gated;
  explicit Int8MatMul(const OrtKernelInfo* info) : gated(attribute(info, "gated", int64_t{0}) != 0) {}

  struct Work {
    const Code* codes;
    const int8_t* weights;
    const int32_t* offsets;
    const float *row_scale, *column_scale, *bias;  // bias: (N) or nullptr
    float* y;
    int64_t rows, k, n;  // n: the product's columns (y has n / 2 where gated)
    bool gated;
  };

  struct Rows {  // the input and its codes
    const float *x, *smooth;
    uint8_t* codes;
    float* steps;
    int64_t rows, k;
  };

  static void quantize(void* data, size_t item) {  // rows [item × QUANTIZE_ROWS, +QUANTIZE_ROWS)
    const Rows& q = *static_cast<const Rows*>(data);
    thread_local std::vector<float> scratch;
    scratch.resize(q.k);
    const int64_t first = static_cast<int64_t>(item) * QUANTIZE_ROWS;
    for (int64_t r = first; r < std::min(q.rows, first + QUANTIZE_ROWS); ++r)
      q.steps[r] = quantize_row(q.x + r * q.k, q.smooth, q.k, scratch.data(), q.codes + r * q.k);
  }

  static void part(void* data, size_t item) {  // a strip of 32 columns × up to ITEM_ROWS rows
#ifdef ATTAR_PACKS
    const Work& w = *static_cast<const Work*>(data);
    const int64_t stride = w.k * BLOCK;
    each_tile(item, w.rows, w.n, [&](int64_t r, int64_t rows, int64_t block, bool two) {
      const int64_t column = block * BLOCK;
      float both[TILE_ROWS * 2 * BLOCK];  // gated: the tile's gate and up outputs, rows of 2 blocks
      float* y = w.gated ? both : w.y + r * w.n + column;
      const int64_t row = w.gated ? 2 * BLOCK : w.n;  // floats from one of y's rows to the next
      (two ? TILES<2>[rows] : TILES<1>[rows])(w.codes + r * w.k, w.k, w.weights + block * stride, stride,
                                              w.offsets + column, w.row_scale + r, w.column_scale + column, y, row);
      for (int64_t i = 0; w.bias != nullptr && i < rows; ++i)
        for (int64_t c = 0; c < (two ? 2 : 1) * BLOCK; ++c) y[i * row + c] += w.bias[column + c];
      if (w.gated) gate(both, rows, w.y + r * (w.n / 2) + block / 2 * BLOCK, w.n / 2);
    });
#else
    (void)data, (void)item;
#endif
  }

  void Compute(OrtKernelContext* context) {
#ifndef ATTAR_PACKS
    fail("Int8MatMul", "this build packs no weights (a CPU with AMX, AVX-VNNI or neither VNNI nor AVX2)");
#endif
    const OrtValue* x = input(context, 0);
    std::vector<int64_t> shape = dims(x);
    const std::vector<int64_t> packed = dims(input(context, 1));
    if (shape.empty() || packed.size() != 3 || packed[2] != BLOCK * GROUP || packed[1] * GROUP != shape.back())
      fail("Int8MatMul", "the weights must be packed (N/16, K/4, 64) for an input of K");
    const int64_t k = shape.back(), n = packed[0] * BLOCK;
    const int64_t rows = leading(shape);
    const OrtValue *smooth = input(context, 4), *bias = input(context, 5);
    if (dims(input(context, 2)) != std::vector<int64_t>{n} || dims(input(context, 3)) != std::vector<int64_t>{n} ||
        (bias != nullptr && dims(bias) != std::vector<int64_t>{n}))
      fail("Int8MatMul", "the offsets, column scale and bias must hold one value a column");
    if (smooth != nullptr && dims(smooth) != std::vector<int64_t>{k}) fail("Int8MatMul", "smooth must hold one factor an input");
    if (gated && n % (2 * BLOCK) != 0) fail("Int8MatMul", "a gated product's columns must be blocks of 16, gate and up in pairs");
    shape.back() = gated ? n / 2 : n;
    OrtValue* out = nullptr;
    check(g_api->KernelContext_GetOutput(context, 0, shape.data(), shape.size(), &out));
    if (rows == 0 || n == 0) return;
    // The rows quantized once for all the strips (a prefill's on every thread); kept by the
    // thread, so a step allocates nothing.
    thread_local std::vector<uint8_t> codes;
    thread_local std::vector<float> steps;
    codes.resize(rows * k), steps.resize(rows);
    Rows q{data<float>(x), smooth ? data<float>(smooth) : nullptr, codes.data(), steps.data(), rows, k};
    const size_t parts = static_cast<size_t>((rows + QUANTIZE_ROWS - 1) / QUANTIZE_ROWS);
    if (parts == 1) quantize(&q, 0); else check(g_api->KernelContext_ParallelFor(context, quantize, parts, 0, &q));
#ifdef ATTAR_AVX2
    thread_local std::vector<Code> wide;  // `vpmaddwd` multiplies 16-bit codes
    wide.assign(codes.begin(), codes.end());
    const Code* a = wide.data();
#else
    const Code* a = codes.data();
#endif
    Work w{a, data<int8_t>(input(context, 1)), data<int32_t>(input(context, 2)), steps.data(),
           data<float>(input(context, 3)), bias ? data<float>(bias) : nullptr, data<float>(out), rows, k, n, gated};
    check(g_api->KernelContext_ParallelFor(context, part, work_items(rows, n), 0, &w));
  }
};

struct Int8MatMulOp : Ort::CustomOpBase<Int8MatMulOp, Int8MatMul> {
  void* CreateKernel(const OrtApi&, const OrtKernelInfo* info) const { return new Int8MatMul(info); }
  const char* GetName() const { return "Int8MatMul"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 6; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    static const ONNXTensorElementDataType types[] = {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8,
                                                      ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
                                                      ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};
    return types[i];
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i >= 4 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

// Q8MatMul(a float (..., K), weights int8 (N/16, K/4, 64; 4-bit codes: 32), scales (N/16, K/G, 16)
//          [, offsets (N/16, K/32, 16)][, bias float (N/16, 16)][, scale units float16 (N/16, K/256, 16)]
//          [, offset units, the same]) -> float (..., N), attributes peak (the weights' largest |w|),
//          gated (0 or 1) and zero (each offset is zero × its scale plus the offsets' number; 0 where
//          not said); scales float, float16 or int8 times their units, offsets float or int8 (Factors)
// The exact graph's MatMulNBits (8 or 4 bits, G = 32 or 16 inputs a scale, accuracy level 4: GGUF's
// Q8_0, Q5_0, Q6_K, Q4_K... weights), with its offset term where the weights have one: the input
// quantized to int8 per row and G inputs (times 127 / max|a|, to nearest even; scale max|a| / 127)
// as that op's int8 path does, y = Σ over the groups of float(Σ codes·w) × (column scale × row scale), plus Σ over
// each 32 inputs of their sum times the column's offset, added in float in the inputs' order; then
// the column's bias, where there is one (the graph's Add: the same bits).
// Gated (1): the weights are a gate's and an up projection's, their blocks of 16 columns
// interleaved (gate, up, gate, up...), and y is (..., N/2), silu(gate) × up (`gate`): the graph's
// Split, Sigmoid and two Muls done on each tile's sums while they are in cache.
//
// On AVX2 without VNNI onnxruntime's MatMulNBits and MatMul computed a row alone otherwise than
// beside others (README, "On AVX2 without VNNI"), and a step of 8 rows cost 3.5 of one. Here the
// sums are exact integers (q8_block), the weights packed once at load (`attar_pack_q8`), and a
// row's outputs are the same bits in a step of any rows. A group holding a NaN or an infinity
// makes its row's outputs NaN.
struct Q8MatMul {
  int64_t peak, zero;
  bool gated;

  // `peak`: the largest |w| of the packed weights (`attar_pack_q8` measures it); 128 where not
  // said. It says how they were packed and how many products add up in 16 bits: a wrong one gives
  // wrong numbers, never a read out of bounds.
  explicit Q8MatMul(const OrtKernelInfo* info)
      : peak(attribute(info, "peak", int64_t{128})), zero(attribute(info, "zero", int64_t{0})),
        gated(attribute(info, "gated", int64_t{0}) != 0) {
    if (peak < 0 || peak > 128) fail("Q8MatMul", "peak must be a weight's largest magnitude, 0 to 128");
    if (zero < 0 || zero > 128) fail("Q8MatMul", "zero must be 0 to 128");
  }

  struct Work {
    Q8Rows a;
    int64_t group;
    int span;
    Weights kind;
    const int8_t* weights;
    Factors column_scale, column_offset;  // (N/16, K/G, 16), (N/16, K/32, 16) (none: at nullptr)
    const float* bias;                    // (N/16, 16) or nullptr
    float* y;
    int64_t rows, n;  // n: the product's columns (y has n / 2 where gated)
    bool gated;
  };

  // The input as the products read it (Q8Rows), written a row at a time: codes and a scale a group,
  // the bias times each group's sum of codes, and each 32 inputs' sum where the weights have offsets
  // (totals, sums: nullptr where not needed). On the step's threads where there is enough of it:
  // on one, it had been 15% of a 256-row product's time; below PREPARE_ALONE inputs, waking the
  // other thread costs more (SmolLM2's 8-row step ×1.04).
  static constexpr int64_t PREPARE_ALONE = 1 << 16;
  static constexpr int64_t UNPACK_FROM = 32;  // rows an item has where it unpacks FIVE weights first (16: ×1.05)

  struct Input {
    const float* x;
    int64_t k, group;
    int32_t bias;
    int8_t* codes;
    float* steps;
    int32_t* totals;
    float* sums;
  };

  static void prepare(void* data, size_t row) {
#ifdef ATTAR_Q8
    const Input& in = *static_cast<const Input*>(data);
    const int64_t k = in.k, groups = k / in.group, at = static_cast<int64_t>(row);
    const float* x = in.x + at * k;
    for (int64_t g = 0; g < groups; ++g) {
      int8_t* codes = in.codes + at * k + g * in.group;
      in.steps[at * groups + g] = quantize(x + g * in.group, in.group, codes);
      if (in.totals == nullptr) continue;
      int32_t total = 0;
      for (int64_t i = 0; i < in.group; ++i) total += codes[i];
      in.totals[at * groups + g] = in.bias * total;
    }
    for (int64_t b = 0; in.sums != nullptr && b < k / Q8_OFFSETS; ++b) {
      float total = 0.0f;
      for (int64_t i = 0; i < Q8_OFFSETS; ++i) total += x[b * Q8_OFFSETS + i];
      in.sums[at * (k / Q8_OFFSETS) + b] = total;
    }
#else
    (void)data, (void)row;
#endif
  }

  static void part(void* data, size_t item) {  // a strip of 32 columns × up to ITEM_ROWS rows
#ifdef ATTAR_Q8
    const Work& w = *static_cast<const Work*>(data);
    const int64_t k = w.a.k, stride = k * BLOCK * (w.kind == NIBBLES ? 4 : w.kind == FIVE ? 5 : 8) / 8;  // a block's bytes
    // An item of many rows (a prefill's) unpacks its FIVE blocks once (`unpack_five`), not in each
    // pass of 3 rows: the same codes, so the same sums; a 512-token prefill had been ×1.04-1.08.
    thread_local std::vector<int8_t> unpacked;
    // An item of more rows than a pass has its strip's factored scales and offsets made floats
    // first (`widen`), at its first tile; one of a pass's rows reads them as given (Factored).
    thread_local std::vector<float> scales, offsets;
    const Factors &given_scales = w.column_scale, &given_offsets = w.column_offset;
    const int64_t groups = k / w.group, sums = k / Q8_OFFSETS;  // numbers a block's column: scales, offsets
    bool wide = false;
    // As given where every number is (or there are no offsets), for an item of one pass.
    const bool as_given = given_scales.kind == FACTORS && (given_offsets.at == nullptr || given_offsets.kind == FACTORS);
    bool few = false;
    each_tile(item, w.rows, w.n, [&](int64_t r, int64_t rows, int64_t block, bool two) {
      const int blocks = two ? 2 : 1;
      if (r % ITEM_ROWS == 0) {  // the item's first tile
        const int64_t item_rows = std::min(ITEM_ROWS, w.rows - r);
        if (w.kind == FIVE && item_rows >= UNPACK_FROM) {
          unpacked.resize(2 * k * BLOCK);
          for (int b = 0; b < blocks; ++b) unpack_five(w.weights + (block + b) * stride, k, unpacked.data() + b * k * BLOCK);
          wide = true;
        }
        few = as_given && item_rows <= Q8_PASS;
        if (!few && given_scales.kind == FACTORS) {
          scales.resize(2 * groups * BLOCK);
          for (int b = 0; b < blocks; ++b) widen(given_scales.skip((block + b) * groups * BLOCK), groups, scales.data() + b * groups * BLOCK);
        }
        if (!few && given_offsets.kind == FACTORS) {
          offsets.resize(2 * sums * BLOCK);
          for (int b = 0; b < blocks; ++b) widen(given_offsets.skip((block + b) * sums * BLOCK), sums, offsets.data() + b * sums * BLOCK);
          // zero × the same 32 inputs' scale (a scale per 32: checked), added as the importer added it;
          // both products are exact (kernels.py checks), so a fused multiply-add rounds alike.
          for (int64_t i = 0; given_offsets.zero != 0.0f && i < blocks * sums * BLOCK; ++i)
            offsets[i] = given_offsets.zero * scales[i] + offsets[i];
        }
      }
      float both[TILE_ROWS * 2 * BLOCK];  // gated: the tile's gate and up sums, rows of 32
      float* y = w.gated ? both : w.y + r * w.n + block * BLOCK;
      const int64_t row = w.gated ? 2 * BLOCK : w.n;  // floats from one of y's rows to the next
      const int span = wide ? 4 : w.span;
      const Weights kind = wide ? BIASED : w.kind;
      const Q8Rows a = w.a.skip(r, w.group);
      const int8_t* weights = wide ? unpacked.data() : w.weights + block * stride;
      const int64_t apart = wide ? k * BLOCK : stride;  // from a block's weights to the next's
      if (few) {
        const Factored numbers = Factored{given_scales, given_offsets}.skip(block, k, w.group);
        (two ? q8_tile_for<2, Factored> : q8_tile_for<1, Factored>)(static_cast<int>(rows), w.group, span, kind)(
            a, weights, apart, numbers, y, row);
      } else {
        const Scales scale = given_scales.kind == FACTORS ? Scales{scales.data(), false}
                                                          : Scales{given_scales.at, given_scales.kind == HALVES}.skip(block * groups * BLOCK);
        const float* offset = given_offsets.at == nullptr ? nullptr
                            : given_offsets.kind == FACTORS ? offsets.data()
                            : static_cast<const float*>(given_offsets.at) + block * sums * BLOCK;
        (two ? q8_tile_for<2, Plain> : q8_tile_for<1, Plain>)(static_cast<int>(rows), w.group, span, kind)(
            a, weights, apart, Plain{scale, offset}, y, row);
      }
      for (int64_t i = 0; w.bias != nullptr && i < rows; ++i)
        for (int64_t c = 0; c < (two ? 2 : 1) * BLOCK; ++c) y[i * row + c] += w.bias[block * BLOCK + c];
      if (w.gated) gate(both, rows, w.y + r * (w.n / 2) + block / 2 * BLOCK, w.n / 2);
    });
#else
    (void)data, (void)item;
#endif
  }

  // Input `i`'s numbers (scales or offsets, one per `group` inputs × column, already checked to be
  // (blocks, K / group, 16)): floats, float16s, or int8 factors of input `units`' float16s (blocks,
  // K / UNIT, 16). None where input i is absent.
  static Factors numbers(OrtKernelContext* context, size_t i, size_t units, int64_t group, int64_t blocks, int64_t k) {
    const OrtValue* values = input(context, i);
    const OrtValue* unit = input(context, units);
    if (values == nullptr) {
      if (unit != nullptr) fail("Q8MatMul", "units without the numbers they are units of");
      return {nullptr, nullptr, FLOATS, 0, 0.0f};
    }
    const ONNXTensorElementDataType type = element_type(values);
    if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8) {
      if (unit == nullptr || k % UNIT != 0 || dims(unit) != std::vector<int64_t>{blocks, k / UNIT, BLOCK} ||
          element_type(unit) != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16)
        fail("Q8MatMul", "int8 scales or offsets need float16 units packed (N/16, K/256, 16)");
      return {data<void>(values), data<uint16_t>(unit), FACTORS, group == 16 ? 4 : 3, 0.0f};  // UNIT / group: 16 or 8
    }
    if (unit != nullptr) fail("Q8MatMul", "units given for numbers that are not int8");
    if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16) return {data<void>(values), nullptr, HALVES, 0, 0.0f};
    if (type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) fail("Q8MatMul", "scales and offsets must be float, float16 or int8");
    return {data<void>(values), nullptr, FLOATS, 0, 0.0f};
  }

  void Compute(OrtKernelContext* context) {
#ifndef ATTAR_Q8
    fail("Q8MatMul", "this build has no Q8 products (a CPU with AMX or AVX-VNNI, or without AVX2)");
#else
    const OrtValue* a = input(context, 0);
    const OrtValue* offsets = input(context, 3);
    const OrtValue* column_bias = input(context, 4);
    std::vector<int64_t> shape = dims(a);
    const std::vector<int64_t> packed = dims(input(context, 1)), scales = dims(input(context, 2));
    if (shape.empty() || shape.back() % Q8_OFFSETS != 0 || packed.size() != 3 || (packed[2] != 64 && packed[2] != 40 && packed[2] != 32) ||
        packed[1] * GROUP != shape.back())
      fail("Q8MatMul", "the weights must be packed (N/16, K/4, 64, 40 or 32) for an input of K (a multiple of 32)");
    const bool nibbles = packed[2] == 32, five = packed[2] == 40;
    const int64_t k = shape.back(), n = packed[0] * BLOCK;
    if (scales.size() != 3 || scales[0] != packed[0] || scales[2] != BLOCK || (scales[1] != k / 32 && scales[1] != k / 16))
      fail("Q8MatMul", "the scales must be packed (N/16, K/32 or K/16, 16)");
    const int64_t group = k / scales[1];
    if (offsets != nullptr && dims(offsets) != std::vector<int64_t>{packed[0], k / Q8_OFFSETS, BLOCK})
      fail("Q8MatMul", "the offsets must be packed (N/16, K/32, 16)");
    const Factors column_scale = numbers(context, 2, 5, group, packed[0], k);
    Factors column_offset = numbers(context, 3, 6, Q8_OFFSETS, packed[0], k);
    if (column_offset.kind == HALVES) fail("Q8MatMul", "the offsets must be float or int8");
    if (zero != 0 && (column_offset.kind != FACTORS || column_scale.kind != FACTORS || group != Q8_OFFSETS))
      fail("Q8MatMul", "a zero needs int8 scales and offsets, a scale per 32 inputs");
    column_offset.zero = static_cast<float>(zero);
    if (column_bias != nullptr && dims(column_bias) != std::vector<int64_t>{packed[0], BLOCK})
      fail("Q8MatMul", "the bias must be packed (N/16, 16)");
    if (gated && packed[0] % 2 != 0) fail("Q8MatMul", "a gated product's columns must be blocks of 16, gate and up in pairs");
    const int64_t rows = leading(shape);
    shape.back() = gated ? n / 2 : n;
    OrtValue* out = nullptr;
    check(g_api->KernelContext_GetOutput(context, 0, shape.data(), shape.size(), &out));
    if (rows == 0 || n == 0) return;
    // The input's codes, scales and sums, once for all the strips (Input); kept by the thread, so a
    // step allocates nothing.
    thread_local std::vector<int8_t> codes;
    thread_local std::vector<float> steps, sums;
    thread_local std::vector<int32_t> totals;
    codes.resize(rows * k);
    steps.resize(rows * k / group);
    sums.resize(offsets ? rows * k / Q8_OFFSETS : 0);
    // How the weights were packed (`attar_pack_q8`), the bias the codes' sums are multiplied by,
    // and how many groups of 4 inputs add up in 16 bits (q8_block): span × 2 × 127 × max c <= 32,767.
    const Weights kind = nibbles ? NIBBLES : five ? FIVE : peak <= BIASED_UP_TO ? BIASED : SIGNED;
    const int32_t bias = nibbles ? 8 : five ? 16 : static_cast<int32_t>(peak);
    int span = 1;
    while (kind == BIASED && span < 8 && 2 * span * 2 * 127 * std::max<int64_t>(2 * peak, 1) <= 32767) span *= 2;
    totals.resize(kind == SIGNED ? 0 : rows * k / group);
    Input in{data<float>(a), k, group, bias, codes.data(), steps.data(), totals.empty() ? nullptr : totals.data(),
             sums.empty() ? nullptr : sums.data()};
    if (rows * k < PREPARE_ALONE)
      for (int64_t row = 0; row < rows; ++row) prepare(&in, static_cast<size_t>(row));
    else
      check(g_api->KernelContext_ParallelFor(context, prepare, static_cast<size_t>(rows), 0, &in));
    Work w{{in.codes, in.steps, in.sums, in.totals, k}, group, span, kind, data<int8_t>(input(context, 1)),
           column_scale, column_offset, column_bias ? data<float>(column_bias) : nullptr, data<float>(out), rows, n, gated};
    check(g_api->KernelContext_ParallelFor(context, part, work_items(rows, n), 0, &w));
#endif
  }
};

struct Q8MatMulOp : Ort::CustomOpBase<Q8MatMulOp, Q8MatMul> {
  void* CreateKernel(const OrtApi&, const OrtKernelInfo* info) const { return new Q8MatMul(info); }
  const char* GetName() const { return "Q8MatMul"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 7; }
  ONNXTensorElementDataType GetInputType(size_t i) const {  // scales: float, float16 or int8; offsets: float or int8
    if (i == 5 || i == 6) return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;  // the units
    return i == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 : i == 2 || i == 3 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i >= 3 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

}  // namespace

void add_int8_matmul(Ort::CustomOpDomain& domain) {
  static Int8MatMulOp op;
  static Q8MatMulOp q8;
  domain.Add(&op);
  domain.Add(&q8);
}

}  // namespace attar

// Pack MatMulInteger's weights w (k × n, int8, row-major) for Int8MatMul, and offsets[c] = zero ×
// Σ_k w[k][c]. Block j's group g (64 bytes) holds w[4g .. 4g+3][16j .. 16j+15]: for VNNI as
// packed[j][g][c][i] = w[4g + i][16j + c], for AVX2 as packed[j][g][p][c][i] = w[4g + 2p + i][16j + c].
// `gated`: the first n/2 columns are a gate's and the rest an up projection's, and their blocks of
// 16 go in pairs (Int8MatMul's `gated`): block j to place 2j, block n/32 + j to place 2j + 1
// (offsets stay in the columns' order). Returns 0, or 1 where this build packs nothing (the graph
// then keeps MatMulInteger) or the shape does not pack (k % 4, n % 16 or, gated, n % 32).
extern "C" int attar_pack_int8(const int8_t* __restrict w, int64_t k, int64_t n, int32_t zero, int32_t gated,
                               int8_t* __restrict packed, int32_t* __restrict offsets) {
#ifdef ATTAR_PACKS
  using attar::BLOCK, attar::GROUP;
  if (k <= 0 || n <= 0 || k % GROUP != 0 || n % (gated ? 2 * BLOCK : BLOCK) != 0) return 1;
  for (int64_t c = 0; c < n; ++c) offsets[c] = 0;
  for (int64_t row = 0; row < k; ++row)
    for (int64_t c = 0; c < n; ++c) offsets[c] += w[row * n + c];
  for (int64_t c = 0; c < n; ++c) offsets[c] *= zero;
  const int64_t blocks = n / BLOCK;
  // Each block's 4 × 16 bytes interleaved, a band of blocks at a time: the band's
  // packed bytes (~512 KB) stay in cache while four rows at a time are read across it.
  const int64_t band = std::max<int64_t>(1, (512 << 10) / (k * BLOCK));
  for (int64_t first = 0; first < blocks; first += band)
  for (int64_t g = 0; g < k / GROUP; ++g) {
    const int8_t* row = w + g * GROUP * n;
    for (int64_t j = first; j < std::min(blocks, first + band); ++j) {
      const int8_t* at = row + j * BLOCK;
      const __m128i r0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(at));
      const __m128i r1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(at + n));
      const __m128i r2 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(at + 2 * n));
      const __m128i r3 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(at + 3 * n));
      const __m128i low01 = _mm_unpacklo_epi8(r0, r1), high01 = _mm_unpackhi_epi8(r0, r1);
      const __m128i low23 = _mm_unpacklo_epi8(r2, r3), high23 = _mm_unpackhi_epi8(r2, r3);
      const int64_t place = gated ? (j < blocks / 2 ? 2 * j : 2 * (j - blocks / 2) + 1) : j;
      __m128i* out = reinterpret_cast<__m128i*>(packed + (place * (k / GROUP) + g) * BLOCK * GROUP);
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
  (void)w, (void)k, (void)n, (void)zero, (void)gated, (void)packed, (void)offsets;
  return 1;
#endif
}

// Q8MatMul's scales or offsets as int8 factors of float16 units (Factors' FACTORS), where every
// unit's numbers are such products: `values` (blocks, groups, 16 columns) floats, and `base` (the
// same shape; nullptr: zeros) what each number adds to its product (an offset's zero × scale).
// A unit is `per_unit` consecutive groups of one column; it takes the float16 nearest its largest
// magnitude (signed) over minus its factor, c, for the first c of GGUF's likeliest (63: Q4_K's and
// Q5_K's sub-scales and minimums; 128: Q6_K's, whose largest is -128; ...), then of 128 down to 1,
// for which each number is base + factor × unit in float, bit for bit, each factor an int8. (A
// float16 times an integer of at most 128 is exact in float, so the kernel's products are too,
// and no fusing of them into the add can change a bit.) Writes factors (as values) and units
// (blocks, groups / per_unit, 16) as float16 bits. Returns 0; 1 at the first unit that is not so
// (or a number that is not finite, or groups % per_unit), the outputs then of no use.
extern "C" int attar_factor_q8(const float* values, const float* base, int64_t blocks, int64_t groups, int32_t per_unit,
                               int8_t* factors, uint16_t* units) {
  using attar::BLOCK;
  constexpr int LIKELY[] = {63, 128, 127, 32, 31, 15};
  if (per_unit <= 0 || per_unit > 64 || groups % per_unit != 0) return 1;
  float rest[64];
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t u = 0; u < groups / per_unit; ++u)
      for (int64_t col = 0; col < BLOCK; ++col) {
        auto at = [&](int i) { return (b * groups + u * per_unit + i) * BLOCK + col; };
        float peak = 0.0f;
        for (int i = 0; i < per_unit; ++i) {
          rest[i] = base ? values[at(i)] - base[at(i)] : values[at(i)];
          if (!std::isfinite(values[at(i)]) || !std::isfinite(rest[i])) return 1;
          if (std::fabs(rest[i]) > std::fabs(peak)) peak = rest[i];
        }
        _Float16 unit = 0;
        bool found = peak == 0.0f;  // base alone (then values == base: rest is 0 only so): unit 0
        for (int t = 0; !found && t < 6 + 128; ++t) {
          const int c = t < 6 ? LIKELY[t] : 128 - (t - 6);
          if (t >= 6 && std::find(std::begin(LIKELY), std::end(LIKELY), c) != std::end(LIKELY)) continue;
          unit = static_cast<_Float16>(-peak / static_cast<float>(c));
          const float wide = static_cast<float>(unit);
          found = true;
          for (int i = 0; found && i < per_unit; ++i) {
            const float f = std::nearbyint(rest[i] / wide);
            found = f >= -128.0f && f <= 127.0f && (base ? base[at(i)] + f * wide : f * wide) == values[at(i)];
            factors[at(i)] = found ? static_cast<int8_t>(f) : 0;
          }
        }
        if (!found) return 1;
        if (peak == 0.0f)
          for (int i = 0; i < per_unit; ++i) factors[at(i)] = 0;
        std::memcpy(units + (b * (groups / per_unit) + u) * BLOCK + col, &unit, sizeof unit);
      }
  return 0;
}

// Pack MatMulNBits' codes (n × k, `bits` 8 or 4: a byte, or two with the first in the low nibble;
// zero point 128 or 8) for Q8MatMul, 16 columns × 4 inputs a group (8 columns a register). 8 bits:
// 64 bytes a group, packed[j][g][c][i] = w[16j + c][4g + i], w being a code less its zero point,
// plus *peak where that is at most BIASED_UP_TO (unsigned then). 4 bits: 32 bytes a group, the
// codes as they are (w + 8), byte 4c + i holding column c's in its low nibble and column 8 + c's in
// its high one. 5 (8-bit codes whose w are -16 to 15, Q5_0's; otherwise 2, nothing written): w + 16's low 4
// bits in the 4 bits' layout, each 4 groups after a plane of their fifth bits (bit 2 × group of
// byte b: its low nibble's, bit 2 × group + 1: its high one's), 160 bytes. *peak = the largest |w|
// (the node's `peak`). `gated`: the first n/2 columns are a gate's and the rest an up
// projection's, and their blocks of 16 go in pairs (Q8MatMul's `gated`): block j to place 2j,
// block n/32 + j to place 2j + 1.
// Each column's codes are read front to back, 4 inputs (2 bytes of nibbles) at a time: a matrix
// packs at about the rate it is read (the 1.5B's 1.3 G weights had taken 1.9 s one code at a time).
// Returns 0; 1 where this build has no Q8 products (a CPU with AMX or AVX-VNNI, or without AVX2) or the shape
// does not pack (k % 32, n % 16 or, gated, n % 32; bits); 2 where 5 bits do not hold the codes.
extern "C" int attar_pack_q8(const uint8_t* __restrict codes, int64_t k, int64_t n, int32_t bits, int32_t gated,
                             int8_t* __restrict packed, int32_t* peak) {
#ifdef ATTAR_Q8
  using attar::BLOCK;
  if (k <= 0 || n <= 0 || k % attar::Q8_OFFSETS != 0 || n % (gated ? 2 * BLOCK : BLOCK) != 0 ||
      (bits != 8 && bits != 5 && bits != 4))
    return 1;
  // bytes: a column's codes, a packed group's
  const int64_t row = bits == 4 ? k / 2 : k, blocks = n / BLOCK, group = bits == 8 ? 64 : bits == 5 ? 40 : 32;
  int32_t largest = 0;  // |w|, from the codes as stored (a nibble's w: -8 to 7); one loop each, vectorized
  if (bits == 4) {
    for (int64_t at = 0; at < n * row; ++at)
      largest = std::max({largest, std::abs((codes[at] & 15) - 8), std::abs((codes[at] >> 4) - 8)});
  } else {
    uint8_t least = 255, most = 0;
    for (int64_t at = 0; at < n * row; ++at) least = std::min(least, codes[at]), most = std::max(most, codes[at]);
    if (bits == 5 && (least < 128 - 16 || most > 128 + 15)) return 2;
    largest = std::max(128 - least, most - 128);
  }
  for (int64_t j = 0; j < blocks; ++j) {
    const int64_t place = gated ? (j < blocks / 2 ? 2 * j : 2 * (j - blocks / 2) + 1) : j;
    int8_t* out = packed + place * (k / 4) * group;
    if (bits == 8) {
      for (int64_t c = 0; c < BLOCK; ++c) {
        const uint8_t* column = codes + (j * BLOCK + c) * row;
        for (int64_t g = 0; g < k / 4; ++g) {
          uint32_t four;
          std::memcpy(&four, column + 4 * g, 4);
          four ^= 0x80808080u;  // less the zero point 128, as int8
          std::memcpy(out + g * group + 4 * c, &four, 4);
        }
      }
    } else if (bits == 5) {
      std::memset(out, 0, k / 4 * group);  // the planes' bits are set one by one
      for (int64_t c = 0; c < BLOCK / 2; ++c) {  // as 4 bits: columns c and 8 + c share bytes
        const uint8_t *low = codes + (j * BLOCK + c) * row, *high = codes + (j * BLOCK + c + BLOCK / 2) * row;
        for (int64_t g = 0; g < k / 4; ++g) {
          int8_t* four = out + g / 4 * 160;  // 4 groups: their plane, then their nibbles
          const int q = static_cast<int>(g % 4);
          for (int i = 0; i < 4; ++i) {
            const int a = low[4 * g + i] - (128 - 16), b = high[4 * g + i] - (128 - 16);  // w + 16: 0 to 31
            four[32 + 32 * q + 4 * c + i] = static_cast<int8_t>((a & 15) | (b & 15) << 4);
            four[4 * c + i] = static_cast<int8_t>(four[4 * c + i] | (a >> 4) << (2 * q) | (b >> 4) << (2 * q + 1));
          }
        }
      }
    } else {
      for (int64_t c = 0; c < BLOCK / 2; ++c) {  // columns c and 8 + c share bytes: c's codes low, 8 + c's high
        const uint8_t *low = codes + (j * BLOCK + c) * row, *high = codes + (j * BLOCK + c + BLOCK / 2) * row;
        for (int64_t g = 0; g < k / 4; ++g) {
          const uint8_t a0 = low[2 * g], a1 = low[2 * g + 1], b0 = high[2 * g], b1 = high[2 * g + 1];
          int8_t* four = out + g * group + 4 * c;
          four[0] = static_cast<int8_t>((a0 & 15) | (b0 & 15) << 4);
          four[1] = static_cast<int8_t>((a0 >> 4) | (b0 & 0xF0));
          four[2] = static_cast<int8_t>((a1 & 15) | (b1 & 15) << 4);
          four[3] = static_cast<int8_t>((a1 >> 4) | (b1 & 0xF0));
        }
      }
    }
  }
  if (bits == 8 && largest <= attar::BIASED_UP_TO)  // stored as w + largest, unsigned
    for (int64_t at = 0; at < n * k; ++at) packed[at] = static_cast<int8_t>(packed[at] + largest);
  *peak = largest;
  return 0;
#else
  (void)codes, (void)k, (void)n, (void)bits, (void)gated, (void)packed, (void)peak;
  return 1;
#endif
}
