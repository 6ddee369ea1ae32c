"""Statistics-pass benchmark: RegMean's Gram matrices against plain forward passes of the same model.

A ViT-B/16-sized classifier (86.6M parameters, random weights from a config,
float32, eval mode) runs over the same random 224 px images, batch 16, in one
process, alternately:

* forward    — ``model(pixel_values=batch)`` under ``torch.inference_mode`` for
               every batch of the DataLoader: the least any data pass must do;
* statistics — ``hfmerge.engine.statistics.collect_statistics`` with the Gram
               matrix of every linear layer's input that RegMean asks for: one
               per shared-input group (q, k and v of one attention are one), so
               4 per transformer layer plus the classifier's, 49 in all: each
               batch's product XᵀX in float32, summed across batches in float64.

Each mode is timed best of ``--repeats``; the ratio statistics / forward is the
cost of the statistics over the forward pass itself. Also printed: the
floating-point operations of one forward batch (``FlopCounterMode``) and of the
Gram products (2·rows·in² per group), the floor that no implementation of
exact Gram matrices goes below.

Precision check (after the timing, not timed): the same pass with float64
products (the statistics module's ``gram_product_dtype`` patched to float64:
the same float32 rows X, the former computation) gives reference Grams. Printed:
the largest relative Frobenius error ‖G₃₂ − G₆₄‖ / ‖G₆₄‖ over the 49 Grams,
the largest entry error relative to its Cauchy–Schwarz scale,
max |ΔGᵢⱼ| / √(GᵢᵢGⱼⱼ) (the quantity the error bound in
``add_upper_gram_``'s docstring is about), and the largest change the float32
products make to RegMean's merged weights: a second source (the model with
noise of std 0.01 on every weight) on other random images, every linear
merged by ``regmean_linear`` (α = 0.9) from either pair of Grams.

Library imports and building the model are not timed. Usage:
``PYTHONPATH=. python benchmarks/statistics.py [--samples 64] [--batch-size 16] [--repeats 3] [--threads N]``
(``--samples 16`` keeps it near a minute on two CPU cores).
"""

from __future__ import annotations

import argparse
import time


def vit_b16():
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                       image_size=224, patch_size=16, num_labels=1000)
    torch.manual_seed(0)
    return ViTForImageClassification(config).eval()


def gram_request(model):
    """One Gram per shared-input group of the model's linears, as ``ModelLayout.linear_groups`` gives them."""
    from hfmerge.adapters.layout import linear_groups
    from hfmerge.adapters.vit import VIT
    from hfmerge.engine.statistics import StatisticsRequest

    groups = linear_groups(VIT, {name: type(module) for name, module in model.named_modules()})
    return StatisticsRequest(grams=tuple(group[0] for group in groups)), groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()

    import torch
    from torch.utils.data import DataLoader, TensorDataset
    from torch.utils.flop_counter import FlopCounterMode

    from hfmerge.engine.statistics import GRAM_BLOCK, collect_statistics

    if args.threads:
        torch.set_num_threads(args.threads)
    model = vit_b16()
    pixels = torch.randn(args.samples, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(pixels), batch_size=args.batch_size, collate_fn=lambda items: {
        "pixel_values": torch.stack([item[0] for item in items])})
    request, groups = gram_request(model)

    def forward() -> None:
        with torch.inference_mode():
            for batch in loader:
                model(pixel_values=batch["pixel_values"])

    def statistics() -> None:
        collect_statistics(model, loader, request, progress=False)

    best = {"forward": float("inf"), "statistics": float("inf")}
    for _ in range(args.repeats):
        for name, run in (("forward", forward), ("statistics", statistics)):
            started = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - started)

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(pixel_values=pixels[: args.batch_size])
    rows = args.batch_size * 197
    modules = dict(model.named_modules())
    widths = [modules[group[0]].in_features for group in groups]
    gram_flops = sum(2 * rows * n * n for n in widths)
    upper_flops = sum(2 * rows * min(GRAM_BLOCK, n - start) * (n - start)
                      for n in widths for start in range(0, n, GRAM_BLOCK))
    print(f"ViT-B/16, {args.samples} samples at 224 px, batch {args.batch_size}, {torch.get_num_threads()} threads, "
          f"best of {args.repeats}; {len(request.grams)} Gram matrices ({sum(map(len, groups))} linears)")
    print(f"forward    {best['forward']:.2f} s")
    print(f"statistics {best['statistics']:.2f} s")
    print(f"ratio      {best['statistics'] / best['forward']:.2f} (target <= 1.25)")
    print(f"per batch: forward {counter.get_total_flops() / 1e9:.0f} GFLOP (float32); Gram products "
          f"{gram_flops / 1e9:.0f} GFLOP in full, {upper_flops / 1e9:.0f} GFLOP on the upper block triangle "
          "(float32 products, float64 sums)", flush=True)
    precision_check(model, loader, request, groups, args.samples, args.batch_size)


def precision_check(model, loader, request, groups, samples: int, batch_size: int) -> None:
    """Float32-product Grams against float64-product Grams of the same rows, and RegMean's merge from each."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    import hfmerge.engine.statistics as engine
    from hfmerge.methods.regmean import regmean_linear

    second = vit_b16()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in second.parameters():
            parameter.add_(0.01 * torch.randn(parameter.shape, generator=generator))
    other = torch.randn(samples, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    other_loader = DataLoader(TensorDataset(other), batch_size=batch_size, collate_fn=loader.collate_fn)

    def grams(source, data) -> dict[str, torch.Tensor]:
        return engine.collect_statistics(source, data, request, progress=False)

    product_dtype = engine.gram_product_dtype
    float32 = [grams(model, loader), grams(second, other_loader)]
    engine.gram_product_dtype = lambda dtype: torch.float64  # the former pass: float64 products of the same rows
    try:
        float64 = [grams(model, loader), grams(second, other_loader)]
    finally:
        engine.gram_product_dtype = product_dtype
    frobenius = entry = 0.0
    for stats32, stats64 in zip(float32, float64):
        for name in request.grams:
            g32, g64 = stats32[f"gram/{name}"], stats64[f"gram/{name}"]
            scale = torch.diagonal(g64).sqrt()
            frobenius = max(frobenius, float((g32 - g64).norm() / g64.norm()))
            entry = max(entry, float(((g32 - g64).abs() / torch.outer(scale, scale).clamp_min(1e-300)).max()))
    modules = [dict(model.named_modules()), dict(second.named_modules())]
    change = weight = 0.0
    for group in groups:
        for name in group:
            weights = [modules[0][name].weight.detach(), modules[1][name].weight.detach()]
            merged32 = regmean_linear(weights, [s[f"gram/{group[0]}"] for s in float32], 0.9)
            merged64 = regmean_linear(weights, [s[f"gram/{group[0]}"] for s in float64], 0.9)
            change = max(change, float((merged32 - merged64).abs().max()))
            weight = max(weight, float(merged64.abs().max()))
    rows = batch_size * 197
    print(f"float32 products vs float64 products, {samples} samples per source, {rows} rows per batch "
          f"(sqrt(rows)·2^-24 = {rows ** 0.5 * 2.0 ** -24:.1e}):")
    print(f"  Gram, relative Frobenius error (largest of {2 * len(request.grams)}): {frobenius:.2e}")
    print(f"  Gram, largest |dG_ij| / sqrt(G_ii G_jj): {entry:.2e}")
    print(f"  RegMean merge of two sources (alpha 0.9), largest weight change: {change:.2e} "
          f"({change / weight:.2e} of the largest merged weight {weight:.3f})")


if __name__ == "__main__":
    main()
