#include "bits_search.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include <fmt/format.h>

namespace kvc {

namespace {

Status Validate(const BitsProblem& p) {
  const size_t nk = p.k_cost.size(), nv = p.v_cost.size();
  if (nk == 0 || nv == 0) return InvalidArgument("bits search: no K or no V candidates");
  if (p.k_loss.empty() || p.k_loss.size() != p.v_loss.size()) {
    return InvalidArgument(fmt::format("bits search: {} layers of K losses, {} of V losses",
                                       p.k_loss.size(), p.v_loss.size()));
  }
  auto bad = [](double x) { return !std::isfinite(x) || x < 0; };
  for (size_t c = 0; c < nk; ++c)
    if (bad(p.k_cost[c])) return InvalidArgument(fmt::format("bits search: K candidate {} cost {} (must be finite, >= 0)", c, p.k_cost[c]));
  for (size_t c = 0; c < nv; ++c)
    if (bad(p.v_cost[c])) return InvalidArgument(fmt::format("bits search: V candidate {} cost {} (must be finite, >= 0)", c, p.v_cost[c]));
  for (size_t l = 0; l < p.k_loss.size(); ++l) {
    if (p.k_loss[l].size() != nk || p.v_loss[l].size() != nv) {
      return InvalidArgument(fmt::format("bits search: layer {} has {} K / {} V losses for {} / {} candidates",
                                         l, p.k_loss[l].size(), p.v_loss[l].size(), nk, nv));
    }
    for (double x : p.k_loss[l])
      if (bad(x)) return InvalidArgument(fmt::format("bits search: layer {} K loss {} (must be finite, >= 0)", l, x));
    for (double x : p.v_loss[l])
      if (bad(x)) return InvalidArgument(fmt::format("bits search: layer {} V loss {} (must be finite, >= 0)", l, x));
  }
  if (!std::isfinite(p.budget) || p.budget <= 0) {
    return InvalidArgument(fmt::format("bits search: budget {} bits/value (must be finite, > 0)", p.budget));
  }
  if (p.grid < 1 || p.grid > (1 << 16)) return InvalidArgument("bits search: grid must be in [1, 65536]");
  // The DP table is n_layer × (budget · grid + 1) entries.
  if (p.budget * p.grid * double(p.k_loss.size()) > 4e8) {
    return InvalidArgument(fmt::format("bits search: budget {} × grid {} × {} layers is too large a table",
                                       p.budget, p.grid, p.k_loss.size()));
  }
  return Status::Ok();
}

}  // namespace

std::vector<std::vector<int>> ParetoPairs(const BitsProblem& p) {
  const int nk = int(p.k_cost.size()), nv = int(p.v_cost.size());
  std::vector<std::vector<int>> out(p.k_loss.size());
  for (size_t l = 0; l < p.k_loss.size(); ++l) {
    std::vector<int> idx(size_t(nk) * nv);
    for (int i = 0; i < nk * nv; ++i) idx[i] = i;
    auto cost = [&](int i) { return p.k_cost[i / nv] + p.v_cost[i % nv]; };
    auto loss = [&](int i) { return p.k_loss[l][i / nv] + p.v_loss[l][i % nv]; };
    // By cost, then loss, then index: a pair survives when its loss is strictly below that of
    // every pair before it (those cost no more; an equal-cost pair before it has loss <=).
    std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) {
      if (cost(a) != cost(b)) return cost(a) < cost(b);
      return loss(a) < loss(b);
    });
    double best = std::numeric_limits<double>::infinity();
    for (int i : idx) {
      if (loss(i) < best) {
        out[l].push_back(i);
        best = loss(i);
      }
    }
  }
  return out;
}

StatusOr<BitsChoice> SelectBits(const BitsProblem& p) {
  KVC_RETURN_IF_ERROR(Validate(p));
  const int n_layer = int(p.k_loss.size()), nv = int(p.v_cost.size());
  const auto pairs = ParetoPairs(p);
  BitsChoice ch;
  ch.pairs_total = n_layer * int(p.k_cost.size()) * nv;
  for (const auto& v : pairs) ch.pairs_kept += int(v.size());
  // Integer costs in grid units, rounded up: Σ units <= capacity implies Σ exact cost <= budget.
  // (The 1e-9 slack absorbs cost values like 0.1 that are exactly on the grid in decimal.)
  auto units = [&](int i) {
    return int64_t(std::ceil((p.k_cost[i / nv] + p.v_cost[i % nv]) * p.grid - 1e-9));
  };
  const int64_t cap = int64_t(std::floor(p.budget * p.grid + 1e-9));
  const double kInf = std::numeric_limits<double>::infinity();
  // dp[l][b]: least Σ loss of layers < l using exactly b units; from[l][b]: the pair chosen at l-1.
  std::vector<std::vector<double>> dp(n_layer + 1, std::vector<double>(cap + 1, kInf));
  std::vector<std::vector<int>> from(n_layer + 1, std::vector<int>(cap + 1, -1));
  dp[0][0] = 0;
  for (int l = 0; l < n_layer; ++l) {
    for (int i : pairs[l]) {
      const int64_t u = units(i);
      if (u > cap) continue;
      const double li = p.k_loss[l][i / nv] + p.v_loss[l][i % nv];
      for (int64_t b = 0; b + u <= cap; ++b) {
        if (dp[l][b] == kInf) continue;
        const double x = dp[l][b] + li;
        if (x < dp[l + 1][b + u]) {
          dp[l + 1][b + u] = x;
          from[l + 1][b + u] = i;
        }
      }
    }
  }
  int64_t best_b = -1;
  for (int64_t b = 0; b <= cap; ++b) {
    if (dp[n_layer][b] < kInf && (best_b < 0 || dp[n_layer][b] < dp[n_layer][best_b])) best_b = b;
  }
  if (best_b < 0) {
    double cheapest = 0;
    for (int l = 0; l < n_layer; ++l) {
      double c = kInf;
      for (int i : pairs[l]) c = std::min(c, p.k_cost[i / nv] + p.v_cost[i % nv]);
      cheapest += c;
    }
    return InvalidArgument(fmt::format("bits search: no mix of the candidates fits {} bits/value all "
                                       "in; the cheapest costs {:.4f} (add cheaper candidates or "
                                       "raise --budget)", p.budget, cheapest));
  }
  ch.k.assign(n_layer, 0);
  ch.v.assign(n_layer, 0);
  for (int l = n_layer, b = int(best_b); l > 0; --l) {
    const int i = from[l][b];
    ch.k[l - 1] = i / nv;
    ch.v[l - 1] = i % nv;
    ch.cost += p.k_cost[i / nv] + p.v_cost[i % nv];
    ch.loss += p.k_loss[l - 1][i / nv] + p.v_loss[l - 1][i % nv];
    b -= int(units(i));
  }
  return ch;
}

}  // namespace kvc
