// attar's attention kernel: onnxruntime's GroupQueryAttention contract (com.microsoft), computed
// so that each row's cached keys and values are read once per KV head, not once per query head.
//
// Why: onnxruntime's CPU GroupQueryAttention runs one GEMV per query head, so the 1.5B teacher
// (6 query heads per KV head) reads its whole KV cache six times a step, at a third of what the
// memory delivers; at 16 rows and 1,500 cached tokens attention was a third of a decode step.
// Here one work item is (row, KV head, up to TILE query tokens): its query heads' vectors go
// through the keys 16 at a time (an online softmax), so each key and value comes from memory once
// and from L1 for every other query head of its group; a token's query heads go through a block
// together, each key or value row loaded once for all of them.
//
// The contract kept, for the graphs attar exports: a packed QKV input (or separate Q, K, V),
// past and present KV of shape (rows, KV heads, capacity, head) that may be one buffer (the
// engine binds them so: the new keys are written in place), seqlens_k (each row's length - 1),
// total_sequence_length, and the rotary embedding (do_rotary) from cos/sin caches, interleaved
// or not. Attributes beyond those (local_window_size, softcap, smooth softmax) are refused at
// load, so a graph that needs them fails loudly instead of computing something else.
//
// Results do not depend on the batch: every query vector visits the keys in blocks aligned at
// absolute positions, through the same vector code (a last, partial block is zero-padded), in
// the same order, whatever other rows and tokens share the call. A row's output is the same, bit
// for bit, alone or in a batch, and a token's in a step of any width, one token included.
//
// The cache is half precision (float16, as llama.cpp keeps its own): a decode step of many rows
// reads each row's whole cache, and at 16 rows of 1,000 tokens that read was a fifth of the 1.5B's
// step, at the memory's speed. Each block of 16 keys is widened to floats once, transposed, into
// the work item's scratch (L1), and every query vector of the group reads it there; values are
// widened as they are read: past that, the arithmetic is what it would be on a float cache. New
// keys and values are rounded to nearest on write.
//
// Each block is asked for ahead of its use: the next block's keys into L1 (the transposition reads
// them first), and the block AHEAD further on, keys and values, into L2. Left to the hardware's
// prefetchers, a block's 64 lines came when first touched, a stall a block: a decode step of 8
// rows of 600 cached tokens read the cache at 8 GB/s, where the weights stream at 28. Asked for,
// attention over 24 layers' caches took x0.8 as long (asked into L1 3 blocks ahead: x1.0).
//
// Shared prefixes (an optional 10th input, `shared`, int32 (rows, 2): a row's leader and length).
// SAG's N candidates hold copies of one prompt's cache, and agents in flight copies of one
// system prompt: decoding, each row read its copy, 8 rows reading 8 times what one holds. The
// engine names, for a row whose first `length` positions hold the same bits as row `leader`'s
// (copied from it, or from what it was copied from), that leader; the blocks of 16 keys wholly
// inside that length are then read once from the leader's row for the query vectors of up to
// SPAN rows together, before each row reads the rest of its own. Every query vector still visits
// the same blocks in the same order through the same code: the output is the same bits.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "kernels.h"
#ifdef __F16C__
#include <immintrin.h>
#endif

namespace attar {
namespace {

constexpr int TILE = 16;   // query tokens per work item (prefill); a decode step has one
constexpr int SPAN = 4;    // rows whose query vectors go through a shared prefix's blocks together
constexpr int MAX_HEAD = 256;  // floats a head vector: what `place` rotates on the stack
constexpr int AHEAD = 2;    // blocks of the cache asked for into L2 before their use

using Half = _Float16;  // the cache's numbers: onnxruntime's float16 has the same bits

// LANES halves as one register of floats.
inline vec load_halves(const Half* from) {
#ifdef __AVX512F__
  return (vec)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(from)));
#elif defined(ATTAR_HALVES) && defined(__F16C__)
  return (vec)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(from)));
#else
  vec x;
  for (int i = 0; i < LANES; ++i) x[i] = static_cast<float>(from[i]);
  return x;
#endif
}

inline void narrow(const float* from, int n, Half* to) {
  for (int i = 0; i < n; ++i) to[i] = static_cast<Half>(from[i]);
}

// The rotary embedding of one head vector: pairs of dims turn by the angle of this position, the
// pairs (d, d + half) ("rotate half", Qwen's GGUFs) or (2d, 2d + 1) (interleaved, llama's GGUFs);
// dims past 2 * half pass through.
inline void rotate(const float* x, float* out, const float* cos, const float* sin, int half, int head, bool interleaved) {
  const int stride = interleaved ? 2 : 1, partner = interleaved ? 1 : half;
  for (int d = 0; d < half; ++d) {
    const int i = d * stride;
    out[i] = x[i] * cos[d] - x[i + partner] * sin[d];
    out[i + partner] = x[i + partner] * cos[d] + x[i] * sin[d];
  }
  for (int d = 2 * half; d < head; ++d) out[d] = x[d];
}

struct Call {  // what one Compute shares with its work items
  int rows, tokens, heads, kv_heads, head, group, capacity, half;
  bool interleaved;
  float scale;
  const float *q, *k, *v;     // the new tokens' projections
  int64_t q_token, kv_token;  // floats from one token to the next in q and in k/v
  const float *cos, *sin;     // rotary caches (nullptr: no rotary)
  Half *keys, *values;        // present (rows, kv_heads, capacity, head)
  const int32_t* lengths;     // seqlens_k: each row's length - 1
  float* queries;             // scratch: rotated queries (rows, kv_heads, tokens, group, head)
  float *acc, *top, *sum;     // scratch: each query vector's running output, largest score, weights' sum
  const int* start;           // per row: the blocks its shared stage visits (0: none)
  const int* spans;           // the shared stage's work: per span, its leader, then SPAN rows (-1: none)
  float* out;                 // (rows, tokens, heads * head)

  int past(int b) const { return std::max(0, lengths[b] + 1 - tokens); }
  int valid(int b) const { return std::min(tokens, lengths[b] + 1); }  // the rest is right padding
};

// Stage 1, per (row, KV head): rotate the group's query heads into scratch; rotate the new keys
// and write them and the new values into the cache at the row's positions.
void place(void* data, size_t item) {
  const Call& c = *static_cast<const Call*>(data);
  const int b = static_cast<int>(item) / c.kv_heads, g = static_cast<int>(item) % c.kv_heads;
  const int past = c.past(b), valid = c.valid(b);
  for (int i = 0; i < valid; ++i) {
    const int pos = past + i;
    const float* cos = c.cos ? c.cos + static_cast<int64_t>(pos) * c.half : nullptr;
    const float* sin = c.sin ? c.sin + static_cast<int64_t>(pos) * c.half : nullptr;
    const int64_t token = static_cast<int64_t>(b) * c.tokens + i;
    for (int h = 0; h < c.group; ++h) {
      const float* x = c.q + token * c.q_token + static_cast<int64_t>(g * c.group + h) * c.head;
      float* dst = c.queries + ((((static_cast<int64_t>(b) * c.kv_heads + g) * c.tokens + i) * c.group + h) * c.head);
      if (cos) rotate(x, dst, cos, sin, c.half, c.head, c.interleaved); else std::memcpy(dst, x, sizeof(float) * c.head);
    }
    const int64_t slot = ((static_cast<int64_t>(b) * c.kv_heads + g) * c.capacity + pos) * c.head;
    const float* k = c.k + token * c.kv_token + static_cast<int64_t>(g) * c.head;
    float rotated[MAX_HEAD];
    if (cos) rotate(k, rotated, cos, sin, c.half, c.head, c.interleaved);
    narrow(cos ? rotated : k, c.head, c.keys + slot);
    narrow(c.v + token * c.kv_token + static_cast<int64_t>(g) * c.head, c.head, c.values + slot);
  }
}

// Lanes [0, n) of x, and `otherwise` in the others.
inline vec first_lanes(vec x, int n, float otherwise) { return LANE < n ? x : vec{} + otherwise; }

// The largest and the sum of a block's 16 lanes (PARTS registers), by the 16-lane trees: their
// first step is the maximum, or the sum, of lanes l and l + 8.
inline float max_16(const vec x[PARTS]) {
  vec m = x[0];
  for (int i = 1; i < PARTS; ++i) m = m > x[i] ? m : x[i];
  return max_lanes(m);
}

inline float add_16(const vec x[PARTS]) {
  vec s = x[0];
  for (int i = 1; i < PARTS; ++i) s += x[i];
  return add_lanes(s);
}

// A block's keys are transposed as they are widened: row d of the block holds dimension d of its
// 16 keys, so a query vector's 16 scores are a multiply-add of its d-th number (broadcast) by row
// d, d = 0, 1, ..., lane by lane: no sums across lanes, and the same arithmetic in every lane
// whatever a register's width. With AVX2, 16 keys' 16 dimensions turn as halves, 16 to a register:
// three rounds of interleaving within 128-bit lanes (16-, 32-, then 64-bit units) leave each
// register one dimension of 8 keys (and in its upper lane the dimension 8 further), and a fourth
// round joins the two sets of 8 keys.
#if defined(__AVX2__) && defined(__F16C__)
inline void transpose_16(const Half* keys, int64_t stride, float* rows) {
  __m256i r[16], a[16], b[16];
  for (int j = 0; j < 16; ++j) r[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + j * stride));
  for (int p = 0; p < 8; ++p) {  // keys 2p, 2p+1: dims 0-3 (and 8-11), then 4-7 (12-15)
    a[2 * p] = _mm256_unpacklo_epi16(r[2 * p], r[2 * p + 1]);
    a[2 * p + 1] = _mm256_unpackhi_epi16(r[2 * p], r[2 * p + 1]);
  }
  for (int q = 0; q < 4; ++q)  // keys 4q..4q+3: dims 4h + 0, 1 and 4h + 2, 3
    for (int h = 0; h < 2; ++h) {
      b[4 * q + 2 * h] = _mm256_unpacklo_epi32(a[4 * q + h], a[4 * q + 2 + h]);
      b[4 * q + 2 * h + 1] = _mm256_unpackhi_epi32(a[4 * q + h], a[4 * q + 2 + h]);
    }
  for (int o = 0; o < 2; ++o)  // keys 8o..8o+7: dim k in a[8o + k], k < 8 (and k + 8 above)
    for (int m = 0; m < 4; ++m) {
      a[8 * o + 2 * m] = _mm256_unpacklo_epi64(b[8 * o + m], b[8 * o + 4 + m]);
      a[8 * o + 2 * m + 1] = _mm256_unpackhi_epi64(b[8 * o + m], b[8 * o + 4 + m]);
    }
  for (int k = 0; k < 8; ++k) {
    const __m256i low = _mm256_permute2x128_si256(a[k], a[8 + k], 0x20), high = _mm256_permute2x128_si256(a[k], a[8 + k], 0x31);
#ifdef __AVX512F__
    _mm512_storeu_ps(rows + 16 * k, _mm512_cvtph_ps(low));
    _mm512_storeu_ps(rows + 16 * (k + 8), _mm512_cvtph_ps(high));
#else
    _mm256_storeu_ps(rows + 16 * k, _mm256_cvtph_ps(_mm256_castsi256_si128(low)));
    _mm256_storeu_ps(rows + 16 * k + 8, _mm256_cvtph_ps(_mm256_extracti128_si256(low, 1)));
    _mm256_storeu_ps(rows + 16 * (k + 8), _mm256_cvtph_ps(_mm256_castsi256_si128(high)));
    _mm256_storeu_ps(rows + 16 * (k + 8) + 8, _mm256_cvtph_ps(_mm256_extracti128_si256(high, 1)));
#endif
  }
}
#endif

// 16 keys of `head` halves as `head` rows of 16 floats.
inline void transpose(const Half* keys, int head, float* rows) {
#if defined(__AVX2__) && defined(__F16C__)
  for (int d = 0; d < head; d += 16) transpose_16(keys + d, head, rows + 16 * d);
#else
  for (int j = 0; j < 16; ++j)
    for (int d = 0; d < head; ++d) rows[d * 16 + j] = static_cast<float>(keys[j * head + d]);
#endif
}

// H query vectors of one token (r, r + 1, ...: query heads of one KV head) visit one block of 16
// keys and values, of which they see the first `sees`: their scores, then an online softmax step on
// each one's running state. Every stage goes through these functions, and a query vector's
// arithmetic in them does not depend on H nor on its place among the H (each vector's own chains,
// in the same order), so a block's result is the same bits wherever and beside whatever it is
// computed. The H vectors share each load of a key or value row: the multiply-adds, not the loads,
// are what is left (one compiled copy each, noinline, so that no inlined copy fuses differently).
template <int HEAD, int H>
__attribute__((noinline)) void visit(const Call& c, int64_t r, const float* keys, const Half* values, int sees) {
  const int head = HEAD ? HEAD : c.head;
  const float* q = c.queries + r * head;
  vec x[H][PARTS] = {}, odd[H][PARTS] = {};  // even dimensions' and odd ones' sums: two chains a lane
  for (int d = 0; d < head; d += 2) {
    vec k[PARTS], l[PARTS];
    for (int i = 0; i < PARTS; ++i) {
      k[i] = load_vec(keys + d * 16 + i * LANES);
      l[i] = load_vec(keys + (d + 1) * 16 + i * LANES);
    }
    for (int h = 0; h < H; ++h)
      for (int i = 0; i < PARTS; ++i) {
        x[h][i] += q[h * head + d] * k[i];
        odd[h][i] += q[h * head + d + 1] * l[i];
      }
  }
  float s[H][16], shrink[H];
  for (int h = 0; h < H; ++h) {
    vec seen[PARTS], p[PARTS];
    for (int i = 0; i < PARTS; ++i) {
      x[h][i] = (x[h][i] + odd[h][i]) * c.scale;
      seen[i] = first_lanes(x[h][i], sees - i * LANES, -INFINITY);
    }
    float& top = c.top[r + h];
    float& sum = c.sum[r + h];
    const float high = std::max(top, max_16(seen));
    // Mostly the running maximum stands: its factor is then exp(0), exactly 1 here, so it is not
    // computed (~16 vector ops a block).
    const bool stands = high == top && high > -INFINITY;
    shrink[h] = stands ? 1.0f : exp_nonpositive(vec{} + (top - high))[0];  // ~0 for the first block (top = -inf)
    for (int i = 0; i < PARTS; ++i) {
      p[i] = first_lanes(exp_nonpositive(x[h][i] - high), sees - i * LANES, 0.0f);
      store_vec(s[h] + i * LANES, p[i]);
    }
    sum = stands ? sum + add_16(p) : sum * shrink[h] + add_16(p);
    top = high;
  }
  // All 16 rows: past `sees` the weights are 0 and the rows real numbers (or the padding's
  // zeros), so a query adds exact zeros there, whatever the step's width. Each vector's block of
  // weighted values is summed from zero, value row by value row, then added to its running output
  // scaled by shrink: one multiply-add, `a * shrink + part`, so no choice of the compiler's about
  // which product to fuse changes the bits. SIDE registers of a head a pass, so that the H × SIDE
  // sums and a value row's SIDE registers stay in registers.
  constexpr int SIDE = std::max(1, (LANES == 16 ? 16 : 8) / H);
  const int chunks = head / LANES;
  for (int k0 = 0; k0 < chunks; k0 += SIDE) {
    const int width = std::min(SIDE, chunks - k0);
    vec part[H][SIDE] = {};
    for (int j = 0; j < 16; ++j) {
      const Half* v = values + static_cast<int64_t>(j) * head + LANES * k0;
      for (int k = 0; k < width; ++k) {
        const vec row = load_halves(v + LANES * k);
        for (int h = 0; h < H; ++h) part[h][k] += s[h][j] * row;
      }
    }
    for (int h = 0; h < H; ++h) {
      float* a = c.acc + (r + h) * head + LANES * k0;
      for (int k = 0; k < width; ++k) store_vec(a + LANES * k, load_vec(a + LANES * k) * shrink[h] + part[h][k]);
    }
  }
}

// The query vectors of `count` query heads of one token (r, r + 1, ...) through a block, MOST at a
// time (as many as registers hold: 2 × MOST × PARTS sums and two key rows; on AVX2's 16, 4 at a
// time ran ×1.1 as long as 3), the rest in smaller calls.
constexpr int MOST = LANES == 16 ? 8 : 3;

template <int HEAD, int H = MOST>
inline void visit_heads(const Call& c, int64_t r, int count, const float* keys, const Half* values, int sees) {
  if constexpr (H > 0) {
    for (; count >= H; count -= H, r += H) visit<HEAD, H>(c, r, keys, values, sees);
    if (count > 0) visit_heads<HEAD, H - 1>(c, r, count, keys, values, sees);
  }
}

// `width` (≤ 16) rows of `head` halves as a block of 16: where they are, or for a last, partial
// block copied into `padded` with zeros past `width` (a weight of 0 times a row past the cache's
// end could be 0 × NaN; nor is the cache read past it).
inline const Half* whole(const Half* rows, int width, int head, Half* padded) {
  if (width == 16) return rows;
  std::memcpy(padded, rows, sizeof(Half) * width * head);
  std::fill(padded + width * head, padded + 16 * head, Half(0));
  return padded;
}

// A block of `width` (≤ 16) keys and values from the cache (`whole`): the keys as floats,
// transposed (`head` rows of 16, into `transposed`), and the values as halves, returned; `padded`
// holds 32 rows of `head` halves.
inline const Half* widen_block(const Half* keys, const Half* values, int width, int head, float* transposed, Half* padded) {
  transpose(whole(keys, width, head, padded), head, transposed);
  return whole(values, width, head, padded + 16 * head);
}

// Asks for the cache's blocks ahead of block j, of a walk through blocks [first, end) of the row
// at `base` (in halves): see the top.
// Always inlined: GCC takes a function that only prefetches for one without effects, and drops
// the calls to it (a first try here compiled to no prefetch at all).
template <int HINT>
__attribute__((always_inline)) inline void ask(const Half* block, int head) {
  for (int o = 0; o < 16 * head; o += 32) __builtin_prefetch(block + o, 0, HINT);  // 64-byte lines
}

__attribute__((always_inline)) inline void ask_ahead(const Call& c, int64_t base, int j, int first, int end, int head) {
  const auto at = [&](int block) { return base + static_cast<int64_t>(16 * block) * head; };
  if (j == first)
    for (int n = j; n < std::min(end, j + AHEAD); ++n) ask<2>(c.keys + at(n), head), ask<2>(c.values + at(n), head);
  if (j + 1 < end) ask<3>(c.keys + at(j + 1), head);
  if (j + AHEAD < end) ask<2>(c.keys + at(j + AHEAD), head), ask<2>(c.values + at(j + AHEAD), head);
}

// The index of row b's first query vector of KV head g at token i in `queries` (and the state).
inline int64_t vector_at(const Call& c, int b, int g, int i) {
  return ((static_cast<int64_t>(b) * c.kv_heads + g) * c.tokens + i) * c.group;
}

// Stage 2, per (span of rows sharing a leader's prefix, KV head): the prefix's blocks, each read
// once from the leader's row, for the query vectors of every row of the span that shares it.
template <int HEAD>
void share(const Call& c, size_t item) {
  const int head = HEAD ? HEAD : c.head, g = static_cast<int>(item % c.kv_heads);
  const int* span = c.spans + item / c.kv_heads * (SPAN + 1);
  int blocks = 0;
  for (int m = 1; m <= SPAN && span[m] >= 0; ++m) blocks = std::max(blocks, c.start[span[m]]);
  const int64_t base = (static_cast<int64_t>(span[0]) * c.kv_heads + g) * c.capacity * head;
  float keys[16 * MAX_HEAD];
  Half padded[32 * MAX_HEAD];  // a partial block's keys and values (`whole`)
  for (int j = 0; j < blocks; ++j) {
    const int64_t at = base + static_cast<int64_t>(16 * j) * head;
    ask_ahead(c, base, j, 0, blocks, head);
    const Half* values = widen_block(c.keys + at, c.values + at, 16, head, keys, padded);
    for (int m = 1; m <= SPAN && span[m] >= 0; ++m) {
      const int b = span[m];
      if (j >= c.start[b]) continue;
      for (int i = 0; i < c.valid(b); ++i) visit_heads<HEAD>(c, vector_at(c, b, g, i), c.group, keys, values, 16);
    }
  }
}

// Stage 3, per (row, KV head, tile of query tokens): the rest of the row's keys, from its own
// cache, 16 at a time; then each query vector's output. Every query vector takes the same path
// whatever the tile holds, so its result does not depend on the step's width.
template <int HEAD>
void attend(const Call& c, size_t item) {
  const int head = HEAD ? HEAD : c.head, tiles = (c.tokens + TILE - 1) / TILE;
  const int b = static_cast<int>(item / (static_cast<size_t>(c.kv_heads) * tiles));
  const int g = static_cast<int>(item / tiles % c.kv_heads), t = static_cast<int>(item % tiles);
  const int past = c.past(b), first = t * TILE, last = std::min(c.valid(b), first + TILE);
  if (first >= last) return;
  const int n = (last - first) * c.group;  // query vectors: (token, query head)
  const int64_t q = vector_at(c, b, g, first);
  const int64_t base = (static_cast<int64_t>(b) * c.kv_heads + g) * c.capacity * head;

  float keys[16 * MAX_HEAD];
  Half padded[32 * MAX_HEAD];  // a partial block's keys and values (`whole`)
  const int seen = past + last;  // keys the tile's last token sees
  for (int j0 = 16 * c.start[b]; j0 < seen; j0 += 16) {
    const int width = std::min(16, seen - j0);
    const int64_t at = base + static_cast<int64_t>(j0) * head;
    ask_ahead(c, base, j0 / 16, c.start[b], (seen + 15) / 16, head);
    const Half* values = widen_block(c.keys + at, c.values + at, width, head, keys, padded);
    for (int i = first; i < last; ++i) {
      const int sees = std::min(width, past + i + 1 - j0);  // causal
      if (sees > 0) visit_heads<HEAD>(c, vector_at(c, b, g, i), c.group, keys, values, sees);
    }
  }
  for (int r = 0; r < n; ++r) {
    const int token = first + r / c.group, h = g * c.group + r % c.group;
    float* o = c.out + (static_cast<int64_t>(b) * c.tokens + token) * c.heads * head + static_cast<int64_t>(h) * head;
    const float inv = 1.0f / c.sum[q + r];
    for (int d = 0; d < head; ++d) o[d] = c.acc[(q + r) * head + d] * inv;
  }
}

void share_any(void* data, size_t item) {
  const Call& c = *static_cast<const Call*>(data);
  if (c.head == 128) share<128>(c, item);
  else if (c.head == 64) share<64>(c, item);
  else share<0>(c, item);
}

void attend_any(void* data, size_t item) {
  const Call& c = *static_cast<const Call*>(data);
  if (c.head == 128) attend<128>(c, item);
  else if (c.head == 64) attend<64>(c, item);
  else attend<0>(c, item);
}

struct Kernel {
  int heads, kv_heads, rotary;
  bool interleaved;
  float scale;

  explicit Kernel(const OrtKernelInfo* info)
      : heads(static_cast<int>(attribute(info, "num_heads", int64_t{0}))),
        kv_heads(static_cast<int>(attribute(info, "kv_num_heads", int64_t{0}))),
        rotary(static_cast<int>(attribute(info, "do_rotary", int64_t{0}))),
        interleaved(attribute(info, "rotary_interleaved", int64_t{0}) != 0),
        scale(attribute(info, "scale", 0.0f)) {
    if (heads <= 0 || kv_heads <= 0 || heads % kv_heads != 0) fail("attention", "num_heads must be a positive multiple of kv_num_heads");
    if (attribute(info, "local_window_size", int64_t{-1}) != -1) fail("attention", "a local window is not supported");
    if (attribute(info, "softcap", 0.0f) != 0.0f) fail("attention", "softcap is not supported");
    if (attribute(info, "smooth_softmax", int64_t{0}) != 0) fail("attention", "smooth softmax is not supported");
  }

  void Compute(OrtKernelContext* context) {
    const OrtValue* query = input(context, 0);
    const OrtValue* key = input(context, 1);
    const OrtValue* value = input(context, 2);
    const OrtValue* past_key = input(context, 3);
    const OrtValue* past_value = input(context, 4);
    const OrtValue* seqlens = input(context, 5);
    const OrtValue* total = input(context, 6);
    const OrtValue* cos = input(context, 7);
    const OrtValue* sin = input(context, 8);
    const OrtValue* shared = input(context, 9);
    if (!past_key || !past_value) fail("attention", "past_key and past_value are required");
    if ((key == nullptr) != (value == nullptr)) fail("attention", "key and value go together");

    Call c{};
    const std::vector<int64_t> qs = dims(query), ps = dims(past_key);
    if (qs.size() != 3 || ps.size() != 4 || dims(past_value) != ps) fail("attention", "query must be 3-d, past key and value 4-d and alike");
    c.rows = static_cast<int>(qs[0]);
    c.tokens = static_cast<int>(qs[1]);
    c.heads = heads;
    c.kv_heads = kv_heads;
    c.group = heads / kv_heads;
    c.head = static_cast<int>(ps[3]);
    if (ps[0] != c.rows || ps[1] != kv_heads) fail("attention", "past shape does not match the query");
    if (c.head <= 0 || c.head % 16 != 0 || c.head > MAX_HEAD) fail("attention", "the head size must be a multiple of 16, at most 256");
    const float* q = data<float>(query);
    if (key == nullptr) {  // packed: Q heads, then K heads, then V heads, per token
      if (qs[2] != static_cast<int64_t>(heads + 2 * kv_heads) * c.head) fail("attention", "packed query width mismatch");
      c.q = q;
      c.k = q + static_cast<int64_t>(heads) * c.head;
      c.v = c.k + static_cast<int64_t>(kv_heads) * c.head;
      c.q_token = c.kv_token = qs[2];
    } else {
      if (qs[2] != static_cast<int64_t>(heads) * c.head || dims(key) != dims(value) ||
          dims(key) != std::vector<int64_t>{qs[0], qs[1], static_cast<int64_t>(kv_heads) * c.head})
        fail("attention", "query, key and value widths mismatch");
      c.q = q;
      c.k = data<float>(key);
      c.v = data<float>(value);
      c.q_token = qs[2];
      c.kv_token = static_cast<int64_t>(kv_heads) * c.head;
    }
    if (dims(seqlens) != std::vector<int64_t>{qs[0]}) fail("attention", "seqlens_k must hold one length a row");
    c.lengths = data<int32_t>(seqlens);
    if (elements(dims(total)) != 1) fail("attention", "total_sequence_length must be one number");
    const int total_length = data<int32_t>(total)[0];
    int longest = 0;
    for (int b = 0; b < c.rows; ++b) {  // lengths come from the caller: nothing is read or written past a buffer
      if (c.lengths[b] < 0 || c.lengths[b] + 1 > total_length) fail("attention", "a row's length is out of range");
      if (c.past(b) > ps[2]) fail("attention", "a row's cached length exceeds the past buffer");
      longest = std::max(longest, c.lengths[b] + 1);
    }
    c.capacity = static_cast<int>(std::max<int64_t>(ps[2], total_length));
    c.scale = scale != 0.0f ? scale : 1.0f / std::sqrt(static_cast<float>(c.head));
    if (rotary) {
      if (!cos || !sin) fail("attention", "do_rotary needs cos_cache and sin_cache");
      const std::vector<int64_t> cs = dims(cos);
      if (cs.size() != 2 || dims(sin) != cs || 2 * cs[1] > c.head || cs[0] < longest) fail("attention", "rotary caches too small");
      c.half = static_cast<int>(cs[1]);
      c.interleaved = interleaved;
      c.cos = data<float>(cos);
      c.sin = data<float>(sin);
    }

    const int64_t out_shape[3] = {qs[0], qs[1], static_cast<int64_t>(heads) * c.head};
    const int64_t kv_shape[4] = {ps[0], ps[1], c.capacity, ps[3]};
    OrtValue *out = nullptr, *present_key = nullptr, *present_value = nullptr;
    check(g_api->KernelContext_GetOutput(context, 0, out_shape, 3, &out));
    check(g_api->KernelContext_GetOutput(context, 1, kv_shape, 4, &present_key));
    check(g_api->KernelContext_GetOutput(context, 2, kv_shape, 4, &present_value));
    c.out = data<float>(out);
    c.keys = data<Half>(present_key);
    c.values = data<Half>(present_value);
    // Not the engine's shared buffer: the present starts as a copy of each row's past.
    const Half* pk = data<Half>(past_key);
    const Half* pv = data<Half>(past_value);
    for (int b = 0; b < c.rows; ++b) {
      const int past = c.past(b);
      for (int g = 0; g < kv_heads; ++g) {
        const int64_t from = (static_cast<int64_t>(b) * kv_heads + g) * ps[2] * c.head;
        const int64_t to = (static_cast<int64_t>(b) * kv_heads + g) * c.capacity * c.head;
        if (c.keys + to != pk + from) std::memmove(c.keys + to, pk + from, sizeof(Half) * past * c.head);
        if (c.values + to != pv + from) std::memmove(c.values + to, pv + from, sizeof(Half) * past * c.head);
      }
    }
    // Right padding of a batched first prompt gets zeros, as onnxruntime's kernel leaves it.
    std::memset(c.out, 0, sizeof(float) * c.rows * c.tokens * heads * c.head);

    const size_t vectors = static_cast<size_t>(c.rows) * c.tokens * heads;
    std::vector<float> queries(vectors * c.head), acc(vectors * c.head, 0.0f), top(vectors, -INFINITY), sum(vectors, 0.0f);
    c.queries = queries.data();
    c.acc = acc.data();
    c.top = top.data();
    c.sum = sum.data();
    std::vector<int> start(c.rows, 0), spans;
    if (shared != nullptr) plan(c, shared, start, spans);
    c.start = start.data();
    c.spans = spans.data();
    const size_t tiles = (c.tokens + TILE - 1) / TILE;
    check(g_api->KernelContext_ParallelFor(context, place, static_cast<size_t>(c.rows) * kv_heads, 0, &c));
    if (!spans.empty())
      check(g_api->KernelContext_ParallelFor(context, share_any, spans.size() / (SPAN + 1) * kv_heads, 0, &c));
    check(g_api->KernelContext_ParallelFor(context, attend_any, static_cast<size_t>(c.rows) * kv_heads * tiles, 0, &c));
  }

  // The shared stage's work from the `shared` input (rows, 2): per row its leader and how many of
  // its first positions hold the leader's bits. Each leader's followers, and the leader itself, go
  // in spans of SPAN rows; each row's `start` is the blocks of 16 its span visits for it (the
  // leader's: as many as its furthest follower's). What the caller says is checked, so that
  // nothing is read outside a row's cache; that the bits are the same is the caller's word.
  static void plan(const Call& c, const OrtValue* shared, std::vector<int>& start, std::vector<int>& spans) {
    const std::vector<int64_t> shape = dims(shared);
    if (elements(shape) == 0) return;  // no row shares (the default)
    if (shape != std::vector<int64_t>{c.rows, 2}) fail("attention", "shared must hold a leader and a length a row");
    const int32_t* s = data<int32_t>(shared);
    std::vector<std::vector<int>> followers(c.rows);
    for (int b = 0; b < c.rows; ++b) {
      const int leader = s[2 * b], length = s[2 * b + 1];
      if (length == 0) continue;
      if (leader < 0 || leader >= c.rows || leader == b || length < 0 || s[2 * leader + 1] != 0 ||
          length > std::min(c.past(b), c.past(leader)))
        fail("attention", "a row's shared prefix is out of range");
      start[b] = length / 16;
      followers[leader].push_back(b);
    }
    for (int leader = 0; leader < c.rows; ++leader) {
      std::vector<int>& rows = followers[leader];
      rows.erase(std::remove_if(rows.begin(), rows.end(), [&](int b) { return start[b] == 0; }), rows.end());
      if (rows.empty()) continue;
      for (int b : rows) start[leader] = std::max(start[leader], start[b]);
      rows.insert(rows.begin(), leader);
      for (size_t i = 0; i < rows.size(); i += SPAN) {
        spans.push_back(leader);
        for (size_t m = i; m < i + SPAN; ++m) spans.push_back(m < rows.size() ? rows[m] : -1);
      }
    }
  }
};

struct Op : Ort::CustomOpBase<Op, Kernel> {
  void* CreateKernel(const OrtApi&, const OrtKernelInfo* info) const { return new Kernel(info); }
  const char* GetName() const { return "GroupQueryAttention"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 10; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    if (i == 3 || i == 4) return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;  // the cache
    return i == 5 || i == 6 || i == 9 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i == 1 || i == 2 || i >= 7 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetOutputType(size_t i) const {
    return i == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
  }
};

}  // namespace

void add_attention(Ort::CustomOpDomain& domain) {
  static Op op;
  domain.Add(&op);
}

}  // namespace attar
