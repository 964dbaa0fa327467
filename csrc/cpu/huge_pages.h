// Transparent huge pages for a large, freshly allocated output. A [B, L, Dv]
// buffer of the attention head (43 MB at 40 x 4,190 x 64) comes from mmap on
// every call; filling its 4 KiB pages one fault at a time cost 4x the writes
// themselves on the machine this was tuned on (THP in "madvise" mode, the
// usual default). Asking for huge pages on the 2 MiB-aligned part of the
// buffer before its first write makes that one fault per 2 MiB. A no-op where
// the kernel refuses (THP off) and off Linux; the memory and the results are
// the same either way.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace xmcnas_fast::cpu {

inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const uintptr_t bytes = static_cast<uintptr_t>(t.nbytes());
  if (bytes < 4 * kHuge) return;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1), last = (begin + bytes) & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
}

}  // namespace xmcnas_fast::cpu
