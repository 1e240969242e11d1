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

inline uint16_t LoadU16(const uint8_t* p) { uint16_t v; std::memcpy(&v, p, 2); return v; }
inline void StoreU16(uint8_t* p, uint16_t v) { std::memcpy(p, &v, 2); }

}  // namespace kvc::kv
