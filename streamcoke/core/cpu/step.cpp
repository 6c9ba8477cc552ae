// Fused CPU kernels for one step of online constrained k-means.
//
// What follows the scoring multiply on the CPU is memory-bound work over the (n, K) score
// matrix, the (K, d) centers and O(K) state, which as a chain of torch operations costs more than
// half the multiply again (every operation is one more pass over memory, one more dispatch and
// one more thread fork-join). Here each part is one pass, split across torch's threads. On
// processors with AVX-512 the multiply itself is here too (scores_into), used where it beats the
// BLAS (torch.mm): on AMD processors, not on Intel ones.
//
// Every kernel has a torch reference implementation in streamcoke/core (the GPU path and the
// fallback); the tests check that the two agree.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SC_X86_VERSIONS 1
// One build serves any x86-64 processor: the loader picks the widest instruction set it has.
#define SC_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SC_CLONES
#endif
#define SC_INLINE inline __attribute__((always_inline))

namespace {

// Sixteen logical lanes, held as 16 / W native vectors of W floats: one AVX-512 register, two
// AVX2 ones or four SSE / NEON ones. One wide type for every target would be simpler, but GCC
// lowers the compares and selects of a vector wider than the target's registers to scalar code
// (the argmax ran ~15x slower on an AVX2-only processor). The lane count, and so every sum's
// order, is the same for every W: results do not depend on the processor's vector width.
constexpr int64_t kLanes = 16;

template <int W>
struct Lanes {
  static constexpr int kParts = kLanes / W;
  typedef float fpart __attribute__((vector_size(4 * W)));
  typedef int32_t ipart __attribute__((vector_size(4 * W)));
  struct F {
    fpart p[kParts];
    SC_INLINE float operator[](int64_t l) const { return p[l / W][l % W]; }
  };
  struct I {
    ipart p[kParts];
    SC_INLINE int32_t operator[](int64_t l) const { return p[l / W][l % W]; }
  };
  static SC_INLINE F load(const float* x) {
    F v;
    for (int k = 0; k < kParts; ++k) __builtin_memcpy(&v.p[k], x + k * W, sizeof(fpart));
    return v;
  }
  static SC_INLINE F splat(float x) {
    F v;
    for (int k = 0; k < kParts; ++k) v.p[k] = fpart{} + x;
    return v;
  }
  static SC_INLINE I iota() {  // lane l holds l
    I v;
    for (int64_t l = 0; l < kLanes; ++l) v.p[l / W][l % W] = static_cast<int32_t>(l);
    return v;
  }
  friend SC_INLINE F operator+(F a, const F& b) {
    for (int k = 0; k < kParts; ++k) a.p[k] += b.p[k];
    return a;
  }
  friend SC_INLINE F operator-(F a, const F& b) {
    for (int k = 0; k < kParts; ++k) a.p[k] -= b.p[k];
    return a;
  }
  friend SC_INLINE F operator*(F a, const F& b) {
    for (int k = 0; k < kParts; ++k) a.p[k] *= b.p[k];
    return a;
  }
  friend SC_INLINE I operator>(const F& a, const F& b) {
    I m;
    for (int k = 0; k < kParts; ++k) m.p[k] = a.p[k] > b.p[k];
    return m;
  }
  friend SC_INLINE I operator+(I a, int32_t b) {
    for (int k = 0; k < kParts; ++k) a.p[k] += b;
    return a;
  }
  static SC_INLINE F select(const I& m, F a, const F& b) {  // a where m, else b
    for (int k = 0; k < kParts; ++k) a.p[k] = m.p[k] ? a.p[k] : b.p[k];
    return a;
  }
  static SC_INLINE I select(const I& m, I a, const I& b) {
    for (int k = 0; k < kParts; ++k) a.p[k] = m.p[k] ? a.p[k] : b.p[k];
    return a;
  }
};

// Sums in a fixed order (per lane, then across the lanes in turn, then the tail), so a value
// does not depend on the thread that computes it.
template <class V>
SC_INLINE float lane_sum(const V& acc) {
  float s = 0.0f;
  for (int64_t l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

// max_j (alpha * z_j + b_j) over one head's block of a row, and the first j that reaches it
// (numpy's argmax convention): each lane keeps its best value and column, merged at the end.
template <class L>
SC_INLINE float biased_argmax_row_lanes(const float* z, const float* b, float alpha, int64_t k, int64_t* arg) {
  using F = typename L::F;
  using I = typename L::I;
  const float ninf = -std::numeric_limits<float>::infinity();
  if (k < kLanes) {  // fewer columns than lanes: the vector part would only reduce -inf lanes
    float m = ninf;
    int64_t a = 0;
    for (int64_t j = 0; j < k; ++j) {
      const float v = alpha * z[j] + b[j];
      if (v > m) {
        m = v;
        a = j;
      }
    }
    *arg = a;
    return m;
  }
  F best = L::splat(ninf);
  I where{}, column = L::iota();
  const F va = L::splat(alpha);
  const int64_t full = k - k % kLanes;
  for (int64_t j = 0; j < full; j += kLanes) {
    const F v = va * L::load(z + j) + L::load(b + j);
    const I better = v > best;
    best = L::select(better, v, best);
    where = L::select(better, column, where);
    column = column + static_cast<int32_t>(kLanes);
  }
  float m = ninf;
  int64_t a = 0;
  for (int64_t l = 0; l < kLanes; ++l) {  // highest value, then lowest column
    if (best[l] > m || (best[l] == m && where[l] < a)) {
      m = best[l];
      a = where[l];
    }
  }
  for (int64_t j = full; j < k; ++j) {  // the tail comes after every lane's columns
    const float v = alpha * z[j] + b[j];
    if (v > m) {
      m = v;
      a = j;
    }
  }
  *arg = a;
  return m;
}

// max_j (alpha * z_j + b_j) over a block (no position).
template <class L>
SC_INLINE float biased_max_lanes(const float* z, const float* b, float alpha, int64_t k) {
  using F = typename L::F;
  const float ninf = -std::numeric_limits<float>::infinity();
  F best = L::splat(ninf);
  const F va = L::splat(alpha);
  const int64_t full = k - k % kLanes;
  for (int64_t j = 0; j < full; j += kLanes) {
    const F v = va * L::load(z + j) + L::load(b + j);
    best = L::select(v > best, v, best);
  }
  float m = ninf;
  for (int64_t l = 0; l < kLanes; ++l) m = best[l] > m ? best[l] : m;
  for (int64_t j = full; j < k; ++j) {
    const float v = alpha * z[j] + b[j];
    m = v > m ? v : m;
  }
  return m;
}

// sum_j x_j y_j.
template <class L>
SC_INLINE float dot_lanes(const float* x, const float* y, int64_t d) {
  typename L::F acc = L::splat(0.0f);
  const int64_t full = d - d % kLanes;
  for (int64_t j = 0; j < full; j += kLanes) acc = acc + L::load(x + j) * L::load(y + j);
  float s = lane_sum(acc);
  for (int64_t j = full; j < d; ++j) s += x[j] * y[j];
  return s;
}

// Whether x[0 .. m) holds no NaN and no infinity: x * 0 is 0 for every finite x and NaN
// otherwise, and a NaN anywhere makes the sum unequal to itself.
template <class L>
SC_INLINE bool finite_span_lanes(const float* x, int64_t m) {
  typename L::F acc = L::splat(0.0f);
  const typename L::F zero = L::splat(0.0f);
  const int64_t full = m - m % kLanes;
  for (int64_t j = 0; j < full; j += kLanes) acc = acc + L::load(x + j) * zero;
  float s = lane_sum(acc);
  for (int64_t j = full; j < m; ++j) s += x[j] * 0.0f;
  return s == s;
}

// Each vector kernel in one version per instruction set, each with its own register width
// (GCC's function multiversioning picks one at load time); elsewhere the 4-wide one.
#ifdef SC_X86_VERSIONS
#define SC_VERSIONS(ret, name, params, args)                                                       \
  __attribute__((target("avx512f"))) ret name params { return name##_lanes<Lanes<16>> args; }     \
  __attribute__((target("avx2"))) ret name params { return name##_lanes<Lanes<8>> args; }         \
  __attribute__((target("default"))) ret name params { return name##_lanes<Lanes<4>> args; }
#else
#define SC_VERSIONS(ret, name, params, args) \
  inline ret name params { return name##_lanes<Lanes<4>> args; }
#endif

SC_VERSIONS(float, biased_argmax_row, (const float* z, const float* b, float alpha, int64_t k, int64_t* arg),
            (z, b, alpha, k, arg))
SC_VERSIONS(float, biased_max, (const float* z, const float* b, float alpha, int64_t k), (z, b, alpha, k))
SC_VERSIONS(float, dot, (const float* x, const float* y, int64_t d), (x, y, d))
SC_VERSIONS(bool, finite_span, (const float* x, int64_t m), (x, m))

inline float squared_norm(const float* x, int64_t d) { return dot(x, x, d); }

SC_CLONES void divide_row(float* out, const float* x, float denom, int64_t d) {
  for (int64_t j = 0; j < d; ++j) out[j] = x[j] / denom;
}

SC_CLONES void sum_rows(float* out, const float* a, const float* b, int64_t d) {
  for (int64_t j = 0; j < d; ++j) out[j] = a[j] + b[j];
}

SC_CLONES void add_row(float* acc, const float* x, int64_t d) {
  for (int64_t j = 0; j < d; ++j) acc[j] += x[j];
}

SC_CLONES void add_scaled_row(float* acc, const float* x, float w, int64_t d) {
  for (int64_t j = 0; j < d; ++j) {
    const float p = x[j] * w;  // rounded before the sum, as X * w then index_add_ would
    acc[j] += p;
  }
}

void check_cpu_float(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32");
  TORCH_CHECK(t.dim() == dim && t.is_contiguous(), name, " must be a contiguous ", dim, "-D tensor");
}

std::vector<int64_t> head_starts(const std::vector<int64_t>& sizes) {
  std::vector<int64_t> offsets(sizes.size());
  for (size_t h = 0, o = 0; h < sizes.size(); o += sizes[h], ++h) offsets[h] = static_cast<int64_t>(o);
  return offsets;
}

// Row i's per-head argmax of alpha * z + b: labels (counted within each head) into lab[0 .. H),
// the winning values into top[0 .. H).
void argmax_heads(const float* row, const float* b, float a, const std::vector<int64_t>& sizes,
                  const std::vector<int64_t>& offsets, int64_t* lab, float* top) {
  for (size_t h = 0; h < sizes.size(); ++h) {
    int64_t j = 0;
    top[h] = biased_argmax_row(row + offsets[h], b + offsets[h], a, sizes[h], &j);
    lab[h] = j;
  }
}

// Row i's per-head second-best biased score, given its winners: the best of the columns either
// side of the winner (the winner itself for a head of one column).
void second_heads(const float* row, const float* b, float a, const std::vector<int64_t>& sizes,
                  const std::vector<int64_t>& offsets, const int64_t* lab, const float* top, float* second) {
  const float ninf = -std::numeric_limits<float>::infinity();
  for (size_t h = 0; h < sizes.size(); ++h) {
    const int64_t o = offsets[h], k = sizes[h], j = lab[h];
    float s = top[h];
    if (k > 1) {
      const float left = j > 0 ? biased_max(row + o, b + o, a, j) : ninf;
      const float right = j + 1 < k ? biased_max(row + o + j + 1, b + o + j + 1, a, k - j - 1) : ninf;
      s = left > right ? left : right;
    }
    second[h] = s;
  }
}

// The score-gap statistic from the winners `top` and the second-best values of the first
// gap_rows rows: per head, the summed difference between the two, then the summed magnitude of
// the best one (float64, 2H). Summed in row order, so it does not depend on the thread count.
at::Tensor gap_sums_in_order(const float* top, const float* second, int64_t gap_rows, int64_t H,
                             const at::TensorOptions& options) {
  auto gap = at::zeros({2 * H}, options.dtype(at::kDouble));
  double* g = gap.data_ptr<double>();
  for (int64_t i = 0; i < gap_rows; ++i) {
    for (int64_t h = 0; h < H; ++h) {
      const double t = top[i * H + h];
      g[h] += t - static_cast<double>(second[i * H + h]);
      g[H + h] += std::abs(t);
    }
  }
  return gap;
}

// ---------------------------------------------------------------------------------- the multiply
//
// Z = X C^T for the shapes of this step (a batch of a few thousand rows, d in the tens to low
// thousands, K centers), with AVX-512 where the processor has it. On AMD processors with
// 512-bit units (EPYC, measured) the BLAS that torch ships reaches about half the rate of this
// register-blocked kernel, which keeps both FMA pipes busy; on Intel ones that BLAS is the
// faster (measured on a Xeon of the Emerald Rapids generation), and the callers use it there.
// Every entry is the sum over the features in order, one fused multiply-add per term.
//
// Layout: the centers are repacked per call into panels of kPanel columns, each panel stored
// feature-major (d rows of kPanel floats), so a tile reads one contiguous stream of the panel
// and broadcasts one sample value per row. A tile is kRows samples by kPanel centers: 24
// accumulators, two loads and twelve broadcasts per feature.

constexpr int64_t kPanel = 32;
constexpr int64_t kRows = 12;

// Whether the processor has AVX-512, and whether it is an Intel one, where the BLAS that torch
// ships on x86 (MKL) multiplies faster than the kernel below and so does the multiply instead.
#if defined(__x86_64__) && defined(__GNUC__)
bool has_avx512() { return __builtin_cpu_supports("avx512f"); }
bool is_intel() { return __builtin_cpu_is("intel"); }
#else
bool has_avx512() { return false; }
bool is_intel() { return false; }
#endif

#if defined(__x86_64__) && defined(__GNUC__)
// Centers (K, d) row-major -> panels (P, d, kPanel), the columns past K zero.
void pack_panels(const float* c, int64_t K, int64_t d, float* out, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    float* panel = out + p * d * kPanel;
    const int64_t cols = std::min(kPanel, K - p * kPanel);
    for (int64_t j = 0; j < kPanel; ++j) {
      if (j >= cols) {
        for (int64_t f = 0; f < d; ++f) panel[f * kPanel + j] = 0.0f;
        continue;
      }
      const float* row = c + (p * kPanel + j) * d;
      for (int64_t f = 0; f < d; ++f) panel[f * kPanel + j] = row[f];
    }
  }
}

// One tile: rows x[0 .. kRows) (row stride d) against one panel, written to out (row stride
// ldo), of which only the first `rows` rows and `cols` columns are stored.
__attribute__((target("avx512f"))) void tile_avx512(const float* x, int64_t d, const float* panel, float* out,
                                                    int64_t ldo, int64_t rows, int64_t cols) {
  __m512 lo[kRows], hi[kRows];
  for (int64_t r = 0; r < kRows; ++r) {
    lo[r] = _mm512_setzero_ps();
    hi[r] = _mm512_setzero_ps();
  }
  for (int64_t f = 0; f < d; ++f) {
    const __m512 b0 = _mm512_loadu_ps(panel + f * kPanel);
    const __m512 b1 = _mm512_loadu_ps(panel + f * kPanel + 16);
#pragma GCC unroll 12
    for (int64_t r = 0; r < kRows; ++r) {
      const __m512 a = _mm512_set1_ps(x[r * d + f]);
      lo[r] = _mm512_fmadd_ps(a, b0, lo[r]);
      hi[r] = _mm512_fmadd_ps(a, b1, hi[r]);
    }
  }
  if (rows == kRows && cols == kPanel) {
    for (int64_t r = 0; r < kRows; ++r) {
      _mm512_storeu_ps(out + r * ldo, lo[r]);
      _mm512_storeu_ps(out + r * ldo + 16, hi[r]);
    }
  } else {
    const __mmask16 m0 = static_cast<__mmask16>(cols >= 16 ? 0xFFFF : (1u << cols) - 1);
    const __mmask16 m1 = static_cast<__mmask16>(cols >= 32 ? 0xFFFF : cols <= 16 ? 0 : (1u << (cols - 16)) - 1);
    for (int64_t r = 0; r < rows; ++r) {
      _mm512_mask_storeu_ps(out + r * ldo, m0, lo[r]);
      _mm512_mask_storeu_ps(out + r * ldo + 16, m1, hi[r]);
    }
  }
}

// The centers packed into panels, in a buffer reused across calls (per calling thread): a fresh
// buffer of this size costs a page fault per 4 KiB, which for small batches is more than the
// multiply. Only up to kKeepFloats is kept; larger center matrices get a buffer of their own per
// call (`own`). The worker threads see the buffer through the pointer, not their own copy of the
// thread-local.
float* packed_centers(const float* c, int64_t K, int64_t d, std::vector<float>& own) {
  const int64_t P = (K + kPanel - 1) / kPanel;
  constexpr size_t kKeepFloats = size_t{8} << 20;  // 32 MiB
  // 16 floats more than the panels, so that they can start on a 64-byte boundary: every panel
  // row is then one cache line (a row that straddles two costs two loads on some processors).
  const size_t need = static_cast<size_t>(P * d * kPanel) + 16;
  thread_local std::vector<float> kept;
  float* packed;
  if (need <= kKeepFloats) {
    if (kept.size() < need) kept.resize(need);
    packed = kept.data();
  } else {
    own.resize(need);
    packed = own.data();
  }
  packed += (16 - (reinterpret_cast<uintptr_t>(packed) / sizeof(float)) % 16) % 16;
  at::parallel_for(0, P, 4, [&](int64_t p0, int64_t p1) { pack_panels(c, K, d, packed, p0, p1); });
  return packed;
}

// Rows [r0, r1) of Z = X C^T (r0 a multiple of kRows) on the calling thread, panel group by
// panel group; `pad` holds kRows * d floats. Every entry is computed the same way whatever the
// row range, so the caller may split the rows as it likes.
void multiply_rows(const float* x, int64_t r0, int64_t r1, int64_t n, int64_t d, const float* packed, int64_t K,
                   float* z, std::vector<float>& pad) {
  const int64_t P = (K + kPanel - 1) / kPanel;
  // Panels in groups that stay in the core's cache while every row block of the range passes.
  const int64_t group = std::max<int64_t>(1, (256 * 1024) / (d * kPanel * 4));
  for (int64_t g0 = 0; g0 < P; g0 += group) {
    const int64_t g1 = std::min(P, g0 + group);
    for (int64_t i = r0; i < r1; i += kRows) {
      const int64_t rows = std::min(kRows, n - i);
      const float* xb = x + i * d;
      if (rows < kRows) {  // the last, short block reads from a zero-padded copy
        std::fill(pad.begin(), pad.end(), 0.0f);
        std::copy(xb, xb + rows * d, pad.begin());
        xb = pad.data();
      }
      for (int64_t p = g0; p < g1; ++p) {
        tile_avx512(xb, d, packed + p * d * kPanel, z + i * K + p * kPanel, K, rows, std::min(kPanel, K - p * kPanel));
      }
    }
  }
}

// Z = X C^T into z (row stride K), row blocks split across threads.
void multiply(const float* x, int64_t n, int64_t d, const float* c, int64_t K, float* z) {
  std::vector<float> own;
  const float* packed = packed_centers(c, K, d, own);
  const int64_t blocks = (n + kRows - 1) / kRows;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> pad(static_cast<size_t>(kRows * d), 0.0f);
    multiply_rows(x, b0 * kRows, std::min(n, b1 * kRows), n, d, packed, K, z, pad);
  });
}
#endif

void check_multiply(const at::Tensor& X, const at::Tensor& C, const at::Tensor& out) {
  check_cpu_float(X, "X", 2);
  check_cpu_float(C, "centers", 2);
  check_cpu_float(out, "out", 2);
  TORCH_CHECK(C.size(1) == X.size(1), "X and centers have different numbers of features");
  TORCH_CHECK(out.size(0) == X.size(0) && out.size(1) == C.size(0), "out must have shape (n, K)");
  TORCH_CHECK(has_avx512(), "this processor has no AVX-512; use the BLAS");
}

}  // namespace

// Z = X C^T into `out` (n, K), which must not overlap X or C. AVX-512 only: callers check
// has_avx512() and use the BLAS elsewhere.
void scores_into(const at::Tensor& X, const at::Tensor& C, at::Tensor& out) {
  check_multiply(X, C, out);
  const int64_t n = X.size(0), d = X.size(1), K = C.size(0);
  if (n == 0 || K == 0) return;
  if (d == 0) {
    out.zero_();
    return;
  }
#if defined(__x86_64__) && defined(__GNUC__)
  multiply(X.data_ptr<float>(), n, d, C.data_ptr<float>(), K, out.data_ptr<float>());
#endif
}

// Per-head argmax of alpha * Z + bias, the winning value, and the score-gap statistic.
//
// Z: (n, sum(sizes)) raw scores; bias: (sum(sizes),). Returns
//   labels (n, H) int64, counted within each head;
//   best (n, H) float32, the winning biased score;
//   gap (2H,) float64: over the first gap_rows rows, the summed difference between the best and
//   the second-best biased score of each head, then the summed magnitude of the best one.
std::vector<at::Tensor> biased_argmax(const at::Tensor& Z, const at::Tensor& bias, double alpha,
                                      const std::vector<int64_t>& sizes, int64_t gap_rows) {
  check_cpu_float(Z, "Z", 2);
  check_cpu_float(bias, "bias", 1);
  const int64_t n = Z.size(0), ktot = Z.size(1), H = static_cast<int64_t>(sizes.size());
  int64_t total = 0;
  for (int64_t k : sizes) total += k;
  TORCH_CHECK(total == ktot && bias.size(0) == ktot, "sizes do not add up to the score columns");
  gap_rows = std::min(std::max<int64_t>(gap_rows, 0), n);

  auto labels = at::empty({n, H}, Z.options().dtype(at::kLong));
  auto best = at::empty({n, H}, Z.options());
  const std::vector<int64_t> offsets = head_starts(sizes);

  const float* z = Z.data_ptr<float>();
  const float* b = bias.data_ptr<float>();
  const float a = static_cast<float>(alpha);
  int64_t* lab = labels.data_ptr<int64_t>();
  float* top = best.data_ptr<float>();

  std::vector<float> second(static_cast<size_t>(gap_rows * H));
  at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      const float* row = z + i * ktot;
      argmax_heads(row, b, a, sizes, offsets, lab + i * H, top + i * H);
      if (i < gap_rows) second_heads(row, b, a, sizes, offsets, lab + i * H, top + i * H, second.data() + i * H);
    }
  });
  return {labels, best, gap_sums_in_order(top, second.data(), gap_rows, H, Z.options())};
}

// Z = X C^T into `out` and its per-head biased argmax, as scores_into (or the BLAS) then
// biased_argmax would give them, in one pass: the threads take chunks of rows in turn, and each
// multiplies its chunk and reads it back while it is still in the core's cache, where two
// passes read the whole score matrix back from memory. The multiply is the AVX-512 kernel
// (kernel = true; every entry the same whatever the chunks) or the BLAS (at::mm_out on each
// chunk, one thread each). chunk_rows: rows per chunk, 0 for the default. Returns labels, best
// and gap as biased_argmax does.
std::vector<at::Tensor> scored_argmax(const at::Tensor& X, const at::Tensor& C, at::Tensor& out,
                                      const at::Tensor& bias, double alpha, const std::vector<int64_t>& sizes,
                                      int64_t gap_rows, bool kernel, int64_t chunk_rows) {
  check_cpu_float(X, "X", 2);
  check_cpu_float(C, "centers", 2);
  check_cpu_float(out, "out", 2);
  check_cpu_float(bias, "bias", 1);
  const int64_t n = X.size(0), d = X.size(1), K = C.size(0), H = static_cast<int64_t>(sizes.size());
  TORCH_CHECK(C.size(1) == d, "X and centers have different numbers of features");
  TORCH_CHECK(out.size(0) == n && out.size(1) == K, "out must have shape (n, K)");
  int64_t total = 0;
  for (int64_t k : sizes) total += k;
  TORCH_CHECK(total == K && bias.size(0) == K, "sizes do not add up to the centers");
  TORCH_CHECK(!kernel || has_avx512(), "this processor has no AVX-512; use the BLAS");
  gap_rows = std::min(std::max<int64_t>(gap_rows, 0), n);

  auto labels = at::empty({n, H}, X.options().dtype(at::kLong));
  auto best = at::empty({n, H}, X.options());
  std::vector<float> second(static_cast<size_t>(gap_rows * H));
  if (n == 0) return {labels, best, at::zeros({2 * H}, X.options().dtype(at::kDouble))};
  const std::vector<int64_t> offsets = head_starts(sizes);
  const float* x = X.data_ptr<float>();
  const float* b = bias.data_ptr<float>();
  const float a = static_cast<float>(alpha);
  float* z = out.data_ptr<float>();
  int64_t* lab = labels.data_ptr<int64_t>();
  float* top = best.data_ptr<float>();

  std::vector<float> own;
  const float* packed = nullptr;
#if defined(__x86_64__) && defined(__GNUC__)
  if (kernel && d > 0) packed = packed_centers(C.data_ptr<float>(), K, d, own);
#endif
  const at::Tensor Ct = C.t();
  int64_t chunk = chunk_rows;
  if (chunk <= 0) {
    // Chunks of at most about 1 MiB of scores, so that one stays in the core's L2, as few as
    // that allows (the BLAS is slower on small ones) and the same number for every thread.
    const int64_t T = at::get_num_threads();
    const int64_t in_cache = std::max<int64_t>(1, (int64_t{1} << 20) / (4 * std::max<int64_t>(K, 1)));
    const int64_t count = T * ((n + T * in_cache - 1) / (T * in_cache));
    chunk = ((n + count - 1) / count + kRows - 1) / kRows * kRows;
  }
  chunk = std::max<int64_t>(kRows, chunk / kRows * kRows);  // whole row blocks of the kernel
  const int64_t n_chunks = (n + chunk - 1) / chunk;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    std::vector<float> pad(static_cast<size_t>(kRows * d), 0.0f);
    for (int64_t c = next.fetch_add(1); c < n_chunks; c = next.fetch_add(1)) {
      const int64_t r0 = c * chunk, r1 = std::min(n, r0 + chunk);
      if (d == 0) {
        std::fill(z + r0 * K, z + r1 * K, 0.0f);
      } else if (kernel) {
#if defined(__x86_64__) && defined(__GNUC__)
        multiply_rows(x, r0, r1, n, d, packed, K, z, pad);
#endif
      } else {
        at::Tensor part = out.narrow(0, r0, r1 - r0);
        at::mm_out(part, X.narrow(0, r0, r1 - r0), Ct);
      }
      for (int64_t i = r0; i < r1; ++i) {
        const float* row = z + i * K;
        argmax_heads(row, b, a, sizes, offsets, lab + i * H, top + i * H);
        if (i < gap_rows) second_heads(row, b, a, sizes, offsets, lab + i * H, top + i * H, second.data() + i * H);
      }
    }
  });
  return {labels, best, gap_sums_in_order(top, second.data(), gap_rows, H, X.options())};
}

// Fold a batch's members into the epoch's running means (center_update="mean").
//
// X: (n, d) prepared samples; rows: (n * H,) flat head-major center index of every sample and
// head; weights: (n,) or an empty tensor; epoch_sums and centers: (K, d); counts: (K,) float64,
// the epoch's counts including this batch. Returns (centers, epoch_sums), new tensors. Each
// center's members are added in sample order, as index_add_ does, so the sums carry the same
// bits; the cosine metric re-normalises the sum, the Euclidean one divides it by the count, and
// a center without members keeps its previous value.
std::vector<at::Tensor> running_mean_update(const at::Tensor& X, const at::Tensor& rows,
                                            const at::Tensor& weights, const at::Tensor& epoch_sums,
                                            const at::Tensor& counts, const at::Tensor& centers,
                                            bool cosine) {
  check_cpu_float(X, "X", 2);
  check_cpu_float(epoch_sums, "epoch_sums", 2);
  check_cpu_float(centers, "centers", 2);
  TORCH_CHECK(rows.device().is_cpu() && rows.scalar_type() == at::kLong && rows.dim() == 1 &&
                  rows.is_contiguous(), "rows must be a contiguous int64 CPU tensor");
  TORCH_CHECK(counts.device().is_cpu() && counts.scalar_type() == at::kDouble && counts.is_contiguous(),
              "counts must be a contiguous float64 CPU tensor");
  const int64_t n = X.size(0), d = X.size(1), K = centers.size(0), m = rows.size(0);
  TORCH_CHECK(n > 0 && m % n == 0, "rows must hold a whole number of heads");
  TORCH_CHECK(epoch_sums.size(0) == K && epoch_sums.size(1) == d && centers.size(1) == d &&
                  counts.size(0) == K, "state shapes disagree");
  const bool weighted = weights.numel() > 0;
  if (weighted) {
    check_cpu_float(weights, "weights", 1);
    TORCH_CHECK(weights.size(0) == n, "weights must hold one value per sample");
  }

  // Members of every center, in sample order (a stable counting sort of rows).
  const int64_t* r = rows.data_ptr<int64_t>();
  std::vector<int64_t> start(K + 1, 0), members(m);
  for (int64_t t = 0; t < m; ++t) {
    TORCH_CHECK(r[t] >= 0 && r[t] < K, "center index out of range");
    ++start[r[t] + 1];
  }
  for (int64_t k = 0; k < K; ++k) start[k + 1] += start[k];
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t t = 0; t < m; ++t) members[fill[r[t]]++] = t % n;
  }

  auto new_sums = at::empty_like(epoch_sums);
  auto new_centers = at::empty_like(centers);
  const float* x = X.data_ptr<float>();
  const float* w = weighted ? weights.data_ptr<float>() : nullptr;
  const float* es = epoch_sums.data_ptr<float>();
  const float* c = centers.data_ptr<float>();
  const double* cnt = counts.data_ptr<double>();
  float* ns = new_sums.data_ptr<float>();
  float* nc = new_centers.data_ptr<float>();

  at::parallel_for(0, K, 8, [&](int64_t k0, int64_t k1) {
    std::vector<float> acc(d);
    for (int64_t k = k0; k < k1; ++k) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t t = start[k]; t < start[k + 1]; ++t) {
        const int64_t i = members[t];
        if (weighted) add_scaled_row(acc.data(), x + i * d, w[i], d);
        else add_row(acc.data(), x + i * d, d);
      }
      float* s = ns + k * d;
      sum_rows(s, es + k * d, acc.data(), d);
      float* out = nc + k * d;
      if (!(cnt[k] > 0)) {
        std::copy(c + k * d, c + (k + 1) * d, out);
        continue;
      }
      const float denom = cosine ? std::max(std::sqrt(squared_norm(s, d)), 1e-12f)
                                 : static_cast<float>(cnt[k]);
      divide_row(out, s, denom, d);
    }
  });
  return {new_centers, new_sums};
}

// A batch's terms of the duality certificate, per head h (float64, 3H values): the summed
// winning scores less the bias they contain (counts . bias over the head's centers), the summed
// winning scores, and the slack max_k (reference_k - bias_k) that keeps the streaming bound
// valid while the duals move. best: (n, H) winning biased scores without the row constant;
// X: the batch, given for the Euclidean metric (whose row constant is -||x||^2), else empty;
// weights: (n,) or empty. Replaces a dozen small torch operations on O(n + K) values.
at::Tensor certificate_terms(const at::Tensor& best, const at::Tensor& X, const at::Tensor& weights,
                             const at::Tensor& counts, const at::Tensor& bias, const at::Tensor& reference,
                             const std::vector<int64_t>& sizes) {
  check_cpu_float(best, "best", 2);
  check_cpu_float(bias, "bias", 1);
  check_cpu_float(reference, "reference", 1);
  TORCH_CHECK(counts.device().is_cpu() && counts.scalar_type() == at::kDouble && counts.dim() == 1 &&
                  counts.is_contiguous(), "counts must be a contiguous float64 CPU tensor");
  const int64_t n = best.size(0), H = best.size(1);
  TORCH_CHECK(static_cast<int64_t>(sizes.size()) == H, "one size per head");
  int64_t total = 0;
  for (int64_t k : sizes) total += k;
  TORCH_CHECK(counts.size(0) == total && bias.size(0) == total && reference.size(0) == total,
              "counts, bias and reference need one value per center");
  const bool euclidean = X.numel() > 0, weighted = weights.numel() > 0;
  if (euclidean) {
    check_cpu_float(X, "X", 2);
    TORCH_CHECK(X.size(0) == n, "X must hold one row per sample");
  }
  if (weighted) {
    check_cpu_float(weights, "weights", 1);
    TORCH_CHECK(weights.size(0) == n, "weights must hold one value per sample");
  }
  const float* bp = best.data_ptr<float>();
  const float* x = euclidean ? X.data_ptr<float>() : nullptr;
  const float* w = weighted ? weights.data_ptr<float>() : nullptr;
  const int64_t d = euclidean ? X.size(1) : 0;
  std::vector<double> row_max(H, 0.0);
  for (int64_t i = 0; i < n; ++i) {
    const float offset = euclidean ? -squared_norm(x + i * d, d) : 0.0f;
    for (int64_t h = 0; h < H; ++h) {
      const double v = static_cast<double>(euclidean ? bp[i * H + h] + offset : bp[i * H + h]);
      row_max[h] += weighted ? v * static_cast<double>(w[i]) : v;
    }
  }
  auto out = at::empty({3 * H}, at::TensorOptions().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  const double* c = counts.data_ptr<double>();
  const float* b = bias.data_ptr<float>();
  const float* r = reference.data_ptr<float>();
  for (int64_t h = 0, k0 = 0; h < H; k0 += sizes[h], ++h) {
    double paid = 0.0;
    float slack = -std::numeric_limits<float>::infinity();
    for (int64_t k = k0; k < k0 + sizes[h]; ++k) {
      paid += c[k] * static_cast<double>(b[k]);
      slack = std::max(slack, r[k] - b[k]);
    }
    o[h] = row_max[h] - paid;
    o[H + h] = row_max[h];
    o[2 * H + h] = static_cast<double>(slack);
  }
  return out;
}

// The rest of a batch's projected dual ascent when it takes several steps (the default schedule
// splits a batch that holds several quotas of every cluster), for one process: after each step
// the batch is re-assigned with the new duals from the same raw scores, recounted, and stepped
// again. The same operations in the same order as the loop of the torch path (float32 duals,
// float64 counts added in sample order), so the results carry the same bits.
//
// Z: (n, K) raw scores; alpha and sq (K,) float32 or empty: the biased scores are
// alpha * Z + ((rho - mu) - sq); rho, mu, lower: (K,) float32, upper: (K,) or empty; steps and
// n_iter: per head; weights: (n,) float32 or empty; batch_weight: their sum (or n); counts:
// (K,) float64, the first assignment's counts. Returns labels (n, H), best (n, H), the last
// assignment's counts, rho, mu and the bias (rho - mu) that last assignment used.
std::vector<at::Tensor> inner_dual_steps(const at::Tensor& Z, double alpha, const at::Tensor& sq,
                                         const at::Tensor& rho0, const at::Tensor& mu0, const at::Tensor& lower,
                                         const at::Tensor& upper, const std::vector<double>& steps,
                                         const std::vector<int64_t>& n_iter, const std::vector<int64_t>& sizes,
                                         const at::Tensor& weights, double batch_weight, const at::Tensor& counts0,
                                         const at::Tensor& labels0, const at::Tensor& best0) {
  check_cpu_float(Z, "Z", 2);
  check_cpu_float(rho0, "rho", 1);
  check_cpu_float(mu0, "mu", 1);
  check_cpu_float(lower, "lower", 1);
  const int64_t n = Z.size(0), K = Z.size(1), H = static_cast<int64_t>(sizes.size());
  int64_t total = 0;
  for (int64_t k : sizes) total += k;
  TORCH_CHECK(total == K && rho0.size(0) == K && mu0.size(0) == K && lower.size(0) == K,
              "sizes do not add up to the centers");
  TORCH_CHECK(static_cast<int64_t>(steps.size()) == H && static_cast<int64_t>(n_iter.size()) == H,
              "one step and one count of steps per head");
  const bool has_upper = upper.numel() > 0, has_sq = sq.numel() > 0, weighted = weights.numel() > 0;
  if (has_upper) check_cpu_float(upper, "upper", 1);
  if (has_sq) check_cpu_float(sq, "sq", 1);
  if (weighted) {
    check_cpu_float(weights, "weights", 1);
    TORCH_CHECK(weights.size(0) == n, "weights must hold one value per sample");
  }
  TORCH_CHECK(counts0.scalar_type() == at::kDouble && counts0.is_contiguous() && counts0.size(0) == K,
              "counts must be a contiguous float64 tensor of one value per center");
  TORCH_CHECK(labels0.scalar_type() == at::kLong && labels0.is_contiguous() && labels0.size(0) == n &&
                  labels0.size(1) == H && best0.scalar_type() == at::kFloat && best0.is_contiguous(),
              "labels and best must be the first assignment's");

  auto rho = rho0.clone(), mu = mu0.clone(), bias = at::empty_like(rho0), terms = at::empty_like(rho0);
  auto labels = labels0.clone(), best = best0.clone(), counts = counts0.clone();
  float* r = rho.data_ptr<float>();
  float* m = mu.data_ptr<float>();
  float* b = bias.data_ptr<float>();
  float* t = terms.data_ptr<float>();
  double* c = counts.data_ptr<double>();
  int64_t* lab = labels.data_ptr<int64_t>();
  float* top = best.data_ptr<float>();
  const float* lo = lower.data_ptr<float>();
  const float* up = has_upper ? upper.data_ptr<float>() : nullptr;
  const float* q = has_sq ? sq.data_ptr<float>() : nullptr;
  const float* w = weighted ? weights.data_ptr<float>() : nullptr;
  const float* z = Z.data_ptr<float>();
  const float a = static_cast<float>(alpha);
  const std::vector<int64_t> offsets = head_starts(sizes);
  std::vector<int64_t> head_of(static_cast<size_t>(K));
  for (int64_t h = 0; h < H; ++h)
    for (int64_t j = offsets[h]; j < offsets[h] + sizes[h]; ++j) head_of[j] = h;
  int64_t rounds = 0;
  for (int64_t it : n_iter) rounds = std::max(rounds, it);
  for (int64_t j = 0; j < K; ++j) b[j] = r[j] - m[j];

  for (int64_t it = 0; it < rounds; ++it) {
    if (it > 0) {
      for (int64_t j = 0; j < K; ++j) {
        b[j] = r[j] - m[j];
        t[j] = has_sq ? b[j] - q[j] : b[j];
      }
      at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) {
        for (int64_t i = r0; i < r1; ++i) {
          for (int64_t h = 0; h < H; ++h) {
            int64_t j = 0;
            top[i * H + h] = biased_argmax_row(z + i * K + offsets[h], t + offsets[h], a, sizes[h], &j);
            lab[i * H + h] = j;
          }
        }
      });
      std::fill(c, c + K, 0.0);
      for (int64_t h = 0; h < H; ++h)  // head by head, samples in order: bincount's order
        for (int64_t i = 0; i < n; ++i) c[offsets[h] + lab[i * H + h]] += weighted ? static_cast<double>(w[i]) : 1.0;
    }
    for (int64_t j = 0; j < K; ++j) {
      const int64_t h = head_of[j];
      const float step = it < n_iter[h] ? static_cast<float>(steps[h]) : 0.0f;
      const float share = static_cast<float>(c[j] / batch_weight);
      const float nr = r[j] + step * (lo[j] - share);
      r[j] = nr > 0.0f ? nr : 0.0f;
      if (has_upper) {
        const float nm = m[j] + step * (share - up[j]);
        m[j] = nm > 0.0f ? nm : 0.0f;
      }
    }
  }
  return {labels, best, counts, rho, mu, bias};
}

// Weight received by every center: rows (m,) int64 center indices, head-major (m = n * H),
// weights (n,) float32 or empty (all ones). Float64, summed in the order of rows, as numpy's
// bincount does.
at::Tensor label_counts(const at::Tensor& rows, const at::Tensor& weights, int64_t total) {
  TORCH_CHECK(rows.device().is_cpu() && rows.scalar_type() == at::kLong && rows.dim() == 1 && rows.is_contiguous(),
              "rows must be a contiguous int64 CPU tensor");
  const bool weighted = weights.numel() > 0;
  const int64_t m = rows.size(0);
  if (weighted) {
    check_cpu_float(weights, "weights", 1);
    TORCH_CHECK(weights.size(0) > 0 && m % weights.size(0) == 0, "rows must hold a whole number of heads");
  }
  auto counts = at::zeros({total}, rows.options().dtype(at::kDouble));
  double* c = counts.data_ptr<double>();
  const int64_t* r = rows.data_ptr<int64_t>();
  const float* w = weighted ? weights.data_ptr<float>() : nullptr;
  const int64_t n = weighted ? weights.size(0) : 1;
  for (int64_t t = 0; t < m; ++t) {
    TORCH_CHECK(r[t] >= 0 && r[t] < total, "center index out of range");
    c[r[t]] += weighted ? static_cast<double>(w[t % n]) : 1.0;
  }
  return counts;
}

// Every row of X scaled to unit length: x / max(||x||, 1e-12), as torch's F.normalize does (the
// norm summed in the order of squared_norm). One pass that reads X and writes the copy.
at::Tensor normalize_rows(const at::Tensor& X) {
  check_cpu_float(X, "X", 2);
  const int64_t n = X.size(0), d = X.size(1);
  auto out = at::empty_like(X);
  const float* x = X.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      const float denom = std::max(std::sqrt(squared_norm(x + i * d, d)), 1e-12f);
      divide_row(o + i * d, x + i * d, denom, d);
    }
  });
  return out;
}

// Whether every entry of X is finite (no NaN, no infinity): one read of X, split across threads.
bool all_finite(const at::Tensor& X) {
  check_cpu_float(X, "X", 2);
  const int64_t total = X.numel();
  const float* x = X.data_ptr<float>();
  std::atomic<bool> ok{true};
  at::parallel_for(0, total, 1 << 15, [&](int64_t a, int64_t b) {
    if (!finite_span(x + a, b - a)) ok.store(false, std::memory_order_relaxed);
  });
  return ok.load();
}

// tar_scan.cpp: the header checks of the one-row shard reader (streamcoke.data.tar_rows).
at::Tensor tar_rows_ok(const at::Tensor& V, const std::vector<int64_t>& member_at, const std::vector<bool>& pax,
                       const std::vector<std::string>& exts, const std::vector<int64_t>& data_blocks,
                       int64_t feature, int64_t key_len, const std::string& magic, const std::string& size_field,
                       const std::string& npy_header, const std::string& previous);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The kernels touch no Python object, so other Python threads (data loaders) run meanwhile.
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("has_avx512", &has_avx512, "Whether this processor runs the AVX-512 multiply");
  m.def("is_intel", &is_intel, "Whether this is an Intel processor");
  m.def("scores_into", &scores_into, "Z = X C^T into out (AVX-512)", nogil);
  m.def("biased_argmax", &biased_argmax, "Per-head argmax of alpha * Z + bias with the score gap", nogil);
  m.def("scored_argmax", &scored_argmax, "Z = X C^T and its per-head biased argmax in one pass", nogil);
  m.def("running_mean_update", &running_mean_update, "Running-mean center update from a batch", nogil);
  m.def("normalize_rows", &normalize_rows, "Rows scaled to unit length", nogil);
  m.def("all_finite", &all_finite, "Whether every entry is finite", nogil);
  m.def("certificate_terms", &certificate_terms, "A batch's terms of the duality certificate", nogil);
  m.def("label_counts", &label_counts, "Weight received by every center, in the order of the rows", nogil);
  m.def("inner_dual_steps", &inner_dual_steps, "A batch's projected dual ascent steps after its first", nogil);
  m.def("tar_rows_ok", &tar_rows_ok, "Which samples of a shard chunk are one-row samples of a layout", nogil);
}
