"""Offline training package for impatient_ros: budgets, data, the joint trainer and its CLI."""
