#include "kv/calibration_file.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>

#include <fmt/format.h>

namespace kvc::kv {

namespace {

constexpr char kMagic[8] = {'K', 'V', 'C', 'C', 'A', 'L', 'I', 'B'};
constexpr size_t kHeaderBytes = 32;

void PutU32(std::string& s, uint32_t v) { s.append(reinterpret_cast<const char*>(&v), 4); }
void PutU64(std::string& s, uint64_t v) { s.append(reinterpret_cast<const char*>(&v), 8); }
void PutStr(std::string& s, const std::string& x) {
  PutU32(s, uint32_t(x.size()));
  s.append(x);
}

// Bounds-checked reader over the payload.
struct Reader {
  const char* p;
  size_t n, off = 0;
  bool Take(void* dst, size_t k) {
    if (k > n - off) return false;
    std::memcpy(dst, p + off, k);
    off += k;
    return true;
  }
  bool U32(uint32_t* v) { return Take(v, 4); }
  bool Str(std::string* s) {
    uint32_t len;
    if (!U32(&len) || len > n - off) return false;
    s->assign(p + off, len);
    off += len;
    return true;
  }
};

}  // namespace

uint64_t Fnv1a64(const void* data, size_t n, uint64_t h) {
  const auto* b = static_cast<const uint8_t*>(data);
  for (size_t i = 0; i < n; ++i) {
    h ^= b[i];
    h *= 0x100000001b3ull;
  }
  return h;
}

const CalibrationFile::Tensor* CalibrationFile::Find(const std::string& name) const {
  auto it = tensors.find(name);
  return it == tensors.end() ? nullptr : &it->second;
}

StatusOr<const CalibrationFile::Tensor*> CalibrationFile::Get(const std::string& name,
                                                              int64_t n_elements) const {
  const Tensor* t = Find(name);
  if (!t) {
    return NotFound(fmt::format("calibration file (source '{}') has no tensor '{}'; re-run "
                                "`kvcrunch calibrate`", MetaOr("source", "?"), name));
  }
  if (int64_t(t->data.size()) != n_elements) {
    return NotFound(fmt::format("calibration tensor '{}' has {} values, expected {}", name,
                                t->data.size(), n_elements));
  }
  return t;
}

std::string CalibrationFile::MetaOr(const std::string& key, const std::string& dflt) const {
  auto it = meta.find(key);
  return it == meta.end() ? dflt : it->second;
}

Status WriteCalibrationFile(const std::string& path, const CalibrationFile& f) {
  std::string payload;
  PutU32(payload, uint32_t(f.meta.size()));
  for (const auto& [k, v] : f.meta) {
    PutStr(payload, k);
    PutStr(payload, v);
  }
  PutU32(payload, uint32_t(f.tensors.size()));
  for (const auto& [name, t] : f.tensors) {
    int64_t prod = 1;
    for (int64_t d : t.dims) prod *= d;
    if (t.dims.empty() || t.dims.size() > 4 || prod != int64_t(t.data.size())) {
      return InvalidArgument(fmt::format("calibration tensor '{}': dims do not match data", name));
    }
    PutStr(payload, name);
    PutU32(payload, uint32_t(t.dims.size()));
    for (int64_t d : t.dims) PutU64(payload, uint64_t(d));
    payload.append(reinterpret_cast<const char*>(t.data.data()), t.data.size() * sizeof(float));
  }
  std::string head(kMagic, 8);
  PutU32(head, CalibrationFile::kVersion);
  PutU32(head, 0);
  PutU64(head, payload.size());
  PutU64(head, Fnv1a64(payload.data(), payload.size()));
  const std::string tmp = fmt::format("{}.tmp.{}", path, getpid());
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) return NotFound(fmt::format("cannot create '{}' (directory missing?)", tmp));
    out.write(head.data(), std::streamsize(head.size()));
    out.write(payload.data(), std::streamsize(payload.size()));
    out.flush();
    if (!out) {
      std::remove(tmp.c_str());
      return Internal(fmt::format("writing '{}' failed (disk full?)", tmp));
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    return Internal(fmt::format("cannot rename '{}' to '{}': {}", tmp, path, std::strerror(errno)));
  }
  return Status::Ok();
}

StatusOr<CalibrationFile> ReadCalibrationFile(const std::string& path) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) {
    return InvalidArgument(fmt::format("calibration file '{}' is a directory", path));
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) return NotFound(fmt::format("calibration file '{}' not found", path));
  const std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return ParseCalibrationFile(all, path);
}

StatusOr<CalibrationFile> ParseCalibrationFile(const std::string& all, const std::string& path) {
  if (all.size() < kHeaderBytes || std::memcmp(all.data(), kMagic, 8) != 0) {
    return DataLoss(fmt::format("'{}' is not a kvcrunch calibration file (bad magic or too short)",
                                path));
  }
  uint32_t version;
  uint64_t payload_bytes, checksum;
  std::memcpy(&version, all.data() + 8, 4);
  std::memcpy(&payload_bytes, all.data() + 16, 8);
  std::memcpy(&checksum, all.data() + 24, 8);
  if (version != CalibrationFile::kVersion) {
    return Unimplemented(fmt::format("calibration file '{}' has version {}, this build reads "
                                     "version {}; re-run `kvcrunch calibrate`", path, version,
                                     CalibrationFile::kVersion));
  }
  const size_t have = all.size() - kHeaderBytes;
  if (payload_bytes > have) {
    return DataLoss(fmt::format("calibration file '{}' is truncated: payload {} bytes, file has {}",
                                path, payload_bytes, have));
  }
  if (payload_bytes < have) {
    return DataLoss(fmt::format("calibration file '{}' has {} trailing bytes", path,
                                have - payload_bytes));
  }
  const char* p = all.data() + kHeaderBytes;
  if (Fnv1a64(p, payload_bytes) != checksum) {
    return DataLoss(fmt::format("calibration file '{}' is corrupt (checksum mismatch)", path));
  }
  CalibrationFile f;
  Reader r{p, size_t(payload_bytes)};
  auto bad = [&](const char* what) {
    return DataLoss(fmt::format("calibration file '{}': malformed {} at payload offset {}", path,
                                what, r.off));
  };
  uint32_t n_meta, n_tensor;
  if (!r.U32(&n_meta)) return bad("metadata count");
  for (uint32_t i = 0; i < n_meta; ++i) {
    std::string k, v;
    if (!r.Str(&k) || !r.Str(&v)) return bad("metadata entry");
    f.meta[k] = v;
  }
  if (!r.U32(&n_tensor)) return bad("tensor count");
  for (uint32_t i = 0; i < n_tensor; ++i) {
    std::string name;
    uint32_t ndim;
    if (!r.Str(&name) || !r.U32(&ndim) || ndim == 0 || ndim > 4) return bad("tensor header");
    CalibrationFile::Tensor t;
    uint64_t prod = 1;
    for (uint32_t d = 0; d < ndim; ++d) {
      uint64_t v;
      if (!r.Take(&v, 8) || v == 0 || v > (uint64_t(1) << 32)) return bad("tensor dims");
      prod *= v;
      if (prod > payload_bytes) return bad("tensor dims");
      t.dims.push_back(int64_t(v));
    }
    t.data.resize(prod);
    if (!r.Take(t.data.data(), prod * sizeof(float))) return bad("tensor data");
    f.tensors[name] = std::move(t);
  }
  if (r.off != r.n) return bad("trailing payload");
  return f;
}

StatusOr<std::shared_ptr<const CalibrationFile>> LoadCalibrationFileShared(const std::string& path) {
  static std::mutex mu;
  static std::map<std::string, std::shared_ptr<const CalibrationFile>> cache;
  struct stat st;
  if (stat(path.c_str(), &st) != 0) {
    return NotFound(fmt::format("calibration file '{}' not found (create it with `kvcrunch "
                                "calibrate`)", path));
  }
  const std::string key =
      fmt::format("{}|{}|{}.{}", path, st.st_size, st.st_mtim.tv_sec, st.st_mtim.tv_nsec);
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  auto f = ReadCalibrationFile(path);
  if (!f.ok()) return f.status();
  auto sp = std::make_shared<const CalibrationFile>(std::move(f).value());
  cache[key] = sp;
  return sp;
}

}  // namespace kvc::kv
