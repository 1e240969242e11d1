// Little-endian bit streams for the packed codecs (TurboQuant, QJL, PolarQuant, KVQuant):
// value i of width w occupies bits [pos, pos + w) of the byte array, LSB first.
#pragma once

#include <cstdint>
#include <cstring>

namespace kvc::kv {

class BitWriter {
 public:
  explicit BitWriter(uint8_t* p) : p_(p) {}
  void Put(uint32_t v, int w) {
    for (int i = 0; i < w; ++i, ++pos_) {
      const uint8_t bit = uint8_t((v >> i) & 1u);
      if ((pos_ & 7) == 0) p_[pos_ >> 3] = 0;
      p_[pos_ >> 3] |= uint8_t(bit << (pos_ & 7));
    }
  }
  size_t pos() const { return pos_; }
 private:
  uint8_t* p_;
  size_t pos_ = 0;
};

class BitReader {
 public:
  explicit BitReader(const uint8_t* p, size_t pos = 0) : p_(p), pos_(pos) {}
  uint32_t Get(int w) {
    // Fast path: read 8 bytes when available is not guaranteed; assemble bytewise.
    uint32_t v = 0;
    int got = 0;
    while (got < w) {
      const int off = int(pos_ & 7);
      const int take = (8 - off) < (w - got) ? (8 - off) : (w - got);
      const uint32_t bits = (uint32_t(p_[pos_ >> 3]) >> off) & ((1u << take) - 1u);
      v |= bits << got;
      got += take;
      pos_ += take;
    }
    return v;
  }
  void Skip(size_t bits) { pos_ += bits; }
  size_t pos() const { return pos_; }
 private:
  const uint8_t* p_;
  size_t pos_;
};

// Codes [0, n) of width w (1..8 bits) starting at bit 0 of p, one per byte of idx. Eight codes
// fill exactly w bytes, so groups of eight are read as one little-endian word; the rest (n mod 8)
// through BitReader. Same result as n calls of BitReader::Get(w).
inline void UnpackCodes(const uint8_t* p, int n, int w, uint8_t* idx) {
  const uint64_t mask = (uint64_t(1) << w) - 1;
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t v = 0;
    std::memcpy(&v, p + size_t(i / 8) * w, size_t(w));  // little-endian host (x86, arm64)
    for (int j = 0; j < 8; ++j) idx[i + j] = uint8_t((v >> (j * w)) & mask);
  }
  BitReader br(p, size_t(i) * w);
  for (; i < n; ++i) idx[i] = uint8_t(br.Get(w));
}

inline uint16_t LoadU16(const uint8_t* p) { uint16_t v; std::memcpy(&v, p, 2); return v; }
inline void StoreU16(uint8_t* p, uint16_t v) { std::memcpy(p, &v, 2); }

}  // namespace kvc::kv
