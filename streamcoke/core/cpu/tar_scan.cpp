// The header checks of streamcoke.data.tar_rows in one pass over a chunk of a shard.
//
// A shard of one feature row per sample is read as a matrix with one sample per row; before
// its rows are used, every tar header of the chunk is checked (checksum, type, size, name,
// key, the feature's .npy header). In numpy that is some twenty passes over the headers, each
// a row-wise reduction, which together cost about as much as the clustering step of the row.
// Here each sample is checked in one go. The numpy version (tar_rows._conforming_numpy)
// is the reference; the tests check that the two agree, on damaged shards too.

#include <torch/extension.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace {

constexpr int64_t kBlock = 512;

// The checksum field reads "%06o\0 " (as Python's tarfile and GNU tar write it) and matches the
// header's bytes, the field itself counted as spaces.
uint32_t byte_sum(const uint8_t* h) {  // of a 512-byte block
#if defined(__SSE2__)
  __m128i acc = _mm_setzero_si128();  // sums of absolute differences with zero: byte sums
  for (int i = 0; i < kBlock; i += 16)
    acc = _mm_add_epi64(acc, _mm_sad_epu8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i)), _mm_setzero_si128()));
  return static_cast<uint32_t>(_mm_cvtsi128_si32(acc) + _mm_extract_epi16(acc, 4) + (_mm_extract_epi16(acc, 5) << 16));
#else
  uint32_t total = 0;
  for (int i = 0; i < kBlock; ++i) total += h[i];
  return total;
#endif
}

bool checksum_ok(const uint8_t* h) {
  uint32_t total = 8 * 32 + byte_sum(h);
  for (int i = 148; i < 156; ++i) total -= h[i];
  uint32_t value = 0;
  for (int i = 148; i < 154; ++i) {
    const int d = h[i] - '0';
    if (d < 0 || d > 7) return false;
    value = value * 8 + static_cast<uint32_t>(d);
  }
  return h[154] == 0 && h[155] == ' ' && value == total;
}

// `digits` octal digits then a NUL.
bool octal(const uint8_t* f, int digits, int64_t* out) {
  int64_t v = 0;
  for (int i = 0; i < digits; ++i) {
    const int d = f[i] - '0';
    if (d < 0 || d > 7) return false;
    v = v * 8 + d;
  }
  if (f[digits] != 0) return false;
  *out = v;
  return true;
}

// A pax header whose payload is one "NN mtime=...\n" record.
bool pax_ok(const uint8_t* p, const uint8_t* data) {
  int64_t size = 0;
  if (!checksum_ok(p) || p[156] != 'x' || !octal(p + 124, 11, &size) || size < 10 || size > 99) return false;
  if (data[0] < '0' || data[0] > '9' || data[1] < '0' || data[1] > '9') return false;
  if ((data[0] - '0') * 10 + (data[1] - '0') != size) return false;
  if (std::memcmp(data + 2, " mtime=", 7) != 0) return false;
  return data[size - 1] == '\n' && data[size] == 0;
}

// KEY.<ext>, NUL-padded, the key key_len bytes of printable ASCII without a dot, not ending in
// a slash, not webdataset metadata ("__...").
bool name_ok(const uint8_t* name, int64_t key_len, const std::string& ext) {
  const int64_t e = static_cast<int64_t>(ext.size());
  if (key_len < 1 || key_len + 1 + e > 100 || name[key_len] != '.') return false;
  if (std::memcmp(name + key_len + 1, ext.data(), static_cast<size_t>(e)) != 0) return false;
  for (int64_t i = key_len + 1 + e; i < 100; ++i)
    if (name[i] != 0) return false;
  for (int64_t i = 0; i < key_len; ++i)
    if (name[i] <= 32 || name[i] >= 127 || name[i] == '.') return false;
  return name[key_len - 1] != '/' && !(name[0] == '_' && name[1] == '_');
}

}  // namespace

// Per sample (row of V, uint8 (m, stride)): whether it is a one-row sample of the layout.
// Member i starts at member_at[i] (its pax header first where pax[i]); the feature member has
// size field `size_field` and payload header `npy_header`, the others ceil(size / 512) ==
// data_blocks[i]; every member's magic is `magic`; the key (key_len bytes) is the same in every
// member of a sample and differs from the sample's before (`previous` for the first row, unless
// empty).
at::Tensor tar_rows_ok(const at::Tensor& V, const std::vector<int64_t>& member_at, const std::vector<bool>& pax,
                       const std::vector<std::string>& exts, const std::vector<int64_t>& data_blocks,
                       int64_t feature, int64_t key_len, const std::string& magic, const std::string& size_field,
                       const std::string& npy_header, const std::string& previous) {
  TORCH_CHECK(V.device().is_cpu() && V.scalar_type() == at::kByte && V.dim() == 2 && V.is_contiguous(),
              "V must be a contiguous uint8 CPU matrix");
  const int64_t m = V.size(0), stride = V.size(1), P = static_cast<int64_t>(member_at.size());
  TORCH_CHECK(static_cast<int64_t>(pax.size()) == P && static_cast<int64_t>(exts.size()) == P &&
                  static_cast<int64_t>(data_blocks.size()) == P && feature >= 0 && feature < P,
              "one entry per member");
  TORCH_CHECK(magic.size() == 8 && size_field.size() == 12, "magic: 8 bytes, size field: 12");
  TORCH_CHECK(key_len >= 1 && key_len < 100, "key_len out of range");
  for (int64_t i = 0; i < P; ++i) {
    const int64_t end = member_at[i] + (pax[i] ? 3 : 1) * kBlock +
                        (i == feature ? static_cast<int64_t>(npy_header.size()) : 0);
    TORCH_CHECK(member_at[i] >= 0 && end <= stride, "a member lies outside the sample");
  }
  const bool posix = std::memcmp(magic.data(), "ustar\0" "00", 8) == 0;
  auto out = at::zeros({m}, V.options().dtype(at::kBool));
  const uint8_t* v = V.data_ptr<uint8_t>();
  bool* ok = out.data_ptr<bool>();
  const uint8_t* before = previous.size() == static_cast<size_t>(key_len)
                              ? reinterpret_cast<const uint8_t*>(previous.data()) : nullptr;
  for (int64_t r = 0; r < m; ++r) {
    const uint8_t* s = v + r * stride;
    const uint8_t* key = nullptr;
    bool good = true;
    for (int64_t i = 0; i < P && good; ++i) {
      int64_t at = member_at[i];
      if (pax[i]) {
        good = pax_ok(s + at, s + at + kBlock);
        at += 2 * kBlock;
      }
      const uint8_t* h = s + at;
      good = good && checksum_ok(h) && (h[156] == '0' || h[156] == 0) && std::memcmp(h + 257, magic.data(), 8) == 0 &&
             (!posix || h[345] == 0) && name_ok(h, key_len, exts[i]);
      if (!good) break;
      if (i == feature) {
        good = std::memcmp(h + 124, size_field.data(), 12) == 0 &&
               std::memcmp(h + kBlock, npy_header.data(), npy_header.size()) == 0;
      } else {
        int64_t size = 0;
        good = octal(h + 124, 11, &size) && (size + kBlock - 1) / kBlock == data_blocks[i];
      }
      if (key == nullptr) key = h;
      else good = good && std::memcmp(h, key, static_cast<size_t>(key_len)) == 0;
    }
    // A key unlike the sample's before (read from its first member's name, as above).
    const int64_t name_at = member_at[0] + (pax[0] ? 2 * kBlock : 0);
    const uint8_t* prev = r > 0 ? s - stride + name_at : before;
    if (good && prev != nullptr) good = std::memcmp(s + name_at, prev, static_cast<size_t>(key_len)) != 0;
    ok[r] = good;
  }
  return out;
}
