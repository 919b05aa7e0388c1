"""The DICOM node: series in over C-STORE, jobs by routing rules, results out over C-STORE.

- :mod:`daemon.dicom.settings`: the ``[dicom]`` configuration (no pynetdicom import);
- :mod:`daemon.dicom.store`: instances on disk and the node's SQLite bookkeeping
  (receipts, sends), bounded by a quota;
- :mod:`daemon.dicom.scp`: the C-STORE / C-ECHO SCP with its allow-lists and TLS;
- :mod:`daemon.dicom.send`: C-STORE SCU, PNG results as Secondary Capture;
- :mod:`daemon.dicom.node`: the node the supervisor starts, routing and following jobs.
"""
