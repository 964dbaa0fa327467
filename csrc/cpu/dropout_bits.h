// dropout_mask.h's stream for a run of elements at once: the 64-bit words of groups g0 .. g0 + count
// (four elements a word, element i in lane i % 4 of word i / 4), 8 hashes a vector on AVX-512. Read as
// 16-bit numbers (x86 is little-endian), the words are the elements' lanes in order.
#pragma once

#include <cstdint>

#include "../dropout_mask.h"
#include "avx512.h"

namespace xmcnas_fast::cpu {

inline void chunk_bits_portable(uint64_t seed, uint64_t g0, int64_t count, uint64_t* out) {
  for (int64_t g = 0; g < count; ++g) out[g] = xmcnas_fast::dropout_bits(seed, g0 + static_cast<uint64_t>(g));
}

#if XMCNAS_HAS_AVX512_CODE
XMCNAS_AVX512 inline void chunk_bits_avx512(uint64_t seed, uint64_t g0, int64_t count, uint64_t* out) {
  const __m512i phi = _mm512_set1_epi64(static_cast<long long>(0x9e3779b97f4a7c15ULL));
  const __m512i c1 = _mm512_set1_epi64(static_cast<long long>(0xbf58476d1ce4e5b9ULL));
  const __m512i c2 = _mm512_set1_epi64(static_cast<long long>(0x94d049bb133111ebULL));
  const __m512i s = _mm512_set1_epi64(static_cast<long long>(seed));
  __m512i g = _mm512_add_epi64(_mm512_set1_epi64(static_cast<long long>(g0)), _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0));
  const __m512i eight = _mm512_set1_epi64(8);
  int64_t i = 0;
  for (; i + 8 <= count; i += 8, g = _mm512_add_epi64(g, eight)) {
    __m512i z = _mm512_add_epi64(s, _mm512_mullo_epi64(g, phi));
    z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64(z, 30)), c1);
    z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64(z, 27)), c2);
    _mm512_storeu_si512(out + i, _mm512_xor_si512(z, _mm512_srli_epi64(z, 31)));
  }
  chunk_bits_portable(seed, g0 + static_cast<uint64_t>(i), count - i, out + i);
}
#endif

}  // namespace xmcnas_fast::cpu
