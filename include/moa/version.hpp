// moa's version: the MOA_VERSION_* macros and moa::version().
// Keep these numbers equal to project(moa VERSION ...) in CMakeLists.txt; configuring moa checks
// that they agree (cmake/moaInstall.cmake), and the installed package reports the same version.
#pragma once

#include <string_view>

#define MOA_VERSION_MAJOR 0
#define MOA_VERSION_MINOR 1
#define MOA_VERSION_PATCH 0

// One number for preprocessor comparisons: 10000 * major + 100 * minor + patch (0.1.0 -> 100).
#define MOA_VERSION (MOA_VERSION_MAJOR * 10000 + MOA_VERSION_MINOR * 100 + MOA_VERSION_PATCH)

// "MAJOR.MINOR.PATCH", spelled from the three macros above so that it cannot drift from them.
#define MOA_DETAIL_STRINGIFY_IMPL(x) #x
#define MOA_DETAIL_STRINGIFY(x) MOA_DETAIL_STRINGIFY_IMPL(x)
#define MOA_VERSION_STRING                                                                         \
  MOA_DETAIL_STRINGIFY(MOA_VERSION_MAJOR)                                                          \
  "." MOA_DETAIL_STRINGIFY(MOA_VERSION_MINOR) "." MOA_DETAIL_STRINGIFY(MOA_VERSION_PATCH)

namespace moa {

// The version of the moa headers in use, e.g. "0.1.0".
[[nodiscard]] constexpr std::string_view version() noexcept { return MOA_VERSION_STRING; }

}  // namespace moa
