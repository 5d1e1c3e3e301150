"""Launch impatient_node with a params file and the most common settings as launch arguments.

    ros2 launch impatient_ros impatient.launch.py camera_topic:=/camera/image_raw budget:=30.0
    ros2 launch impatient_ros impatient.launch.py namespace:=robot1 mode:=cascade device:=cuda
    ros2 launch impatient_ros impatient.launch.py params_file:=/path/to/robot.yaml

Needs ``launch`` and ``launch_ros`` (a ROS 2 install; a pip install works once
AMENT_PREFIX_PATH names its venv, see the README). Every setting here is also
reachable without launch, e.g.

    impatient_node --ros-args --params-file config/impatient.yaml -p mode:=cascade \\
        -p default_budget_ms:=30.0 -r image:=/camera/image_raw -r __ns:=/robot1

The params file is the base. A launch argument that sets a parameter
(checkpoint, device, mode, budget, input_transport, num_threads) overrides it
only when given: their defaults are '' ("not given"), so a value in the
user's params file is never replaced by a launch default. (Consequence: an
argument cannot set a parameter *to* ''; put that in the params file.)

If the node fails to start (a missing checkpoint, a bad parameter) or dies,
the launch stops with an error naming it and exits non-zero.
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction, RegisterEventHandler
from launch.event_handlers import OnProcessExit
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue
from launch_ros.substitutions import FindPackageShare

PACKAGE = "impatient_ros"
NOT_GIVEN = ""
# Seconds from Ctrl-C's SIGINT to SIGTERM (launch's default: 5): the node's Python takes ~3 s more to
# exit after it stopped (torch unloading), which overran 5 s on a busy machine.
STOP_TIMEOUT_S = "20"

# Launch argument -> (the node parameter it sets, that parameter's type). Launch arguments are text
# that launch_ros would parse by YAML rules unless typed: "30" would become an integer (which the
# double parameter default_budget_ms rejects), a checkpoint named "123" a number.
PARAMETER_ARGUMENTS = {
    "checkpoint": ("checkpoint", str),
    "device": ("device", str),
    "mode": ("mode", str),
    "budget": ("default_budget_ms", float),
    "input_transport": ("input_transport", str),
    "num_threads": ("num_threads", int),
}


def _overrides(context) -> dict:
    """The typed parameter values of the launch arguments that were given (not '')."""
    given = {}
    for argument, (parameter, value_type) in PARAMETER_ARGUMENTS.items():
        if context.launch_configurations.get(argument, NOT_GIVEN) != NOT_GIVEN:
            given[parameter] = ParameterValue(LaunchConfiguration(argument), value_type=value_type)
    return given


def _node_exited(event, context):
    """A node that exits with an error on its own stops the launch with an exception: exit status 1."""
    if context.is_shutdown or event.returncode == 0:
        return None  # Ctrl-C, or a clean exit
    raise RuntimeError(
        f"impatient_node exited with code {event.returncode} (pid {event.pid}): it failed to start or "
        "stopped with an error; its log above says why")


def _node(context):
    """The node (built here because which parameters the launch arguments set is known only now)."""
    node = Node(
        package=PACKAGE,
        executable="impatient_node",
        name="impatient_node",  # the params file addresses /**/impatient_node
        namespace=LaunchConfiguration("namespace"),
        output="screen",
        emulate_tty=True,
        # Later entries win: the params file first, then only the launch arguments that were given.
        parameters=[LaunchConfiguration("params_file"), _overrides(context)],
        remappings=[("image", LaunchConfiguration("camera_topic"))],
        arguments=["--ros-args", "--log-level", LaunchConfiguration("log_level")],
        sigterm_timeout=STOP_TIMEOUT_S,
    )
    # The handler first, so that it is in place before the process can exit.
    return [RegisterEventHandler(OnProcessExit(target_action=node, on_exit=_node_exited)), node]


def generate_launch_description() -> LaunchDescription:
    """The node, its arguments and their descriptions."""
    not_given = "; '' (default) = the params file's value"
    arguments = [
        DeclareLaunchArgument(
            "params_file",
            default_value=PathJoinSubstitution([FindPackageShare(PACKAGE), "config", "impatient.yaml"]),
            description="YAML file with the node's parameters (all of them, see config/impatient.yaml); "
                        "the launch arguments below override it only when given.",
        ),
        DeclareLaunchArgument(
            "checkpoint", default_value=NOT_GIVEN,
            description="checkpoint parameter: the .pt file to run (the file's '' = the embedded "
                        "Fashion-MNIST model)" + not_given,
        ),
        DeclareLaunchArgument(
            "device", default_value=NOT_GIVEN,
            description="device parameter: auto, cpu, cuda or cuda:N (auto = CUDA when available)" + not_given,
        ),
        DeclareLaunchArgument(
            "mode", default_value=NOT_GIVEN, choices=[NOT_GIVEN, "anytime", "apriori", "cascade"],
            description="mode parameter: anytime = every exit until the deadline; apriori = only the deepest "
                        "exit that fits; cascade = stop at the first confident exit" + not_given,
        ),
        DeclareLaunchArgument(
            "budget", default_value=NOT_GIVEN,
            description="default_budget_ms parameter: time per image in ms when no Budget message or "
                        "energy rule applies; 0 = unlimited" + not_given,
        ),
        DeclareLaunchArgument(
            "input_transport", default_value=NOT_GIVEN, choices=[NOT_GIVEN, "raw", "compressed"],
            description="input_transport parameter: raw = sensor_msgs/Image on camera_topic; compressed = "
                        "CompressedImage on <camera_topic>/compressed" + not_given,
        ),
        DeclareLaunchArgument(
            "num_threads", default_value=NOT_GIVEN,
            description="num_threads parameter: torch CPU threads (0 = one per core)" + not_given,
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
    return LaunchDescription([*arguments, OpaqueFunction(function=_node)])
