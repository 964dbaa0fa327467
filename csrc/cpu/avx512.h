// What the CPU kernels share of AVX-512: the target attribute of the functions
// written for it, the check (once, at the first call) that the running CPU
// has it, and the pieces built from its intrinsics: a small GEMM that keeps a
// tile of C in registers, and a vectorized exp and log. The rest of the extension is
// compiled for baseline x86-64; only functions marked XMCNAS_AVX512 use the
// wider instructions, and only after has_avx512() said yes, so the library
// loads and runs anywhere. XMCNAS_CPU_ISA=generic in the environment turns
// these paths off (the tests run the portable ones that way).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define XMCNAS_HAS_AVX512_CODE 1
#include <immintrin.h>
#define XMCNAS_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,bmi2")))
#define XMCNAS_AVX512_INLINE XMCNAS_AVX512 inline __attribute__((always_inline))
#else
#define XMCNAS_HAS_AVX512_CODE 0
#endif

namespace xmcnas_fast::cpu {

// Whether the running CPU has AVX-512 (F, DQ, BW, VL) and XMCNAS_CPU_ISA does not say "generic".
inline bool has_avx512() {
#if XMCNAS_HAS_AVX512_CODE
  static const bool yes = [] {
    const char* isa = std::getenv("XMCNAS_CPU_ISA");
    if (isa != nullptr && std::strcmp(isa, "generic") == 0) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  }();
  return yes;
#else
  return false;
#endif
}

#if XMCNAS_HAS_AVX512_CODE

// The first n lanes (n <= 16).
XMCNAS_AVX512_INLINE __mmask16 first_lanes(int64_t n) {
  return n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1u);
}

// exp(x) in float32, within about 1 ulp (Cephes' expf polynomial on x - k ln2, then
// a scale by 2^k); 0 below -104, +inf above 88.8, NaN for NaN.
XMCNAS_AVX512_INLINE __m512 exp512(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-104.0f), x);  // NaN stays NaN (max returns its second operand)
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, k);
}

// log(x) in float32 for positive, finite, normal x, within about 1 ulp (Cephes' logf polynomial on the
// mantissa, plus the exponent times ln 2).
XMCNAS_AVX512_INLINE __m512 log512(__m512 x) {
  __m512 e = _mm512_add_ps(_mm512_getexp_ps(x), _mm512_set1_ps(1.0f));               // x = m 2^e, m in [0.5, 1)
  __m512 m = _mm512_mul_ps(_mm512_getmant_ps(x, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_src), _mm512_set1_ps(0.5f));
  const __mmask16 low = _mm512_cmp_ps_mask(m, _mm512_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
  e = _mm512_mask_sub_ps(e, low, e, _mm512_set1_ps(1.0f));
  m = _mm512_mask_add_ps(m, low, m, m);                                              // m in [sqrt(1/2), sqrt(2))
  const __m512 r = _mm512_sub_ps(m, _mm512_set1_ps(1.0f));
  const __m512 z = _mm512_mul_ps(r, r);
  __m512 y = _mm512_set1_ps(7.0376836292e-2f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(-1.1514610310e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.1676998740e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(-1.2420140846e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.4249322787e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(-1.6668057665e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(2.0000714765e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(-2.4999993993e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(3.3333331174e-1f));
  y = _mm512_mul_ps(_mm512_mul_ps(y, r), z);
  y = _mm512_fmadd_ps(e, _mm512_set1_ps(-2.12194440e-4f), y);
  y = _mm512_fnmadd_ps(_mm512_set1_ps(0.5f), z, y);
  return _mm512_fmadd_ps(e, _mm512_set1_ps(0.693359375f), _mm512_add_ps(r, y));
}

// C[MR rows, 16 NV columns] (+)= A B over K, the tile of C in registers. A(i, k) = A[i sam + k sak]
// (any strides: a transposed A is read in place), B row-major (ldb), C row-major (ldc); m0, m1 mask
// the columns of the two vectors.
template <int MR, int NV>
XMCNAS_AVX512_INLINE void gemm_tile(int64_t K, const float* A, int64_t sam, int64_t sak, const float* B,
                                    int64_t ldb, float* C, int64_t ldc, __mmask16 m0, __mmask16 m1, bool add) {
  __m512 c[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v)
      c[i][v] = add ? _mm512_maskz_loadu_ps(v == 0 ? m0 : m1, C + i * ldc + 16 * v) : _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m512 b[NV];
    for (int v = 0; v < NV; ++v) b[v] = _mm512_maskz_loadu_ps(v == 0 ? m0 : m1, B + k * ldb + 16 * v);
    const float* a = A + k * sak;
    for (int i = 0; i < MR; ++i) {
      const __m512 ai = _mm512_set1_ps(a[i * sam]);
      for (int v = 0; v < NV; ++v) c[i][v] = _mm512_fmadd_ps(ai, b[v], c[i][v]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) _mm512_mask_storeu_ps(C + i * ldc + 16 * v, v == 0 ? m0 : m1, c[i][v]);
}

// Rows in blocks of at most 12 (24 accumulators at two vectors a row), of near-equal size, so that
// a few rows (the tokens of a short text: 10 rows are one block, not 8 + 2) still fill the registers.
template <int NV>
XMCNAS_AVX512_INLINE void gemm_rows(int64_t M, int64_t K, const float* A, int64_t sam, int64_t sak, const float* B,
                                    int64_t ldb, float* C, int64_t ldc, __mmask16 m0, __mmask16 m1, bool add) {
  constexpr int64_t kMaxRows = 12;
  const int64_t blocks = (M + kMaxRows - 1) / kMaxRows;
  for (int64_t bi = 0, i = 0; bi < blocks; ++bi) {
    const int64_t rows = (M - i) / (blocks - bi);  // the remaining rows over the remaining blocks
    const float* a = A + i * sam;
    float* c = C + i * ldc;
    switch (rows) {
#define XMCNAS_GEMM_ROWS(R) \
  case R: gemm_tile<R, NV>(K, a, sam, sak, B, ldb, c, ldc, m0, m1, add); break;
      XMCNAS_GEMM_ROWS(1) XMCNAS_GEMM_ROWS(2) XMCNAS_GEMM_ROWS(3) XMCNAS_GEMM_ROWS(4) XMCNAS_GEMM_ROWS(5)
      XMCNAS_GEMM_ROWS(6) XMCNAS_GEMM_ROWS(7) XMCNAS_GEMM_ROWS(8) XMCNAS_GEMM_ROWS(9) XMCNAS_GEMM_ROWS(10)
      XMCNAS_GEMM_ROWS(11) XMCNAS_GEMM_ROWS(12)
#undef XMCNAS_GEMM_ROWS
      default: break;
    }
    i += rows;
  }
}

// C[M,N] = A[M,K] B[K,N] (+ C if add), A(i, k) = A[i sam + k sak], B and C row-major. Columns in
// panels of 32 (the last one masked), rows in blocks of up to 12 under each panel, so that the panel of B
// is read from L1 by every block.
XMCNAS_AVX512 inline void gemm_avx512(int64_t M, int64_t N, int64_t K, const float* A, int64_t sam, int64_t sak,
                                      const float* B, int64_t ldb, float* C, int64_t ldc, bool add) {
  for (int64_t j = 0; j < N; j += 32) {
    const int64_t nj = N - j < 32 ? N - j : 32;
    if (nj <= 16)
      gemm_rows<1>(M, K, A, sam, sak, B + j, ldb, C + j, ldc, first_lanes(nj), 0, add);
    else
      gemm_rows<2>(M, K, A, sam, sak, B + j, ldb, C + j, ldc, first_lanes(16), first_lanes(nj - 16), add);
  }
}

#endif  // XMCNAS_HAS_AVX512_CODE

}  // namespace xmcnas_fast::cpu
