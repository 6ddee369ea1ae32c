"""Gating benchmark: the gated merge of N ViTs against one plain ViT and the N-model ensemble.

Issue 9's "speed is part of the method": the gated model (``hfmerge.methods.gating.model``,
Ye et al. §3.2) should cost one ViT plus the gate plus the per-sample weighted
sum of the gated weights (Eq. 2), not N forward passes. For every N in
``--sources`` and m in ``--m`` this script builds, from configs with random
weights (no download):

* ``gate``     — the gate alone (``gate_logits``: resize, normalise, MobileNetV2), for the overhead's breakdown;
* ``plain``    — one ``ViTForImageClassification`` (the reference);
* ``ensemble`` — N plain ViTs, softmaxes averaged (``hfmerge.eval.ensemble.Ensemble``);
* ``soft``     — ``assemble_gated`` of the N ViTs with a MobileNetV2 1.0/224 gate (random weights), the
                 embeddings and every LayerNorm gated plus the attention and MLP of m layers (Table 2,
                 strategy 4; the last m layers: on random weights which layers is immaterial to the cost),
                 ``routing="soft"``: per-sample weights materialised once per forward;
* ``top1``     — the same model with ``routing="top1"`` (samples grouped by the gate's argmax source).

All variants run in one process, interleaved in rounds (plain, ensemble, soft,
top1, then again), each timed once per round at ``--batch-size`` (throughput)
and ``--latency-repeats`` times at batch 1 (latency, median of the round); the
table gives the median over ``--rounds`` rounds and the ratios against plain and
the ensemble of the same run. Also printed per (N, m):

* ``mix``   — the time of the per-sample weighted sums alone (the einsums of Eq. 2 over every gated tensor,
              at the batch size), as a share of the soft forward, and the bytes they write;
* ``agree`` — the fraction of ``--agreement-samples`` random images on which top1 and soft routing predict the
              same label, given a peaked gate (``--peak`` on one random source, the rest spread evenly). On
              random weights this is an agreement rate only, not an accuracy difference.

Building the models is not timed. CPU runs in float32; a CUDA device, when present, in bfloat16 (its name is
printed). Usage:
``python benchmarks/gating.py [--size tiny|small|base] [--batch-size 16] [--sources 3,6,12] [--m 0,3,5]
[--rounds 2] [--latency-repeats 3] [--threads N]``; the defaults (ViT-Ti/16, batch 16, 2 rounds) finish
the grid in about 20 minutes on a loaded 2-core CPU (use ``--sources 6 --m 3`` for the targets' cell alone); the issue's setting is ``--size base --batch-size 64``.
Only batch-1 passes warm up (untimed) before the first round.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

SIZES = {  # hidden, layers, heads, MLP; all at 224 px, patch 16
    "base": (768, 12, 12, 3072),
    "small": (384, 12, 6, 1536),
    "tiny": (192, 12, 3, 768),
}
LABELS_PER_SOURCE = 10


def ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def vit_sources(size: str, count: int) -> list[Any]:
    """``count`` ViT classifiers of one shape, independent random weights, distinct label names per source."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    hidden, layers, heads, mlp = SIZES[size]
    sources = []
    for i in range(count):
        labels = {j: f"s{i}-c{j}" for j in range(LABELS_PER_SOURCE)}
        config = ViTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                           intermediate_size=mlp, image_size=224, patch_size=16, id2label=labels,
                           label2id={v: k for k, v in labels.items()})
        torch.manual_seed(i)
        model = ViTForImageClassification(config).eval()
        model.config._name_or_path = f"bench/source-{i}"
        sources.append(model)
    return sources


def gated_keys(layers: int, m: int) -> list[str]:
    """Checkpoint keys gated at ``m``: embeddings, every LayerNorm, and the attention and MLP of the last m layers."""
    keys = ["vit.embeddings.cls_token", "vit.embeddings.position_embeddings",
            "vit.embeddings.patch_embeddings.projection.weight", "vit.embeddings.patch_embeddings.projection.bias",
            "vit.layernorm.weight", "vit.layernorm.bias"]
    for layer in range(layers):
        prefix = f"vit.encoder.layer.{layer}"
        modules = ["layernorm_before", "layernorm_after"]
        if layer >= layers - m:
            modules += ["attention.attention.query", "attention.attention.key", "attention.attention.value",
                        "attention.output.dense", "intermediate.dense", "output.dense"]
        keys += [f"{prefix}.{module}.{kind}" for module in modules for kind in ("weight", "bias")]
    return keys


def median(values: Any) -> float:
    """The median (the stdlib's ``statistics`` is shadowed by ``benchmarks/statistics.py`` on this path)."""
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def timed(run: Any, synchronize: Any) -> float:
    started = time.perf_counter()
    run()
    synchronize()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny",
                        help="ViT size: base = ViT-B/16 (the issue's), small = ViT-S/16, tiny = ViT-Ti/16")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="batch of the throughput measurement (the issue's is 64)")
    parser.add_argument("--sources", type=ints, default=[3, 6, 12], help="comma-separated N")
    parser.add_argument("--m", type=ints, default=[0, 3, 5], help="comma-separated m (gated layers)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; medians are reported")
    parser.add_argument("--latency-repeats", type=int, default=3, help="batch-1 passes per variant per round")
    parser.add_argument("--agreement-samples", type=int, default=32)
    parser.add_argument("--peak", type=float, default=0.9, help="the peaked gate's top probability")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()

    import torch
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    from hfmerge.eval.cost import count_flops
    from hfmerge.eval.ensemble import Ensemble
    from hfmerge.methods.gating.model import assemble_gated

    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    device_name = torch.cuda.get_device_name(device) if cuda else "CPU"

    def synchronize() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    layers = SIZES[args.size][1]
    if max(args.m) > layers:
        parser.error(f"--m at most {layers} (the number of layers)")
    sources = [s.to(device, dtype) for s in vit_sources(args.size, max(args.sources))]
    torch.manual_seed(100)
    gate = MobileNetV2ForImageClassification(MobileNetV2Config()).eval()  # 1.0/224
    generator = torch.Generator().manual_seed(0)
    batch = torch.randn(args.batch_size, 3, 224, 224, generator=generator).to(device, dtype)
    single = batch[:1].clone()
    plain = sources[0]
    plain_flops = count_flops(plain, single)
    gate_flops = count_flops(gate.to(device, dtype), single)
    print(f"device {device_name}, dtype {str(dtype).removeprefix('torch.')}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; ViT {args.size} {SIZES[args.size]}, batch {args.batch_size}, "
          f"{args.rounds} rounds, batch-1 latency median of {args.latency_repeats} per round")
    print(f"per image: plain ViT {plain_flops / 1e9:.2f} GFLOP, MobileNetV2 gate {gate_flops / 1e9:.2f} GFLOP "
          f"({gate_flops / plain_flops:.1%} of the ViT)")

    rows = []
    for n in args.sources:
        variants: dict[str, Any] = {"plain": plain, "ensemble": Ensemble(sources[:n]).eval()}
        models = {}
        for m in args.m:
            models[m] = assemble_gated(sources[:n], gate, gated_keys(layers, m)).to(device, dtype).eval()
            if len(models) == 1:
                variants["gate"] = models[m].gate_logits
            variants[f"soft{m}"] = lambda x, model=models[m]: model(x, routing="soft")
            variants[f"top1{m}"] = lambda x, model=models[m]: model(x, routing="top1")
        through: dict[str, list[float]] = {name: [] for name in variants}
        latency: dict[str, list[float]] = {name: [] for name in variants}
        mix: dict[int, list[float]] = {m: [] for m in args.m}
        with torch.inference_mode():
            for run in variants.values():  # warm-up, untimed
                run(single)
            probs = {m: models[m].gate_logits(batch).float().softmax(-1).to(dtype) for m in args.m}
            groups = {m: int(probs[m].argmax(-1).unique().numel()) for m in args.m}
            for _ in range(args.rounds):
                for name, run in variants.items():
                    through[name].append(args.batch_size / timed(lambda run=run: run(batch), synchronize))
                    latency[name].append(median(
                        timed(lambda run=run: run(single), synchronize) for _ in range(args.latency_repeats)))
                for m in args.m:
                    stacked = [p for key, p in models[m].named_parameters() if key in models[m].config.gated]
                    mix[m].append(timed(lambda m=m, stacked=stacked, probs=probs: [torch.einsum("bn,n...->b...", probs[m], t)
                                                                                for t in stacked],
                                        synchronize))
            agreement = {}
            pixels = torch.randn(args.agreement_samples, 3, 224, 224, generator=generator).to(device, dtype)
            task = torch.randint(n, (args.agreement_samples,), generator=generator)
            peaked = torch.full((args.agreement_samples, n), (1 - args.peak) / max(n - 1, 1))
            peaked[torch.arange(args.agreement_samples), task] = args.peak if n > 1 else 1.0
            for m in args.m:
                soft = models[m](pixels, gate_probs=peaked, routing="soft").logits.argmax(-1)
                top1 = models[m](pixels, gate_probs=peaked, routing="top1").logits.argmax(-1)
                agreement[m] = float((soft == top1).float().mean())
        med = {name: median(values) for name, values in through.items()}
        lat = {name: median(values) for name, values in latency.items()}
        for m in args.m:
            per_sample = sum(p[0].numel() for key, p in models[m].named_parameters() if key in models[m].config.gated)
            soft_time = args.batch_size / med[f"soft{m}"]
            rows.append({
                "N": n, "m": m, "plain": med["plain"], "ensemble": med["ensemble"], "soft": med[f"soft{m}"],
                "top1": med[f"top1{m}"], "lat_plain": lat["plain"], "lat_soft": lat[f"soft{m}"],
                "lat_top1": lat[f"top1{m}"], "mix": median(mix[m]), "soft_time": soft_time,
                "mix_bytes": args.batch_size * per_sample * batch.element_size(), "per_sample": per_sample,
                "groups": groups[m], "agree": agreement[m], "gate": med["gate"], "lat_gate": lat["gate"],
            })
        print(f"N={n} measured", flush=True)
        del variants, models

    print()
    print("| N | m | plain img/s | soft img/s | top1 img/s | ensemble img/s | soft/plain | soft/ensemble | "
          "top1/plain | b1 plain ms | b1 soft ms | b1 top1 ms | b1 soft/plain | b1 top1/plain | "
          "gate alone img/s | b1 gate alone ms | mix share of soft | mix writes | top1 groups | top1=soft |")
    print("|" + "---|" * 20)
    for r in rows:
        print(f"| {r['N']} | {r['m']} | {r['plain']:.1f} | {r['soft']:.1f} | {r['top1']:.1f} | {r['ensemble']:.1f} | "
              f"{r['soft'] / r['plain']:.2f} | {r['soft'] / r['ensemble']:.2f} | {r['top1'] / r['plain']:.2f} | "
              f"{r['lat_plain'] * 1e3:.1f} | {r['lat_soft'] * 1e3:.1f} | {r['lat_top1'] * 1e3:.1f} | "
              f"{r['lat_soft'] / r['lat_plain']:.2f} | {r['lat_top1'] / r['lat_plain']:.2f} | "
              f"{r['gate']:.1f} | {r['lat_gate'] * 1e3:.1f} | {r['mix'] / r['soft_time']:.0%} | {r['mix_bytes'] / 2**20:.0f} MiB | {r['groups']} | "
              f"{r['agree']:.2f} |")
    print()
    print("targets at N=6, m=3: soft/plain >= 0.70, soft/ensemble >= 4, b1 soft/plain <= 1.25, top1/plain >= 0.95")
    print(f"mix writes = batch x per-sample gated entries x {batch.element_size()} bytes; "
          f"top1 groups = sources the gate picked in the timed batch; top1=soft at gate peak {args.peak}")


if __name__ == "__main__":
    main()
