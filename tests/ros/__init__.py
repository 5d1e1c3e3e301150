"""Helpers for tests that talk through real rclpy between real processes."""
