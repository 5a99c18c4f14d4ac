# Installs a moa build tree into a fresh prefix for the package tests.
#   cmake -DBUILD_DIR=... -DPREFIX=... [-DCONFIG=...] -P install_prefix.cmake
foreach(_var BUILD_DIR PREFIX)
  if(NOT ${_var})
    message(FATAL_ERROR "install_prefix.cmake: ${_var} is not set")
  endif()
endforeach()
file(REMOVE_RECURSE ${PREFIX})
set(_config_args "")
if(CONFIG)
  set(_config_args --config ${CONFIG})
endif()
execute_process(COMMAND ${CMAKE_COMMAND} --install ${BUILD_DIR} --prefix ${PREFIX} ${_config_args}
                COMMAND_ERROR_IS_FATAL ANY)
