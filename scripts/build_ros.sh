#!/usr/bin/env bash
# Build and install this ROS 2 package (the interfaces in msg/ and srv/, the Python
# packages, launch/, config/, rviz/) with CMake against the ROS 2 wheels in a venv,
# the same CMake steps `colcon build` runs on a robot.
#
# Usage: scripts/build_ros.sh [VENV] [PREFIX]   (defaults: .venv, install)
# Build tree: build/ros.  Then `. scripts/ros_env.sh` to use the result.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$(cd "${1:-$ROOT/.venv}" && pwd)"
PREFIX="${2:-$ROOT/install}"
mkdir -p "$PREFIX" && PREFIX="$(cd "$PREFIX" && pwd)"
BUILD="$ROOT/build/ros/$(basename "$PREFIX")"  # one build tree per prefix (Kilted, Jazzy)
mkdir -p "$BUILD"
PY="$VENV/bin/python"

if [[ ! -d "$VENV/share/rosidl_default_generators" ]]; then
  echo "build_ros.sh: no ROS 2 generators in $VENV; run scripts/install_ros.sh $VENV first" >&2
  exit 1
fi

# The venv is the ROS underlay: its share/ and lib/ hold the wheels' packages.
export AMENT_PREFIX_PATH="$VENV${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}"
export CMAKE_PREFIX_PATH="$VENV${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}"
export PATH="$VENV/bin:$PATH"
# Generators run under this interpreter and dlopen the wheels' libraries.
export LD_LIBRARY_PATH="$VENV/lib$(printf ':%s' "$VENV"/lib/python3.11/site-packages/ros_*.libs)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export _ROS_WHEELS_BOOTSTRAP_COMPLETE=1

# instructsam_core is pip-installed (editable) in the development venv; installing a
# second copy into the prefix would shadow the live sources, so skip it when the venv
# already provides it.
INSTALL_CORE=ON
if (cd / && "$PY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("instructsam_core") is None)' 2>/dev/null); then
  INSTALL_CORE=OFF
fi

# A build tree configured against another venv would keep that venv's paths cached.
if [[ -f "$BUILD/CMakeCache.txt" && "$(cat "$BUILD/venv.path" 2>/dev/null)" != "$VENV" ]]; then
  rm -rf "$BUILD" && mkdir -p "$BUILD"
fi
echo "$VENV" > "$BUILD/venv.path"

# numpy's headers through the path install_ros.sh links (outside the checkout): when the
# venv lives inside the repository, CMake refuses to export an include directory that
# lies in the source tree ("prefixed in the source directory").
NUMPY_INCLUDE=/opt/python/cp311-cp311/lib/python3.11/site-packages/numpy/_core/include
if [[ "$(readlink -f "$NUMPY_INCLUDE")" != "$(cd / && "$PY" -c 'import numpy, os; print(os.path.realpath(numpy.get_include()))')" ]]; then
  echo "build_ros.sh: $NUMPY_INCLUDE does not point at $VENV's numpy; run scripts/install_ros.sh $VENV" >&2
  exit 1
fi

cmake -S "$ROOT" -B "$BUILD" \
  -DCMAKE_INSTALL_PREFIX="$PREFIX" \
  -DCMAKE_BUILD_TYPE=Release \
  -DPython3_EXECUTABLE="$PY" \
  -DPython3_FIND_VIRTUALENV=ONLY \
  -DPython3_NumPy_INCLUDE_DIR="$NUMPY_INCLUDE" \
  -DBUILD_TESTING=OFF \
  -DINSTRUCTSAM_INSTALL_CORE="$INSTALL_CORE" \
  -Wno-dev > "$BUILD/configure.log" 2>&1 || { cat "$BUILD/configure.log" >&2; exit 1; }
cmake --build "$BUILD" -j "$(nproc)" > "$BUILD/build.log" 2>&1 || { tail -50 "$BUILD/build.log" >&2; exit 1; }
# The package's share directory is rebuilt whole, so files removed from (or excluded
# from) the sources do not linger in the prefix.
rm -rf "$PREFIX/share/instructsam_ros"
cmake --install "$BUILD" > "$BUILD/install.log" 2>&1 || { tail -50 "$BUILD/install.log" >&2; exit 1; }
echo "build_ros.sh: installed instructsam_ros into $PREFIX (instructsam_core: $INSTALL_CORE)"
