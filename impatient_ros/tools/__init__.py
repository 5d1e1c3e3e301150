"""Small ROS 2 tool nodes around the classifier node, and the pure helpers they use.

* ``impatient-camera``  (:mod:`.camera`)  - publishes images from a data set, a folder or a video
* ``impatient-budget``  (:mod:`.budget`)  - publishes impatient_ros/Budget from a schedule
* ``impatient-monitor`` (:mod:`.monitor`) - joins predictions with true labels, prints and plots

The logic each tool needs lives in pure modules (:mod:`.sources`,
:mod:`.schedule`, :mod:`.monitor_stats`, no rclpy); the nodes only wire it to
ROS with the shared helpers of :mod:`.common`.
"""
