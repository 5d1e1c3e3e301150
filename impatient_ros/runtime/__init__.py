"""The torch runtime: the staged network, its checkpoints, preprocessing, timing and the engine.

Imports torch, never rclpy and never the offline ``training`` package.
"""
