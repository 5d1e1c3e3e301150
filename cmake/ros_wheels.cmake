# Workarounds for building ROS 2 interfaces against the PyPI ros-* wheels
# (inert on a real ROS 2 install). Included by this package's CMakeLists.txt and
# by the test-only interface packages under tests/fixtures/, so every message
# package here is built by the same rosidl pipeline.
#
#   include(cmake/ros_wheels.cmake)
#   ros_wheels_prepare()                 # before find_package(ament_cmake ...)
#   rosidl_generate_interfaces(...)
#   ros_wheels_fix_imported_includes()   # after it

# Sets ROS_WHEELS (ON/OFF) and ROS_WHEELS_PREFIX in the caller's scope. The
# wheels keep their CMake files under the venv prefix; the ament index is found
# through AMENT_PREFIX_PATH, which a plain venv does not set.
macro(ros_wheels_prepare)
  find_package(Python3 REQUIRED COMPONENTS Interpreter)
  execute_process(
    COMMAND "${Python3_EXECUTABLE}" -c "import sys; print(sys.prefix)"
    OUTPUT_VARIABLE ROS_WHEELS_PREFIX OUTPUT_STRIP_TRAILING_WHITESPACE)
  set(ROS_WHEELS OFF)
  if(EXISTS "${ROS_WHEELS_PREFIX}/share/ament_index/resource_index/packages/rosidl_typesupport_c"
     AND NOT EXISTS "/opt/ros")
    set(ROS_WHEELS ON)
    message(STATUS "${PROJECT_NAME}: building against the PyPI ros-* wheels in ${ROS_WHEELS_PREFIX}")
    if(NOT "$ENV{AMENT_PREFIX_PATH}" MATCHES "${ROS_WHEELS_PREFIX}")
      set(ENV{AMENT_PREFIX_PATH} "${ROS_WHEELS_PREFIX}:$ENV{AMENT_PREFIX_PATH}")
    endif()
    list(APPEND CMAKE_PREFIX_PATH "${ROS_WHEELS_PREFIX}")
  endif()
endmacro()

# The wheels' exported targets carry the include path of the machine that
# built them (/opt/python/cpXY-cpXY/...). Swap it for this Python's and NumPy's.
# A function: IMPORTED_TARGETS is a directory property, the caller's directory.
function(ros_wheels_fix_imported_includes)
  if(NOT ROS_WHEELS)
    return()
  endif()
  execute_process(
    COMMAND "${Python3_EXECUTABLE}" -c "import sysconfig, numpy; print(sysconfig.get_paths()['include'] + ';' + numpy.get_include())"
    OUTPUT_VARIABLE _py_includes OUTPUT_STRIP_TRAILING_WHITESPACE)
  get_property(_imported DIRECTORY PROPERTY IMPORTED_TARGETS)
  foreach(_target IN LISTS _imported)
    get_target_property(_dirs ${_target} INTERFACE_INCLUDE_DIRECTORIES)
    if(_dirs AND "${_dirs}" MATCHES "/opt/python/cp[0-9]+-cp[0-9]+")
      set(_fixed "")
      foreach(_dir IN LISTS _dirs)
        if(NOT _dir MATCHES "^/opt/python/cp[0-9]+-cp[0-9]+")
          list(APPEND _fixed "${_dir}")
        endif()
      endforeach()
      list(APPEND _fixed ${_py_includes})
      set_target_properties(${_target} PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "${_fixed}")
    endif()
  endforeach()
endfunction()
