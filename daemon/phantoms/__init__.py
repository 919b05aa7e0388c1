"""Synthetic images with ground truth, for training the bundled models and for tests.

- :mod:`daemon.phantoms.ultrasound`: the ultrasound simulator (convolution model of
  B-mode imaging, :mod:`~daemon.phantoms.us_imaging`; scenes with vessels and their
  look-alikes, :mod:`~daemon.phantoms.us_scene`): random training frames and the live
  phantom (artery, vein; optionally a probe sweep and an advancing needle), each frame
  with its truth (vessels in view, the needle's tip); :mod:`~daemon.phantoms.us_tasks`
  draws the frames of the view classifier and the needle-tip model.
- :mod:`daemon.phantoms.ct`: a thoracic CT volume in Hounsfield units with
  lung nodules; DICOM series and NIfTI/MetaImage writers.
- :mod:`daemon.phantoms.wsi`: H&E-like tissue of four classes and a streaming
  pyramidal tiled-TIFF writer that OpenSlide opens.

Every generator is deterministic by seed. ``ultrasound`` needs numpy and
OpenCV, ``ct`` and the tissue rendering of ``wsi`` only numpy (so training
machines need nothing else); file writers import pydicom, SimpleITK or tifffile
when called. This package imports none of its modules.
"""
