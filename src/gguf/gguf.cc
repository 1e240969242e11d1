// GGUF parser. Every read goes through Cursor, which checks the remaining length first; every
// failure message names the item (metadata key / tensor), the field and its byte offset.
#include "gguf/gguf.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <iterator>
#include <limits>

namespace kvc::gguf {
namespace {

constexpr uint32_t kMaxDims = 4;
constexpr uint64_t kDefaultAlignment = 32;
// Smallest possible encodings, used to reject counts that cannot fit in the remaining bytes
// before anything is allocated for them.
constexpr uint64_t kMinKvBytes = 8 + 4 + 1;  // empty key, type, 1-byte value
constexpr uint64_t kMinTensorInfoBytes =
    8 + 4 + 8 + 4 + 8;  // empty name, n_dims, ne[0], type, offset

const char* MetaTypeName(uint32_t t) {
  static constexpr const char* kNames[] = {"uint8",  "int8",    "uint16", "int16",  "uint32",
                                           "int32",  "float32", "bool",   "string", "array",
                                           "uint64", "int64",   "float64"};
  return t < std::size(kNames) ? kNames[t] : "unknown";
}

bool IsValidMetaType(uint32_t t) { return t <= static_cast<uint32_t>(MetaType::kFloat64); }

// Bytes of a fixed-size scalar type; 0 for string / array.
uint64_t ScalarBytes(MetaType t) {
  switch (t) {
    case MetaType::kUint8:
    case MetaType::kInt8:
    case MetaType::kBool:
      return 1;
    case MetaType::kUint16:
    case MetaType::kInt16:
      return 2;
    case MetaType::kUint32:
    case MetaType::kInt32:
    case MetaType::kFloat32:
      return 4;
    case MetaType::kUint64:
    case MetaType::kInt64:
    case MetaType::kFloat64:
      return 8;
    case MetaType::kString:
    case MetaType::kArray:
      return 0;
  }
  return 0;
}

bool IsIntegerType(MetaType t) {
  switch (t) {
    case MetaType::kUint8:
    case MetaType::kInt8:
    case MetaType::kUint16:
    case MetaType::kInt16:
    case MetaType::kUint32:
    case MetaType::kInt32:
    case MetaType::kUint64:
    case MetaType::kInt64:
      return true;
    default:
      return false;
  }
}

std::string Quoted(std::string_view s) {
  // Names come from the file: show at most 64 printable bytes.
  std::string out = "'";
  for (size_t i = 0; i < s.size() && i < 64; ++i) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    out += (c >= 0x20 && c < 0x7F) ? static_cast<char>(c) : '?';
  }
  if (s.size() > 64) out += "...";
  return out + "'";
}

std::string SupportedTypesList() {
  static constexpr GgmlType kOrder[] = {GgmlType::kF32,  GgmlType::kF16,  GgmlType::kBF16,
                                        GgmlType::kQ4_0, GgmlType::kQ4_1, GgmlType::kQ5_0,
                                        GgmlType::kQ5_1, GgmlType::kQ8_0, GgmlType::kQ4_K,
                                        GgmlType::kQ5_K, GgmlType::kQ6_K};
  std::string out;
  for (GgmlType type : kOrder) {
    const TypeTraits* t = GetTypeTraits(static_cast<uint32_t>(type));
    if (t == nullptr || !t->supported) continue;
    if (!out.empty()) out += ", ";
    out += t->name;
  }
  return out;
}

// Bounds-checked little-endian reader over [base, base + size).
class Cursor {
 public:
  Cursor(const uint8_t* base, size_t size) : base_(base), size_(size) {}
  size_t pos() const { return pos_; }
  size_t remaining() const { return size_ - pos_; }

  // `ctx` names the item being read (for messages); `field` the value.
  template <typename T>
  Status Read(const std::string& ctx, const char* field, T* out) {
    KVC_RETURN_IF_ERROR(Need(ctx, field, sizeof(T)));
    std::memcpy(out, base_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return Status::Ok();
  }

  Status ReadString(const std::string& ctx, const char* field, std::string* out) {
    const size_t start = pos_;
    uint64_t len = 0;
    KVC_RETURN_IF_ERROR(Read(ctx, field, &len));
    if (len > remaining()) {
      pos_ = start;
      return DataLoss(ctx + ": " + field + " at offset " + std::to_string(start) + " has length " +
                      std::to_string(len) + " but only " + std::to_string(remaining() - 8) +
                      " bytes follow (file size " + std::to_string(size_) + ")");
    }
    out->assign(reinterpret_cast<const char*>(base_ + pos_), static_cast<size_t>(len));
    pos_ += static_cast<size_t>(len);
    return Status::Ok();
  }

  Status Need(const std::string& ctx, const char* field, uint64_t n) const {
    if (n <= remaining()) return Status::Ok();
    return DataLoss(ctx + ": " + field + " at offset " + std::to_string(pos_) + " needs " +
                    std::to_string(n) + " bytes but the file ends at " + std::to_string(size_) +
                    " (truncated?)");
  }

 private:
  const uint8_t* base_;
  size_t size_;
  size_t pos_ = 0;
};

// Reads one scalar of type `t` into `v` (non-array, non-string handled here; strings too).
Status ReadScalar(Cursor& cur, const std::string& ctx, MetaType t, MetaValue* v) {
  switch (t) {
#define KVC_READ_AS(enum_name, ctype, store)                      \
  case MetaType::enum_name: {                                     \
    ctype x;                                                      \
    KVC_RETURN_IF_ERROR(cur.Read(ctx, "value (" #ctype ")", &x)); \
    v->scalar = static_cast<store>(x);                            \
    return Status::Ok();                                          \
  }
    KVC_READ_AS(kUint8, uint8_t, uint64_t)
    KVC_READ_AS(kUint16, uint16_t, uint64_t)
    KVC_READ_AS(kUint32, uint32_t, uint64_t)
    KVC_READ_AS(kUint64, uint64_t, uint64_t)
    KVC_READ_AS(kInt8, int8_t, int64_t)
    KVC_READ_AS(kInt16, int16_t, int64_t)
    KVC_READ_AS(kInt32, int32_t, int64_t)
    KVC_READ_AS(kInt64, int64_t, int64_t)
    KVC_READ_AS(kFloat32, float, double)
    KVC_READ_AS(kFloat64, double, double)
#undef KVC_READ_AS
    case MetaType::kBool: {
      uint8_t x;
      const size_t at = cur.pos();
      KVC_RETURN_IF_ERROR(cur.Read(ctx, "value (bool)", &x));
      if (x > 1) {
        return DataLoss(ctx + ": bool value at offset " + std::to_string(at) + " is " +
                        std::to_string(x) + ", expected 0 or 1");
      }
      v->scalar = x != 0;
      return Status::Ok();
    }
    case MetaType::kString: {
      std::string s;
      KVC_RETURN_IF_ERROR(cur.ReadString(ctx, "string value", &s));
      v->scalar = std::move(s);
      return Status::Ok();
    }
    case MetaType::kArray:
      break;
  }
  return Internal(ctx + ": ReadScalar called for an array");
}

Status ReadArray(Cursor& cur, const std::string& ctx, MetaValue* v) {
  const size_t type_at = cur.pos();
  uint32_t elem_type = 0;
  uint64_t len = 0;
  KVC_RETURN_IF_ERROR(cur.Read(ctx, "array element type", &elem_type));
  if (!IsValidMetaType(elem_type)) {
    return DataLoss(ctx + ": unknown array element type " + std::to_string(elem_type) +
                    " at offset " + std::to_string(type_at));
  }
  if (elem_type == static_cast<uint32_t>(MetaType::kArray)) {
    return Unimplemented(ctx + ": nested array at offset " + std::to_string(type_at) +
                         " (arrays of arrays are not read by kvcrunch)");
  }
  const size_t len_at = cur.pos();
  KVC_RETURN_IF_ERROR(cur.Read(ctx, "array length", &len));
  const MetaType et = static_cast<MetaType>(elem_type);
  v->array_type = et;
  const uint64_t min_elem = et == MetaType::kString ? 8 : ScalarBytes(et);
  if (len > cur.remaining() / min_elem) {
    return DataLoss(ctx + ": array length " + std::to_string(len) + " at offset " +
                    std::to_string(len_at) + " of " + MetaTypeName(elem_type) +
                    " cannot fit in the remaining " + std::to_string(cur.remaining()) + " bytes");
  }
  const size_t n = static_cast<size_t>(len);
  if (et == MetaType::kString) {
    v->str_array.resize(n);
    for (size_t i = 0; i < n; ++i) {
      KVC_RETURN_IF_ERROR(
          cur.ReadString(ctx + " element #" + std::to_string(i), "string", &v->str_array[i]));
    }
    return Status::Ok();
  }
  const bool is_int = IsIntegerType(et);
  v->num_array.resize(n);
  if (is_int) v->int_array.resize(n);
  MetaValue elem;
  for (size_t i = 0; i < n; ++i) {
    KVC_RETURN_IF_ERROR(ReadScalar(cur, ctx, et, &elem));
    if (const auto* u = std::get_if<uint64_t>(&elem.scalar)) {
      v->num_array[i] = static_cast<double>(*u);
      v->int_array[i] = static_cast<int64_t>(*u);  // uint64 above INT64_MAX keeps its bit pattern
    } else if (const auto* s = std::get_if<int64_t>(&elem.scalar)) {
      v->num_array[i] = static_cast<double>(*s);
      v->int_array[i] = *s;
    } else if (const auto* d = std::get_if<double>(&elem.scalar)) {
      v->num_array[i] = *d;
    } else if (const auto* b = std::get_if<bool>(&elem.scalar)) {
      v->num_array[i] = *b ? 1.0 : 0.0;
    }
  }
  return Status::Ok();
}

bool IsPowerOfTwo(uint64_t x) { return x != 0 && (x & (x - 1)) == 0; }

}  // namespace

int64_t TensorInfo::NumElements() const {
  int64_t n = 1;
  for (int64_t d : ne) n *= d;
  return ne.empty() ? 0 : n;
}

int64_t TensorInfo::NumRows() const {
  int64_t n = 1;
  for (size_t i = 1; i < ne.size(); ++i) n *= ne[i];
  return ne.empty() ? 0 : n;
}

StatusOr<std::unique_ptr<GgufFile>> GgufFile::Open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return NotFound("cannot open GGUF file '" + path + "': " + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    const std::string why = S_ISDIR(st.st_mode) ? "it is a directory" : "not a regular file";
    ::close(fd);
    return NotFound("cannot read GGUF file '" + path + "': " + why);
  }
  const size_t size = static_cast<size_t>(st.st_size);
  if (size == 0) {
    ::close(fd);
    return DataLoss(path + ": file is empty (expected GGUF magic at offset 0)");
  }
  void* map = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  const int map_errno = errno;
  ::close(fd);
  if (map == MAP_FAILED) {
    return Internal("cannot mmap '" + path + "' (" + std::to_string(size) +
                    " bytes): " + std::strerror(map_errno));
  }
  std::unique_ptr<GgufFile> file(new GgufFile());
  file->base_ = static_cast<const uint8_t*>(map);
  file->size_ = size;
  file->owns_mapping_ = true;
  const Status st_parse = file->Parse();
  if (!st_parse.ok()) return Status(st_parse.code(), path + ": " + st_parse.message());
  return file;
}

StatusOr<std::unique_ptr<GgufFile>> GgufFile::FromBuffer(const uint8_t* data, size_t size) {
  if (data == nullptr && size != 0) return InvalidArgument("GgufFile::FromBuffer: null data");
  std::unique_ptr<GgufFile> file(new GgufFile());
  file->base_ = data;
  file->size_ = size;
  KVC_RETURN_IF_ERROR(file->Parse());
  return file;
}

GgufFile::~GgufFile() {
  if (owns_mapping_ && base_ != nullptr) ::munmap(const_cast<uint8_t*>(base_), size_);
}

void GgufFile::ReleasePages(const TensorInfo& t) const {
  if (!owns_mapping_ || base_ == nullptr || t.data == nullptr) return;
  const uintptr_t page = uintptr_t(::sysconf(_SC_PAGESIZE));
  const uintptr_t begin = (uintptr_t(t.data) + page - 1) / page * page;
  const uintptr_t end = (uintptr_t(t.data) + t.n_bytes) / page * page;
  if (end > begin) ::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);
}

void GgufFile::ReleasePages() const {
  if (owns_mapping_ && base_ != nullptr) {
    ::madvise(const_cast<uint8_t*>(base_), size_, MADV_DONTNEED);
  }
}

Status GgufFile::Parse() {
  Cursor cur(base_, size_);
  const std::string header = "header";

  // --- header ---------------------------------------------------------------------------------
  uint8_t magic[4];
  if (size_ < sizeof(magic)) {
    return DataLoss("file is " + std::to_string(size_) +
                    " bytes, too short for the GGUF magic at offset 0");
  }
  KVC_RETURN_IF_ERROR(cur.Read(header, "magic", &magic));
  if (std::memcmp(magic, "GGUF", 4) != 0) {
    char hex[32];
    std::snprintf(hex, sizeof(hex), "%02x %02x %02x %02x", magic[0], magic[1], magic[2], magic[3]);
    return DataLoss(std::string("header: bad magic at offset 0: bytes ") + hex +
                    ", expected 47 47 55 46 ('GGUF'); not a GGUF file");
  }
  KVC_RETURN_IF_ERROR(cur.Read(header, "version", &version_));
  if (version_ != 2 && version_ != 3) {
    std::string hint;
    const uint32_t swapped = __builtin_bswap32(version_);
    if (swapped == 2 || swapped == 3) hint = " (looks like a big-endian GGUF, which is not read)";
    if (version_ == 1) hint = " (GGUF v1 is obsolete; re-convert the model)";
    return DataLoss("header: unsupported version " + std::to_string(version_) +
                    " at offset 4; kvcrunch reads versions 2 and 3" + hint);
  }
  uint64_t n_tensors = 0, n_kv = 0;
  KVC_RETURN_IF_ERROR(cur.Read(header, "tensor count", &n_tensors));
  KVC_RETURN_IF_ERROR(cur.Read(header, "metadata count", &n_kv));
  if (n_kv > cur.remaining() / kMinKvBytes ||
      n_tensors > (cur.remaining() - n_kv * kMinKvBytes) / kMinTensorInfoBytes) {
    return DataLoss("header: tensor count " + std::to_string(n_tensors) +
                    " (offset 8) and metadata count " + std::to_string(n_kv) +
                    " (offset 16) cannot fit in the remaining " + std::to_string(cur.remaining()) +
                    " bytes");
  }

  // --- metadata -------------------------------------------------------------------------------
  for (uint64_t i = 0; i < n_kv; ++i) {
    const size_t kv_at = cur.pos();
    std::string ctx = "metadata key #" + std::to_string(i) + " at offset " + std::to_string(kv_at);
    std::string key;
    KVC_RETURN_IF_ERROR(cur.ReadString(ctx, "key", &key));
    ctx = "metadata key #" + std::to_string(i) + " " + Quoted(key) + " at offset " +
          std::to_string(kv_at);
    const size_t type_at = cur.pos();
    uint32_t type = 0;
    KVC_RETURN_IF_ERROR(cur.Read(ctx, "value type", &type));
    if (!IsValidMetaType(type)) {
      return DataLoss(ctx + ": unknown value type " + std::to_string(type) + " (at offset " +
                      std::to_string(type_at) + ")");
    }
    MetaValue v;
    v.type = static_cast<MetaType>(type);
    if (v.type == MetaType::kArray) {
      KVC_RETURN_IF_ERROR(ReadArray(cur, ctx, &v));
    } else {
      KVC_RETURN_IF_ERROR(ReadScalar(cur, ctx, v.type, &v));
    }
    if (!meta_.emplace(key, std::move(v)).second) {
      return DataLoss(ctx + ": duplicate key (an earlier entry has the same name)");
    }
  }

  // general.alignment (uint32 per the spec; any unsigned integer is accepted).
  if (const MetaValue* a = Find("general.alignment")) {
    const auto* u = std::get_if<uint64_t>(&a->scalar);
    if (a->type == MetaType::kArray || u == nullptr) {
      return DataLoss(std::string("metadata 'general.alignment' has type ") +
                      MetaTypeName(static_cast<uint32_t>(a->type)) + ", expected uint32");
    }
    if (!IsPowerOfTwo(*u) || *u > (uint64_t{1} << 30)) {
      return DataLoss("metadata 'general.alignment' is " + std::to_string(*u) +
                      ", expected a power of two (default 32)");
    }
    alignment_ = *u;
  } else {
    alignment_ = kDefaultAlignment;
  }

  // --- tensor infos ---------------------------------------------------------------------------
  if (n_tensors > cur.remaining() / kMinTensorInfoBytes) {
    return DataLoss("header: tensor count " + std::to_string(n_tensors) +
                    " (offset 8) cannot fit in the " + std::to_string(cur.remaining()) +
                    " bytes left after the metadata at offset " + std::to_string(cur.pos()));
  }
  tensors_.reserve(static_cast<size_t>(n_tensors));
  for (uint64_t i = 0; i < n_tensors; ++i) {
    const size_t info_at = cur.pos();
    const std::string idx = "(#" + std::to_string(i) + ")";
    std::string ctx = "tensor " + idx + " at offset " + std::to_string(info_at);
    TensorInfo t;
    KVC_RETURN_IF_ERROR(cur.ReadString(ctx, "name", &t.name));
    ctx = "tensor " + Quoted(t.name) + " " + idx + " at offset " + std::to_string(info_at);
    if (tensor_index_.count(t.name) != 0) {
      return DataLoss(ctx + ": duplicate tensor name (also tensor #" +
                      std::to_string(tensor_index_.find(t.name)->second) + ")");
    }
    const size_t dims_at = cur.pos();
    uint32_t n_dims = 0;
    KVC_RETURN_IF_ERROR(cur.Read(ctx, "n_dims", &n_dims));
    if (n_dims < 1 || n_dims > kMaxDims) {
      return DataLoss(ctx + ": n_dims " + std::to_string(n_dims) + " at offset " +
                      std::to_string(dims_at) + " is outside 1..4");
    }
    int64_t n_elements = 1;
    for (uint32_t d = 0; d < n_dims; ++d) {
      const size_t ne_at = cur.pos();
      uint64_t ne = 0;
      KVC_RETURN_IF_ERROR(cur.Read(ctx, "dimension", &ne));
      const std::string where = "ne[" + std::to_string(d) + "] at offset " + std::to_string(ne_at);
      if (ne == 0 || ne > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        return DataLoss(ctx + ": " + where + " is " + std::to_string(ne) + ", expected 1..2^63-1");
      }
      if (__builtin_mul_overflow(n_elements, static_cast<int64_t>(ne), &n_elements)) {
        return DataLoss(ctx + ": " + where + " = " + std::to_string(ne) +
                        " overflows the element count (product of dims exceeds 2^63-1)");
      }
      t.ne.push_back(static_cast<int64_t>(ne));
    }
    const size_t type_at = cur.pos();
    KVC_RETURN_IF_ERROR(cur.Read(ctx, "type", &t.type_id));
    KVC_RETURN_IF_ERROR(cur.Read(ctx, "data offset", &t.offset));
    const TypeTraits* traits = GetTypeTraits(t.type_id);
    if (traits == nullptr || !traits->supported) {
      const std::string type_name =
          traits == nullptr ? "unknown type id " + std::to_string(t.type_id)
                            : std::string(traits->name) + " (" + std::to_string(t.type_id) + ")";
      return Unimplemented("tensor " + Quoted(t.name) + " " + idx + " has type " + type_name +
                           " (at offset " + std::to_string(type_at) +
                           "), which kvcrunch does not read; supported: " + SupportedTypesList());
    }
    if (t.ne[0] % traits->block_elems != 0) {
      return DataLoss(ctx + ": row length ne[0] = " + std::to_string(t.ne[0]) +
                      " is not a multiple of the " + traits->name + " block size " +
                      std::to_string(traits->block_elems));
    }
    const uint64_t n_blocks = static_cast<uint64_t>(n_elements / traits->block_elems);
    if (__builtin_mul_overflow(n_blocks, static_cast<uint64_t>(traits->block_bytes), &t.n_bytes)) {
      return DataLoss(ctx + ": byte size of " + std::to_string(n_elements) + " " + traits->name +
                      " elements overflows 64 bits");
    }
    tensor_index_.emplace(t.name, tensors_.size());
    tensors_.push_back(std::move(t));
  }

  // --- data section ---------------------------------------------------------------------------
  const uint64_t infos_end = cur.pos();
  data_offset_ =
      (infos_end + alignment_ - 1) / alignment_ * alignment_;  // no overflow: pos <= size
  for (size_t i = 0; i < tensors_.size(); ++i) {
    TensorInfo& t = tensors_[i];
    const std::string ctx = "tensor " + Quoted(t.name) + " (#" + std::to_string(i) + ")";
    if (t.offset % alignment_ != 0) {
      return DataLoss(ctx + ": data offset " + std::to_string(t.offset) +
                      " is not a multiple of the alignment " + std::to_string(alignment_));
    }
    uint64_t end = 0;
    if (__builtin_add_overflow(data_offset_, t.offset, &end) ||
        __builtin_add_overflow(end, t.n_bytes, &end) || end > size_) {
      return DataLoss(ctx + ": data [offset " + std::to_string(data_offset_) + "+" +
                      std::to_string(t.offset) + ", " + std::to_string(t.n_bytes) +
                      " bytes] exceeds file size " + std::to_string(size_));
    }
    t.data = base_ + data_offset_ + t.offset;
  }
  return Status::Ok();
}

const MetaValue* GgufFile::Find(std::string_view key) const {
  const auto it = meta_.find(std::string(key));
  return it == meta_.end() ? nullptr : &it->second;
}

const TensorInfo* GgufFile::FindTensor(std::string_view name) const {
  const auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

namespace {

Status WrongType(std::string_view key, const MetaValue& v, const char* wanted) {
  std::string have = MetaTypeName(static_cast<uint32_t>(v.type));
  if (v.type == MetaType::kArray) {
    have += std::string(" of ") + MetaTypeName(static_cast<uint32_t>(v.array_type));
  }
  return InvalidArgument("metadata key '" + std::string(key) + "' has type " + have +
                         ", expected " + wanted);
}

Status Missing(std::string_view key) {
  return NotFound("metadata key '" + std::string(key) + "' is missing");
}

}  // namespace

StatusOr<std::string> GgufFile::GetString(std::string_view key) const {
  const MetaValue* v = Find(key);
  if (v == nullptr) return Missing(key);
  if (v->type != MetaType::kString) return WrongType(key, *v, "string");
  return std::get<std::string>(v->scalar);
}

StatusOr<int64_t> GgufFile::GetInt(std::string_view key) const {
  const MetaValue* v = Find(key);
  if (v == nullptr) return Missing(key);
  if (v->type == MetaType::kArray || !IsIntegerType(v->type))
    return WrongType(key, *v, "an integer");
  if (const auto* u = std::get_if<uint64_t>(&v->scalar)) {
    if (*u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return InvalidArgument("metadata key '" + std::string(key) + "' = " + std::to_string(*u) +
                             " does not fit in int64");
    }
    return static_cast<int64_t>(*u);
  }
  return std::get<int64_t>(v->scalar);
}

StatusOr<double> GgufFile::GetFloat(std::string_view key) const {
  const MetaValue* v = Find(key);
  if (v == nullptr) return Missing(key);
  if (const auto* d = std::get_if<double>(&v->scalar);
      d != nullptr && v->type != MetaType::kArray) {
    return *d;
  }
  if (v->type == MetaType::kArray || !IsIntegerType(v->type)) return WrongType(key, *v, "a number");
  if (const auto* u = std::get_if<uint64_t>(&v->scalar)) return static_cast<double>(*u);
  return static_cast<double>(std::get<int64_t>(v->scalar));
}

StatusOr<bool> GgufFile::GetBool(std::string_view key) const {
  const MetaValue* v = Find(key);
  if (v == nullptr) return Missing(key);
  if (v->type != MetaType::kBool) return WrongType(key, *v, "bool");
  return std::get<bool>(v->scalar);
}

StatusOr<int64_t> GgufFile::GetIntOr(std::string_view key, int64_t dflt) const {
  if (Find(key) == nullptr) return dflt;
  return GetInt(key);
}

StatusOr<double> GgufFile::GetFloatOr(std::string_view key, double dflt) const {
  if (Find(key) == nullptr) return dflt;
  return GetFloat(key);
}

}  // namespace kvc::gguf
