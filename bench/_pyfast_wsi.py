"""pyFAST's whole-slide classification pipeline, for bench/wsi_table4.py (run as a child
with pyFAST on PYTHONPATH; imports nothing of echod's, so FAST's own libraries load alone).

    python bench/_pyfast_wsi.py SLIDE MODEL BATCH     # prints one JSON line
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import numpy as np


def fast_child(slide: str, model: str, batch: int) -> None:
    """Run the pipeline twice (cold: FAST builds its OpenCL kernels; warm) and print JSON."""
    import fast

    def pipeline() -> tuple[Any, ...]:
        importer = fast.WholeSlideImageImporter.create(slide)
        tissue = fast.TissueSegmentation.create(useColorThresholdingMethod=True).connect(importer)
        gen = fast.PatchGenerator.create(512, 512, level=0, maskThreshold=0.5)
        gen.connect(0, importer).connect(1, tissue)
        batches = fast.ImageToBatchGenerator.create(batch).connect(gen)
        # with scale 1, FAST's (v - mean) / std is the card's (v/255 - 0.5) / 0.25 (checked:
        # FAST and echod give the same class to every patch both classify)
        nn = fast.NeuralNetwork.create(
            modelFilename=model,
            scaleFactor=1.0,
            meanIntensity=127.5,
            standardDeviationIntensity=63.75,
            inferenceEngine="ONNXRuntime",
        ).connect(batches)
        stitcher = fast.PatchStitcher.create().connect(nn)
        return importer, tissue, gen, batches, nn, stitcher

    out: dict[str, Any] = {}
    for run in ("cold", "warm"):
        t0 = time.perf_counter()
        *objects, stitcher = pipeline()
        for po in (*objects, stitcher):
            po.enableRuntimeMeasurements()
        first, grid = None, None
        for output in fast.DataStream(stitcher):  # the stitched grid, after each batch
            grid = output
            if first is None:
                first = time.perf_counter() - t0
        wall = time.perf_counter() - t0
        probs = np.asarray(grid)
        n = int((probs.sum(axis=-1) > 0).sum())
        importer, tissue, gen, _, nn = objects

        def total(po: Any, name: str = "execute") -> float:
            return float(po.getRuntime(name).getSum())  # ms

        per_patch = {
            "generator": total(gen, "create patch"),
            "nn_input": total(nn, "input_processing"),
            "inference": total(nn, "inference"),
            "nn_output": total(nn, "output_processing"),
            "stitcher": total(stitcher, "stitch patch"),
        }
        out[run] = {
            "patches": n,
            "wall_s": round(wall, 3),
            "patches_per_s": round(n / wall, 2),
            "first_batch_s": None if first is None else round(first, 3),
            "per_patch_ms": {k: round(v / max(n, 1), 3) for k, v in per_patch.items()}
            | {"total": round(wall * 1e3 / max(n, 1), 3)},
            "importer_tissue_ms": round(total(importer) + total(tissue), 1),
            "classes": np.bincount(
                probs[probs.sum(axis=-1) > 0].argmax(-1), minlength=probs.shape[-1]
            ).tolist(),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    fast_child(sys.argv[1], sys.argv[2], int(sys.argv[3]))
