"""Would fused elementwise passes bring TIES near ``average``? Eager against ``torch.compile``, one tensor.

One 3072×768 float32 tensor (a ViT-B MLP weight), N = 8 sources (the base plus noise of std 0.01),
density 0.2, one torch thread, CPU milliseconds, best of 5: ``average``'s op, hfmerge's TIES op
(``DisjointMerge``), the per-source selection alone (τ, |τ| and the k-th magnitude), and TIES's
elementwise passes (trim and sum; then sign agreement, masked sum and count) written plainly, run
eagerly and compiled by ``torch.compile`` (its C++ backend fuses each pass into one loop; it needs a
C++ compiler, and the first call compiles). The compiled passes' merge is checked equal to hfmerge's.

Usage: ``OMP_NUM_THREADS=1 python -m benchmarks.ties_fused`` from the repository root (as a module: run as a
script, ``benchmarks/statistics.py`` would shadow the standard library's ``statistics``, which inductor imports).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from hfmerge.engine.ops import LinearCombination
from hfmerge.methods.task_vectors import DisjointMerge, _top_magnitude_threshold

N, SHAPE, DENSITY = 8, (3072, 768), 0.2


def trim_and_sum(theta: torch.Tensor, base: torch.Tensor, threshold: float, total: torch.Tensor) -> torch.Tensor:
    """The first pass for one source: τ, trimmed at its threshold, added to the sum."""
    tau = theta - base
    return total + torch.where(tau.abs() >= threshold, tau, 0.0)


def agreeing(theta: torch.Tensor, base: torch.Tensor, threshold: float, elected: torch.Tensor,
             total: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The second pass for one source: its kept entries of the elected sign, summed and counted."""
    tau = theta - base
    agrees = tau * elected >= threshold
    return total + torch.where(agrees, tau, 0.0), count + agrees.to(torch.float32)


def best_ms(run: Callable[[], object], repeats: int = 5) -> float:
    """The least CPU time of ``repeats`` calls, in milliseconds."""
    times = []
    for _ in range(repeats):
        started = time.process_time()
        run()
        times.append(time.process_time() - started)
    return 1e3 * min(times)


def main() -> None:
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(*SHAPE, generator=generator)
    sources = [base + 0.01 * torch.randn(*SHAPE, generator=generator) for _ in range(N)]
    tables = {(i, "w"): s for i, s in enumerate(sources)} | {(N, "w"): base}
    load = tables.__getitem__
    refs = tuple((i, "w") for i in range(N))
    ties = DisjointMerge((N, "w"), refs, 1.0, "trim", "ties", density=DENSITY)
    average = LinearCombination(refs, tuple([1.0 / N] * N))
    thresholds = [_top_magnitude_threshold((s - base).abs(), DENSITY) for s in sources]

    def passes(first: Callable, second: Callable) -> torch.Tensor:
        total = torch.zeros_like(base)
        for source, threshold in zip(sources, thresholds):
            total = first(source, base, threshold, total)
        elected = total.sign()
        summed, count = torch.zeros_like(base), torch.zeros_like(base)
        for source, threshold in zip(sources, thresholds):
            summed, count = second(source, base, threshold, elected, summed, count)
        return summed / count.clamp(min=1)

    def selections() -> None:
        for source in sources:
            _top_magnitude_threshold((source - base).abs(), DENSITY)

    first, second = torch.compile(trim_and_sum, dynamic=False), torch.compile(agreeing, dynamic=False)
    started = time.perf_counter()
    passes(first, second)
    print(f"compiling: {time.perf_counter() - started:.1f} s")
    print(f"average op:                       {best_ms(lambda: average.apply(load)):7.1f} ms")
    print(f"TIES op (hfmerge):                {best_ms(lambda: ties.apply(load)):7.1f} ms")
    print(f"selection alone (τ, |τ|, k-th):   {best_ms(selections):7.1f} ms")
    print(f"elementwise passes, eager:        {best_ms(lambda: passes(trim_and_sum, agreeing)):7.1f} ms")
    print(f"elementwise passes, compiled:     {best_ms(lambda: passes(first, second)):7.1f} ms")
    merged = passes(first, second).mul_(1.0).add_(base)
    print("compiled passes merge as hfmerge's op, bit for bit:", torch.equal(merged, ties.apply(load)))


if __name__ == "__main__":
    main()
