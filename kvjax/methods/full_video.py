"""`FullVideo`: the streaming baseline that keeps every frame on the device.

Nothing is compressed or offloaded: every clip and every question attends to the whole
stream, and device memory grows linearly with it (the long-term buffers grow geometrically,
one compile per size) until it runs out. Positions are re-indexed like every stream method's,
so past the model's trained context this baseline is out of its regime by design.
"""

from __future__ import annotations

import dataclasses

from kvjax.methods.stream_memory import StreamMethod


@dataclasses.dataclass(frozen=True)
class FullVideo(StreamMethod):
    """Keep every frame's K/V on the device; attend to all of them."""

    name = "full_video"
