// API-key checks in constant time: the presented key and every configured key are hashed with
// SHA-256 and the digests compared with OpenSSL's CRYPTO_memcmp, all keys every time, so the
// time taken says nothing about how much of a key was right, nor which key matched.
#pragma once

#include <array>
#include <string>
#include <string_view>
#include <vector>

namespace expertmesh::gateway {

class ApiKeyChecker {
 public:
  explicit ApiKeyChecker(const std::vector<std::string>& keys);
  bool empty() const { return digests_.empty(); }
  bool Accepts(std::string_view presented) const;

 private:
  using Digest = std::array<unsigned char, 32>;
  static Digest Hash(std::string_view text);
  std::vector<Digest> digests_;
};

}  // namespace expertmesh::gateway
