"""Torch-free, ROS-free core: budget math (paper Eq. 5), file formats and shared types.

Nothing here imports torch or rclpy, so the training CLI, the tools and the
node's pure helpers can all use it cheaply.
"""
