// A group of consecutive small bags of the posterior op, run by a team as a
// GPU warp would run it (bench/cuda_variants.cu's variant 3, a candidate for
// the shipped small-bag kernel): the team stages the group's logits (one
// contiguous range) in a shared buffer with strided, hence coalesced, loads;
// member r runs bag b0 + r alone from there, its workspace in a local array;
// phi goes to a second buffer that the team stores back strided. A group whose
// range does not fit reads and writes global memory directly.
//
// Bags this runner does not own (is_group_bag false: workspace over kLocal or
// a wide band) are skipped, and their stretch of phi receives whatever the
// output buffer holds: a kernel that runs after it on the same stream (the
// thread-per-bag or block kernel) writes them. The C++ test runs this with host
// thread teams of 1..32 against posterior_bag, bit for bit.
#pragma once

#include "posterior_bag.h"

namespace mlellp {
namespace detail {

// Workspace entries a member keeps to itself: bags of n <= 12 need <= 129.
constexpr int64_t kGroupLocal = 160;

MLELLP_HD bool is_group_bag(int64_t n, int64_t y, int64_t wide_from) {
  return posterior_workspace(n, y, y) <= kGroupLocal && Band{n, y, y}.width() < wide_from;
}

// Bags [b0, b1) (b1 - b0 <= team.size()). stage: 2 * cap entries shared by the
// team. Every member calls it.
template <typename Team, typename T>
MLELLP_HD void posterior_group(const Team& team, const T* z, const int64_t* off, const int64_t* cnt, int64_t b0,
                               int64_t b1, int64_t wide_from, T* stage, int64_t cap, T* phi, T* log_lik) {
  const int64_t start = off[b0], len = off[b1] - start;
  const bool staged = len <= cap;
  T* in = stage;
  T* out = stage + cap;
  if (staged) {
    for (int64_t i = team.rank(); i < len; i += team.size()) in[i] = z[start + i];
    team.sync();
  }
  const int64_t b = b0 + team.rank();
  if (b < b1) {
    const int64_t at = off[b], n = off[b + 1] - at, y = cnt[b];
    if (is_group_bag(n, y, wide_from)) {
      T ws[kGroupLocal];
      const T* zb = staged ? in + (at - start) : z + at;
      T* pb = staged ? out + (at - start) : phi + at;
      posterior_bag(SoloTeam(), zb, n, y, y, pb, log_lik + b, ws);
    }
  }
  if (staged) {
    team.sync();
    for (int64_t i = team.rank(); i < len; i += team.size()) phi[start + i] = out[i];
    team.sync();  // the buffers are reused by the next group
  }
}

}  // namespace detail
}  // namespace mlellp
