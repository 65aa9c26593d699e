"""instructsam_ros: the ROS 2 node around the InstructSAM engine (instructsam_core).

This Python package shares its name with the interfaces rosidl generates for the same
ROS package (`instructsam_ros.msg`, `instructsam_ros.srv`). After a CMake/colcon build
both live in one directory of the install prefix. When the sources are imported
straight from a checkout (`python -m instructsam_ros.perception_node` from the
repository root puts the checkout first on sys.path), the generated modules are in the
install prefix instead; `extend_path` adds every other `instructsam_ros` directory on
sys.path to this package's search path, so `instructsam_ros.msg` is found either way.
"""

from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)
