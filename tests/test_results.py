"""Result records (daemon/results.py): round trip, in-place views, hostile payloads."""

from __future__ import annotations

import numpy as np
import pytest

from daemon import results
from daemon.results import Output, RecordError


def _outputs() -> list[Output]:
    rng = np.random.default_rng(0)
    return [
        Output("segmentation", "vessels", rng.integers(0, 3, (48, 64), dtype=np.uint8)),
        Output("confidence", "vessels.p", rng.random((3, 24, 32)).astype(np.float16)),
        Output("classification", "view", np.array([0.1, 0.7, 0.2], np.float32)),
        Output("detection", "boxes", np.array([[1, 2, 30, 40, 0.9, 1]], np.float32)),
        Output("keypoints", "tip", np.array([[10.5, 20.25, 0.8], [np.nan, np.nan, 0.1]], "f4")),
        Output("regression", "depth", np.array([42.0], np.float32)),
    ]


def test_round_trip_keeps_every_output_in_order() -> None:
    outputs = _outputs()
    record = results.unpack(results.pack(outputs))
    assert [(o.role, o.name) for o in record.outputs] == [(o.role, o.name) for o in outputs]
    for got, sent in zip(record.outputs, outputs, strict=True):
        np.testing.assert_array_equal(got.array, sent.array)
        assert got.array.dtype == sent.array.dtype
    assert record.labels is not None and record.labels.shape == (48, 64)
    assert record.get("regression") is not None
    assert record.get("regression").array[0] == 42.0  # type: ignore[union-attr]
    assert len(record.all("keypoints")) == 1


def test_arrays_are_views_of_the_payload_not_copies() -> None:
    payload = results.pack(_outputs()[:1])
    labels = results.unpack(payload).labels
    assert labels is not None and np.shares_memory(labels, payload)


def test_pack_into_a_slot_and_an_empty_record() -> None:
    slot = np.zeros(results.capacity((48, 64)), np.uint8)
    used = results.pack_into(slot, _outputs())
    assert used == results.nbytes(_outputs()) <= slot.nbytes
    assert len(results.unpack(slot[:used]).outputs) == 6
    assert results.unpack(results.pack([])).outputs == ()


@pytest.mark.parametrize(
    ("output", "words"),
    [
        (Output("segmentation", "s", np.zeros((4, 4), np.int32)), "int32"),
        (Output("classification", "c", np.zeros((2, 2), np.float32)), "dimensions"),
        (Output("detection", "d", np.zeros((3, 5), np.float32)), "rows of 5"),
        (Output("regression", "", np.zeros(1, np.float32)), "name"),
        (Output("regression", "x" * 40, np.zeros(1, np.float32)), "name"),
        (Output("bogus", "b", np.zeros(1, np.float32)), "unknown role"),  # type: ignore[arg-type]
    ],
)
def test_malformed_outputs_are_refused_by_name(output: Output, words: str) -> None:
    with pytest.raises(RecordError, match=words):
        results.pack([output])


def test_a_record_that_does_not_fit_or_repeats_a_name_is_refused() -> None:
    with pytest.raises(RecordError, match="does not fit"):
        results.pack_into(np.zeros(results.HEADER_BYTES + 64, np.uint8), _outputs())
    twice = [Output("regression", "a", np.zeros(1, np.float32))] * 2
    with pytest.raises(RecordError, match="repeat"):
        results.pack(twice)


def test_hostile_payloads_raise_record_error_never_anything_else() -> None:
    """Random bytes, truncations and single corrupted bytes of a valid record: unpack
    either returns outputs that lie inside the payload or raises RecordError."""
    good = results.pack(_outputs())
    rng = np.random.default_rng(1)
    cases = [rng.integers(0, 256, n, dtype=np.uint8) for n in (0, 10, 900, 5000)]
    cases += [good[:n] for n in (0, 8, results.HEADER_BYTES, good.nbytes - 1)]
    for _ in range(300):
        bad = good.copy()
        at = int(rng.integers(0, results.HEADER_BYTES))
        bad[at] = rng.integers(0, 256)
        cases.append(bad)
    raised = 0
    for payload in cases:
        try:
            record = results.unpack(payload)
        except RecordError:
            raised += 1
            continue
        for o in record.outputs:
            assert np.shares_memory(o.array, payload)
    assert raised >= 8  # every random and truncated payload at least
