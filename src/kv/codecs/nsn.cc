#include "kv/codecs/nsn.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <mutex>
#include <utility>

#include "cpu/kv_kernels.h"
#include "gguf/types.h"
#include "kv/cache_internal.h"
#include "kv/calibration_file.h"
#include "kv/codecs/bitpack.h"
#include "kv/transforms/hadamard.h"
#include "util/check.h"

namespace kvc::kv {
namespace {

uint64_t SplitMix(uint64_t* s) {
  *s += 0x9E3779B97F4A7C15ull;
  uint64_t z = *s;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// n standard normal draws (Box–Muller on splitmix64 uniforms; same numbers on every platform up
// to libm's log/cos/sin rounding).
std::vector<float> GaussianSample(size_t n, uint64_t seed) {
  std::vector<float> v(n);
  uint64_t s = seed;
  for (size_t i = 0; i < n; i += 2) {
    const double u1 = (double(SplitMix(&s) >> 11) + 1.0) * 0x1.0p-53;  // (0, 1]
    const double u2 = double(SplitMix(&s) >> 11) * 0x1.0p-53;          // [0, 1)
    const double r = std::sqrt(-2.0 * std::log(u1)), a = 2.0 * M_PI * u2;
    v[i] = float(r * std::cos(a));
    if (i + 1 < n) v[i + 1] = float(r * std::sin(a));
  }
  return v;
}

// Distances ‖c_k‖² − 2 y·c_k for every k (the ‖y‖² term is common), then the first minimum.
int Nearest(const float* ct, const float* norm2, int k_n, int dim, const float* y, float* dist) {
  for (int k = 0; k < k_n; ++k) dist[k] = norm2[k];
  for (int j = 0; j < dim; ++j) {
    const float m = -2.f * y[j];
    const float* row = ct + size_t(j) * k_n;
    for (int k = 0; k < k_n; ++k) dist[k] += m * row[k];
  }
  int best = 0;
  float bd = dist[0];
  for (int k = 1; k < k_n; ++k) {
    if (dist[k] < bd) {
      bd = dist[k];
      best = k;
    }
  }
  return best;
}

struct SoA {
  std::vector<float> ct;     // [dim, entries]
  std::vector<float> norm2;  // [entries]
};
SoA MakeSoA(const std::vector<float>& c, int k_n, int dim) {
  SoA s;
  s.ct.resize(size_t(k_n) * dim);
  s.norm2.assign(k_n, 0.f);
  for (int k = 0; k < k_n; ++k) {
    for (int j = 0; j < dim; ++j) {
      s.ct[size_t(j) * k_n + k] = c[size_t(k) * dim + j];
      s.norm2[k] += c[size_t(k) * dim + j] * c[size_t(k) * dim + j];
    }
  }
  return s;
}

// Mean squared error per coordinate of quantizing x [n, dim] with c [k_n, dim]; fills assign.
double Assign(const std::vector<float>& c, int k_n, int dim, const std::vector<float>& x,
              std::vector<int>* assign) {
  const SoA s = MakeSoA(c, k_n, dim);
  const size_t n = x.size() / dim;
  std::vector<float> dist(k_n);
  double err = 0;
  if (assign) assign->resize(n);
  for (size_t i = 0; i < n; ++i) {
    const float* y = &x[i * dim];
    const int k = Nearest(s.ct.data(), s.norm2.data(), k_n, dim, y, dist.data());
    if (assign) (*assign)[i] = k;
    for (int j = 0; j < dim; ++j) {
      const double e = double(y[j]) - c[size_t(k) * dim + j];
      err += e * e;
    }
  }
  return err / double(n * dim);
}

// Lloyd steps for N(0, I_dim) with a FRESH Gaussian sample of n vectors per step (no over-fit to
// one sample: with a reused sample of 64 points per codeword a 4-D/512 codebook measured 0.063 on
// its sample and 0.072 on new data). The last `avg` steps do not reset the cell sums, so the final
// centroids are cell means over avg·n points.
void Lloyd(std::vector<float>* c, int k_n, int dim, size_t n, int iters, int avg, uint64_t seed) {
  std::vector<int> a;
  std::vector<double> sum(size_t(k_n) * dim, 0.0);
  std::vector<double> cnt(k_n, 0.0);
  for (int it = 0; it < iters; ++it) {
    const auto x = GaussianSample(n * dim, seed + 0x9E37ull * uint64_t(it + 1));
    Assign(*c, k_n, dim, x, &a);
    if (it < iters - avg || it == iters - avg) {
      std::fill(sum.begin(), sum.end(), 0.0);
      std::fill(cnt.begin(), cnt.end(), 0.0);
    }
    for (size_t i = 0; i < n; ++i) {
      cnt[a[i]] += 1;
      for (int j = 0; j < dim; ++j) sum[size_t(a[i]) * dim + j] += x[i * dim + j];
    }
    for (int k = 0; k < k_n; ++k) {
      if (cnt[k] == 0) {  // empty cell: move it onto a (deterministic) sample point
        const size_t i = (size_t(k) * 7919u + size_t(it) * 104729u) % n;
        for (int j = 0; j < dim; ++j) (*c)[size_t(k) * dim + j] = x[i * dim + j];
        continue;
      }
      for (int j = 0; j < dim; ++j) {
        (*c)[size_t(k) * dim + j] = float(sum[size_t(k) * dim + j] / cnt[k]);
      }
    }
  }
}

VqCodebook Train(int dim, int bits) {
  const int k_n = 1 << bits;
  // 32 fresh points per codeword and step (at least 32 768, at most 65 536 vectors).
  const size_t n = std::clamp<size_t>(size_t(k_n) * 32, 32768, 65536);
  const uint64_t seed = 0x6e736e5175616e74ull ^ (uint64_t(dim) << 32) ^ uint64_t(bits);
  // LBG: start from the mean, split every codeword into c ± ε·δ (δ a fixed Gaussian direction),
  // a few Lloyd steps per size, then more at the final size (half of them averaged).
  std::vector<float> c(dim, 0.f);
  const auto dirs = GaussianSample(size_t(k_n) * dim, 0x5eedull + bits);
  for (int k = 1; k < k_n; k *= 2) {
    std::vector<float> nc(size_t(2 * k) * dim);
    for (int i = 0; i < k; ++i) {
      for (int j = 0; j < dim; ++j) {
        const float e = 0.01f * dirs[size_t(i + k) * dim + j];
        nc[size_t(2 * i) * dim + j] = c[size_t(i) * dim + j] + e;
        nc[size_t(2 * i + 1) * dim + j] = c[size_t(i) * dim + j] - e;
      }
    }
    c = std::move(nc);
    const bool last = 2 * k == k_n;
    // Final size: 24 steps (12 averaged); codebooks of <= 256 entries are cheap, 80 (40).
    const int fin = k_n <= 256 ? 80 : 24;
    Lloyd(&c, 2 * k, dim, n, last ? fin : 6, last ? fin / 2 : 1, seed + uint64_t(k) * 0x1000);
  }
  VqCodebook cb;
  cb.dim = dim;
  cb.entries = k_n;
  cb.c = std::move(c);
  // "train": one more fresh sample from the training stream; "test": an unrelated seed.
  cb.train_mse = Assign(cb.c, k_n, dim, GaussianSample(n * dim, seed + 0xABCull), nullptr);
  const auto test = GaussianSample(size_t(65536) * dim, 0x7e57ull ^ (uint64_t(dim) << 20) ^ bits);
  cb.test_mse = Assign(cb.c, k_n, dim, test, nullptr);
  cb.norm2.assign(k_n, 0.f);
  for (int k = 0; k < k_n; ++k) {
    for (int j = 0; j < dim; ++j)
      cb.norm2[k] += cb.c[size_t(k) * dim + j] * cb.c[size_t(k) * dim + j];
  }
  return cb;
}

}  // namespace

namespace {

// Training is deterministic but costs seconds (11 s for the 2048-entry codebook on one core, a
// minute under ASan) in every process that builds an nsn codec, so a trained codebook is kept in
// the user's cache directory ($KVC_CACHE_DIR, else $XDG_CACHE_HOME/kvcrunch, else
// ~/.cache/kvcrunch): "KVCNSNCB", u32 version, i32 dim, bits, entries, f32 c[entries·dim],
// f64 train_mse, test_mse, u64 FNV-1a of everything before it. Anything that does not verify
// (size, header, checksum, non-finite values) is ignored and the codebook is retrained; write
// errors are ignored (the cache is an optimisation only). Bump kCacheVersion when Train changes.
constexpr uint32_t kCacheVersion = 1;

std::string CodebookCachePath(int dim, int bits) {
  std::string dir;
  if (const char* d = std::getenv("KVC_CACHE_DIR"); d && *d) {
    dir = d;
  } else if (const char* x = std::getenv("XDG_CACHE_HOME"); x && *x) {
    dir = std::string(x) + "/kvcrunch";
  } else if (const char* h = std::getenv("HOME"); h && *h) {
    dir = std::string(h) + "/.cache/kvcrunch";
  } else {
    return "";
  }
  return fmt::format("{}/nsn-codebook-d{}-b{}-v{}.bin", dir, dim, bits, kCacheVersion);
}

std::string SerializeCodebook(const VqCodebook& cb, int bits) {
  std::string b("KVCNSNCB");
  auto put = [&](const void* p, size_t n) { b.append(static_cast<const char*>(p), n); };
  const uint32_t v = kCacheVersion;
  const int32_t hdr[3] = {cb.dim, bits, cb.entries};
  put(&v, 4);
  put(hdr, sizeof(hdr));
  put(cb.c.data(), cb.c.size() * sizeof(float));
  put(&cb.train_mse, 8);
  put(&cb.test_mse, 8);
  const uint64_t h = Fnv1a64(b.data(), b.size());
  put(&h, 8);
  return b;
}

bool LoadCodebook(const std::string& path, int dim, int bits, VqCodebook* cb) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return false;
  const std::string b((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const int entries = 1 << bits;
  const size_t want = 8 + 4 + 12 + size_t(entries) * dim * sizeof(float) + 16 + 8;
  if (b.size() != want || b.compare(0, 8, "KVCNSNCB") != 0) return false;
  uint64_t h = 0;
  std::memcpy(&h, b.data() + want - 8, 8);
  if (h != Fnv1a64(b.data(), want - 8)) return false;
  uint32_t v = 0;
  int32_t hdr[3] = {0, 0, 0};
  std::memcpy(&v, b.data() + 8, 4);
  std::memcpy(hdr, b.data() + 12, sizeof(hdr));
  if (v != kCacheVersion || hdr[0] != dim || hdr[1] != bits || hdr[2] != entries) return false;
  cb->dim = dim;
  cb->entries = entries;
  cb->c.resize(size_t(entries) * dim);
  std::memcpy(cb->c.data(), b.data() + 24, cb->c.size() * sizeof(float));
  std::memcpy(&cb->train_mse, b.data() + 24 + cb->c.size() * sizeof(float), 8);
  std::memcpy(&cb->test_mse, b.data() + 32 + cb->c.size() * sizeof(float), 8);
  for (float x : cb->c) if (!std::isfinite(x)) return false;
  if (!std::isfinite(cb->train_mse) || !std::isfinite(cb->test_mse)) return false;
  cb->norm2.assign(entries, 0.f);
  for (int k = 0; k < entries; ++k) {
    for (int j = 0; j < dim; ++j) cb->norm2[k] += cb->c[size_t(k) * dim + j] * cb->c[size_t(k) * dim + j];
  }
  return true;
}

void SaveCodebook(const std::string& path, int bits, const VqCodebook& cb) {
  std::error_code ec;
  std::filesystem::create_directories(std::filesystem::path(path).parent_path(), ec);
  if (ec) return;
  const std::string tmp = fmt::format("{}.tmp.{}", path, uint64_t(::getpid()));
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) return;
    const std::string b = SerializeCodebook(cb, bits);
    out.write(b.data(), std::streamsize(b.size()));
    if (!out) { std::filesystem::remove(tmp, ec); return; }
  }
  std::filesystem::rename(tmp, path, ec);  // atomic: readers see the old file or the new one
  if (ec) std::filesystem::remove(tmp, ec);
}

}  // namespace

const VqCodebook& GaussianVqCodebook(int dim, int code_bits) {
  KVC_CHECK(dim == 1 || dim == 2 || dim == 4 || dim == 8);
  KVC_CHECK(code_bits >= 1 && code_bits <= 12);
  static std::mutex mu;
  static std::map<std::pair<int, int>, std::unique_ptr<VqCodebook>> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto& slot = cache[{dim, code_bits}];
  if (!slot) {
    const std::string path = std::getenv("KVC_NO_CODEBOOK_CACHE") ? "" : CodebookCachePath(dim, code_bits);
    auto cb = std::make_unique<VqCodebook>();
    if (path.empty() || !LoadCodebook(path, dim, code_bits, cb.get())) {
      *cb = Train(dim, code_bits);
      if (!path.empty()) SaveCodebook(path, code_bits, *cb);
    }
    slot = std::move(cb);
  }
  return *slot;
}

int NearestCodeword(const VqCodebook& cb, const float* y) {
  int best = 0;
  float bd = std::numeric_limits<float>::infinity();
  for (int k = 0; k < cb.entries; ++k) {
    float dot = 0.f;
    for (int j = 0; j < cb.dim; ++j) dot += y[j] * cb.c[size_t(k) * cb.dim + j];
    const float dk = cb.norm2[k] - 2.f * dot;
    if (dk < bd) {
      bd = dk;
      best = k;
    }
  }
  return best;
}

namespace {

class NsnCodec final : public Codec {
 public:
  NsnCodec(int d, int sub, int code_bits, bool nc, bool lut, uint64_t seed, std::string name)
      : d_(d),
        sub_(sub),
        w_(code_bits),
        n_sub_(d / sub),
        nc_(nc),
        lut_(lut),
        name_(std::move(name)),
        cb_(GaussianVqCodebook(sub, code_bits)),
        k_n_(1 << code_bits) {
    bytes_ = 2 + (size_t(n_sub_) * w_ + 7) / 8;
    code_bytes_ = bytes_ - 2;
    const SoA s = MakeSoA(cb_.c, k_n_, sub_);
    ct_ = s.ct;
    sign_.resize(d_);
    uint64_t st = seed ^ 0x6e736e5369676eull;
    for (int i = 0; i < d_; ++i) sign_[i] = (SplitMix(&st) & 1) ? -1.f : 1.f;
  }

  std::string Name() const override { return name_; }
  int dim() const override { return d_; }
  size_t BlockBytes() const override { return bytes_; }

  // y = H·S·v (orthogonal).
  void Forward(const float* v, float* y) const {
    for (int j = 0; j < d_; ++j) y[j] = sign_[j] * v[j];
    FastHadamard(y, d_);
  }
  // v = S·H·y in place (the inverse of Forward; H is symmetric).
  void Inverse(float* y) const {
    FastHadamard(y, d_);
    for (int j = 0; j < d_; ++j) y[j] *= sign_[j];
  }

  void Encode(const float* x, uint8_t* block) override {
    float y[512], dist[4096];
    double g2 = 0;
    for (int j = 0; j < d_; ++j) g2 += double(x[j]) * x[j];
    std::memset(block, 0, bytes_);
    if (!(g2 > 0)) return;  // s = 0: decodes to exactly 0
    const double gamma = std::sqrt(g2);
    Forward(x, y);
    const float sc = float(std::sqrt(double(d_)) / gamma);
    for (int j = 0; j < d_; ++j) y[j] *= sc;  // ‖y‖² = d: coordinates ≈ N(0, 1)
    BitWriter bw(block + 2);
    double yh2 = 0;
    for (int i = 0; i < n_sub_; ++i) {
      const int k = Nearest(ct_.data(), cb_.norm2.data(), k_n_, sub_, y + i * sub_, dist);
      bw.Put(uint32_t(k), w_);
      yh2 += cb_.norm2[k];
    }
    const double s = nc_ ? (yh2 > 0 ? gamma / std::sqrt(yh2) : 0.0) : gamma / std::sqrt(double(d_));
    StoreU16(block, Fp32ToFp16Sat(float(s)));
  }

  // idx [n_sub] from codes starting at p, read as 8-byte little-endian words: needs 7 readable
  // bytes past the last code byte.
  void UnpackAt(const uint8_t* p, uint16_t* idx) const {
    const uint64_t mask = (uint64_t(1) << w_) - 1;
    for (int i = 0; i < n_sub_; ++i) {
      const size_t bit = size_t(i) * w_;
      uint64_t v;
      std::memcpy(&v, p + bit / 8, 8);  // little-endian host (x86, arm64)
      idx[i] = uint16_t((v >> (bit & 7)) & mask);
    }
  }
  // idx [n_sub] from one token's codes; `tail_ok`: the 7 bytes after the block are readable (a
  // later block of the same array), else the codes go through a zero-padded copy. (Copy-then-load
  // for every token was 8x the SIMD dot in a profile: the 8-byte loads miss store forwarding.)
  void Unpack(const uint8_t* block, uint16_t* idx, bool tail_ok = false) const {
    if (tail_ok) return UnpackAt(block + 2, idx);
    uint8_t buf[768 + 8];  // d/D · w / 8 <= 512 · 12 / 8
    std::memcpy(buf, block + 2, code_bytes_);
    std::memset(buf + code_bytes_, 0, 8);
    UnpackAt(buf, idx);
  }
  float ScaleOf(const uint8_t* block) const { return gguf::Fp16ToFp32(LoadU16(block)); }

  // Rotated-domain reconstruction s·ŷ [d].
  void DecodeRotated(const uint8_t* block, float* y, bool tail_ok = false) const {
    uint16_t idx[512];
    Unpack(block, idx, tail_ok);
    const float s = ScaleOf(block);
    for (int i = 0; i < n_sub_; ++i) {
      const float* c = &cb_.c[size_t(idx[i]) * sub_];
      for (int j = 0; j < sub_; ++j) y[i * sub_ + j] = s * c[j];
    }
  }

  // m rows -> y [m, d] rotated; rows before `end` - 7 bytes read in place. Same values as
  // DecodeRotated (one product s·c per value); D is a compile-time constant in the loop.
  void DecodeRotatedRows(const uint8_t* rows, int64_t m, const uint8_t* end, float* y) const {
    switch (sub_) {
      case 1:
        return DecodeRowsD<1>(rows, m, end, y);
      case 2:
        return DecodeRowsD<2>(rows, m, end, y);
      case 4:
        return DecodeRowsD<4>(rows, m, end, y);
      default:
        return DecodeRowsD<8>(rows, m, end, y);
    }
  }
  template <int D>
  void DecodeRowsD(const uint8_t* rows, int64_t m, const uint8_t* end, float* y) const {
    const float* cb = cb_.c.data();
    const uint64_t mask = (uint64_t(1) << w_) - 1;
    const int n_sub = n_sub_, w = w_;
    uint8_t pad[768 + 8];
    for (int64_t t = 0; t < m; ++t) {
      const uint8_t* row = rows + size_t(t) * bytes_;
      const float s = ScaleOf(row);
      const uint8_t* p = row + 2;
      if (row + bytes_ + 7 > end) {
        std::memcpy(pad, p, code_bytes_);
        std::memset(pad + code_bytes_, 0, 8);
        p = pad;
      }
      float* yt = y + size_t(t) * d_;
      for (int i = 0; i < n_sub; ++i) {
        const size_t bit = size_t(i) * w;
        uint64_t v;
        std::memcpy(&v, p + bit / 8, 8);
        const float* c = cb + size_t((v >> (bit & 7)) & mask) * D;
        for (int j = 0; j < D; ++j) yt[i * D + j] = s * c[j];
      }
    }
  }

  void Decode(const uint8_t* block, float* x) const override {
    DecodeRotated(block, x);
    Inverse(x);
  }

  void PrepareQuery(const float* q, int n_q, float* qp) const override {
    for (int r = 0; r < n_q; ++r) Forward(q + size_t(r) * d_, qp + size_t(r) * d_);
  }

  // Scalar reference: s · Σ_i (q'_i · c[idx_i]) (sub-vector dots summed in order).
  void Score(const float* qp, int n_q, const uint8_t* block, float* scores) const override {
    uint16_t idx[512];
    Unpack(block, idx);
    const float s = ScaleOf(block);
    for (int r = 0; r < n_q; ++r) {
      const float* q = qp + size_t(r) * d_;
      float acc = 0.f;
      for (int i = 0; i < n_sub_; ++i) {
        const float* c = &cb_.c[size_t(idx[i]) * sub_];
        float dot = 0.f;
        for (int j = 0; j < sub_; ++j) dot += q[i * sub_ + j] * c[j];
        acc += dot;
      }
      scores[r] = s * acc;
    }
  }

  void AccumulateWeighted(const float* p, int n_q, const uint8_t* block,
                          float* out) const override {
    float x[512];
    Decode(block, x);
    for (int r = 0; r < n_q; ++r) {
      const float w = p[r];
      if (w == 0.f) continue;
      float* o = out + size_t(r) * d_;
      for (int j = 0; j < d_; ++j) o[j] += w * x[j];
    }
  }

  // Lookup-table scoring: per group of query rows, T[r][i][k] = q'_i · c_k (built with the same
  // sub-vector dot as Score), then a token costs n_sub lookups per row.
  void ScoreBlocks(const float* qp, int n_q, const uint8_t* blocks, int64_t n_blocks, float* scores,
                   int64_t ld) const override {
    if (!lut_) {  // tile path: decode s·ŷ rows into an f32 tile, SIMD dot (cpu::DotF32Rows)
      const uint8_t* end = blocks + size_t(n_blocks) * bytes_;
      cpu::ScoreViaTile(
          qp, n_q, blocks, bytes_, n_blocks, d_, scores, ld,
          [&](const uint8_t* rows, int64_t m, float* y) { DecodeRotatedRows(rows, m, end, y); });
      return;
    }
    if (n_blocks * 4 < k_n_) return Codec::ScoreBlocks(qp, n_q, blocks, n_blocks, scores, ld);
    const int rows_per = std::max(1, int((64 * 1024) / (size_t(n_sub_) * k_n_)));
    std::vector<float> lut(size_t(std::min(rows_per, n_q)) * n_sub_ * k_n_);
    std::vector<uint16_t> idx(size_t(n_blocks) * n_sub_);
    std::vector<float> sc(n_blocks);
    for (int64_t t = 0; t < n_blocks; ++t) {
      const uint8_t* b = blocks + size_t(t) * bytes_;
      Unpack(b, &idx[size_t(t) * n_sub_], t + 1 < n_blocks && bytes_ >= 7);
      sc[t] = ScaleOf(b);
    }
    for (int r0 = 0; r0 < n_q; r0 += rows_per) {
      const int nr = std::min(rows_per, n_q - r0);
      BuildLut(qp + size_t(r0) * d_, nr, lut.data());
      for (int r = 0; r < nr; ++r) {
        const float* tr = &lut[size_t(r) * n_sub_ * k_n_];
        float* o = scores + size_t(r0 + r) * ld;
        for (int64_t t = 0; t < n_blocks; ++t) {
          const uint16_t* ix = &idx[size_t(t) * n_sub_];
          float acc = 0.f;
          for (int i = 0; i < n_sub_; ++i) acc += tr[size_t(i) * k_n_ + ix[i]];
          o[t] = sc[t] * acc;
        }
      }
    }
  }

  // Codebook-domain accumulation: W[r][i][k] += p·s over the tokens, then Σ_k W c_k per
  // sub-vector and one S·H per query row.
  void AccumulateBlocks(const float* p, int64_t ld, int n_q, const uint8_t* blocks,
                        int64_t n_blocks, float* out) const override {
    if (!lut_) {  // tile path: Σ p·s·ŷ in the rotated domain (SIMD axpy), then S·H once per row
      std::vector<float> acc(size_t(n_q) * d_, 0.f);
      const uint8_t* end = blocks + size_t(n_blocks) * bytes_;
      cpu::AccumulateViaTile(
          p, ld, n_q, blocks, bytes_, n_blocks, d_, acc.data(),
          [&](const uint8_t* rows, int64_t m, float* y) { DecodeRotatedRows(rows, m, end, y); });
      for (int r = 0; r < n_q; ++r) {
        float* a = &acc[size_t(r) * d_];
        Inverse(a);
        float* o = out + size_t(r) * d_;
        for (int j = 0; j < d_; ++j) o[j] += a[j];
      }
      return;
    }
    if (n_blocks * 4 < k_n_) return Codec::AccumulateBlocks(p, ld, n_q, blocks, n_blocks, out);
    const int rows_per = std::max(1, int((64 * 1024) / (size_t(n_sub_) * k_n_)));
    std::vector<float> w(size_t(std::min(rows_per, n_q)) * n_sub_ * k_n_);
    std::vector<uint16_t> idx(size_t(n_blocks) * n_sub_);
    std::vector<float> sc(n_blocks);
    for (int64_t t = 0; t < n_blocks; ++t) {
      const uint8_t* b = blocks + size_t(t) * bytes_;
      Unpack(b, &idx[size_t(t) * n_sub_], t + 1 < n_blocks && bytes_ >= 7);
      sc[t] = ScaleOf(b);
    }
    float y[512];
    for (int r0 = 0; r0 < n_q; r0 += rows_per) {
      const int nr = std::min(rows_per, n_q - r0);
      std::fill(w.begin(), w.begin() + size_t(nr) * n_sub_ * k_n_, 0.f);
      for (int r = 0; r < nr; ++r) {
        float* wr = &w[size_t(r) * n_sub_ * k_n_];
        const float* pr = p + size_t(r0 + r) * ld;
        for (int64_t t = 0; t < n_blocks; ++t) {
          const float pw = pr[t] * sc[t];
          if (pw == 0.f) continue;
          const uint16_t* ix = &idx[size_t(t) * n_sub_];
          for (int i = 0; i < n_sub_; ++i) wr[size_t(i) * k_n_ + ix[i]] += pw;
        }
        for (int i = 0; i < n_sub_; ++i) {
          float* yi = y + i * sub_;
          for (int j = 0; j < sub_; ++j) yi[j] = 0.f;
          const float* wi = wr + size_t(i) * k_n_;
          for (int k = 0; k < k_n_; ++k) {
            if (wi[k] == 0.f) continue;
            const float* c = &cb_.c[size_t(k) * sub_];
            for (int j = 0; j < sub_; ++j) yi[j] += wi[k] * c[j];
          }
        }
        Inverse(y);
        float* o = out + size_t(r0 + r) * d_;
        for (int j = 0; j < d_; ++j) o[j] += y[j];
      }
    }
  }

  const VqCodebook& codebook() const { return cb_; }

 private:
  // lut [nr, n_sub, K]: T[r][i][k] = Σ_j q'_{i·D+j} c_k[j], same summation order as Score.
  void BuildLut(const float* qp, int nr, float* lut) const {
    for (int r = 0; r < nr; ++r) {
      const float* q = qp + size_t(r) * d_;
      for (int i = 0; i < n_sub_; ++i) {
        float* t = lut + (size_t(r) * n_sub_ + i) * k_n_;
        for (int k = 0; k < k_n_; ++k) {
          const float* c = &cb_.c[size_t(k) * sub_];
          float dot = 0.f;
          for (int j = 0; j < sub_; ++j) dot += q[i * sub_ + j] * c[j];
          t[k] = dot;
        }
      }
    }
  }

  int d_, sub_, w_, n_sub_;
  bool nc_, lut_;
  std::string name_;
  const VqCodebook& cb_;
  int k_n_;
  size_t bytes_ = 0, code_bytes_ = 0;
  std::vector<float> ct_;    // [sub, K] codewords transposed (encoder search)
  std::vector<float> sign_;  // [d] ±1
};

}  // namespace

StatusOr<std::unique_ptr<Codec>> MakeNsnCodec(const CodecSpec& spec, const CodecContext& ctx) {
  auto bits = spec.GetDouble("bits", 2.25);
  auto sub = spec.GetInt("dim", 4);
  auto nc = spec.GetBool("nc", true);
  auto lut = spec.GetBool("lut", false);
  for (const Status& s : {bits.status(), sub.status(), nc.status(), lut.status()}) {
    KVC_RETURN_IF_ERROR(s);
  }
  KVC_RETURN_IF_ERROR(spec.CheckAllUsed());
  const int D = *sub;
  if (D != 1 && D != 2 && D != 4 && D != 8) {
    return InvalidArgument(fmt::format("nsn: dim={} must be 1, 2, 4 or 8 (codebook dimension)", D));
  }
  const double cbits = *bits * D;
  if (!std::isfinite(cbits) || std::fabs(cbits - std::round(cbits)) > 1e-9 || cbits < 1 ||
      cbits > 12) {
    return InvalidArgument(fmt::format(
        "nsn: bits={} with dim={} gives {} bits per codeword; bits*dim must be an integer in "
        "[1, 12] (e.g. dim=4: bits=1.75, 2, 2.25, 2.5, 2.75, 3)",
        *bits, D, cbits));
  }
  const int d = ctx.dim;
  if (d < 8 || d > 512 || (d & (d - 1)) != 0) {
    return Unimplemented(
        fmt::format("nsn needs a power-of-2 head_dim in [8, 512] (Hadamard), got {}", d));
  }
  if (d % D != 0) {
    return Unimplemented(fmt::format("nsn: head_dim {} is not a multiple of dim={}", d, D));
  }
  std::string name = fmt::format("nsn:bits={},dim={}", *bits, D);
  if (!*nc) name += ",nc=0";
  if (*lut) name += ",lut=1";
  return std::unique_ptr<Codec>(
      new NsnCodec(d, D, int(std::lround(cbits)), *nc, *lut, ctx.seed, std::move(name)));
}

}  // namespace kvc::kv
