"""The ROS 2 adapter: the node and the pure helpers that turn its inputs and outputs into messages.

Only :mod:`.node` (and the parameter schema) import rclpy; the helpers here
(image conversion, budget policy, message fields, diagnostics) are pure.
"""
