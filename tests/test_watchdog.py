"""The memory watchdog: a pure decision (table-driven), the listener around it on a real engine, a real exit."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from collections import deque

import pytest

from zimage.ops.watchdog import WATCHDOG_EXIT_CODE, MemoryWatchdog, decide, error_chain_text
from zimage.service.request import GenerationRequest

from .support import ROOT, wait_until

G = 1 << 30
ILLEGAL = "CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be reported later"


@pytest.mark.parametrize(
    "history, threshold, strikes, error, exit_, reason_part",
    [
        # memory check off: never exits for memory
        ([30 * G] * 5, 0, 3, None, False, "off"),
        # no GPU (CPU box): readings are None
        ([None, None, None], 20 * G, 3, None, False, "no GPU"),
        ([], 20 * G, 3, None, False, "no GPU"),
        # under, at, over the threshold
        ([10 * G], 20 * G, 1, None, False, "fine"),
        ([20 * G], 20 * G, 1, None, False, "fine"),  # at the threshold is not over it
        ([21 * G], 20 * G, 1, None, True, "1 consecutive"),
        # strikes: consecutive jobs over, newest last
        ([21 * G, 22 * G], 20 * G, 3, None, False, "2 of 3"),
        ([21 * G, 22 * G, 23 * G], 20 * G, 3, None, True, "3 consecutive"),
        ([21 * G, 22 * G, 19 * G], 20 * G, 3, None, False, "fine"),  # dipped back: memory came back
        ([21 * G, 19 * G, 22 * G, 23 * G], 20 * G, 3, None, False, "2 of 3"),
        ([19 * G, 21 * G, 22 * G, 23 * G], 20 * G, 3, None, True, "3 consecutive"),
        ([21 * G, None, 22 * G], 20 * G, 2, None, False, "1 of 2"),  # an unread job breaks the streak
        ([21 * G], 20 * G, 0, None, True, "1 consecutive"),  # strikes < 1 means 1
        # unrecoverable CUDA errors exit whatever the memory says, even with the check off
        ([1 * G], 20 * G, 3, ILLEGAL, True, "unrecoverable CUDA error: CUDA error: an illegal memory access"),
        ([], 0, 3, "RuntimeError: CUDA error: device-side assert triggered", True, "unrecoverable"),
        ([], 0, 3, "CUBLAS_STATUS_EXECUTION_FAILED when calling cublasGemmEx", True, "unrecoverable"),
        # ordinary errors do not
        ([1 * G], 20 * G, 3, "OutOfMemory: Out of GPU memory at 2048x2048", False, "fine"),
        ([], 0, 3, "InvalidRequest: Height must be divisible by 16", False, "off"),
    ],
)
def test_decide_table(history, threshold, strikes, error, exit_, reason_part):
    verdict = decide(history, threshold, strikes, error)
    assert verdict.exit is exit_
    assert reason_part in verdict.reason


def test_decide_reads_the_listeners_history_without_changing_it():
    """The listener keeps its history in a bounded deque, which cannot be sliced: decide takes it
    as it is, answers as for the same list, and leaves it untouched for the next job."""
    history = deque([19 * G, 21 * G, 22 * G], maxlen=8)
    verdict = decide(history, 20 * G, 2)
    assert verdict == decide(list(history), 20 * G, 2) and verdict.exit
    assert list(history) == [19 * G, 21 * G, 22 * G] and history.maxlen == 8


def test_error_chain_text_reaches_the_cuda_cause():
    try:
        try:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        except RuntimeError as inner:
            raise ValueError("Generation failed") from inner
    except ValueError as outer:
        text = error_chain_text(outer)
    assert text.startswith("ValueError: Generation failed") and "illegal memory access" in text
    assert decide([], 0, 1, text).exit
    assert error_chain_text(None) is None


class Readings:
    """Reserved-VRAM readings fed to the watchdog in place of torch.cuda on this CPU-only machine."""

    def __init__(self, values):
        self.values = list(values)
        self.thresholds = []

    def __call__(self, threshold):
        self.thresholds.append(threshold)
        return self.values.pop(0) if self.values else None


def test_listener_on_a_real_engine_exits_after_strikes(engine):
    exits = []
    readings = Readings([25 * G, 19 * G, 25 * G, 26 * G, 27 * G, 28 * G])
    dog = MemoryWatchdog(20, 3, exits.append, read_reserved=readings)
    engine.job_listeners.append(dog)
    try:
        req = GenerationRequest(prompt="a lighthouse", width=64, height=64, steps=1, seed=1)
        for i in range(4):
            engine.generate(req, save=False)
            assert exits == [], f"exited after job {i + 1}"
        engine.generate(req, save=False)  # the third consecutive job over 20 GiB
        wait_until(lambda: exits)
        assert exits == [WATCHDOG_EXIT_CODE]
        wait_until(lambda: not exit_threads(), what="the exit thread to end")
        status = dog.status()
        assert status["exiting"] and "3 consecutive" in status["last_verdict"]
        assert status["recent_reserved_gib"][-3:] == [25.0, 26.0, 27.0]
        engine.generate(req, save=False)  # already exiting: asks only once
        # the listener ran inside generate; had it asked again, its exit thread would be running or done
        assert dog.jobs_seen == 6
        wait_until(lambda: not exit_threads(), what="any second exit thread to end")
        assert exits == [WATCHDOG_EXIT_CODE]
        assert readings.thresholds[0] == 20 * G  # the reader may release cache over this
    finally:
        engine.job_listeners.remove(dog)


def test_listener_exits_on_an_unrecoverable_error_even_when_memory_check_is_off(engine):
    exits = []
    dog = MemoryWatchdog(0, 3, exits.append, read_reserved=Readings([]))
    dog(engine, None, RuntimeError("CUDA error: misaligned address"))
    wait_until(lambda: exits)
    assert exits == [WATCHDOG_EXIT_CODE] and "misaligned address" in dog.status()["last_verdict"]


def test_listener_treats_a_failing_memory_reading_as_the_error_it_is(engine):
    def broken(_threshold):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    exits = []
    dog = MemoryWatchdog(20, 3, exits.append, read_reserved=broken)
    dog(engine, None, None)
    wait_until(lambda: exits)
    assert exits == [WATCHDOG_EXIT_CODE]


def test_listener_stays_quiet_on_cpu(engine):
    """The default reader on a machine without CUDA: no reading, no exit, no error."""
    exits = []
    dog = MemoryWatchdog(0.001, 1, exits.append)
    engine.job_listeners.append(dog)
    try:
        engine.generate(GenerationRequest(prompt="x", width=64, height=64, steps=1, seed=2), save=False)
    finally:
        engine.job_listeners.remove(dog)
    assert exits == [] and dog.status()["recent_reserved_gib"] == [None] and dog.jobs_seen == 1


def exit_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "watchdog-exit"]


@pytest.mark.slow  # a real process
def test_hard_exit_when_the_graceful_path_hangs(tmp_path):
    """A real process whose request_exit never returns still exits with the watchdog's code."""
    script = textwrap.dedent(
        f"""
        import sys, threading, time
        sys.path.insert(0, {str(ROOT)!r})
        from zimage.ops.watchdog import MemoryWatchdog
        hang = threading.Event()
        dog = MemoryWatchdog(0, 1, lambda code: hang.wait(), hard_exit_after_s=0.5)
        dog(None, None, RuntimeError("CUDA error: unspecified launch failure"))
        time.sleep(30)
        sys.exit(0)
        """
    )
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == WATCHDOG_EXIT_CODE, out.stderr
    assert time.perf_counter() - t0 < 20
    assert "unspecified launch failure" in out.stderr
