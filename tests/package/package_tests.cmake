# Package tests (included from tests/CMakeLists.txt), label `package`, in the spirit of Eigen's
# test/buildsystem: install this build into a prefix, then build users' projects against it.
#
#   package.install             cmake --install into ${MOA_TEST_PREFIX}        (fixture setup)
#   package.find_package        consumer/: find_package(moa 0.1 COMPONENTS openmp), build, run
#   package.find_components     find_checks/: components, unknown ones, cuda, refused versions
#   package.find_without_openmp find_checks/: OpenMP and CUDA disabled, moa::moa still found
#   package.version_too_new     find_checks/: find_package(moa 9.0 REQUIRED) must fail
#   package.add_subdirectory    subdir/: add_subdirectory(<moa source>), moa::moa, build, run

if(NOT MOA_INSTALL)
  message(STATUS "package tests: skipped, MOA_INSTALL is OFF")
  return()
endif()

set(_moa_pkg_dir ${CMAKE_CURRENT_LIST_DIR})
set(_moa_pkg_work ${CMAKE_CURRENT_BINARY_DIR}/package)
set(MOA_TEST_PREFIX ${_moa_pkg_work}/prefix)

# The same generator, compiler and flags as this build (sanitizers included) for every project.
set(_moa_pkg_project_args
  -DGENERATOR=${CMAKE_GENERATOR}
  -DMAKE_PROGRAM=${CMAKE_MAKE_PROGRAM}
  -DCXX_COMPILER=${CMAKE_CXX_COMPILER}
  "-DCXX_FLAGS=${CMAKE_CXX_FLAGS}"
  "-DLINKER_FLAGS=${CMAKE_EXE_LINKER_FLAGS}"
  -DBUILD_TYPE=$<CONFIG>)

add_test(NAME package.install
  COMMAND ${CMAKE_COMMAND} -DBUILD_DIR=${PROJECT_BINARY_DIR} -DPREFIX=${MOA_TEST_PREFIX}
          -DCONFIG=$<CONFIG> -P ${_moa_pkg_dir}/install_prefix.cmake)
set_tests_properties(package.install PROPERTIES FIXTURES_SETUP moa_installed)

add_test(NAME package.find_package
  COMMAND ${CMAKE_COMMAND} ${_moa_pkg_project_args}
          -DSOURCE_DIR=${_moa_pkg_dir}/consumer -DBINARY_DIR=${_moa_pkg_work}/consumer
          -DPREFIX=${MOA_TEST_PREFIX} -DRUN=moa_consumer
          -DEXPECT_MOA_DIR=${MOA_TEST_PREFIX}/${MOA_INSTALL_CMAKEDIR}
          -P ${_moa_pkg_dir}/run_project.cmake)

add_test(NAME package.find_components
  COMMAND ${CMAKE_COMMAND} ${_moa_pkg_project_args}
          -DSOURCE_DIR=${_moa_pkg_dir}/find_checks -DBINARY_DIR=${_moa_pkg_work}/find_components
          -DPREFIX=${MOA_TEST_PREFIX}
          -DDEFINES=CASE=components|MOA_EXPECTED_VERSION=${PROJECT_VERSION}
          -P ${_moa_pkg_dir}/run_project.cmake)

add_test(NAME package.find_without_openmp
  COMMAND ${CMAKE_COMMAND} ${_moa_pkg_project_args}
          -DSOURCE_DIR=${_moa_pkg_dir}/find_checks -DBINARY_DIR=${_moa_pkg_work}/find_without_openmp
          -DPREFIX=${MOA_TEST_PREFIX}
          -DDEFINES=CASE=no_openmp|CMAKE_DISABLE_FIND_PACKAGE_OpenMP=ON|CMAKE_DISABLE_FIND_PACKAGE_CUDAToolkit=ON
          -P ${_moa_pkg_dir}/run_project.cmake)

string(REPLACE "." "\\." _moa_version_regex "${PROJECT_VERSION}")
add_test(NAME package.version_too_new
  COMMAND ${CMAKE_COMMAND} ${_moa_pkg_project_args}
          -DSOURCE_DIR=${_moa_pkg_dir}/find_checks -DBINARY_DIR=${_moa_pkg_work}/version_too_new
          -DPREFIX=${MOA_TEST_PREFIX} -DDEFINES=CASE=require_9
          "-DEXPECT_FAIL_REGEX=moaConfig\\.cmake, version: ${_moa_version_regex}"
          -P ${_moa_pkg_dir}/run_project.cmake)

set_tests_properties(package.find_package package.find_components package.find_without_openmp
                     package.version_too_new PROPERTIES FIXTURES_REQUIRED moa_installed)

add_test(NAME package.add_subdirectory
  COMMAND ${CMAKE_COMMAND} ${_moa_pkg_project_args}
          -DSOURCE_DIR=${_moa_pkg_dir}/subdir -DBINARY_DIR=${_moa_pkg_work}/subdir
          -DDEFINES=MOA_SOURCE_DIR=${PROJECT_SOURCE_DIR} -DRUN=moa_subdir_consumer
          -P ${_moa_pkg_dir}/run_project.cmake)

set_tests_properties(package.install package.find_package package.find_components
                     package.find_without_openmp package.version_too_new package.add_subdirectory
                     PROPERTIES LABELS package ENVIRONMENT OMP_NUM_THREADS=2)
