"""TIES's cost on one tensor, step by step, against `average` on the same tensor (one process, CPU time).

What ``DisjointMerge.apply`` (``hfmerge/methods/task_vectors.py``) does for a
ViT-B MLP weight (3072×768 float32) at N sources and density 0.2, each step
timed on its own (CPU milliseconds of this process, best of ``--repeats``,
so less disturbed by other jobs than wall time), then the whole op and
`average` (one ``lerp_`` per source, as the engine's running mean does).

Also timed: ways of finding the k-th magnitude other than the two-level bit
count the op uses — ``torch.kthvalue``, and a bracket guessed from a strided
sample of 32K magnitudes (count the entries below it, pick out the ~1 % inside
it, ``kthvalue`` of those), so a later change can be weighed here first.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/ties_tensor.py --sizes 2,8
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import torch

from hfmerge.methods.task_vectors import DisjointMerge, kth_smallest_magnitude

SHAPE = (3072, 768)
DENSITY = 0.2


def best_ms(step: Callable[[], object], repeats: int) -> float:
    """The least CPU time of ``repeats`` calls, in milliseconds."""
    times = []
    for _ in range(repeats):
        start = time.process_time()
        step()
        times.append(time.process_time() - start)
    return min(times) * 1e3


def sampled_bracket_kth(magnitudes: torch.Tensor, rank: int, sample_size: int = 1 << 15) -> float | None:
    """The rank-th smallest magnitude inside a bracket guessed from a strided sample; ``None`` if it misses."""
    flat = magnitudes.reshape(-1)
    step = flat.numel() // sample_size | 1
    sample = flat[step // 2 :: step]
    centre = rank / flat.numel() * sample.numel()
    spread = 3.5 * math.sqrt(centre * (1.0 - rank / flat.numel())) + 4.0
    low = torch.kthvalue(sample, max(1, math.floor(centre - spread))).values
    high = torch.kthvalue(sample, min(sample.numel(), math.ceil(centre + spread))).values
    inside = torch.index_select(flat, 0, ((flat >= low) & (flat <= high)).nonzero().squeeze(1))
    below = int(torch.count_nonzero(flat < low))
    if not below < rank <= below + inside.numel():
        return None
    return float(torch.kthvalue(inside, rank - below).values)


def profile(sources: int, repeats: int) -> None:
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(SHAPE, generator=generator) * 0.02
    tensors = [base + torch.randn(SHAPE, generator=generator) * 1e-3 for _ in range(sources)]
    store = {("base", 0): base, **{("source", i): t for i, t in enumerate(tensors)}}
    op = DisjointMerge(("base", 0), tuple(("source", i) for i in range(sources)), 1.0, "trim", density=DENSITY)
    task_vector, magnitudes = tensors[0] - base, (tensors[0] - base).abs()
    keep, out = torch.empty_like(base), torch.empty_like(base)
    rank = magnitudes.numel() - int(DENSITY * magnitudes.numel()) + 1
    threshold = kth_smallest_magnitude(magnitudes, rank)
    assert sampled_bracket_kth(magnitudes, rank) in (None, threshold)

    def average() -> torch.Tensor:
        merged = tensors[0].clone()
        for index in range(1, sources):
            merged.lerp_(tensors[index], 1.0 / (index + 1))
        return merged

    per_source = {
        "τ = θ − θ_base (sub, out=)": lambda: torch.sub(tensors[0], base, out=out),
        "|τ| (abs, out=)": lambda: torch.abs(task_vector, out=out),
        "k-th magnitude: two-level bit count (used)": lambda: kth_smallest_magnitude(magnitudes, rank),
        "k-th magnitude: sampled bracket (tried)": lambda: sampled_bracket_kth(magnitudes, rank),
        "k-th magnitude: torch.kthvalue (before issue 20)": lambda: torch.kthvalue(magnitudes.reshape(-1), rank),
        "mask |τ| ≥ t (ge, float out=)": lambda: torch.ge(magnitudes, threshold, out=keep),
        "masked add (addcmul_)": lambda: out.addcmul_(task_vector, keep),
        "τ·γ (mul, out=)": lambda: torch.mul(task_vector, base, out=out),
        "count (add_)": lambda: out.add_(keep),
    }
    print(f"\nN = {sources}, one {SHAPE[0]}×{SHAPE[1]} float32 tensor, {torch.get_num_threads()} torch thread(s), "
          f"CPU ms, best of {repeats}")
    for name, step in per_source.items():
        print(f"  {name:52s} {best_ms(step, repeats):7.2f}")
    ties = best_ms(lambda: op.apply(store.__getitem__), repeats)
    mean = best_ms(average, repeats)
    print(f"  {'whole TIES op':52s} {ties:7.2f}\n  {'average (lerp_ per source)':52s} {mean:7.2f}"
          f"\n  {'ties / average':52s} {ties / mean:7.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="2,8", help="numbers of sources, comma-separated")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    for sources in (int(size) for size in args.sizes.split(",")):
        profile(sources, args.repeats)


if __name__ == "__main__":
    main()
