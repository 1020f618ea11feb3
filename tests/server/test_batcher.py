"""Tests for server/batcher.py: concurrent requests' images run as one batch, each gets its own result, errors reach every waiter."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from lungdet.server.batcher import Batcher
from lungdet.submission.prediction_string import Prediction


class FakeDetector:
    """Answers each image with one box whose confidence is the image's first pixel / 255; the first call can be held at a gate."""

    score_threshold = 0.5

    def __init__(self, *, fail: bool = False) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.calls: list[int] = []
        self.fail = fail

    def predict_batch(self, images: list[np.ndarray], tags=None) -> list[Prediction]:
        assert tags is not None and len(tags) == len(images)  # each upload's tags travel with it
        self.calls.append(len(images))
        self.entered.set()
        if len(self.calls) == 1:
            assert self.gate.wait(timeout=30), "the test never opened the gate"
        if self.fail:
            raise RuntimeError("model exploded")
        return [
            Prediction.from_arrays([image[0, 0] / 255], [[0, 0, image.shape[1], image.shape[0]]]) for image in images
        ]


def image(value: int) -> np.ndarray:
    return np.full((4, 6), value, dtype=np.uint8)


def queue_while_held(batcher: Batcher, detector: FakeDetector, values: list[int]) -> dict[int, object]:
    """Send ``values[0]``, hold the model on it, queue the rest behind it, then release; returns {value: result or error}."""
    results: dict[int, object] = {}

    def ask(value: int) -> None:
        try:
            results[value] = batcher.predict(image(value))
        except Exception as error:  # noqa: BLE001 - the test looks at what each waiter got
            results[value] = error

    threads = [threading.Thread(target=ask, args=(values[0],))]
    threads[0].start()
    assert detector.entered.wait(timeout=30)
    for value in values[1:]:
        threads.append(threading.Thread(target=ask, args=(value,)))
        threads[-1].start()
    deadline = time.monotonic() + 30
    while batcher._waiting.qsize() < len(values) - 1:  # every later request queued behind the held one
        assert time.monotonic() < deadline, "the requests never queued"
        time.sleep(0.01)
    detector.gate.set()
    for thread in threads:
        thread.join(timeout=30)
    return results


def test_a_lone_request_runs_alone() -> None:
    detector = FakeDetector()
    detector.gate.set()
    batcher = Batcher(detector)
    prediction = batcher.predict(image(51))
    assert prediction.scores.tolist() == [0.2] and prediction.boxes.tolist() == [[0, 0, 6, 4]]
    assert batcher.batch_sizes == [1]
    assert batcher.score_threshold == 0.5  # the detector's attributes show through
    batcher.close()


def test_requests_queued_during_a_pass_run_together_and_each_gets_its_own_boxes() -> None:
    detector = FakeDetector()
    batcher = Batcher(detector, max_batch=8)
    values = [10, 20, 30, 40, 50, 60]
    results = queue_while_held(batcher, detector, values)
    assert batcher.batch_sizes == [1, 5]
    for value in values:
        assert results[value].scores.tolist() == [value / 255], value
    batcher.close()


def test_max_batch_caps_a_pass() -> None:
    detector = FakeDetector()
    batcher = Batcher(detector, max_batch=2)
    results = queue_while_held(batcher, detector, [1, 2, 3, 4, 5, 6])
    assert batcher.batch_sizes == [1, 2, 2, 1]
    assert sorted(round(result.scores[0] * 255) for result in results.values()) == [1, 2, 3, 4, 5, 6]
    batcher.close()


def test_an_error_reaches_every_waiting_request_and_the_batcher_goes_on() -> None:
    detector = FakeDetector(fail=True)
    batcher = Batcher(detector)
    results = queue_while_held(batcher, detector, [1, 2, 3])
    assert all(isinstance(result, RuntimeError) and str(result) == "model exploded" for result in results.values())
    detector.fail = False
    assert batcher.predict(image(255)).scores.tolist() == [1.0]
    batcher.close()


def test_close_stops_the_thread_and_max_batch_must_be_positive() -> None:
    detector = FakeDetector()
    detector.gate.set()
    batcher = Batcher(detector)
    batcher.close()
    assert not batcher._thread.is_alive()
    with pytest.raises(ValueError, match="max_batch must be at least 1, got 0"):
        Batcher(detector, max_batch=0)
