"""What the latency measurement must do: warm up untimed, time the same call
several times, report the median, and wait for queued GPU work before each clock
read. (How fast this machine is, is not a test.)"""
import time

import pytest
import torch

from compress.measure import timing


class FakeClock:
    """perf_counter that advances only when a run 'takes' time."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_median_of_timed_runs_excludes_warmup(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(time, "perf_counter", clock)
    durations = iter([100.0, 100.0, 3.0, 1.0, 2.0, 50.0, 4.0])  # two slow warm-ups

    def run():
        clock.now += next(durations)

    assert timing.median_seconds(run, lambda: None, warmup=2, repeats=5) == 3.0


def test_synchronises_before_each_clock_read():
    events = []
    timing.median_seconds(lambda: events.append("run"), lambda: events.append("sync"),
                         warmup=1, repeats=2)
    assert events == ["sync", "run", "sync"] * 3


def test_measure_latency_uses_inference_mode_and_the_same_inputs():
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, x):
            seen.append((x.data_ptr(), torch.is_inference_mode_enabled()))
            return x

    inputs = torch.zeros(2, 3)
    seconds = timing.measure_latency(Recorder(), inputs, torch.device("cpu"), warmup=2, repeats=3)
    assert seconds >= 0 and len(seen) == 5
    assert {ptr for ptr, _ in seen} == {inputs.data_ptr()}
    assert all(mode for _, mode in seen)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_measure_latency_synchronises_cuda(monkeypatch):
    calls = []
    real = torch.cuda.synchronize
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: (calls.append(1), real(*a)))
    timing.measure_latency(torch.nn.Linear(4, 4).cuda(), torch.zeros(1, 4), torch.device("cuda"),
                          warmup=1, repeats=2)
    assert len(calls) == 6
