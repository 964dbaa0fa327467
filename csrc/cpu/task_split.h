// How the CPU kernels share their tasks out among threads.
#pragma once

#include <cstdint>
#include <vector>

namespace xmcnas_fast::cpu {

// Task boundaries (parts+1 entries) splitting the tasks, of the given costs, into `parts` consecutive
// ranges of about equal cost.
inline std::vector<int64_t> balanced_split(const std::vector<double>& cost, int64_t parts) {
  const int64_t n = static_cast<int64_t>(cost.size());
  double total = 0;
  for (double c : cost) total += c;
  std::vector<int64_t> bounds{0};
  double acc = 0;
  int64_t i = 0;
  for (int64_t p = 1; p < parts; ++p) {
    const double target = total * static_cast<double>(p) / static_cast<double>(parts);
    while (i < n && acc + cost[i] / 2 < target) acc += cost[i++];
    bounds.push_back(i);
  }
  bounds.push_back(n);
  return bounds;
}

}  // namespace xmcnas_fast::cpu
