"""RViz markers for the instances that have a 3D position (use_depth).

Per instance: a box at its centroid, sized by its extent, in the overlay's colour, and a
text label (phrase and score) above it. Depth is aligned to the colour image, so the
markers use the colour image's frame. A DELETEALL first clears the previous frame's
markers, and a lifetime makes them vanish when results stop coming.
"""

from __future__ import annotations

from builtin_interfaces.msg import Duration

from instructsam_core.visualize import PALETTE

MARKER_LIFETIME_S = 1.0
MIN_SIZE_M = 0.01  # a flat or one-pixel extent still shows


def instance_markers(result_msg, lifetime_s: float = MARKER_LIFETIME_S):
    """visualization_msgs/MarkerArray for an InstanceSegmentation."""
    from visualization_msgs.msg import Marker, MarkerArray

    clear = Marker(action=Marker.DELETEALL)
    clear.header = result_msg.header
    markers = [clear]
    lifetime = Duration(sec=int(lifetime_s), nanosec=int((lifetime_s % 1) * 1e9))
    for inst in result_msg.instances:
        if not inst.has_position:
            continue
        r, g, b = (float(c) / 255.0 for c in PALETTE[(inst.id - 1) % len(PALETTE)])
        box = Marker(ns="instances", id=int(inst.id), type=Marker.CUBE, action=Marker.ADD, lifetime=lifetime)
        box.header = result_msg.header
        box.pose.position = inst.centroid
        box.pose.orientation.w = 1.0
        box.scale.x, box.scale.y, box.scale.z = (max(v, MIN_SIZE_M) for v in (inst.extent.x, inst.extent.y,
                                                                             inst.extent.z))
        box.color.r, box.color.g, box.color.b, box.color.a = r, g, b, 0.5
        label = Marker(ns="labels", id=int(inst.id), type=Marker.TEXT_VIEW_FACING, action=Marker.ADD,
                       lifetime=lifetime, text=f"{inst.id} {inst.phrase} {inst.score:.2f}")
        label.header = result_msg.header
        label.pose.position.x = inst.centroid.x
        label.pose.position.y = inst.centroid.y - box.scale.y / 2 - 0.03  # optical frame: y points down
        label.pose.position.z = inst.centroid.z
        label.pose.orientation.w = 1.0
        label.scale.z = 0.04  # text height, metres
        label.color.r = label.color.g = label.color.b = label.color.a = 1.0
        markers += [box, label]
    return MarkerArray(markers=markers)
