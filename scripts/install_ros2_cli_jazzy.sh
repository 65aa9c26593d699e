#!/usr/bin/env bash
# Install the ros2 CLI and launch system into a venv holding the ROS 2 Jazzy wheels, from
# the same upstream sources ../shared/ros2_cli keeps for Kilted (its install.sh names the
# Kilted wheels; the sources run on Jazzy's rclpy too). A test-machine step: on a robot apt
# provides these packages. Nothing of the sources is part of this repository.
#
# Usage: scripts/install_ros2_cli_jazzy.sh VENV [SOURCES]   (default: ../shared/ros2_cli/src)
# Idempotent: a second run only checks.  Needs cmake and a C/C++ compiler.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$(cd "${1:?usage: install_ros2_cli_jazzy.sh VENV [SOURCES]}" && pwd)"
SRC="$(cd "${2:-$ROOT/../shared/ros2_cli/src}" && pwd)"
PY="$VENV/bin/python"

check() {
  "$PY" - <<'PYCHECK' 2>/dev/null
import launch, launch_ros, ros2cli, ros2launch, ros2topic, ros2param, ros2lifecycle
import composition_interfaces.srv, rosidl_runtime_py
PYCHECK
}
if check && [[ -x "$VENV/bin/ros2" ]]; then
  echo "install_ros2_cli_jazzy.sh: ros2 CLI and launch already in $VENV"
  exit 0
fi
echo "install_ros2_cli_jazzy.sh: installing the ros2 CLI and launch into $VENV"
log=$(mktemp)
work=$(mktemp -d)
trap 'rm -rf "$work" "$log"' EXIT
pip_install() {  # quiet unless it fails
  "$PY" -m pip install --disable-pip-version-check -q "$@" >"$log" 2>&1 || { tail -40 "$log" >&2; exit 1; }
}
# The sources' Python dependencies, and the Jazzy wheels composition_interfaces' build needs.
pip_install wheel osrf-pycommon importlib-metadata argcomplete psutil packaging catkin_pkg PyYAML lark \
  ros-jazzy-ament-index-python ros-jazzy-ament-cmake-include-directories ros-jazzy-rosidl-core-generators \
  ros-jazzy-ament-cmake-ros ros-jazzy-lifecycle-msgs
cp -r "$SRC" "$work/src"  # built in a scratch copy: the sources may be read-only
chmod -R u+w "$work/src"
s="$work/src"
pip_install --no-deps --no-build-isolation \
  "$s/launch/launch" "$s/launch/launch_xml" "$s/launch/launch_yaml" \
  "$s/rosidl_runtime_py" "$s/launch_ros/launch_ros" "$s/launch_ros/ros2launch" \
  "$s/ros2cli/ros2cli" "$s/ros2cli/ros2pkg" "$s/ros2cli/ros2node" "$s/ros2cli/ros2topic" \
  "$s/ros2cli/ros2run" "$s/ros2cli/ros2service" "$s/ros2cli/ros2interface" \
  "$s/ros2cli/ros2param" "$s/ros2cli/ros2lifecycle"
(
  export AMENT_PREFIX_PATH="$VENV" CMAKE_PREFIX_PATH="$VENV" PATH="$VENV/bin:$PATH"
  export LD_LIBRARY_PATH="$VENV/lib$(printf ':%s' "$VENV"/lib/python3.11/site-packages/ros_*.libs)"
  export _ROS_WHEELS_BOOTSTRAP_COMPLETE=1
  mkdir -p "$work/build" && cd "$work/build"
  cmake "$s/rcl_interfaces/composition_interfaces" -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX="$VENV" \
    -DPython3_EXECUTABLE="$PY" -DBUILD_TESTING=OFF > cmake.log 2>&1 || { tail -40 cmake.log >&2; exit 1; }
  cmake --build . -j"$(nproc)" > build.log 2>&1 || { tail -40 build.log >&2; exit 1; }
  cmake --install . > install.log 2>&1 || { tail -40 install.log >&2; exit 1; }
)
if check; then
  echo "install_ros2_cli_jazzy.sh: done"
else
  echo "install_ros2_cli_jazzy.sh: installed, but the import check fails:" >&2
  "$PY" -c "import launch_ros, ros2cli, composition_interfaces.srv" >&2
  exit 1
fi
