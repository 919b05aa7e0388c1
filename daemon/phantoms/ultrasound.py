"""The B-mode neck phantom (any size 256..1024, labels 0 background, 1 artery, 2 vein).

It lives with the frame sources (:mod:`daemon.acquire.synthetic`), where the
live pipeline uses it; this module gives it a place beside the other phantoms.
``SyntheticSource(settings, fps).frame_with_labels(i)`` is one frame and its
labels; ``frames()`` is the moving sequence (pulsating artery, compressible
vein, probe drift).
"""

from __future__ import annotations

from daemon.acquire.synthetic import ARTERY, VEIN, SyntheticSettings, SyntheticSource

__all__ = ["ARTERY", "VEIN", "SyntheticSettings", "SyntheticSource"]
