// A program that builds moa from source with add_subdirectory() and links moa::moa (no OpenMP).
#include <moa/moa.hpp>

#include <cstdio>
#include <string>

static_assert(__cplusplus >= 202002L, "moa::moa must give its users C++20");

int main() {
  const std::string from_macros = std::to_string(MOA_VERSION_MAJOR) + "." +
                                  std::to_string(MOA_VERSION_MINOR) + "." +
                                  std::to_string(MOA_VERSION_PATCH);
  if (moa::version() != from_macros) {
    std::fprintf(stderr, "moa::version() %s differs from the macros %s\n",
                 std::string(moa::version()).c_str(), from_macros.c_str());
    return 1;
  }
  std::printf("moa %s via add_subdirectory\n", from_macros.c_str());
  return 0;
}
