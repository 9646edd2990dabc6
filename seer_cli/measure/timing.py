"""Clocks for profiling: CUDA events on a GPU (with the L2 cache cleared before a call when
asked, as ``triton.testing.do_bench`` does), the wall clock on the CPU."""

import math
import time
from collections.abc import Callable
from functools import cache

import torch

# Larger than any GPU's L2 cache (triton.testing.do_bench clears the same amount).
L2_FLUSH_BYTES = 256 * 1024 * 1024


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@cache
def _l2_flush_buffer(device: torch.device) -> torch.Tensor:
    return torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device)


def times_ms(
    fn: Callable[[], object],
    repeats: int,
    device: torch.device,
    *,
    min_repeat_ms: float = 0.0,
    flush_l2: bool = False,
) -> list[float]:
    """Per repeat, the mean time in ms of one call of ``fn``, after one warm-up call.

    A repeat makes as many calls as last ``min_repeat_ms`` (at least one). ``flush_l2`` clears
    the GPU's L2 cache before every call, outside the timed span, so that no call finds its
    inputs left in the cache by the previous one.
    """
    flush = _l2_flush_buffer(device) if flush_l2 and device.type == "cuda" else None
    fn()  # warm-up: compilation, autotuning, allocator growth
    calls = 1
    if min_repeat_ms > 0:
        calls = max(1, math.ceil(min_repeat_ms / _mean_call_ms(fn, device, 1, flush)))
    return [_mean_call_ms(fn, device, calls, flush) for _ in range(repeats)]


def first_call_ms(fn: Callable[[], object], device: torch.device) -> float:
    """The time in ms of one call of ``fn`` with nothing warmed up before it: what a fresh
    process pays for compilation, tuning and allocation on its first call of this shape."""
    return _mean_call_ms(fn, device, 1, None)


def _mean_call_ms(fn, device: torch.device, calls: int, flush: torch.Tensor | None) -> float:
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - start) * 1000 / calls
    spans = []
    for _ in range(calls):
        if flush is not None:
            flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        spans.append((start, end))
    torch.cuda.synchronize(device)
    return sum(start.elapsed_time(end) for start, end in spans) / calls


class Timeline:
    """Named points in time: CUDA events on a GPU (recorded without waiting for the GPU), the
    wall clock on the CPU. A point is marked on ``device``'s current stream (by default the
    timeline's), and a span is read between two points of one device, after synchronizing it."""

    def __init__(self, device: torch.device):
        self.device = device
        self._points = {}

    def mark(self, name, device: torch.device | None = None) -> None:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(device or self.device))
            self._points[name] = event
        else:
            self._points[name] = time.perf_counter()

    def ms(self, start, end) -> float:
        first, last = self._points[start], self._points[end]
        if self.device.type == "cuda":
            return first.elapsed_time(last)
        return (last - first) * 1000
