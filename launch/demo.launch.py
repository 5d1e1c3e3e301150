"""The demo on a real ROS 2 install: camera, budget sweep, impatient_node and monitor.

    ros2 launch impatient_ros demo.launch.py
    ros2 launch impatient_ros demo.launch.py rate_hz:=15.0 schedule:=steps:1,3,10@3 mode:=cascade

The same four processes as scripts/demo.sh (which needs no ROS install, only
the PyPI wheels: the ``launch`` packages are not on PyPI). The monitor prints
its table every second and writes the summary and the plot when the launch is
stopped (Ctrl-C).
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

PACKAGE = "impatient_ros"


def generate_launch_description() -> LaunchDescription:
    """Four nodes wired as in the README: camera -> node <- budget; node + camera labels -> monitor.

    Camera and budget publish on /image and /budget, where impatient_node
    listens by default; only the monitor needs remaps.
    """
    # Configurations bound once, at the top.
    source = LaunchConfiguration("source")
    rate_hz = LaunchConfiguration("rate_hz")
    schedule = LaunchConfiguration("schedule")
    checkpoint = LaunchConfiguration("checkpoint")
    mode = LaunchConfiguration("mode")
    device = LaunchConfiguration("device")
    summary_path = LaunchConfiguration("summary_path")
    plot_path = LaunchConfiguration("plot_path")

    arguments = [
        DeclareLaunchArgument("source", default_value="fashion-mnist:test", description=(
            "camera source: fashion-mnist[:test|train], folder:PATH, video:PATH")),
        DeclareLaunchArgument("rate_hz", default_value="12.0", description="camera frames per second"),
        DeclareLaunchArgument("schedule", default_value="sweep:0.5,6,10", description=(
            "budget schedule: sweep:START_MS,END_MS,PERIOD_S, steps:MS,...@HOLD_S, constant:MS or a "
            "distribution such as uniform:LOW,HIGH")),
        DeclareLaunchArgument("checkpoint", default_value="", description=(
            "checkpoint for impatient_node; empty: the embedded Fashion-MNIST model")),
        DeclareLaunchArgument("mode", default_value="anytime", choices=["anytime", "apriori", "cascade"],
                              description="impatient_node inference mode"),
        DeclareLaunchArgument("device", default_value="auto", description=(
            "impatient_node device: auto, cpu, cuda or cuda:N")),
        DeclareLaunchArgument("summary_path", default_value="runs/demo/summary.json",
                              description="where the monitor writes its JSON summary on exit"),
        DeclareLaunchArgument("plot_path", default_value="runs/demo/monitor.png",
                              description="where the monitor writes its plot on exit"),
    ]

    camera = Node(
        package=PACKAGE, executable="impatient-camera", name="impatient_camera", output="screen",
        parameters=[{"source": source, "rate_hz": rate_hz, "wait_for_subscribers": 1}],
    )
    budget = Node(
        package=PACKAGE, executable="impatient-budget", name="impatient_budget", output="screen",
        parameters=[{"schedule": schedule, "rate_hz": 5.0}],
    )
    node = Node(
        package=PACKAGE, executable="impatient_node", name="impatient_node", output="screen",
        parameters=[{"checkpoint": checkpoint, "mode": mode, "device": device}],
    )
    monitor = Node(
        package=PACKAGE, executable="impatient-monitor", name="impatient_monitor", output="screen",
        parameters=[{"summary_path": summary_path, "plot_path": plot_path}],
        remappings=[("prediction", "/impatient_node/prediction"), ("label", "/impatient_camera/label")],
    )
    return LaunchDescription([*arguments, camera, budget, node, monitor])
