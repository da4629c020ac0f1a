"""TimedForwardBackward splits a step into forward and backward from clock marks."""

from __future__ import annotations

import pytest

from megatron_sfm.benchmark.timing import Clock, TimedForwardBackward


class FakeClock(Clock):
    """A host clock that only moves when the fake schedule says so."""

    def __init__(self):
        super().__init__(use_cuda=False)
        self.now = 0.0

    def mark(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


def make_schedule(clock, model_s, loss_s, backward_s, reduce_s, last_stage=True):
    """A stand-in for Megatron's no-pipelining schedule: per micro-batch forward, loss, backward."""

    def schedule(*, forward_step_func, data_iterator, model, num_microbatches, **_):
        results = []
        for _ in range(num_microbatches):
            output, loss_func = forward_step_func(data_iterator, model)
            if last_stage:
                clock.advance(loss_s)
                results.append(loss_func(output))
            clock.advance(backward_s)
        clock.advance(reduce_s)  # gradient reduction at the end of the pass
        return results

    return schedule


def test_forward_includes_loss_and_backward_is_the_rest():
    clock = FakeClock()
    calls = []

    def forward_step(data_iterator, model):
        calls.append((data_iterator, model))
        clock.advance(0.010)
        return "out", lambda output: ("loss", output)

    timed = TimedForwardBackward(make_schedule(clock, 0.010, 0.002, 0.030, 0.005), clock)
    result = timed(forward_step_func=forward_step, data_iterator="it", model="m", num_microbatches=3)
    assert result == [("loss", "out")] * 3  # outputs and losses pass through untouched
    assert calls == [("it", "m")] * 3
    times = timed.last()
    assert times.microbatches == 3
    assert times.forward_s == pytest.approx(3 * 0.012)
    assert times.forward_backward_s == pytest.approx(3 * (0.012 + 0.030) + 0.005)
    assert times.backward_s == pytest.approx(3 * 0.030 + 0.005)


def test_stage_without_loss_ends_forward_at_the_model_output():
    clock = FakeClock()

    def forward_step(data_iterator, model, *rest):
        assert rest == ()
        clock.advance(0.004)
        return "out", lambda output: output

    timed = TimedForwardBackward(make_schedule(clock, 0.004, 0.5, 0.010, 0.0, last_stage=False), clock)
    timed(forward_step_func=forward_step, data_iterator=None, model=None, num_microbatches=2)
    assert timed.last().forward_s == pytest.approx(0.008)
    assert timed.last().backward_s == pytest.approx(0.020)


def test_each_call_replaces_the_last_one():
    clock = FakeClock()

    def forward_step(data_iterator, model):
        clock.advance(0.001)
        return "out", lambda output: output

    timed = TimedForwardBackward(make_schedule(clock, 0.001, 0.0, 0.002, 0.0), clock)
    with pytest.raises(RuntimeError):
        timed.last()
    timed(forward_step_func=forward_step, data_iterator=None, model=None, num_microbatches=4)
    timed(forward_step_func=forward_step, data_iterator=None, model=None, num_microbatches=1)
    assert timed.last().microbatches == 1
    assert timed.last().forward_backward_s == pytest.approx(0.003)


def test_host_clock_measures_elapsed_time():
    clock = Clock(use_cuda=False)
    a = clock.mark()
    total = sum(i * i for i in range(20000))
    b = clock.mark()
    assert total > 0
    assert clock.seconds(a, b) >= 0.0
    assert clock.seconds(a, b) == b - a
