# moa's install rules and exported CMake package (included from the top-level CMakeLists.txt).
#
# Installs the headers (include/moa) and a relocatable package in ${MOA_INSTALL_CMAKEDIR}:
#   moaConfig.cmake, moaConfigVersion.cmake   find_package(moa 0.1 [COMPONENTS openmp cuda])
#   moaTargets.cmake                          moa::moa     always; needs nothing but the headers
#   moaOpenmpTargets.cmake                    moa::openmp  needs OpenMP (CXX)
#   moaCudaTargets.cmake                      moa::cuda    needs the CUDA toolkit; only installed
#                                                          when the build found it
# One export set per component, so that loading the core targets never requires OpenMP or CUDA.

# The version header and project(VERSION) must agree: the package's version file is written from
# PROJECT_VERSION, while users' code sees MOA_VERSION_*.
file(STRINGS ${PROJECT_SOURCE_DIR}/include/moa/version.hpp _moa_version_lines
     REGEX "^#define MOA_VERSION_(MAJOR|MINOR|PATCH) +[0-9]+$")
set(_moa_header_version "")
foreach(_moa_part MAJOR MINOR PATCH)
  set(_moa_number "?")
  foreach(_moa_line IN LISTS _moa_version_lines)
    if(_moa_line MATCHES "^#define MOA_VERSION_${_moa_part} +([0-9]+)$")
      set(_moa_number ${CMAKE_MATCH_1})
    endif()
  endforeach()
  string(APPEND _moa_header_version ".${_moa_number}")
endforeach()
string(SUBSTRING "${_moa_header_version}" 1 -1 _moa_header_version)
if(NOT _moa_header_version STREQUAL PROJECT_VERSION)
  message(FATAL_ERROR "include/moa/version.hpp says ${_moa_header_version} but project(moa VERSION) "
                      "says ${PROJECT_VERSION}: update the MOA_VERSION_* macros or the project version")
endif()

if(NOT MOA_INSTALL)
  return()
endif()

include(CMakePackageConfigHelpers)

# Header only, so the package is architecture independent: share/, not lib/.
set(MOA_INSTALL_CMAKEDIR ${CMAKE_INSTALL_DATADIR}/cmake/moa
    CACHE STRING "Where to install moa's CMake package files, relative to the prefix")
mark_as_advanced(MOA_INSTALL_CMAKEDIR)

install(DIRECTORY ${PROJECT_SOURCE_DIR}/include/moa DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})

# Installed, moa::openmp always means "with OpenMP", found on the user's machine, even when the
# machine that installed moa had no OpenMP (the top level then links it only in the build tree).
if(NOT OpenMP_CXX_FOUND)
  target_link_libraries(moa_openmp INTERFACE $<INSTALL_INTERFACE:OpenMP::OpenMP_CXX>)
endif()

install(TARGETS moa EXPORT moaTargets)
install(EXPORT moaTargets NAMESPACE moa:: DESTINATION ${MOA_INSTALL_CMAKEDIR}
        FILE moaTargets.cmake)

install(TARGETS moa_openmp EXPORT moaOpenmpTargets)
install(EXPORT moaOpenmpTargets NAMESPACE moa:: DESTINATION ${MOA_INSTALL_CMAKEDIR}
        FILE moaOpenmpTargets.cmake)

if(TARGET moa_cuda)
  install(TARGETS moa_cuda EXPORT moaCudaTargets)
  install(EXPORT moaCudaTargets NAMESPACE moa:: DESTINATION ${MOA_INSTALL_CMAKEDIR}
          FILE moaCudaTargets.cmake)
endif()

configure_package_config_file(
  ${CMAKE_CURRENT_LIST_DIR}/moaConfig.cmake.in
  ${PROJECT_BINARY_DIR}/moaConfig.cmake
  INSTALL_DESTINATION ${MOA_INSTALL_CMAKEDIR}
  NO_SET_AND_CHECK_MACRO)
write_basic_package_version_file(
  ${PROJECT_BINARY_DIR}/moaConfigVersion.cmake
  VERSION ${PROJECT_VERSION}
  COMPATIBILITY SameMinorVersion
  ARCH_INDEPENDENT)
install(FILES ${PROJECT_BINARY_DIR}/moaConfig.cmake ${PROJECT_BINARY_DIR}/moaConfigVersion.cmake
        DESTINATION ${MOA_INSTALL_CMAKEDIR})
