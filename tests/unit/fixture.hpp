// Reads the text fixtures under tests/fixtures (written by the committed gen_*.py scripts):
// one record per line, `name n v1 ... vn`; lines starting with '#' are comments.
#pragma once

#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "moa/core/error.hpp"

#ifndef MOA_TEST_FIXTURES
#define MOA_TEST_FIXTURES "tests/fixtures"
#endif

namespace moa::test {

class Fixture {
 public:
  explicit Fixture(const std::string& file) {
    const std::string path = std::string(MOA_TEST_FIXTURES) + "/" + file;
    std::ifstream in(path);
    MOA_CHECK(in.good(), IOError, "fixture: cannot open ", path);
    std::string line;
    while (std::getline(in, line)) {
      if (line.empty() || line[0] == '#') continue;
      std::istringstream ls(line);
      std::string name;
      std::size_t n = 0;
      ls >> name >> n;
      std::vector<double> v(n);
      for (auto& x : v) ls >> x;
      MOA_CHECK(!ls.fail(), IOError, "fixture: malformed record ", name, " in ", path);
      records_[name] = std::move(v);
    }
  }
  const std::vector<double>& operator[](const std::string& name) const {
    auto it = records_.find(name);
    MOA_CHECK(it != records_.end(), IOError, "fixture: no record named ", name);
    return it->second;
  }

 private:
  std::map<std::string, std::vector<double>> records_;
};

}  // namespace moa::test
