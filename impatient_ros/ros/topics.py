"""Topic naming rules the node and the camera tool share (pure: no rclpy)."""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["compressed_topic"]


def compressed_topic(resolve: Callable[..., str], base: str = "image") -> str:
    """The topic of the compressed transport of ``base``: '<base>/compressed', as image_transport names it.

    It follows a remap of ``base`` (``-r image:=/cam/image`` gives
    ``/cam/image/compressed``) unless '<base>/compressed' is remapped itself,
    which then wins. ``resolve(name, only_expand=False)`` is a node's
    ``resolve_topic_name``: the fully qualified name, with remaps applied
    unless ``only_expand``.
    """
    name = f"{base}/compressed"
    direct = resolve(name)
    if direct != resolve(name, only_expand=True):
        return direct
    return resolve(base) + "/compressed"
