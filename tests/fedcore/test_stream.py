"""The windowed signal source: window boundaries, stride, label rules, chunked feeding equal
to whole-array windowing, the ring of recent windows, and signal files."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fedcore import (
    ConfigError,
    SignalWindower,
    collect_windows,
    load_signal_windows,
    read_signal_chunks,
    window_signal,
)
from fedledger._datasets import ACTIVITY_CLASSES, synthetic_activity


def _ramp(steps: int, channels: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Step t, channel c holds 10 t + c: every value says where it came from."""
    signal = 10.0 * np.arange(steps)[:, None] + np.arange(channels)
    return signal.astype(np.float32), np.arange(steps) % 3


def test_window_boundaries_and_layout():
    signal, labels = _ramp(11)
    x, y = window_signal(signal, labels, window=4, stride=2)
    # Starts 0, 2, 4, 6; a window from 8 would need step 11: the short tail is dropped.
    assert x.shape == (4, 4 * 2)
    starts = x[:, 0] / 10
    np.testing.assert_array_equal(starts, [0, 2, 4, 6])
    # Row-major (window, channels): step t's channels side by side, then step t + 1.
    np.testing.assert_array_equal(x[1], [20, 21, 30, 31, 40, 41, 50, 51])
    np.testing.assert_array_equal(y, labels[[3, 5, 7, 9]])  # label of the last step


@pytest.mark.parametrize(
    ("window", "stride", "count"), [(5, 1, 16), (5, 5, 4), (3, 7, 3), (20, 1, 1)]
)
def test_stride_sets_the_starts(window, stride, count):
    signal, labels = _ramp(20)
    x, _ = window_signal(signal, labels, window=window, stride=stride)
    assert len(x) == count
    np.testing.assert_array_equal(x[:, 0] / 10, np.arange(count) * stride)


def test_too_short_a_signal_gives_no_windows():
    signal, labels = _ramp(3)
    x, y = window_signal(signal, labels, window=4, stride=1)
    assert x.shape == (0, 8) and y.shape == (0,)


def test_majority_label_and_its_ties():
    signal = np.zeros((8, 1), np.float32)
    labels = np.array([2, 2, 1, 1, 3, 0, 0, 0])
    _, last = window_signal(signal, labels, window=4, stride=4)
    _, majority = window_signal(signal, labels, window=4, stride=4, label="majority")
    np.testing.assert_array_equal(last, [1, 0])
    np.testing.assert_array_equal(majority, [1, 0])  # 2-2 tie: the smaller label wins
    with pytest.raises(ValueError, match="label rule"):
        window_signal(signal, labels, window=4, stride=4, label="first")


def _chunks(signal, labels, sizes):
    bounds = np.cumsum([0, *sizes])
    return [(signal[a:b], labels[a:b]) for a, b in itertools.pairwise(bounds)]


@pytest.mark.parametrize(("window", "stride"), [(8, 3), (8, 8), (4, 9), (1, 1), (16, 1)])
@pytest.mark.parametrize("label", ["last", "majority"])
def test_chunked_feeding_equals_whole_array_feeding(window, stride, label):
    signal, labels = synthetic_activity(600, channels=3, seed=1)
    whole = window_signal(signal, labels, window=window, stride=stride, label=label)
    rng = np.random.default_rng(window * 100 + stride)
    for sizes in (
        [1] * 600,
        [600],
        [0, 7, 0, 200, 3, 390],
        list(rng.multinomial(600, np.ones(37) / 37)),
    ):
        windower = SignalWindower(window=window, stride=stride, channels=3, label=label)
        x, y = collect_windows(windower, _chunks(signal, labels, sizes))
        np.testing.assert_array_equal(x, whole[0])
        np.testing.assert_array_equal(y, whole[1])
        assert windower.steps == 600
        # Memory between chunks: the last window - 1 steps, whatever the stream's length.
        assert windower._carry.shape == (window - 1, 3)


@pytest.mark.parametrize("max_windows", [1, 5, 50, 1000])
def test_ring_keeps_the_most_recent_windows(max_windows):
    signal, labels = synthetic_activity(900, channels=2, seed=2)
    x_all, y_all = window_signal(signal, labels, window=10, stride=4)
    windower = SignalWindower(window=10, stride=4, channels=2)
    chunks = _chunks(signal, labels, [13] * 69 + [3])
    x, y = collect_windows(windower, chunks, max_windows=max_windows)
    np.testing.assert_array_equal(x, x_all[-max_windows:])
    np.testing.assert_array_equal(y, y_all[-max_windows:])


def test_an_endless_stream_in_bounded_memory():
    """Chunks come from a generator: nothing holds the stream, only the ring and carry."""

    def stream():
        for seed in range(200):
            yield synthetic_activity(500, channels=3, seed=seed)

    windower = SignalWindower(window=64, stride=32, channels=3)
    x, y = collect_windows(windower, stream(), max_windows=100)
    assert x.shape == (100, 192) and windower.steps == 100_000
    assert set(np.unique(y)) <= set(range(len(ACTIVITY_CLASSES)))


def test_bad_chunks_are_refused():
    windower = SignalWindower(window=4, stride=1, channels=2)
    with pytest.raises(ValueError, match=r"shape \(T, 2\)"):
        windower.feed(np.zeros((3, 3)), np.zeros(3))
    with pytest.raises(ValueError, match="labels"):
        windower.feed(np.zeros((3, 2)), np.zeros(2))
    with pytest.raises(ValueError, match="NaN"):
        windower.feed(np.full((3, 2), np.nan), np.zeros(3))
    with pytest.raises(ValueError, match="non-negative integers"):
        windower.feed(np.zeros((3, 2)), np.array([0.5, 1, 2]))
    with pytest.raises(ValueError, match=">= 1"):
        SignalWindower(window=0, stride=1, channels=1)


def test_single_channel_signals_may_be_one_dimensional():
    signal, labels = _ramp(9, channels=1)
    x1, y1 = window_signal(signal[:, 0], labels, window=3, stride=2)
    x2, y2 = window_signal(signal, labels, window=3, stride=2)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)


@pytest.fixture
def recording():
    return synthetic_activity(1000, channels=3, seed=3)


def test_csv_signal_is_read_in_chunks(tmp_path, recording):
    signal, labels = recording
    path = tmp_path / "signal.csv"
    table = np.column_stack([signal, labels])
    np.savetxt(path, table, delimiter=",", header="ax,ay,az,label", comments="", fmt="%.9g")
    chunks = list(read_signal_chunks(path, chunk_rows=64))
    assert max(len(s) for s, _ in chunks) == 64 and sum(len(s) for s, _ in chunks) == 1000
    x, y = load_signal_windows(path, window=32, stride=16, channels=3, chunk_rows=64)
    ref_x, ref_y = window_signal(signal, labels, window=32, stride=16)
    np.testing.assert_allclose(x, ref_x, rtol=1e-6)
    np.testing.assert_array_equal(y, ref_y)


def test_npy_signal_is_memory_mapped(tmp_path, recording):
    signal, labels = recording
    np.save(tmp_path / "signal.npy", signal)
    np.save(tmp_path / "labels.npy", labels)
    x, y = load_signal_windows(
        tmp_path / "signal.npy", labels=tmp_path / "labels.npy",
        window=50, stride=25, channels=3, label="majority", max_windows=10, chunk_rows=99,
    )  # fmt: skip
    ref_x, ref_y = window_signal(signal, labels, window=50, stride=25, label="majority")
    np.testing.assert_array_equal(x, ref_x[-10:])
    np.testing.assert_array_equal(y, ref_y[-10:])


def test_signal_file_errors_name_the_file(tmp_path, recording):
    signal, labels = recording
    np.save(tmp_path / "signal.npy", signal)
    with pytest.raises(ConfigError, match="needs a labels"):
        load_signal_windows(tmp_path / "signal.npy", window=4, stride=1, channels=3)
    with pytest.raises(ConfigError, match="file not found"):
        load_signal_windows(
            tmp_path / "signal.npy", labels=tmp_path / "none.npy", window=4, stride=1, channels=3
        )
    np.save(tmp_path / "short.npy", labels[:10])
    with pytest.raises(ConfigError, match="10 labels|expected a"):
        load_signal_windows(
            tmp_path / "signal.npy", labels=tmp_path / "short.npy", window=4, stride=1, channels=3
        )
    (tmp_path / "bad.csv").write_text("1,2,3,0\n1,nan,3,1\n")
    with pytest.raises(ConfigError, match="NaN") as caught:
        load_signal_windows(tmp_path / "bad.csv", window=1, stride=1, channels=3)
    assert caught.value.file == str(tmp_path / "bad.csv")
    (tmp_path / "few.csv").write_text("1,2,3,0\n")
    with pytest.raises(ConfigError, match="shorter than one window"):
        load_signal_windows(tmp_path / "few.csv", window=2, stride=1, channels=3)
    with pytest.raises(ConfigError, match="shape"):
        load_signal_windows(tmp_path / "few.csv", window=1, stride=1, channels=2)
    with pytest.raises(ConfigError, match=".csv or .npy"):
        load_signal_windows(tmp_path / "s.parquet", window=1, stride=1, channels=2)


def test_synthetic_activity_is_deterministic():
    a, la = synthetic_activity(2000, seed=5)
    b, lb = synthetic_activity(2000, seed=5)
    c, _ = synthetic_activity(2000, seed=6)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    assert not np.array_equal(a, c)
    assert a.dtype == np.float32 and a.shape == (2000, 3)
    assert set(np.unique(la)) == set(range(len(ACTIVITY_CLASSES)))
