// Large outputs of the attention head's CPU kernels, recycled. A [B, L, Dv]
// buffer (43 MB at 40 x 4,190 x 64) is made on every call: from the default
// allocator it comes from mmap, and the kernel faults in and zeroes each of
// its pages before the first write, which cost more than the kernel's own
// arithmetic at short texts on the machine this was tuned on. Here such a
// buffer is 2 MiB-aligned, asks for transparent huge pages (one fault per
// 2 MiB where THP is in "madvise" mode, the usual default), and when its
// tensor dies it goes back to a small cache (at most kCachedBuffers buffers,
// kCachedBytes in all) from which the next call of the same size takes it:
// in a training loop the same few buffers serve every step, already mapped.
// Tensors under kMinBytes come from at::empty as usual. Off Linux, plain
// at::empty.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>

#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace xmcnas_fast::cpu {

class BufferCache {
 public:
  static constexpr size_t kHuge = size_t(1) << 21;
  static constexpr size_t kMinBytes = size_t(8) << 20;
  static constexpr size_t kCachedBuffers = 4;
  static constexpr size_t kCachedBytes = size_t(1) << 30;

  static BufferCache& get() {
    static BufferCache* cache = new BufferCache();  // never destroyed: tensors may die after static destructors
    return *cache;
  }

  // A buffer of at least `bytes` (rounded up to 2 MiB): a cached one of that size, or a new one.
  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (size_t i = 0; i < free_.size(); ++i)
        if (free_[i].second == bytes) {
          void* p = free_[i].first;
          cached_ -= bytes;
          free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(i));
          return p;
        }
    }
    void* p = std::aligned_alloc(kHuge, bytes);
#if defined(MADV_HUGEPAGE)
    if (p != nullptr) madvise(p, bytes, MADV_HUGEPAGE);
#endif
    return p;
  }

  // Back to the cache; the oldest buffers are freed past the limits.
  void give(void* p, size_t bytes) {
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      free_.emplace_back(p, bytes);
      cached_ += bytes;
      while (!free_.empty() && (free_.size() > kCachedBuffers || cached_ > kCachedBytes)) {
        drop.push_back(free_.front().first);
        cached_ -= free_.front().second;
        free_.erase(free_.begin());
      }
    }
    for (void* d : drop) std::free(d);
  }

 private:
  std::mutex mu_;
  std::vector<std::pair<void*, size_t>> free_;
  size_t cached_ = 0;
};

// at::empty(sizes, options) for a CPU output; large ones from BufferCache (contents undefined either way).
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
#if defined(__linux__)
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t bytes = static_cast<size_t>(numel) * options.dtype().itemsize();
  if (bytes >= BufferCache::kMinBytes) {
    const size_t rounded = (bytes + BufferCache::kHuge - 1) / BufferCache::kHuge * BufferCache::kHuge;
    void* p = BufferCache::get().take(rounded);
    if (p != nullptr)
      return at::from_blob(p, sizes, [rounded](void* q) { BufferCache::get().give(q, rounded); }, options);
  }
#endif
  return at::empty(sizes, options);
}

}  // namespace xmcnas_fast::cpu
