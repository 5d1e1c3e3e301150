"""Offline training package for impatient_ros: data, the joint trainer, evaluation and their CLIs.

The source folder is ``training/``; it is installed as ``impatient_ros.training``
(never as a top-level ``training`` module, which would collide with any other
package of that name on a robot). Its modules import each other relatively, so
the same code runs as either name. It imports :mod:`impatient_ros`; the runtime
never imports it.
"""
