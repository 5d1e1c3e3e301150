"""The demo on a real ROS 2 install: camera, budget sweep, impatient_node and monitor.

    ros2 launch impatient_ros demo.launch.py
    ros2 launch impatient_ros demo.launch.py rate_hz:=15 schedule:=steps:1,3,10@3 mode:=cascade

The same four processes as scripts/demo.sh (which needs no ROS install, only
the PyPI wheels: the ``launch`` packages are not on PyPI). The monitor prints
its table every second and writes the summary and the plot when the launch is
stopped (Ctrl-C).

The four belong together: when one of them exits (a crash, a bad argument, the
camera at the end of a non-looping source), the launch stops the others and
says which one ended it; a non-zero exit status also makes the launch exit
non-zero.
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, LogInfo, RegisterEventHandler, Shutdown
from launch.event_handlers import OnProcessExit
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue

PACKAGE = "impatient_ros"
# Seconds from Ctrl-C's SIGINT to SIGTERM (launch's default: 5). The node's Python takes ~3 s more to
# exit after it stopped (torch unloading), the monitor writes its summary and plot first: on a busy
# machine both overran 5 s and were killed mid-way, logged as "process has died".
STOP_TIMEOUT_S = "20"


def typed(name: str, value_type: type) -> ParameterValue:
    """A launch argument as a parameter of ``value_type``.

    Untyped, launch_ros parses the text by YAML rules: ``rate_hz:=15`` would reach
    the camera as an integer (its double parameter refuses it and the camera
    dies), ``schedule:=10`` the budget publisher as an integer instead of a
    schedule string, ``checkpoint:=123`` the node as a number.
    """
    return ParameterValue(LaunchConfiguration(name), value_type=value_type)


def _stop_all_when_it_exits(node: Node, name: str) -> RegisterEventHandler:
    def on_exit(event, context):
        if context.is_shutdown:
            return None  # the launch is stopping anyway (Ctrl-C or another process ended it)
        reason = f"{name} exited with code {event.returncode}; stopping the demo"
        if event.returncode != 0:
            # Raised, the reason is logged as an error and the launch exits with status 1.
            raise RuntimeError(reason + " (its log above says why)")
        return [LogInfo(msg=reason), Shutdown(reason=reason)]

    return RegisterEventHandler(OnProcessExit(target_action=node, on_exit=on_exit))


def generate_launch_description() -> LaunchDescription:
    """Four nodes wired as in the README: camera -> node <- budget; node + camera labels -> monitor.

    Camera and budget publish on /image and /budget, where impatient_node
    listens by default; only the monitor needs remaps.
    """
    arguments = [
        DeclareLaunchArgument("source", default_value="fashion-mnist:test", description=(
            "camera source: fashion-mnist[:test|train], folder:PATH, video:PATH")),
        DeclareLaunchArgument("rate_hz", default_value="12.0", description="camera frames per second"),
        DeclareLaunchArgument("schedule", default_value="sweep:0.5,6,10", description=(
            "budget schedule: MS or constant:MS, sweep:START_MS,END_MS,PERIOD_S, steps:MS,...@HOLD_S or a "
            "distribution such as uniform:LOW,HIGH")),
        DeclareLaunchArgument("checkpoint", default_value="", description=(
            "checkpoint for impatient_node; empty: the embedded Fashion-MNIST model")),
        DeclareLaunchArgument("mode", default_value="anytime", choices=["anytime", "apriori", "cascade"],
                              description="impatient_node inference mode"),
        DeclareLaunchArgument("device", default_value="auto", description=(
            "impatient_node device: auto, cpu, cuda or cuda:N")),
        DeclareLaunchArgument("num_threads", default_value="1", description=(
            "impatient_node torch CPU threads (0 = one per core); the demo's other three processes "
            "share the cores")),
        DeclareLaunchArgument("summary_path", default_value="runs/demo/summary.json",
                              description="where the monitor writes its JSON summary on exit"),
        DeclareLaunchArgument("plot_path", default_value="runs/demo/monitor.png",
                              description="where the monitor writes its plot on exit"),
    ]

    camera = Node(
        package=PACKAGE, executable="impatient-camera", name="impatient_camera", output="screen",
        parameters=[{"source": typed("source", str), "rate_hz": typed("rate_hz", float),
                     "wait_for_subscribers": 1}],
    )
    budget = Node(
        package=PACKAGE, executable="impatient-budget", name="impatient_budget", output="screen",
        parameters=[{"schedule": typed("schedule", str), "rate_hz": 5.0}],
    )
    node = Node(
        package=PACKAGE, executable="impatient_node", name="impatient_node", output="screen",
        parameters=[{"checkpoint": typed("checkpoint", str), "mode": typed("mode", str),
                     "device": typed("device", str), "num_threads": typed("num_threads", int)}],
        sigterm_timeout=STOP_TIMEOUT_S,
    )
    monitor = Node(
        package=PACKAGE, executable="impatient-monitor", name="impatient_monitor", output="screen",
        parameters=[{"summary_path": typed("summary_path", str), "plot_path": typed("plot_path", str)}],
        remappings=[("prediction", "/impatient_node/prediction"), ("label", "/impatient_camera/label")],
        sigterm_timeout=STOP_TIMEOUT_S,
    )
    processes = {"impatient_camera": camera, "impatient_budget": budget, "impatient_node": node,
                 "impatient_monitor": monitor}
    # The handlers go first so that they are in place before any process can exit.
    handlers = [_stop_all_when_it_exits(action, name) for name, action in processes.items()]
    return LaunchDescription([*arguments, *handlers, *processes.values()])
