#include "gateway/api_keys.h"

#include <openssl/crypto.h>
#include <openssl/sha.h>

namespace expertmesh::gateway {

ApiKeyChecker::ApiKeyChecker(const std::vector<std::string>& keys) {
  for (const std::string& key : keys) digests_.push_back(Hash(key));
}

ApiKeyChecker::Digest ApiKeyChecker::Hash(std::string_view text) {
  Digest d{};
  SHA256(reinterpret_cast<const unsigned char*>(text.data()), text.size(), d.data());
  return d;
}

bool ApiKeyChecker::Accepts(std::string_view presented) const {
  const Digest d = Hash(presented);
  int matched = 0;
  for (const Digest& key : digests_) {
    matched |= CRYPTO_memcmp(d.data(), key.data(), d.size()) == 0 ? 1 : 0;
  }
  return matched != 0;
}

}  // namespace expertmesh::gateway
