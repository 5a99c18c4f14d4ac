# Configures (and optionally builds and runs) a small CMake project for the package tests, in a
# fresh binary dir, with the same generator, compiler and flags as the moa build that runs it.
#
#   cmake -DSOURCE_DIR=... -DBINARY_DIR=... [options] -P run_project.cmake
#     GENERATOR, MAKE_PROGRAM, CXX_COMPILER, CXX_FLAGS, LINKER_FLAGS, BUILD_TYPE   passed through
#     PREFIX             CMAKE_PREFIX_PATH for the project (the test install of moa)
#     DEFINES            extra -D settings, separated by '|' (e.g. "CASE=components|X=1")
#     RUN                build, then run this executable of the project
#     EXPECT_MOA_DIR     after configuring, the project's cached moa_DIR must be exactly this
#     EXPECT_FAIL_REGEX  configuring must fail, with output matching this regex

foreach(_var SOURCE_DIR BINARY_DIR)
  if(NOT ${_var})
    message(FATAL_ERROR "run_project.cmake: ${_var} is not set")
  endif()
endforeach()

file(REMOVE_RECURSE ${BINARY_DIR})

set(_args -S ${SOURCE_DIR} -B ${BINARY_DIR} -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF)
if(GENERATOR)
  list(APPEND _args -G ${GENERATOR})
endif()
if(MAKE_PROGRAM)
  list(APPEND _args -DCMAKE_MAKE_PROGRAM=${MAKE_PROGRAM})
endif()
if(CXX_COMPILER)
  list(APPEND _args -DCMAKE_CXX_COMPILER=${CXX_COMPILER})
endif()
if(BUILD_TYPE)
  list(APPEND _args -DCMAKE_BUILD_TYPE=${BUILD_TYPE})
endif()
list(APPEND _args "-DCMAKE_CXX_FLAGS=${CXX_FLAGS}" "-DCMAKE_EXE_LINKER_FLAGS=${LINKER_FLAGS}")
if(PREFIX)
  list(APPEND _args -DCMAKE_PREFIX_PATH=${PREFIX})
endif()
if(DEFINES)
  string(REPLACE "|" ";" _defines "${DEFINES}")
  foreach(_define IN LISTS _defines)
    list(APPEND _args -D${_define})
  endforeach()
endif()

if(EXPECT_FAIL_REGEX)
  execute_process(COMMAND ${CMAKE_COMMAND} ${_args}
                  RESULT_VARIABLE _rc OUTPUT_VARIABLE _out ERROR_VARIABLE _out)
  message("${_out}")
  if(_rc EQUAL 0)
    message(FATAL_ERROR "configuring ${SOURCE_DIR} succeeded but was expected to fail")
  endif()
  if(NOT _out MATCHES "${EXPECT_FAIL_REGEX}")
    message(FATAL_ERROR "configuring ${SOURCE_DIR} failed, but not with: ${EXPECT_FAIL_REGEX}")
  endif()
  message(STATUS "configuring failed as expected")
  return()
endif()

execute_process(COMMAND ${CMAKE_COMMAND} ${_args} COMMAND_ERROR_IS_FATAL ANY)

if(EXPECT_MOA_DIR)
  file(STRINGS ${BINARY_DIR}/CMakeCache.txt _moa_dir REGEX "^moa_DIR:")
  string(REGEX REPLACE "^moa_DIR:[A-Z]+=" "" _moa_dir "${_moa_dir}")
  file(REAL_PATH "${_moa_dir}" _moa_dir)
  file(REAL_PATH "${EXPECT_MOA_DIR}" _expected)
  if(NOT _moa_dir STREQUAL _expected)
    message(FATAL_ERROR "moa was found in '${_moa_dir}', expected '${_expected}'")
  endif()
endif()

if(RUN)
  set(_config_args "")
  if(BUILD_TYPE)
    set(_config_args --config ${BUILD_TYPE})
  endif()
  execute_process(COMMAND ${CMAKE_COMMAND} --build ${BINARY_DIR} ${_config_args}
                  COMMAND_ERROR_IS_FATAL ANY)
  # Single-config generators put the program in the binary dir, multi-config ones below it.
  set(_exe ${BINARY_DIR}/${RUN})
  if(NOT EXISTS ${_exe} AND BUILD_TYPE)
    set(_exe ${BINARY_DIR}/${BUILD_TYPE}/${RUN})
  endif()
  execute_process(COMMAND ${_exe} COMMAND_ERROR_IS_FATAL ANY)
endif()
