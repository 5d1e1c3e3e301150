"""impatient-camera: publish images from a data set, a folder or a video at a set rate.

A stand-in camera for demos and tests (like image_tools' cam2image with its
synthetic mode): no hardware needed. Publishes

* ``image`` (sensor_msgs/Image), or ``image/compressed``
  (sensor_msgs/CompressedImage) with ``transport:=compressed`` (it follows a
  remap of ``image``, as image_transport does); header stamp =
  now, frame_id = the ``frame_id`` parameter; sensor-data QoS (best effort,
  keep last ``depth``) unless ``reliability:=reliable``;
* ``~/label`` (std_msgs/Int32MultiArray, reliable) for every frame whose true
  class is known: ``data = [stamp.sec, stamp.nanosec, class_id]``, the image's
  header stamp and its label. std_msgs has no stamped integer, and the stamp is
  what the classifier copies into its predictions, so it is the join key
  (the monitor uses it). The layout's one dimension is labelled
  ``"stamp_sec,stamp_nanosec,class_id"`` so the message explains itself.

Run:  impatient-camera --ros-args -p source:=fashion-mnist:test -p rate_hz:=15.0
"""

from __future__ import annotations

import array
import sys
from typing import Any, Iterator, Sequence

from rcl_interfaces.msg import SetParametersResult
from rclpy.duration import Duration
from rclpy.impl.implementation_singleton import rclpy_implementation as _rclpy
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.task import Future
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header, Int32MultiArray, MultiArrayDimension

from impatient_ros.ros.choices import RELIABILITIES, TRANSPORTS
from impatient_ros.ros.image_convert import ImageConversionError, array_to_compressed, array_to_image_fields
from impatient_ros.ros.params import ParamSpec, check_declared, check_values, declare
from impatient_ros.ros.topics import compressed_topic
from impatient_ros.tools.sources import (
    DEFAULT_FASHION_MNIST_DIR,
    ENCODINGS,
    SPEC_FORMS,
    Frame,
    SourceError,
    convert_frame,
    iterate_frames,
    open_source,
)
from impatient_ros.tools.common import make_qos, run_node

__all__ = ["LABEL_LAYOUT", "PARAMETERS", "CameraNode", "main"]

LABEL_LAYOUT = "stamp_sec,stamp_nanosec,class_id"
COMPRESSED_FORMATS = ("jpeg", "png")
ENCODING_CHOICES = ("auto", *ENCODINGS)  # auto: mono8 for grey frames, rgb8 for colour ones
_ACK_TIMEOUT_S = 2.0  # how long the last reliable messages may take to be acknowledged at the end

# Choices go into additional_constraints only (list_choices=False): the tools' short descriptions never
# listed them.
PARAMETERS: tuple[ParamSpec, ...] = (
    ParamSpec("source", "fashion-mnist:test", f"what to publish: {SPEC_FORMS}", read_only=True),
    ParamSpec("dataset_dir", str(DEFAULT_FASHION_MNIST_DIR), "folder of the IDX files for the fashion-mnist source",
              read_only=True),
    ParamSpec("rate_hz", 10.0, "frames per second", float_range=(0.01, 1000.0)),
    ParamSpec("transport", "raw", "raw: sensor_msgs/Image on 'image'; compressed: sensor_msgs/CompressedImage on "
              "'image/compressed'", read_only=True, choices=TRANSPORTS, list_choices=False),
    ParamSpec("encoding", "auto", "pixel encoding of raw images (compressed images are mono8 or bgr8); auto: mono8 "
              "for grey frames, rgb8 for colour ones", choices=ENCODING_CHOICES, list_choices=False),
    ParamSpec("compressed_format", "jpeg", "codec of compressed images", choices=COMPRESSED_FORMATS,
              list_choices=False),
    ParamSpec("jpeg_quality", 90, "JPEG quality", int_range=(1, 100)),
    ParamSpec("width", 0, "resize to this width (0 with height 0: keep the source size)", int_range=(0, 16384)),
    ParamSpec("height", 0, "resize to this height (0 with width 0: keep the source size)", int_range=(0, 16384)),
    ParamSpec("frame_id", "camera", "header.frame_id of the images"),
    ParamSpec("loop", True, "start again at the end of the source; false: stop there", read_only=True),
    ParamSpec("max_frames", 0, "stop after this many frames (0: no limit)", read_only=True, int_range=(0, 2**31 - 1)),
    ParamSpec("reliability", "best_effort", "image QoS reliability (sensor data is best effort; reliable for "
              "lossless tests)", read_only=True, choices=RELIABILITIES, list_choices=False),
    ParamSpec("depth", 1, "image QoS history depth", read_only=True, int_range=(1, 1000)),
    ParamSpec("wait_for_subscribers", 0, "hold the first frame until the image topic and the label topic each "
              "have this many subscribers (0: start at once)", read_only=True, int_range=(0, 1000)),
)


class CameraNode(Node):
    """Publishes one frame per timer tick; finishes (``done``) at the end of the source or max_frames."""

    def __init__(self, **node_options: Any) -> None:
        # node_options go to rclpy's Node (context, parameter_overrides, ...): tests run it in-process.
        super().__init__("impatient_camera", **node_options)
        declare(self, PARAMETERS)
        check_declared(self, self._check_parameters)
        self.add_on_set_parameters_callback(self._check_parameters)
        self.add_post_set_parameters_callback(self._apply_parameters)

        self.exit_status = 0
        self.done = Future()
        self.sent = 0
        self.dropped = 0
        self.source = open_source(self._param("source"), self._param("dataset_dir"))
        self._frames: Iterator[Frame] = iterate_frames(
            self.source, loop=self._param("loop"), max_frames=self._param("max_frames"))
        self._compressed = self._param("transport") == "compressed"
        qos = make_qos(self._param("reliability"), self._param("depth"))
        if self._compressed:
            self.image_pub = self.create_publisher(CompressedImage, compressed_topic(self.resolve_topic_name), qos)
        else:
            self.image_pub = self.create_publisher(Image, "image", qos)
        # Labels are tiny and the monitor needs every one: reliable with room to spare.
        self.label_pub = self.create_publisher(Int32MultiArray, "~/label", make_qos("reliable", 100))
        self._waiting_logged = False
        self.timer = self.create_timer(1.0 / self._param("rate_hz"), self._tick)
        self.get_logger().info(
            f"publishing {self.source.describe()} on {self.image_pub.topic_name} at {self._param('rate_hz'):g} Hz"
            f", labels on {self.label_pub.topic_name}")

    def _param(self, name: str):  # noqa: ANN202 - the value's type depends on the parameter
        return self.get_parameter(name).value

    def _check_parameters(self, params: list[Parameter]) -> SetParametersResult:
        # Ranges are enforced by the descriptors; choices by the specs, the size rule here.
        reason = check_values(PARAMETERS, {p.name: p.value for p in params})
        if reason:
            return SetParametersResult(successful=False, reason=reason)
        sizes = {p.name: p.value for p in params if p.name in ("width", "height")}
        if sizes:
            width = sizes.get("width", self._param("width"))
            height = sizes.get("height", self._param("height"))
            if (width == 0) != (height == 0):
                return SetParametersResult(
                    successful=False, reason=f"set both width and height, or neither (got {width}x{height})")
        return SetParametersResult(successful=True)

    def _apply_parameters(self, params: list[Parameter]) -> None:
        if any(p.name == "rate_hz" for p in params):
            self.timer.timer_period_ns = int(1e9 / self._param("rate_hz"))
            self.timer.reset()

    def _subscribers_ready(self) -> bool:
        wanted = self._param("wait_for_subscribers")
        # Label subscribers only count when there will be labels to receive.
        ready = self.image_pub.get_subscription_count() >= wanted and (
            not self.source.labelled or self.label_pub.get_subscription_count() >= wanted)
        if not ready and not self._waiting_logged:
            self._waiting_logged = True
            topics = "image and label topics" if self.source.labelled else "image topic"
            self.get_logger().info(f"waiting for {wanted} subscriber(s) on the {topics}")
        return ready

    def _tick(self) -> None:
        if self.done.done():
            return
        if self.sent == 0 and not self._subscribers_ready():
            return
        try:
            frame = next(self._frames, None)
            if frame is None:
                self._finish("end of the source")
                return
            published = self._publish(frame)
        except (SourceError, ImageConversionError) as exc:
            self.get_logger().error(f"stopping: {exc}")
            self.exit_status = 1
            self._finish("error")
            return
        self.sent += published
        self.dropped += not published
        if self._param("max_frames") and self.sent + self.dropped >= self._param("max_frames"):
            self._finish("max_frames reached")

    def _publish(self, frame: Frame) -> bool:
        """Publish the frame and its label; False when the image topic refused it."""
        encoding = self._param("encoding")
        if encoding == "auto" or self._compressed:
            # Compressed images carry OpenCV's order (grey or BGR) whatever was asked.
            colour = frame.order != "gray" and encoding != "mono8"
            encoding = ("bgr8" if self._compressed else "rgb8") if colour else "mono8"
        size = (self._param("width"), self._param("height"))
        pixels = convert_frame(frame, encoding, size)
        header = Header(stamp=self.get_clock().now().to_msg(), frame_id=self._param("frame_id"))
        if self._compressed:
            fields = array_to_compressed(pixels, self._param("compressed_format"), quality=self._param("jpeg_quality"))
            msg = CompressedImage(header=header, format=fields["format"])
        else:
            fields = array_to_image_fields(pixels, encoding)
            msg = Image(header=header, height=fields["height"], width=fields["width"], encoding=encoding,
                        is_bigendian=fields["is_bigendian"], step=fields["step"])
        # array.array is taken as is; bytes would be checked element by element (slow for big images).
        msg.data = array.array("B", fields["data"])
        try:
            self.image_pub.publish(msg)
        except _rclpy.RCLError as exc:
            # A reliable publisher whose reader lags refuses instead of dropping (Fast DDS):
            # drop the frame like best effort would, and send no label for it.
            self.get_logger().warn(f"frame dropped, the image topic is saturated: {exc}", throttle_duration_sec=5.0)
            return False
        if frame.label is not None:
            label = Int32MultiArray(data=[header.stamp.sec, header.stamp.nanosec, frame.label])
            label.layout.dim = [MultiArrayDimension(label=LABEL_LAYOUT, size=3, stride=3)]
            self.label_pub.publish(label)
        return True

    def _finish(self, why: str) -> None:
        self.timer.cancel()
        # Let reliable subscribers receive the last messages before the process exits.
        timeout = Duration(seconds=_ACK_TIMEOUT_S)
        if self._param("reliability") == "reliable":
            self.image_pub.wait_for_all_acked(timeout)
        self.label_pub.wait_for_all_acked(timeout)
        dropped = f", {self.dropped} dropped (topic saturated)" if self.dropped else ""
        self.get_logger().info(f"{why}: published {self.sent} frame(s){dropped}")
        self.done.set_result(why)


def main(args: Sequence[str] | None = None) -> int:
    """Entry point of impatient-camera; returns the exit status."""
    return run_node(CameraNode, args, until=lambda node: node.done)


if __name__ == "__main__":
    sys.exit(main())
