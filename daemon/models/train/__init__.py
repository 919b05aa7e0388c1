"""Training scripts for the bundled models (PyTorch: ``pip install -e .[train]``).

- ``python -m daemon.models.train.ultrasound``: the paper's 2-D U-Net, artery/vein.
- ``python -m daemon.models.train.ct``: a 3-D U-Net for lung nodules.
- ``python -m daemon.models.train.wsi``: a 512x512 H&E patch classifier, 4 classes.
- ``python -m daemon.models.train.view``: a frame classifier, vessels in view or not.
- ``python -m daemon.models.train.needle``: a needle-tip keypoint model.

Each trains on its phantom (daemon/phantoms/), scores itself on held-out seeds,
and writes ``<name>.onnx`` and its card ``<name>.toml`` into ``--out DIR``, or into
the package (daemon/models/, replacing the bundled model) only with ``--publish``.
``--quick`` is a CPU smoke run. See daemon/models/README.md.
"""
