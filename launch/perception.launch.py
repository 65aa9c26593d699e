"""Start the InstructSAM perception node (and optionally RViz with the overlay).

    ros2 launch instructsam_ros perception.launch.py checkpoint:=/models/InstructSAM-2B \
        image:=/camera/color/image_raw
    ros2 topic pub /instruction std_msgs/msg/String "data: 'the red mug'"

Parameters come from `params_file`; the `checkpoint`, `device` and `backend` arguments
override it only when given (non-empty), so a checkpoint set in your own params file is kept.
RViz (`rviz:=true`) is optional: install rviz2 to use it.
"""

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue

# Launch arguments that override the node parameter of the same name when non-empty.
OVERRIDES = ("checkpoint", "device", "backend")


def _perception_node(context, *args, **kwargs):
    """The node, with the overrides resolved now (launch arguments are known here)."""
    arg = LaunchConfiguration
    overrides = {}
    for name in OVERRIDES:
        value = arg(name).perform(context).strip()
        if value:
            # value_type=str: a value such as "1234" or "true" stays a string parameter.
            overrides[name] = ParameterValue(value, value_type=str)
    parameters = [arg("params_file")]
    if overrides:
        parameters.append(overrides)  # later entries win over the params file
    return [Node(
        package="instructsam_ros",
        executable="perception_node",
        name="instructsam",
        namespace=arg("namespace"),
        output="screen",
        emulate_tty=True,
        parameters=parameters,
        remappings=[
            ("image", arg("image")),
            ("image/compressed", [arg("image"), "/compressed"]),
            ("depth", arg("depth")),
            ("camera_info", arg("camera_info")),
        ],
    )]


def generate_launch_description():
    share = get_package_share_directory("instructsam_ros")
    arg = LaunchConfiguration
    args = [
        DeclareLaunchArgument("checkpoint", default_value="",
                              description="InstructSAM checkpoint directory ('default' = the shipped "
                              "model, 'tiny' = untrained test model); empty = the params file's ('default')"),
        DeclareLaunchArgument("device", default_value="",
                              description="auto, cpu, cuda or cuda:N; empty = the params file's"),
        DeclareLaunchArgument("backend", default_value="",
                              description="eager, compiled, tensorrt or onnxruntime (those installed); empty = "
                              "the params file's"),
        DeclareLaunchArgument("image", default_value="/camera/color/image_raw",
                              description="colour image topic (its /compressed sibling when compressed_input is true)"),
        DeclareLaunchArgument("depth", default_value="/camera/aligned_depth_to_color/image_raw",
                              description="depth topic aligned to the colour image (used when use_depth is true)"),
        DeclareLaunchArgument("camera_info", default_value="/camera/aligned_depth_to_color/camera_info",
                              description="camera_info of the depth image"),
        DeclareLaunchArgument("params_file", default_value=PathJoinSubstitution([share, "config", "perception.yaml"]),
                              description="node parameters (config/perception.yaml)"),
        DeclareLaunchArgument("namespace", default_value="", description="node namespace"),
        DeclareLaunchArgument("rviz", default_value="false",
                              description="also start RViz with the overlay (needs rviz2 installed)"),
    ]
    rviz = Node(
        package="rviz2",
        executable="rviz2",
        arguments=["-d", PathJoinSubstitution([share, "rviz", "perception.rviz"])],
        condition=IfCondition(arg("rviz")),
    )
    return LaunchDescription(args + [OpaqueFunction(function=_perception_node), rviz])
