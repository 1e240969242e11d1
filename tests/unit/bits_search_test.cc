// calibrate --method bits, selection step (tools/cli/lib/bits_search.h): the budget is never
// exceeded, small instances are solved optimally (checked against brute force), dominated (K, V)
// pairs are pruned, and bad input is refused. Plus the --candidates parser.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>

#include "../../tools/cli/lib/bits_search.h"
#include "../../tools/cli/lib/calibrate_bits.h"

namespace kvc {
namespace {

// Least loss over every assignment with Σ cost <= budget (exponential; tiny instances only).
double BruteForce(const BitsProblem& p, double* best_cost) {
  const int L = int(p.k_loss.size()), nk = int(p.k_cost.size()), nv = int(p.v_cost.size());
  const int per = nk * nv;
  int64_t total = 1;
  for (int l = 0; l < L; ++l) total *= per;
  double best = std::numeric_limits<double>::infinity();
  for (int64_t code = 0; code < total; ++code) {
    int64_t x = code;
    double cost = 0, loss = 0;
    for (int l = 0; l < L; ++l) {
      const int i = int(x % per);
      x /= per;
      cost += p.k_cost[i / nv] + p.v_cost[i % nv];
      loss += p.k_loss[l][i / nv] + p.v_loss[l][i % nv];
    }
    if (cost <= p.budget && loss < best) {
      best = loss;
      *best_cost = cost;
    }
  }
  return best;
}

BitsProblem Random(std::mt19937& rng, int L, int nk, int nv) {
  std::uniform_real_distribution<double> u(0, 1);
  BitsProblem p;
  // Costs like the real ones: a layer's K or V at b bits contributes b / (2 L) bits per value.
  for (int c = 0; c < nk; ++c) p.k_cost.push_back((1.0 + 7.0 * u(rng)) / (2 * L));
  for (int c = 0; c < nv; ++c) p.v_cost.push_back((1.0 + 7.0 * u(rng)) / (2 * L));
  p.k_loss.assign(L, std::vector<double>(nk));
  p.v_loss.assign(L, std::vector<double>(nv));
  for (int l = 0; l < L; ++l) {
    for (auto& x : p.k_loss[l]) x = 0.01 * u(rng);
    for (auto& x : p.v_loss[l]) x = 0.01 * u(rng);
  }
  p.budget = 2.0 + 4.0 * u(rng);
  return p;
}

TEST(BitsSearch, KnownInstanceSolvedOptimally) {
  // Two layers; K: 2 or 4 bits, V: 2 or 4 bits (cost = bits / (2 · 2 layers) per value).
  // Layer 0's keys lose a lot at 2 bits, layer 1's values do; budget 3 b/v = two "upgrades" of
  // the four. The optimum upgrades exactly layer 0 K and layer 1 V.
  BitsProblem p;
  p.k_cost = {2.0 / 4, 4.0 / 4};
  p.v_cost = {2.0 / 4, 4.0 / 4};
  p.k_loss = {{0.50, 0.01}, {0.05, 0.01}};
  p.v_loss = {{0.04, 0.01}, {0.40, 0.02}};
  p.budget = 3.0;
  auto r = SelectBits(p);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->k, (std::vector<int>{1, 0}));
  EXPECT_EQ(r->v, (std::vector<int>{0, 1}));
  EXPECT_DOUBLE_EQ(r->cost, 3.0);
  EXPECT_NEAR(r->loss, 0.01 + 0.04 + 0.05 + 0.02, 1e-12);
  // One upgrade less: only layer 0's keys (the larger gain) get it.
  p.budget = 2.5;
  r = SelectBits(p);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->k, (std::vector<int>{1, 0}));
  EXPECT_EQ(r->v, (std::vector<int>{0, 0}));
  EXPECT_LE(r->cost, 2.5);
}

TEST(BitsSearch, MatchesBruteForceAndNeverExceedsBudget) {
  std::mt19937 rng(7);
  int feasible = 0;
  for (int trial = 0; trial < 200; ++trial) {
    BitsProblem p = Random(rng, 1 + trial % 4, 1 + trial % 3, 1 + (trial / 3) % 3);
    double bf_cost = 0;
    const double bf = BruteForce(p, &bf_cost);
    auto r = SelectBits(p);
    if (!std::isfinite(bf)) {
      EXPECT_FALSE(r.ok()) << trial;
      continue;
    }
    ++feasible;
    ASSERT_TRUE(r.ok()) << trial << ": " << r.status().ToString();
    EXPECT_LE(r->cost, p.budget) << trial;
    // Recompute the choice's cost and loss from the indices.
    double cost = 0, loss = 0;
    for (size_t l = 0; l < p.k_loss.size(); ++l) {
      cost += p.k_cost[r->k[l]] + p.v_cost[r->v[l]];
      loss += p.k_loss[l][r->k[l]] + p.v_loss[l][r->v[l]];
    }
    EXPECT_NEAR(cost, r->cost, 1e-12);
    EXPECT_NEAR(loss, r->loss, 1e-12);
    EXPECT_LE(cost, p.budget) << trial;
    // Optimal, but for mixes within n_layer / grid bits of the budget (rounding up to the grid).
    if (bf_cost <= p.budget - double(p.k_loss.size()) / p.grid) {
      EXPECT_NEAR(r->loss, bf, 1e-12) << trial;
    } else {
      EXPECT_GE(r->loss, bf - 1e-12) << trial;
    }
  }
  EXPECT_GT(feasible, 100);
}

TEST(BitsSearch, BudgetNeverExceededOnRealSizedInstances) {
  std::mt19937 rng(11);
  for (int trial = 0; trial < 10; ++trial) {
    BitsProblem p = Random(rng, 30, 7, 7);
    p.budget = 2.5 + 0.25 * trial;
    auto r = SelectBits(p);
    if (!r.ok()) continue;
    EXPECT_LE(r->cost, p.budget) << trial;
    EXPECT_EQ(r->k.size(), 30u);
  }
}

TEST(BitsSearch, DominatedPairsPruned) {
  BitsProblem p;
  p.k_cost = {0.1, 0.2, 0.3};
  p.v_cost = {0.1, 0.2};
  // K candidate 2 costs most and loses more than candidate 1: every pair with it is dominated.
  p.k_loss = {{0.3, 0.1, 0.2}};
  p.v_loss = {{0.05, 0.05}};  // V candidate 1 costs more for the same loss: dominated too
  p.budget = 1;
  const auto pairs = ParetoPairs(p);
  ASSERT_EQ(pairs.size(), 1u);
  // Pair index = k * n_v + v; kept: (0,0) cost 0.2 loss 0.35, (1,0) cost 0.3 loss 0.15.
  EXPECT_EQ(pairs[0], (std::vector<int>{0, 2}));
  auto r = SelectBits(p);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->pairs_total, 6);
  EXPECT_EQ(r->pairs_kept, 2);
  EXPECT_EQ(r->k[0], 1);
  EXPECT_EQ(r->v[0], 0);
  // Each kept pair beats every cheaper one: loss falls strictly along the cost order.
  std::mt19937 rng(3);
  BitsProblem q = Random(rng, 5, 7, 7);
  for (const auto& lay : ParetoPairs(q)) {
    for (size_t i = 1; i < lay.size(); ++i) {
      const int a = lay[i - 1], b = lay[i];
      EXPECT_LE(q.k_cost[a / 7] + q.v_cost[a % 7], q.k_cost[b / 7] + q.v_cost[b % 7]);
    }
  }
}

TEST(BitsSearch, BadInput) {
  BitsProblem ok;
  ok.k_cost = {0.1, 0.2};
  ok.v_cost = {0.1};
  ok.k_loss = {{0.2, 0.1}};
  ok.v_loss = {{0.0}};
  ok.budget = 0.3;
  ASSERT_TRUE(SelectBits(ok).ok());
  auto expect_bad = [](BitsProblem p, const char* what) {
    auto r = SelectBits(p);
    EXPECT_FALSE(r.ok()) << what;
    if (!r.ok()) EXPECT_FALSE(r.status().message().empty()) << what;
  };
  BitsProblem p = ok;
  p.k_loss[0][1] = std::nan("");
  expect_bad(p, "NaN loss");
  p = ok;
  p.v_loss[0][0] = -1;
  expect_bad(p, "negative loss");
  p = ok;
  p.k_cost[0] = std::numeric_limits<double>::infinity();
  expect_bad(p, "inf cost");
  p = ok;
  p.k_loss[0].pop_back();
  expect_bad(p, "row shorter than the candidates");
  p = ok;
  p.v_loss.push_back({0.0});
  expect_bad(p, "layer counts differ");
  p = ok;
  p.k_cost.clear();
  p.k_loss[0].clear();
  expect_bad(p, "no K candidates");
  p = ok;
  p.budget = std::nan("");
  expect_bad(p, "NaN budget");
  p = ok;
  p.budget = 0.15;  // the cheapest mix costs 0.2
  auto r = SelectBits(p);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(std::string(r.status().message()).find("0.2000"), std::string::npos) << r.status().message();
}

TEST(BitsSearch, CandidateList) {
  std::vector<std::string> k = DefaultBitsCandidates(true), v = DefaultBitsCandidates(false);
  ASSERT_TRUE(ParseBitsCandidates("k=turbo:bits=3,nc=1,center=1;q8_0", &k, &v).ok());
  EXPECT_EQ(k, (std::vector<std::string>{"turbo:bits=3,nc=1,center=1", "q8_0"}));
  EXPECT_EQ(v, DefaultBitsCandidates(false));  // untouched
  ASSERT_TRUE(ParseBitsCandidates("v=turbo:bits=2,nc=1 k=q8_0", &k, &v).ok());
  EXPECT_EQ(k, (std::vector<std::string>{"q8_0"}));
  EXPECT_EQ(v, (std::vector<std::string>{"turbo:bits=2,nc=1"}));
  for (const char* bad : {"", "q8_0", "k=", "k=q8_0;", "k=q8_0;q8_0", "x=q8_0", "k=;q8_0"}) {
    EXPECT_FALSE(ParseBitsCandidates(bad, &k, &v).ok()) << bad;
  }
}

}  // namespace
}  // namespace kvc
