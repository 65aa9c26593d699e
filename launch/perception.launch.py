"""Start the InstructSAM perception node (and optionally RViz with the overlay).

    ros2 launch instructsam_ros perception.launch.py checkpoint:=/models/InstructSAM-2B \
        image:=/camera/color/image_raw
    ros2 topic pub /instruction std_msgs/msg/String "data: 'the red mug'"
"""

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node


def generate_launch_description():
    share = get_package_share_directory("instructsam_ros")
    arg = LaunchConfiguration
    args = [
        DeclareLaunchArgument("checkpoint", default_value="",
                              description="InstructSAM checkpoint directory ('tiny' = untrained test model)"),
        DeclareLaunchArgument("device", default_value="auto", description="auto, cpu, cuda or cuda:N"),
        DeclareLaunchArgument("image", default_value="/camera/color/image_raw",
                              description="colour image topic (its /compressed sibling when compressed_input is true)"),
        DeclareLaunchArgument("depth", default_value="/camera/aligned_depth_to_color/image_raw",
                              description="depth topic aligned to the colour image (used when use_depth is true)"),
        DeclareLaunchArgument("camera_info", default_value="/camera/aligned_depth_to_color/camera_info",
                              description="camera_info of the depth image"),
        DeclareLaunchArgument("params_file", default_value=PathJoinSubstitution([share, "config", "perception.yaml"]),
                              description="node parameters (config/perception.yaml)"),
        DeclareLaunchArgument("namespace", default_value="", description="node namespace"),
        DeclareLaunchArgument("rviz", default_value="false", description="also start RViz with the overlay"),
    ]
    node = Node(
        package="instructsam_ros",
        executable="perception_node",
        name="instructsam",
        namespace=arg("namespace"),
        output="screen",
        emulate_tty=True,
        # Later entries win: the launch arguments override the params file.
        parameters=[arg("params_file"), {"checkpoint": arg("checkpoint"), "device": arg("device")}],
        remappings=[
            ("image", arg("image")),
            ("image/compressed", [arg("image"), "/compressed"]),
            ("depth", arg("depth")),
            ("camera_info", arg("camera_info")),
        ],
    )
    rviz = Node(
        package="rviz2",
        executable="rviz2",
        arguments=["-d", PathJoinSubstitution([share, "rviz", "perception.rviz"])],
        condition=IfCondition(arg("rviz")),
    )
    return LaunchDescription(args + [node, rviz])
