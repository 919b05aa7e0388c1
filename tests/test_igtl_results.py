"""Results of every role over OpenIGTLink: records (built with ``results.pack``) written to
real results rings, served by the real IgtlOutStage on a free port, received by pyigtl's
own client. Positions are checked in world mm through the frame's transform."""

from __future__ import annotations

import json
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pyigtl
import pytest

from daemon import config, results
from daemon.config import Config
from daemon.frame import WITHHELD, FrameMeta
from daemon.igtl_out import IgtlOutStage
from daemon.igtl_results import device_name
from daemon.models import default_model
from daemon.results import Output
from daemon.ring import Ring, RingWriter
from daemon.stage import InputPort, StageContext, StageSpec
from daemon.supervisor import Supervisor

pytestmark = pytest.mark.timeout(120)

T = 20.0
SHAPE = (48, 64)
MATRIX = np.array(
    [[0.0, -0.3, 0.0, 12.5], [0.2, 0.0, 0.0, -40.0], [0.0, 0.0, 1.0, 3.0], [0.0, 0.0, 0.0, 1.0]]
)  # 0.2 mm columns, 0.3 mm rows, rotated 90 degrees, with an origin


def world(x: float, y: float) -> tuple[float, float, float]:
    """MATRIX applied to pixel (x, y), written out."""
    return (12.5 - 0.3 * y, -40.0 + 0.2 * x, 3.0)


DESCRIPTION = {
    "model": "multitask.onnx",
    "outputs": [
        {"name": "seg", "role": "segmentation", "classes": []},
        {
            "name": "view",
            "role": "classification",
            "classes": [
                {"name": "no vessels", "colour": [0, 0, 0], "opacity": 0.0},
                {"name": "vessels in view", "colour": [200, 40, 40], "opacity": 0.5},
            ],
        },
        {
            "name": "boxes",
            "role": "detection",
            "classes": [
                {"name": "needle", "colour": [10, 20, 30], "opacity": 0.5},
                {"name": "probe", "colour": [250, 128, 0], "opacity": 0.5},
            ],
        },
        {"name": "tip", "role": "keypoints", "names": ["tip", "heel"]},
        {"name": "depth", "role": "regression", "names": ["depth", "gain"], "units": ["mm", "dB"]},
    ],
}
LONG = "a-rather-long-output-nm"  # 23 bytes: the device name is cut to fit 20


def multitask(i: int) -> np.ndarray:
    """Frame ``i``'s record: one output of each role the description names."""
    nan = float("nan")
    return results.pack(
        [
            Output(
                "segmentation",
                "seg",
                (np.arange(48 * 64).reshape(SHAPE) % (3 + i)).astype(np.uint8),
            ),
            Output("classification", "view", np.array([0.1, 0.9], np.float32)),
            Output(
                "detection",
                "boxes",
                np.array([[4, 6, 14, 26, 0.8, 1], [1, 1, nan, 2, 0.7, 0]], np.float32),
            ),
            Output("keypoints", "tip", np.array([[10 + i, 20, 0.93], [nan, nan, 0.1]], np.float32)),
            Output("regression", "depth", np.array([42.5, 3.0], np.float32)),
        ]
    )


def meta(i: int, flags: int = 0) -> FrameMeta:
    return FrameMeta(index=i, t_source=1_700_000_000.5 + i, transform=MATRIX.copy(), flags=flags)


@contextmanager
def igtl_stage(
    ports: tuple[str, ...] = ("results",), params: dict[str, Any] | None = None
) -> Iterator[tuple[IgtlOutStage, dict[str, RingWriter]]]:
    """An IgtlOutStage (free port) reading fresh results rings, and the rings' writers."""
    rings = {
        p: Ring.create(
            f"{os.getpid()}-test-{uuid.uuid4().hex[:8]}-{p}",
            slots=4,
            payload_bytes=results.capacity(SHAPE),
        )
        for p in ports
    }
    spec = StageSpec(
        "igtl_out",
        "igtl_out",
        inputs={p: InputPort(r.name, "newest") for p, r in rings.items()},
        params=params or {},
    )
    config = Config.model_validate({"igtl_out": {"enabled": True, "port": 0}})
    ctx = StageContext(spec, queue.Queue(), threading.Event())
    stage = IgtlOutStage(spec, config, ctx)
    stage.setup()
    try:
        yield stage, {p: r.writer() for p, r in rings.items()}
    finally:
        stage.teardown()
        ctx.close(finished=True)
        for r in rings.values():
            r.close()
            r.unlink()


@contextmanager
def client_of(stage: IgtlOutStage) -> Iterator[Any]:
    client = pyigtl.OpenIGTLinkClient("127.0.0.1", stage.server.port)
    try:
        step_until(stage, lambda: stage.server.clients == 1)
        yield client
    finally:
        client.stop()


def step_until(stage: IgtlOutStage, cond: Callable[[], bool], timeout: float = T) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"condition not reached; {stage.summary()}"
        stage.step()


def receive(stage: IgtlOutStage, client: Any, devices: set[str]) -> dict[str, Any]:
    """Step the stage until the client has a message from each of ``devices``."""
    got: dict[str, Any] = {}

    def arrived() -> bool:
        got.update({m.device_name: m for m in client.get_latest_messages()})
        return devices <= set(got)

    step_until(stage, arrived)
    return got


def test_every_role_reaches_a_pyigtl_client_with_names_positions_and_scores() -> None:
    second = {
        "outputs": [
            {"name": "view", "role": "classification", "classes": [{"name": "a"}, {"name": "b"}]},
            {"name": LONG, "role": "regression", "names": ["speed"], "units": ["mm/s"]},
        ]
    }
    with igtl_stage(("results", "results-1"), params=DESCRIPTION) as (stage, rings):
        # the second model's description arrives as the supervisor's `model` command
        stage.command("model", {"generation": 0, "port": "results-1", **second})
        with client_of(stage) as client:
            for i in range(2):
                rings["results"].write(multitask(i), meta(i))
                rings["results-1"].write(
                    results.pack(
                        [
                            Output("classification", "view", np.array([0.7, 0.3], np.float32)),
                            Output("regression", LONG, np.array([1.25], np.float32)),
                        ]
                    ),
                    meta(i),
                )
                long = "a-rather-long-outp-1"
                got = receive(
                    stage,
                    client,
                    {
                        "Segmentation",
                        "view",
                        "boxes",
                        "boxesCentres",
                        "tip",
                        "depth",
                        "view-1",
                        long,
                    },
                )
                types = {name: m.message_type for name, m in got.items()}
                assert types == {
                    "Segmentation": "IMAGE",
                    "view": "STRING",
                    "boxes": "STRING",
                    "boxesCentres": "POINT",
                    "tip": "POINT",
                    "depth": "STRING",
                    "view-1": "STRING",
                    long: "STRING",
                }
                for m in got.values():
                    assert m.timestamp == pytest.approx(meta(i).t_source, abs=1e-6)
                seg = got["Segmentation"]
                expected = (np.arange(48 * 64).reshape(SHAPE) % (3 + i)).astype(np.uint8)
                assert np.array_equal(seg.image[0], expected)
                np.testing.assert_allclose(seg.ijk_to_world_matrix, MATRIX, atol=1e-4)

                view = json.loads(got["view"].string)
                assert view == {
                    "frame": i,
                    "withheld": False,
                    "class": "vessels in view",
                    "score": 0.9,
                    "probabilities": {"no vessels": 0.1, "vessels in view": 0.9},
                }
                assert json.loads(got["view-1"].string)["class"] == "a"

                (box,) = json.loads(got["boxes"].string)["boxes"]  # the NaN box is left out
                assert (box["class"], box["score"], box["box"]) == ("probe", 0.8, [4, 6, 14, 26])
                assert box["centre"] == pytest.approx(world(9, 16), abs=1e-3)
                assert box["size"] == pytest.approx([10 * 0.2, 20 * 0.3], abs=1e-3)
                centres = got["boxesCentres"]
                assert centres.names == ["probe"] and centres.groups == ["Labeled Point"]
                assert centres.rgba_colors == [(250, 128, 0, 255)]
                np.testing.assert_allclose(centres.positions, [world(9, 16)], atol=1e-4)

                tip = got["tip"]  # "heel" was not found: no point for it
                assert tip.names == ["tip"] and tip.groups == ["Landmark"]
                np.testing.assert_allclose(tip.positions, [world(10 + i, 20)], atol=1e-4)

                depth = json.loads(got["depth"].string)
                assert depth["values"] == [
                    {"name": "depth", "value": 42.5, "unit": "mm"},
                    {"name": "gain", "value": 3.0, "unit": "dB"},
                ]
                assert json.loads(got[long].string)["values"] == [
                    {"name": "speed", "value": 1.25, "unit": "mm/s"}
                ]
        assert stage.summary()["malformed"] == 0 and stage.summary()["sent"] == 4


def test_without_a_description_rows_get_stable_names() -> None:
    with igtl_stage() as (stage, rings), client_of(stage) as client:
        rings["results"].write(multitask(0), meta(0))
        got = receive(stage, client, {"view", "tip", "depth"})
        assert json.loads(got["view"].string)["probabilities"] == {"class0": 0.1, "class1": 0.9}
        assert got["tip"].names == ["point0"]
        values = json.loads(got["depth"].string)["values"]
        assert [(v["name"], v["unit"]) for v in values] == [("value0", ""), ("value1", "")]


def test_a_withheld_result_removes_its_points() -> None:
    """Withheld by the guard (or nothing found): an empty POINT message, so the viewer's
    markers go away instead of showing stale points."""
    with igtl_stage(params=DESCRIPTION) as (stage, rings), client_of(stage) as client:
        rings["results"].write(multitask(0), meta(0, flags=WITHHELD))
        got = receive(stage, client, {"tip", "boxesCentres", "view"})
        assert got["tip"].positions == [] and got["boxesCentres"].positions == []
        assert json.loads(got["view"].string)["withheld"] is True


def test_malformed_records_are_counted_and_the_next_one_is_served() -> None:
    with igtl_stage(params=DESCRIPTION) as (stage, rings), client_of(stage) as client:
        writer = rings["results"]
        writer.write(np.zeros(SHAPE, np.uint8), meta(0))  # a bare label map, not a record
        step_until(stage, lambda: stage.malformed == 1)
        garbage = multitask(1)
        garbage[:4] = np.frombuffer(b"JUNK", np.uint8)
        writer.write(garbage, meta(1))
        step_until(stage, lambda: stage.malformed == 2)
        short = multitask(2)[: results.HEADER_BYTES + 10]  # claims more than it holds
        writer.write(short, meta(2))
        step_until(stage, lambda: stage.malformed == 3)
        writer.write(multitask(3), meta(3))
        got = receive(stage, client, {"view"})
        assert json.loads(got["view"].string)["frame"] == 3
        assert stage.summary()["sent"] == 1


def test_device_names_fit_the_header() -> None:
    assert device_name("Segmentation") == "Segmentation"
    assert device_name("Segmentation", "-12") == "Segmentation-12"
    assert device_name("x" * 24, "-1") == "x" * 18 + "-1"
    assert device_name("Gefäß\n", "") == "Gef___"


def test_a_hot_swap_tells_the_output_the_new_model_before_it_switches() -> None:
    """A real run (threads, ONNX Runtime): the swap announces the new model's description
    to igtl_out too, and switches only once it answered, so the new model's first result
    is already named after it."""
    cfg = config.load(
        None,
        {
            "source.pace": "fps",
            "source.fps": 20.0,
            "pipeline.workers": "threads",
            "model.warmup": 1,
            "sink.headless": True,
            "control.enabled": False,
            "igtl_out.enabled": True,
            "igtl_out.port": 0,
        },
    )
    sup = Supervisor(cfg)
    done: list[dict[str, Any]] = []
    runner = threading.Thread(target=lambda: done.append(sup.run()), daemon=True)
    runner.start()
    deadline = time.monotonic() + 90
    while sup.state != "running":
        assert runner.is_alive() and time.monotonic() < deadline, "echod did not start"
        time.sleep(0.05)
    sup.in_main(lambda: sup.begin_swap(default_model(), "", "")).result(30)
    while (sup.last_swap or {}).get("state") not in ("switched", "failed"):
        assert time.monotonic() < deadline, f"no swap outcome: {sup.swap}"
        time.sleep(0.05)
    assert sup.last_swap is not None and sup.last_swap["state"] == "switched", sup.last_swap
    sup.request_stop("test")
    runner.join(60)
    assert done, "the run did not end"
    assert done[0]["igtl_out"]["descriptions"] == {"results": [0, 1]}
