"""Forward / backward / optimizer split of one training step, without extra syncs.

:class:`TimedForwardBackward` wraps the ``forward_backward_func`` of a training state.
It marks the start and end of the whole forward-backward pass and, per micro-batch, the
start of the forward step and the end of its loss (the end of the model call on stages
without a loss). On CUDA the marks are CUDA events in the current stream, read once the
step has synchronised; on the CPU, where work is synchronous, they are host clock
readings. So:

* forward   = sum over micro-batches of (loss end - forward start)
* backward  = (forward-backward end - start) - forward: backward compute, and with
              pipeline parallelism the communication and bubbles between micro-batches,
              plus the gradient reduction that Megatron's schedules finish before
              returning
* optimizer = step wall time - forward-backward time: loss reduction, gradient norm,
              clipping, the optimizer and scheduler step
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


class Clock:
    """Marks on the GPU timeline (CUDA events) or on the host clock (CPU)."""

    def __init__(self, use_cuda: bool):
        self.use_cuda = use_cuda

    def mark(self) -> Any:
        if self.use_cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start: Any, end: Any) -> float:
        """Seconds between two marks (after the device work between them has finished)."""
        if self.use_cuda:
            end.synchronize()
            return start.elapsed_time(end) / 1000.0
        return end - start


@dataclass
class PassTimes:
    forward_backward_s: float
    forward_s: float
    microbatches: int

    @property
    def backward_s(self) -> float:
        return max(0.0, self.forward_backward_s - self.forward_s)


class TimedForwardBackward:
    """A drop-in ``forward_backward_func`` that records :class:`PassTimes` of its last call."""

    def __init__(self, inner: Callable, clock: Clock):
        self.inner = inner
        self.clock = clock
        self._marks: list = []
        self._span = None

    def __call__(self, *args, forward_step_func, **kwargs):
        marks = []
        clock = self.clock

        def timed_forward_step(data_iterator, model, *rest):
            start = clock.mark()
            output, loss_func = forward_step_func(data_iterator, model, *rest)
            pair = [start, clock.mark()]
            marks.append(pair)

            def timed_loss(*a, **k):
                result = loss_func(*a, **k)
                pair[1] = clock.mark()
                return result

            return output, timed_loss

        begin = clock.mark()
        result = self.inner(*args, forward_step_func=timed_forward_step, **kwargs)
        self._span = (begin, clock.mark())
        self._marks = marks
        return result

    def last(self) -> PassTimes:
        """Times of the last call (reads the marks: call after the step has finished)."""
        if self._span is None:
            raise RuntimeError("TimedForwardBackward.last(): no call recorded yet")
        total = self.clock.seconds(*self._span)
        forward = sum(self.clock.seconds(a, b) for a, b in self._marks)
        return PassTimes(forward_backward_s=total, forward_s=forward, microbatches=len(self._marks))
