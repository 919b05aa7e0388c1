"""echod: a real-time ultrasound appliance daemon."""

from __future__ import annotations

__version__ = "0.1.0"
