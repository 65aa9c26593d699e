# Source me (bash, zsh or POSIX sh):  . scripts/ros_env.sh
# Puts the ROS 2 wheels of the venv (the underlay) and this repository's CMake install
# (the overlay, from scripts/build_ros.sh) on the paths, the way `source
# install/setup.bash` does on a robot, and keeps DDS discovery on this machine.
#
# Overrides: INSTRUCTSAM_VENV (default <repo>/.venv), INSTRUCTSAM_ROS_PREFIX (default
# <repo>/install), RMW_IMPLEMENTATION (default rmw_fastrtps_cpp).

# Repository root: from BASH_SOURCE under bash; POSIX sh cannot tell a sourced file's
# path, so there it must be sourced from the repository root (as the Makefile does).
if [ -n "${BASH_SOURCE:-}" ]; then
  _isr_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
elif [ -n "${ZSH_VERSION:-}" ]; then
  _isr_root="$(cd "$(dirname "${(%):-%x}")/.." && pwd)"
else
  _isr_root="$(pwd)"
fi
_isr_venv="${INSTRUCTSAM_VENV:-$_isr_root/.venv}"
_isr_prefix="${INSTRUCTSAM_ROS_PREFIX:-$_isr_root/install}"

if [ ! -f "$_isr_root/scripts/ros_env.sh" ] || [ ! -d "$_isr_venv/share/rclpy" ]; then
  echo "ros_env.sh: no ROS 2 wheels in $_isr_venv (run scripts/install_ros.sh, or source from the repository root)" >&2
elif [ ! -d "$_isr_prefix/share/instructsam_ros" ]; then
  echo "ros_env.sh: instructsam_ros is not built in $_isr_prefix (run scripts/build_ros.sh)" >&2
else
  _isr_site="lib/python3.11/site-packages"
  # The wheels' own bootstrap (a .pth) re-executes Python with these library paths;
  # setting them here (and its guard) makes that unnecessary and also covers the
  # overlay's libraries, which the bootstrap does not know.
  _isr_ld="$_isr_prefix/lib:$_isr_venv/lib"
  for _isr_d in "$_isr_venv/$_isr_site"/ros_*.libs; do
    [ -d "$_isr_d" ] && _isr_ld="$_isr_ld:$_isr_d"
  done
  export LD_LIBRARY_PATH="$_isr_ld${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export _ROS_WHEELS_BOOTSTRAP_COMPLETE=1
  export AMENT_PREFIX_PATH="$_isr_prefix:$_isr_venv${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}"
  # The checkout first, so edits to instructsam_ros/*.py take effect without a rebuild
  # (like `colcon build --symlink-install`); instructsam_ros/__init__.py extends its
  # path to the prefix's copy, where the generated .msg/.srv modules are.
  export PYTHONPATH="$_isr_root:$_isr_prefix/$_isr_site${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="$_isr_venv/bin:$PATH"
  export RMW_IMPLEMENTATION="${RMW_IMPLEMENTATION:-rmw_fastrtps_cpp}"
  # Discovery stays on this machine (tests, CI); robots override this.
  # ROS_AUTOMATIC_DISCOVERY_RANGE is Jazzy+; ROS_LOCALHOST_ONLY is its Humble
  # equivalent (deprecated but honoured on Jazzy, ignored on Kilted): set both.
  export ROS_AUTOMATIC_DISCOVERY_RANGE="${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}"
  export ROS_LOCALHOST_ONLY="${ROS_LOCALHOST_ONLY:-1}"
  unset _isr_site _isr_ld _isr_d
fi
unset _isr_root _isr_venv _isr_prefix
