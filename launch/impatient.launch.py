"""Launch impatient_node with a params file and the most common settings as launch arguments.

    ros2 launch impatient_ros impatient.launch.py camera_topic:=/camera/image_raw budget:=30.0
    ros2 launch impatient_ros impatient.launch.py namespace:=robot1 mode:=cascade device:=cuda

Needs a ROS 2 install with ``launch`` and ``launch_ros`` (the pip-only set-up has
neither). Every setting here is also reachable without launch, e.g.

    impatient_node --ros-args --params-file config/impatient.yaml -p mode:=cascade \\
        -p default_budget_ms:=30.0 -r image:=/camera/image_raw -r __ns:=/robot1

Launch arguments override the params file (their defaults equal the file's
defaults); everything else comes from ``params_file``.
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue
from launch_ros.substitutions import FindPackageShare


def generate_launch_description() -> LaunchDescription:
    """The node, its arguments and their descriptions."""
    params_file = LaunchConfiguration("params_file")
    checkpoint = LaunchConfiguration("checkpoint")
    device = LaunchConfiguration("device")
    mode = LaunchConfiguration("mode")
    budget = LaunchConfiguration("budget")
    input_transport = LaunchConfiguration("input_transport")
    camera_topic = LaunchConfiguration("camera_topic")
    namespace = LaunchConfiguration("namespace")
    log_level = LaunchConfiguration("log_level")

    arguments = [
        DeclareLaunchArgument(
            "params_file",
            default_value=PathJoinSubstitution([FindPackageShare("impatient_ros"), "config", "impatient.yaml"]),
            description="YAML file with the node's parameters (all of them, see config/impatient.yaml).",
        ),
        DeclareLaunchArgument(
            "checkpoint", default_value="",
            description="Checkpoint (.pt) to run; empty = the embedded Fashion-MNIST model.",
        ),
        DeclareLaunchArgument(
            "device", default_value="auto",
            description="Inference device: auto, cpu, cuda or cuda:N (auto = CUDA when available).",
        ),
        DeclareLaunchArgument(
            "mode", default_value="anytime", choices=["anytime", "apriori", "cascade"],
            description="anytime: every exit until the deadline; apriori: only the deepest exit that fits; "
                        "cascade: stop at the first confident exit.",
        ),
        DeclareLaunchArgument(
            "budget", default_value="0.0",
            description="default_budget_ms: time per image in ms when no Budget message or energy rule "
                        "applies; 0 = unlimited.",
        ),
        DeclareLaunchArgument(
            "input_transport", default_value="raw", choices=["raw", "compressed"],
            description="raw: sensor_msgs/Image on camera_topic; compressed: CompressedImage on "
                        "<camera_topic>/compressed.",
        ),
        DeclareLaunchArgument(
            "camera_topic", default_value="image",
            description="Camera topic the node's 'image' input is remapped to (relative names are "
                        "resolved in the namespace).",
        ),
        DeclareLaunchArgument(
            "namespace", default_value="",
            description="Namespace of the node and its relative topics (image, budget, battery_state).",
        ),
        DeclareLaunchArgument(
            "log_level", default_value="info", choices=["debug", "info", "warn", "error", "fatal"],
            description="Logging level of the node.",
        ),
    ]

    node = Node(
        package="impatient_ros",
        executable="impatient_node",
        name="impatient_node",  # the params file addresses /**/impatient_node
        namespace=namespace,
        output="screen",
        emulate_tty=True,
        parameters=[
            params_file,
            {
                # Launch arguments are text parsed by YAML rules unless typed: "30" would become an
                # integer (which the double parameter rejects), a path like "1e3" a number.
                "checkpoint": ParameterValue(checkpoint, value_type=str),
                "device": ParameterValue(device, value_type=str),
                "mode": ParameterValue(mode, value_type=str),
                "default_budget_ms": ParameterValue(budget, value_type=float),
                "input_transport": ParameterValue(input_transport, value_type=str),
            },
        ],
        remappings=[("image", camera_topic)],
        arguments=["--ros-args", "--log-level", log_level],
    )
    return LaunchDescription([*arguments, node])
