"""Launch impatient_node with a params file and the most common settings as launch arguments.

    ros2 launch impatient_ros impatient.launch.py camera_topic:=/camera/image_raw budget:=30.0
    ros2 launch impatient_ros impatient.launch.py namespace:=robot1 mode:=cascade device:=cuda
    ros2 launch impatient_ros impatient.launch.py params_file:=/path/to/robot.yaml
    ros2 launch impatient_ros impatient.launch.py cameras:="[front, rear]" \
        camera_topics:="[/front/image_raw, /rear/image_raw]" budget:=20.0
    ros2 launch impatient_ros impatient.launch.py \
        params_file:=$(ros2 pkg prefix impatient_ros)/share/impatient_ros/config/multicam.yaml

Needs ``launch`` and ``launch_ros`` (a ROS 2 install; a pip install works once
AMENT_PREFIX_PATH names its venv, see the README). Every setting here is also
reachable without launch, e.g.

    impatient_node --ros-args --params-file config/impatient.yaml -p mode:=cascade \\
        -p default_budget_ms:=30.0 -r image:=/camera/image_raw -r __ns:=/robot1

The params file is the base. A launch argument that sets a parameter
(checkpoint, device, mode, budget, input_transport, num_threads,
realtime_priority) overrides it only when given: their defaults are ''
("not given"), so a value in the user's params file is never replaced by a
launch default. (Consequence: an argument cannot set a parameter *to* '';
put that in the params file.)

``cameras`` (a YAML list of names) makes one node serve several cameras with
one model: camera ``<name>`` reads ``<name>/image`` and ``<name>/budget`` and
publishes ``~/<name>/prediction`` and ``~/<name>/stage_k`` (README, "Several
cameras"). ``camera_topics`` (a list as long as ``cameras``) remaps each
camera's ``<name>/image`` to a driver's topic; ``camera_topic`` applies to the
single-camera node only. config/multicam.yaml is the same as a params file.

If the node fails to start (a missing checkpoint, a bad parameter) or dies,
the launch stops with an error naming it and exits non-zero.
"""

import yaml
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
    "realtime_priority": ("realtime_priority", int),
}


def _overrides(context) -> dict:
    """The typed parameter values of the launch arguments that were given (not '')."""
    given = {}
    for argument, (parameter, value_type) in PARAMETER_ARGUMENTS.items():
        if context.launch_configurations.get(argument, NOT_GIVEN) != NOT_GIVEN:
            given[parameter] = ParameterValue(LaunchConfiguration(argument), value_type=value_type)
    cameras = _name_list(context, "cameras")
    if cameras:
        given["cameras"] = cameras
    return given


def _name_list(context, argument: str) -> list[str]:
    """A launch argument holding a YAML list of names ("[front, rear]"); [] when not given.

    Parsed here rather than typed by launch_ros: a name YAML reads as a number or a boolean
    (``[1, on]``) must stop the launch with its name, not reach the node as another type.
    """
    text = context.launch_configurations.get(argument, NOT_GIVEN).strip()
    if text == NOT_GIVEN:
        return []
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RuntimeError(f"{argument}:={text!r} is not a YAML list ({exc})") from exc
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise RuntimeError(f"{argument}:={text!r} must be a list of names, e.g. \"[front, rear]\"")
    return value


def _remappings(context) -> list[tuple[str, str]]:
    """camera_topic for the single camera; with cameras, camera_topics one by one (<name>/image:=topic)."""
    cameras, topics = _name_list(context, "cameras"), _name_list(context, "camera_topics")
    if not cameras:
        if topics:
            raise RuntimeError("camera_topics needs cameras (one topic per camera name)")
        return [("image", LaunchConfiguration("camera_topic"))]
    if topics and len(topics) != len(cameras):
        raise RuntimeError(f"camera_topics has {len(topics)} topics for {len(cameras)} cameras {cameras}")
    return [(f"{name}/image", topic) for name, topic in zip(cameras, topics)]


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
        remappings=_remappings(context),
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
            "realtime_priority", default_value=NOT_GIVEN,
            description="realtime_priority parameter: SCHED_FIFO priority of the inference thread (1..98; "
                        "0 = the normal scheduler; needs CAP_SYS_NICE or an rtprio limit)" + not_given,
        ),
        DeclareLaunchArgument(
            "cameras", default_value=NOT_GIVEN,
            description="cameras parameter: a YAML list of camera names, e.g. \"[front, rear]\", served by "
                        "one node and one model (inputs <name>/image, outputs ~/<name>/prediction)" + not_given,
        ),
        DeclareLaunchArgument(
            "camera_topics", default_value=NOT_GIVEN,
            description="With cameras: a YAML list of the camera topics, one per name in the same order, "
                        "each camera's <name>/image is remapped to; '' = no remaps (<name>/image).",
        ),
        DeclareLaunchArgument(
            "camera_topic", default_value="image",
            description="Camera topic the node's 'image' input is remapped to (relative names are "
                        "resolved in the namespace); single camera only (see camera_topics).",
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
