"""Tiling: patch grid, padding, blending stitcher with bounded memory, prefetch thread,
and equality with MONAI's sliding_window_inference (when MONAI and torch are here)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from daemon.offline import tiling


def position_dependent(x: np.ndarray) -> np.ndarray:
    """(N, *patch) -> (N, 2, *patch): depends on the whole patch, so blending shows."""
    axes = tuple(range(1, x.ndim))
    m = x.mean(axis=axes, keepdims=True)
    return np.stack([np.sin(x) + m, np.cos(x) * m], axis=1).astype(np.float32)


def reference(
    image: np.ndarray, predictor: tiling.Predictor, patch: tuple[int, ...], **kw: object
) -> np.ndarray:
    """The same definition without streaming: accumulate everything, divide once."""
    overlap = kw.get("overlap", 0.25)
    blend = kw.get("blend", "gaussian")
    pad = kw.get("pad", 0.0)
    w = tiling.weights(patch, blend, overlap)  # type: ignore[arg-type]
    acc: np.ndarray | None = None
    total = np.zeros(image.shape, np.float64)
    for pos in tiling.grid(image.shape, patch, overlap):  # type: ignore[arg-type]
        out = predictor(tiling.extract(image, pos, patch, pad)[None])[0]  # type: ignore[arg-type]
        if acc is None:
            acc = np.zeros((out.shape[0], *image.shape), np.float64)
        lo = [max(0, o) for o in pos]
        hi = [min(s, o + p) for s, o, p in zip(image.shape, pos, patch, strict=True)]
        dst = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        src = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, pos, strict=True))
        acc[(slice(None), *dst)] += out[(slice(None), *src)] * w[src]
        total[dst] += w[src]
    assert acc is not None
    return (acc / total).astype(np.float32)


def test_grid_places_patches_as_monai() -> None:
    # stride int(32 * 0.75) = 24; the last patch moved back to end at the edge
    assert sorted({p[0] for p in tiling.grid((100, 10), (32, 10), 0.25)}) == [0, 24, 48, 68]
    assert [p[0] for p in tiling.grid((64,), (32,), 0.0)] == [0, 32]
    assert [p[0] for p in tiling.grid((65,), (32,), 0.0)] == [0, 32, 33]
    # an axis no longer than the patch: one patch, centred (padded on both sides)
    assert tiling.grid((3, 40), (32, 40), 0.25) == [(-14, 0)]
    # raster order, first axis slowest
    g = tiling.grid((50, 50, 50), (20, 20, 20), 0.5)
    assert g == sorted(g) and len(g) == 4**3


def test_extract_pads_outside_and_views_inside() -> None:
    image = np.arange(20, dtype=np.float32).reshape(4, 5)
    inside = tiling.extract(image, (1, 1), (2, 3))
    assert np.shares_memory(inside, image) and inside.tolist() == [[6, 7, 8], [11, 12, 13]]
    out = tiling.extract(image, (-1, 3), (3, 4), pad=-5.0)
    assert out.tolist() == [[-5] * 4, [3, 4, -5, -5], [8, 9, -5, -5]]
    edge = tiling.extract(image, (-1, 3), (3, 4), pad="edge")
    assert edge[:, -1].tolist() == [4, 4, 9]
    rgb = np.zeros((10, 10, 3), np.uint8)
    assert tiling.extract(rgb, (8, 8), (4, 4)).shape == (4, 4, 3)  # trailing axes whole


@pytest.mark.parametrize("blend", ["constant", "linear", "gaussian"])
def test_identity_is_reproduced_by_any_blend(blend: tiling.Blend) -> None:
    rng = np.random.default_rng(0)
    image = rng.normal(size=(21, 37, 30)).astype(np.float32)

    def identity(x: np.ndarray) -> np.ndarray:
        return x[:, None]

    out = tiling.predict(image, identity, (8, 16, 32), overlap=0.25, blend=blend, batch=3)
    np.testing.assert_allclose(out[0], image, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("blend", ["constant", "linear", "gaussian"])
@pytest.mark.parametrize(
    ("shape", "patch", "overlap"),
    [((40, 50, 33), (16, 24, 40), 0.25), ((70, 45), (32, 16), 0.5), ((9, 9, 9), (4, 4, 4), 0.0)],
)
def test_streaming_equals_the_whole_volume_definition(
    blend: tiling.Blend, shape: tuple[int, ...], patch: tuple[int, ...], overlap: float
) -> None:
    image = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    got = tiling.predict(image, position_dependent, patch, overlap=overlap, blend=blend, batch=2)
    want = reference(image, position_dependent, patch, overlap=overlap, blend=blend)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_linear_weights_sum_to_one_over_the_overlap() -> None:
    # two patches of 32 with 25 % overlap share 8 rows; their ramps add up to 1 there
    w = tiling.weights((32,), "linear", 0.25)
    np.testing.assert_allclose(w[24:] + w[:8], 1.0, rtol=1e-6)
    assert w[8:24].tolist() == [1.0] * 16 and w.min() > 0
    g = tiling.weights((32, 32), "gaussian")
    assert g.argmax() == np.ravel_multi_index((15, 15), (32, 32)) and g.min() > 0


def test_stitcher_holds_one_patch_depth_and_hands_out_rows_in_order() -> None:
    shape, patch = (300, 20, 20), (32, 20, 20)
    st = tiling.Stitcher(shape, patch, channels=2, blend="gaussian", overlap=0.25)
    assert st._acc.shape == (2, 32, 20, 20)  # bounded: never the whole volume
    rows: list[tuple[int, int]] = []
    for pos in tiling.grid(shape, patch, 0.25):
        for start, block in st.add(pos, np.ones((2, *patch), np.float32)):
            rows.append((start, block.shape[1]))
            np.testing.assert_allclose(block, 1.0)
    rows += [(s, b.shape[1]) for s, b in st.close()]
    assert [s for s, _ in rows] == np.cumsum([0] + [n for _, n in rows[:-1]]).tolist()
    assert sum(n for _, n in rows) == 300
    with pytest.raises(ValueError, match="not grid order"):
        st2 = tiling.Stitcher(shape, patch, 2)
        st2.add((40, 0, 0), np.ones((2, *patch), np.float32))
        st2.add((0, 0, 0), np.ones((2, *patch), np.float32))


def test_mask_skips_patches_and_fills_what_no_patch_covers() -> None:
    image = np.ones((64, 64), np.float32)
    mask = np.zeros((8, 8), bool)  # a low-resolution mask: 1/8 of the image
    mask[:2, :2] = True  # the top-left 16 x 16 pixels
    positions = tiling.grid(image.shape, (16, 16), 0.0, mask=mask)
    assert positions == [(0, 0)]
    calls: list[int] = []

    def count(x: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        return x[:, None] * 3

    out = tiling.predict(image, count, (16, 16), overlap=0.0, mask=mask, fill=-1.0)
    assert calls == [1] and out.shape == (1, 64, 64)
    np.testing.assert_allclose(out[0, :16, :16], 3.0, rtol=1e-6)
    assert (out[0, 16:] == -1).all() and (out[0, :16, 16:] == -1).all()
    assert tiling.grid(image.shape, (16, 16), 0.0, mask=mask, min_fraction=0.99) == [(0, 0)]
    half = np.zeros((64, 64), bool)
    half[:8] = True
    assert tiling.grid(image.shape, (16, 16), 0.0, mask=half, min_fraction=0.6) == []


def test_prefetch_runs_ahead_boundedly_in_its_own_thread() -> None:
    made: list[int] = []
    threads: set[str] = set()

    def produce() -> object:
        for i in range(100):
            threads.add(threading.current_thread().name)
            made.append(i)
            yield i

    it = tiling.prefetch(produce(), depth=3)
    assert next(it) == 0
    # the producer fills the queue (items 1-3), makes item 4 and waits to put it: 5 made
    deadline = time.monotonic() + 30
    while len(made) < 5 and time.monotonic() < deadline:
        threading.Event().wait(0.01)
    assert len(made) == 5
    it.close()  # the consumer stops: so does the producer
    assert threading.current_thread().name not in threads
    assert not any(t.name == "tiling-prefetch" and t.is_alive() for t in threading.enumerate())


def test_prefetch_raises_the_producers_error_in_the_consumer() -> None:
    def broken() -> object:
        yield 1
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(tiling.prefetch(broken()))


def test_bad_predictor_output_is_named() -> None:
    with pytest.raises(ValueError, match=r"expected \(1, C, 8, 8\)"):
        tiling.predict(np.zeros((16, 16)), lambda x: x, (8, 8))


def test_timings_cover_generator_and_stitcher() -> None:
    t = tiling.Timings()
    tiling.predict(np.zeros((40, 40)), lambda x: x[:, None], (16, 16), timings=t, batch=2)
    assert len(t.seconds["generator"]) == len(t.seconds["stitcher"]) == 5  # 9 patches, by 2


# --- MONAI's sliding_window_inference on the same predictor --------------------------------


@pytest.mark.parametrize("blend", ["constant", "gaussian"])
@pytest.mark.parametrize(
    ("shape", "patch", "overlap"),
    [
        ((70, 90, 41), (32, 48, 48), 0.25),
        ((100, 77), (32, 32), 0.5),
        ((5, 60, 60), (16, 32, 32), 0.0),
    ],
)
def test_equal_to_monai_sliding_window_inference(
    blend: tiling.Blend, shape: tuple[int, ...], patch: tuple[int, ...], overlap: float
) -> None:
    torch = pytest.importorskip("torch", reason="MONAI needs torch (pip install monai torch)")
    inferers = pytest.importorskip("monai.inferers", reason="MONAI is a test-only extra")
    image = np.random.default_rng(2).normal(size=shape).astype(np.float32)

    def torch_predictor(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(position_dependent(x[:, 0].numpy()))

    want = inferers.sliding_window_inference(
        torch.from_numpy(image)[None, None],
        roi_size=patch,
        sw_batch_size=3,
        predictor=torch_predictor,
        overlap=overlap,
        mode=blend,
        sigma_scale=0.125,
        padding_mode="constant",
        cval=0.0,
    )[0].numpy()
    got = tiling.predict(image, position_dependent, patch, overlap=overlap, blend=blend, batch=3)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
