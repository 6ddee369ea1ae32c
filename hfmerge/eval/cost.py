"""What a model costs to run: parameters, floating-point operations, latency.

FLOPs are counted by PyTorch's own dispatcher (``torch.utils.flop_counter``),
so they follow the operations a forward pass really runs; a multiply-add
counts as two FLOPs. Latency is a median over timed repeats after a warm-up,
in inference mode, waiting for the GPU before reading the clock; with it goes
the repeats' spread, so that a report can tell a busy machine's number from a
model's cost.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


def count_parameters(model: torch.nn.Module) -> int:
    """The number of parameter entries; a tensor shared by two modules (tied weights) counts once."""
    return sum(p.numel() for p in model.parameters())


def _forward(model: torch.nn.Module, pixel_values: Tensor) -> Any:
    return model(pixel_values)


def count_flops(model: torch.nn.Module, pixel_values: Tensor) -> int:
    """FLOPs of one forward pass of ``model`` on ``pixel_values`` (the whole batch), in inference mode.

    Counted with :class:`torch.utils.flop_counter.FlopCounterMode`: matrix products and convolutions
    (2 FLOPs per multiply-add); element-wise operations, normalisations and softmax are not counted.
    """
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            _forward(model, pixel_values)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Latency:
    """The timed forward passes of one model on one batch (the warm-up passes are not among them).

    A median alone hides a busy machine: another process holding a core slows some passes many times
    over, and the median of a run that was slowed throughout is as wrong as its mean. The spread is
    what shows it.
    """

    seconds: tuple[float, ...]

    @property
    def median(self) -> float:
        """Median seconds of one pass."""
        return statistics.median(self.seconds)

    @property
    def spread(self) -> float | None:
        """Interquartile range over the median (0 when every pass took the same time); ``None`` under 2 passes."""
        if len(self.seconds) < 2:
            return None
        first, _, third = statistics.quantiles(self.seconds, n=4, method="inclusive")
        return (third - first) / self.median if self.median > 0 else 0.0


def measure_latency(model: torch.nn.Module, pixel_values: Tensor, *, warmup: int = 3, repeats: int = 10,
                    clock: Callable[[], float] = time.perf_counter) -> Latency:
    """Seconds of each of ``repeats`` forward passes on ``pixel_values`` (the batch as given: the caller states
    its size), after ``warmup`` passes that are run and not timed (allocator, kernel selection, caches).

    On a GPU the clock is read only after ``torch.cuda.synchronize``, since kernels run asynchronously.
    ``clock``: seconds, monotonic (a test passes one whose readings it controls).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    device = pixel_values.device
    was_training = model.training
    model.eval()
    times = []
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                _forward(model, pixel_values)
            _synchronize(device)
            for _ in range(repeats):
                start = clock()
                _forward(model, pixel_values)
                _synchronize(device)
                times.append(clock() - start)
    finally:
        model.train(was_training)
    return Latency(tuple(times))
