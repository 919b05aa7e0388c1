"""Inference engines behind one interface, model cards, pre/post-processing.

Importing this package imports no engine library (see ``registry``); the
heavier parts (``segmenter``, ``preprocess``, ``reference``) are imported
where they are used.
"""

from __future__ import annotations

from daemon.engines.base import Engine, Probe, TensorSpec
from daemon.engines.registry import engine_class, names, probe_all, select

__all__ = ["Engine", "Probe", "TensorSpec", "engine_class", "names", "probe_all", "select"]
