// koala's decode GEMM for a CPU with AVX-512: y (M, N) = x (M, K) @ W (N, K)^T for the few rows of a decode or
// verify step (M <= 32), with W packed once into column panels: (N / NR panels, K, NR), zero-padded.
//
// A step of a small model on a CPU reads every weight once, so its cost is the memory traffic of the weights as
// long as the arithmetic keeps up with it. The kernel streams each panel once per 8 rows: for each k it loads NR
// weights (three 512-bit registers), broadcasts x[m, k] for up to 8 rows and accumulates 8 x 48 outputs in 24
// registers, prefetching PFD k-steps ahead so the next weights arrive while these are multiplied. Beyond 8 rows, K
// runs in chunks that stay in L1 while each 8-row block runs them, the blocks taking turns to prefetch the next
// chunk, so memory keeps streaming while the arithmetic runs. Each output is the same sum in the same order whatever
// M is, so a row's result does not depend on how many rows share the call (a verify step's first row equals a
// one-token step's).
//
// Weights are float32 or bfloat16 (bf16 is widened to fp32 by a shift: no bf16 instructions needed); x and y are
// float32 or bfloat16 (bf16 x with bf16 weights only); accumulation is fp32, and a bf16 output is rounded to nearest
// even. float32 x with bfloat16 weights is the `bf16` weights mode: half the bytes per step, fp32 arithmetic.
// Ops: koala::pack(Tensor w) -> Tensor, koala::small_linear(Tensor x, Tensor packed, int n) -> Tensor.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

namespace {

constexpr int NR = 48;   // output columns per panel: three 512-bit registers of fp32
constexpr int MR = 8;    // rows per pass: 8 x 3 accumulators, 3 weight registers, 1 broadcast of 32 registers
constexpr int PFD = 16;  // k-steps prefetched ahead (up to MR rows)
constexpr int KC = 64;   // k-steps per chunk beyond MR rows: 12 KB of fp32 weights, in L1 while every row block runs
constexpr int GROUP = 4; // row blocks sharing a panel's chunks (32 rows)

using bf16 = c10::BFloat16;

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const bf16* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline float widen(float v) { return v; }
inline float widen(bf16 v) { return static_cast<float>(v); }

inline void prefetch_step(const float* w) {
  _mm_prefetch(reinterpret_cast<const char*>(w), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(w + 16), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(w + 32), _MM_HINT_T0);
}
inline void prefetch_step(const bf16* w) {
  _mm_prefetch(reinterpret_cast<const char*>(w), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(w + 32), _MM_HINT_T0);
}

inline void store_row(float* y, const float* acc, int64_t nn) {
  for (int64_t n = 0; n < nn; ++n) y[n] = acc[n];
}
inline void store_row(bf16* y, const float* acc, int64_t nn) {
  for (int64_t n = 0; n < nn; ++n) y[n] = bf16(acc[n]);  // round to nearest even, as torch rounds
}

// rows x[0..R) of one panel over the k-steps [k0, k1). The running sums start at zero (`init`) or are read from
// `sums` (R x NR floats); they are stored to y (its rows `ldy` apart) when `y` is given, else back to `sums`, so a
// row's sum runs over k in the same order however the k-steps are split. Prefetching: the weight step `pf` + i
// (counted from this panel's first step; the panels lie one after another) at every `every`-th local step i from
// `phase` on, at every step when ALL (the one-pass case: no counting in its loop); never past `last`, the packed
// weight's last step counted from this panel's first.
template <int R, bool ALL, typename T, typename W>
inline void panel(const T* x, int64_t ldx, const W* w, int64_t k0, int64_t k1, float* sums, bool init, T* y,
                  int64_t ldy, int64_t nn, int64_t pf, int64_t every, int64_t phase, int64_t last) {
  __m512 acc[R][3];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 3; ++j) acc[r][j] = init ? _mm512_setzero_ps() : _mm512_load_ps(sums + r * NR + 16 * j);
  int64_t wait = phase;
  for (int64_t k = k0; k < k1; ++k) {
    const W* wk = w + k * NR;
    if (ALL) {
      prefetch_step(w + std::min(pf + k - k0, last) * NR);
    } else if (wait-- == 0) {
      prefetch_step(w + std::min(pf + k - k0, last) * NR);
      wait = every - 1;
    }
    __m512 w0 = load16(wk), w1 = load16(wk + 16), w2 = load16(wk + 32);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      __m512 b = _mm512_set1_ps(widen(x[r * ldx + k]));
      acc[r][0] = _mm512_fmadd_ps(b, w0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(b, w1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(b, w2, acc[r][2]);
    }
  }
  if (y == nullptr) {
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < 3; ++j) _mm512_store_ps(sums + r * NR + 16 * j, acc[r][j]);
    return;
  }
  alignas(64) float out[NR];
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < 3; ++j) _mm512_store_ps(out + 16 * j, acc[r][j]);
    store_row(y + r * ldy, out, nn);
  }
}

// `panel` for rows = 1..MR rows
template <bool ALL, typename T, typename W>
inline void rows_of_panel(int64_t rows, const T* x, int64_t ldx, const W* w, int64_t k0, int64_t k1, float* sums,
                          bool init, T* y, int64_t ldy, int64_t nn, int64_t pf, int64_t every, int64_t phase,
                          int64_t last) {
  switch (rows) {
    case 1: panel<1, ALL>(x, ldx, w, k0, k1, sums, init, y, ldy, nn, pf, every, phase, last); break;
    case 2: panel<2, ALL>(x, ldx, w, k0, k1, sums, init, y, ldy, nn, pf, every, phase, last); break;
    case 3: panel<3, ALL>(x, ldx, w, k0, k1, sums, init, y, ldy, nn, pf, every, phase, last); break;
    case 4: panel<4, ALL>(x, ldx, w, k0, k1, sums, init, y, ldy, nn, pf, every, phase, last); break;
    case 5: panel<5, ALL>(x, ldx, w, k0, k1, sums, init, y, ldy, nn, pf, every, phase, last); break;
    case 6: panel<6, ALL>(x, ldx, w, k0, k1, sums, init, y, ldy, nn, pf, every, phase, last); break;
    case 7: panel<7, ALL>(x, ldx, w, k0, k1, sums, init, y, ldy, nn, pf, every, phase, last); break;
    default: panel<8, ALL>(x, ldx, w, k0, k1, sums, init, y, ldy, nn, pf, every, phase, last);
  }
}

// One panel for up to MR x GROUP rows. Up to MR rows: one pass over K, prefetching PFD k-steps ahead. More rows: K in
// chunks of KC k-steps (KC x NR weights stay in L1 while every MR-row block runs them), the blocks taking turns to
// prefetch the next chunk, so the weights keep streaming from memory while the arithmetic of the later blocks runs.
template <typename T, typename W>
void one_panel(const T* x, const W* wp, T* y, int64_t M, int64_t K, int64_t N, int64_t nn, float* sums,
               int64_t last) {
  const int64_t blocks = (M + MR - 1) / MR;
  if (blocks == 1) {
    rows_of_panel<true, T, W>(M, x, K, wp, 0, K, sums, true, y, N, nn, PFD, 1, 0, last);
    return;
  }
  for (int64_t k0 = 0; k0 < K; k0 += KC) {
    const int64_t k1 = std::min<int64_t>(K, k0 + KC);
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t m0 = b * MR;
      rows_of_panel<false, T, W>(std::min<int64_t>(MR, M - m0), x + m0 * K, K, wp, k0, k1, sums + b * MR * NR,
                                 k0 == 0, k1 == K ? y + m0 * N : nullptr, N, nn, k1, blocks, b, last);
    }
  }
}

template <typename T, typename W>
void run(const T* x, const W* w, T* y, int64_t M, int64_t K, int64_t N) {
  const int64_t panels = (N + NR - 1) / NR;
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    alignas(64) float sums[GROUP * MR * NR];  // the running sums of a group's row blocks between k-chunks
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * NR, nn = std::min<int64_t>(NR, N - n0), last = (panels - p) * K - 1;
      for (int64_t m0 = 0; m0 < M; m0 += GROUP * MR)
        one_panel<T, W>(x + m0 * K, w + p * K * NR, y + m0 * N + n0, std::min<int64_t>(GROUP * MR, M - m0), K, N,
                        nn, sums, last);
    }
  });
}

at::Tensor pack(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2, "koala::pack: a 2-d weight (N, K), got ", w.dim(), " dimensions");
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16,
              "koala::pack: float32 or bfloat16 weights, got ", w.scalar_type());
  const int64_t N = w.size(0), K = w.size(1), panels = (N + NR - 1) / NR;
  auto padded = at::zeros({panels * NR, K}, w.options());
  padded.narrow(0, 0, N).copy_(w);
  // (panels, NR, K) -> (panels, K, NR)
  return padded.view({panels, NR, K}).transpose(1, 2).contiguous();
}

at::Tensor small_linear(const at::Tensor& x_, const at::Tensor& packed, int64_t n) {
  TORCH_CHECK(x_.dim() == 2 && packed.dim() == 3 && packed.size(2) == NR && x_.size(1) == packed.size(1),
              "koala::small_linear: x (M, K) and a weight packed by koala::pack with K columns");
  const bool fp32_x = x_.scalar_type() == at::kFloat, bf16_w = packed.scalar_type() == at::kBFloat16;
  TORCH_CHECK((fp32_x || x_.scalar_type() == at::kBFloat16) && (bf16_w || packed.scalar_type() == at::kFloat) &&
              (fp32_x || bf16_w), "koala::small_linear: x float32 with float32 or bfloat16 weights, or x and weights "
              "bfloat16; x is ", x_.scalar_type(), ", the weight ", packed.scalar_type());
  TORCH_CHECK(n > 0 && n <= packed.size(0) * NR, "koala::small_linear: n out of the packed weight's range");
  auto x = x_.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  auto y = at::empty({M, n}, x.options());
  if (M == 0) return y;
  if (K == 0) return y.zero_();
  auto p = packed.contiguous();
  if (fp32_x && !bf16_w) {
    run<float, float>(x.data_ptr<float>(), p.data_ptr<float>(), y.data_ptr<float>(), M, K, n);
  } else if (fp32_x) {
    run<float, bf16>(x.data_ptr<float>(), p.data_ptr<bf16>(), y.data_ptr<float>(), M, K, n);
  } else {
    run<bf16, bf16>(x.data_ptr<bf16>(), p.data_ptr<bf16>(), y.data_ptr<bf16>(), M, K, n);
  }
  return y;
}

}  // namespace

TORCH_LIBRARY(koala, m) {
  m.def("pack(Tensor w) -> Tensor");
  m.def("small_linear(Tensor x, Tensor packed, int n) -> Tensor");
}

TORCH_LIBRARY_IMPL(koala, CPU, m) {
  m.impl("pack", &pack);
  m.impl("small_linear", &small_linear);
}
