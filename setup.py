"""pip entry for the ROS-free packages, instructsam_core and training:

    pip install .                  # or: pip install -e ".[training,eval]"

The metadata (name, dependencies, extras, entry points, which packages) lives in
pyproject.toml; this file only hands over to it. It never installs instructsam_ros: the
ament_cmake build at the repository root (CMakeLists.txt, `colcon build`) installs that
package together with its generated messages, since two `instructsam_ros` packages on
sys.path would shadow each other.
"""

from setuptools import setup

setup()
