"""Synthetic images with ground truth, for training the bundled models and for tests.

- :mod:`daemon.phantoms.ultrasound`: the B-mode neck phantom (artery, vein).
- :mod:`daemon.phantoms.ct`: a thoracic CT volume in Hounsfield units with
  lung nodules; DICOM series and NIfTI/MetaImage writers.
- :mod:`daemon.phantoms.wsi`: H&E-like tissue of four classes and a streaming
  pyramidal tiled-TIFF writer that OpenSlide opens.

Every generator is deterministic by seed. ``ct`` and the tissue rendering of
``wsi`` need only numpy (so training machines need nothing else); file writers
import pydicom, SimpleITK or tifffile when called. This package imports none of
its modules.
"""
