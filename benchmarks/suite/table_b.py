"""Table B: layer-wise merging of UDA segmentation models (layerwise-uda-merge, Tables 2–4 and Fig. 3).

The paper merges semantic segmenters adapted from a synthetic source (GTA) to a
real target (Cityscapes) by different UDA strategies, and finds that its
layer-wise merge (§3.3, Eq. 1: early layers averaged uniformly, later layers
increasingly the anchor's) beats the isotropic average (Table 2), improves its
anchor whichever model that is (Table 3), merges models with different class
counts where the other methods cannot (Table 4a), and merges the checkpoints of
one run (Fig. 3). This table repeats those comparisons on the synthetic scenes
of :mod:`benchmarks.suite.segmentation` with tiny SegFormers, every model and
dataset pushed to the local Hub and every merge run by repo id through
:func:`hfmerge.merge`. Merged models are read back from their output folders
with plain transformers and scored by hfmerge's segmentation evaluation
(:func:`hfmerge.eval.evaluate_segmenter`) on the test splits, read by dataset id.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.suite.bench import Bench, fingerprint
from benchmarks.suite.report import Cell, Claim, Section, Table, Value, at_least, line_plot_svg
from benchmarks.suite.segmentation import (
    CLASSES,
    CONSTRUCTION,
    CONSTRUCTION_CLASSES,
    UDA_METHODS,
    VERSION,
    SceneSpec,
    Training,
    adapt,
    domain_dataset,
    fuse_classes,
    image_processor,
    new_segformer,
    push_segmentation_dataset,
    save_segmenter,
    scene_arrays,
    train_source,
    with_fused_head,
)

HEADING = "Table B — layer-wise merging of UDA segmentation models (layerwise-uda-merge Tables 2–4)"
PREFIX = "segformer-scenes"


@dataclass(frozen=True)
class Sizes:
    """One mode's scenes, training and number of UDA seeds."""

    scenes: SceneSpec
    training: Training
    seeds: int
    """UDA runs per strategy (each from its own seed), at most the run's ``bench.seeds``."""


ALL_METHODS = ("self-training", "entropy", "maxsquare")
SIZES = {
    "smoke": Sizes(SceneSpec(size=32, train=32, validation=8, test=16),
                   Training(source_steps=10, uda_steps=2, batch=8, checkpoints=2), seeds=1),
    "quick": Sizes(SceneSpec(size=32, train=256, validation=32, test=128),
                   Training(source_steps=300, uda_steps=90, methods=ALL_METHODS), seeds=2),
    "full": Sizes(SceneSpec(size=32, train=512, validation=64, test=256),
                  Training(source_steps=600, uda_steps=300, methods=ALL_METHODS), seeds=3),
}


# -- data ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Data:
    """The dataset repos: both domains with five classes, and their test splits with fence → construction."""

    source: str
    target: str
    source_construction: str
    target_construction: str


def push_data(bench: Bench, sizes: Sizes) -> Data:
    """Build (or take from the cache) and push the scene datasets."""
    key = fingerprint(VERSION, sizes.scenes)
    about = {
        "source": "The source domain: clean synthetic renderings (flat colours, sharp period-4 fence stripes).",
        "target": "The target domain: the same kinds of scenes with other textures, shifted colours, a colour cast, "
                  "lower contrast, blur and noise. UDA reads only the images of `train`.",
    }
    repos = {}
    for domain in ("source", "target"):
        repos[domain] = push_segmentation_dataset(
            bench, f"{PREFIX}-{domain}", lambda d=domain: domain_dataset(d, sizes.scenes), key, CLASSES,
            f"{about[domain]} {sizes.scenes.size}x{sizes.scenes.size} px, made by hfmerge's benchmark suite.")
        repos[f"{domain}_construction"] = push_segmentation_dataset(
            bench, f"{PREFIX}-{domain}-construction",
            lambda d=domain: domain_dataset(d, sizes.scenes, fused=CONSTRUCTION, splits=("test",)), key,
            CONSTRUCTION_CLASSES,
            f"The test split of {repos[domain]} with fence merged into building as `construction`.")
    return Data(**repos)


# -- the zoo ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    """The models of one UDA seed, as repo ids (checkpoints as ``repo@commit``, oldest first)."""

    seed: int
    uda: dict[str, str]
    """UDA strategy → repo id, in :attr:`Training.methods` order."""
    construction: str
    checkpoints: tuple[str, ...]

    @property
    def anchor(self) -> str:
        """The self-training model: the anchor of the class-count and checkpoint merges."""
        return self.uda["self-training"]


@dataclass(frozen=True)
class Zoo:
    """The source-only model's repo id, each UDA seed's models, and the SegFormer's parameter count."""

    source_only: str
    runs: tuple[Run, ...]
    parameters: int


def build_zoo(bench: Bench, sizes: Sizes, seeds: Sequence[int]) -> Zoo:
    """Train (or take from the cache) the source-only model and each seed's UDA models, and push them.

    Every UDA model starts from the one source-only model, as the paper's models
    share their pre-training (§3.1). The construction model gets the source-only
    model with fence's classifier row dropped (:func:`with_fused_head`) and
    self-trains on source labels with fence merged into building: a model of
    another label set, as the paper's Synthia model is to its GTA model (Table 4a).
    """
    training, scenes = sizes.training, sizes.scenes
    source_key = fingerprint(VERSION, scenes, training.hidden_sizes, training.source_steps, training.batch,
                             training.learning_rate)

    def build_source(folder: Path) -> None:
        images, maps = scene_arrays("source", "train", scenes)
        model = new_segformer(CLASSES, training.hidden_sizes, seed=0)
        with one_thread():
            train_source(model, images, maps, image_processor(scenes.size), training, seed=0)
        save_segmenter(folder, model, image_processor(scenes.size), "Source-only SegFormer",
                       f"Trained on the labelled source scenes only ({training.source_steps} steps).")

    source_folder = bench.cached(f"model-{PREFIX}-source-only", source_key, build_source)
    source_only = bench.push_folder(f"{PREFIX}-source-only", source_folder)
    runs = []
    for seed in seeds:
        key = fingerprint(source_key, training, seed)
        folder = bench.cached(f"model-{PREFIX}-uda-seed{seed}", key,
                              lambda out, s=seed: _build_uda(out, source_folder, scenes, training, s))
        runs.append(_push_run(bench, folder, seed, training))
    return Zoo(source_only, tuple(runs), _parameters(source_folder))


def _parameters(folder: Path) -> int:
    from transformers import SegformerForSemanticSegmentation

    return sum(p.numel() for p in SegformerForSemanticSegmentation.from_pretrained(folder).parameters())


SEED_OFFSETS = {"self-training": 1, "entropy": 2, "maxsquare": 3, "construction": 9}
"""Each training's seed is 1000 × the UDA seed + its offset: a strategy's runs do not move when others are added."""
NAMES = {"self-training": "self-training", "entropy": "entropy minimisation", "maxsquare": "MaxSquare"}


def _build_uda(folder: Path, source_folder: Path, scenes: SceneSpec, training: Training, seed: int) -> None:
    """One seed's models: each UDA strategy's (self-training's checkpoints too) and the construction model."""
    from transformers import SegformerForSemanticSegmentation

    processor = image_processor(scenes.size)
    source = scene_arrays("source", "train", scenes)
    target_images, _ = scene_arrays("target", "train", scenes)  # the target's labels are never read
    with one_thread():
        for method in training.methods:
            model = SegformerForSemanticSegmentation.from_pretrained(source_folder)
            states = adapt(model, method, source, target_images, processor, training,
                           seed=1000 * seed + SEED_OFFSETS[method])
            save_segmenter(folder / method, model, processor, f"SegFormer adapted by {method}",
                           f"From the source-only model: {UDA_METHODS[method]}; {training.uda_steps} steps, "
                           f"seed {seed}.")
            if method == "self-training":
                for k, state in enumerate(states, start=1):
                    model.load_state_dict(state)
                    save_segmenter(folder / f"checkpoint-{k}", model, processor, f"Self-training checkpoint {k}",
                                   f"Checkpoint {k} of {len(states)} of the self-training run, seed {seed}.")
        fused = with_fused_head(SegformerForSemanticSegmentation.from_pretrained(source_folder),
                                CONSTRUCTION_CLASSES, CONSTRUCTION, training.hidden_sizes)
        adapt(fused, "self-training", (source[0], fuse_classes(source[1], CONSTRUCTION)), target_images, processor,
              training, seed=1000 * seed + SEED_OFFSETS["construction"])
        save_segmenter(folder / "construction", fused, processor, "SegFormer with a construction class",
                       f"Source labels with fence merged into building; self-trained on the target, seed {seed}.")


def _push_run(bench: Bench, folder: Path, seed: int, training: Training) -> Run:
    """Push one seed's models; the checkpoints as successive commits of one repo, named by commit sha."""
    repos = {method: bench.push_folder(f"{PREFIX}-{method}-s{seed}", folder / method)
             for method in (*training.methods, "construction")}
    run_name = f"{PREFIX}-self-training-run-s{seed}"
    revisions = []
    for k in range(1, training.checkpoints + 1):
        repo = bench.push_folder(run_name, folder / f"checkpoint-{k}")
        revisions.append(f"{repo}@{bench.api.model_info(repo).sha}")
    uda = {method: repos[method] for method in training.methods}
    return Run(seed, uda, repos["construction"], tuple(revisions))


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Train on one CPU thread (the fastest for models this small), restoring the count afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# -- scoring ------------------------------------------------------------------------------------
class SoftmaxEnsemble(torch.nn.Module):
    """The output ensemble the paper compares with: Σ_i softmax(f(x; θ_i)) / M per pixel (§3.3, last paragraph).

    Returns the log of the averaged probabilities as ``logits`` (their argmax is the ensemble's).
    """

    def __init__(self, models: Sequence[torch.nn.Module]) -> None:
        super().__init__()
        self.members = torch.nn.ModuleList(models)
        self.config = models[0].config

    def forward(self, pixel_values: torch.Tensor) -> Any:
        from transformers.modeling_outputs import SemanticSegmenterOutput

        probabilities = torch.stack([m(pixel_values=pixel_values).logits.softmax(dim=1) for m in self.members])
        return SemanticSegmenterOutput(logits=probabilities.mean(dim=0).log())


class Scorer:
    """Test metrics of models (repo ids, ``repo@revision``, folders) on dataset splits read by dataset id, once each."""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.scores: dict[tuple[str, str, str], dict[str, float]] = {}
        self.loaded: dict[str, tuple[torch.nn.Module, Any]] = {}

    def load(self, model: str | Path) -> tuple[torch.nn.Module, Any]:
        """A segmenter and its processor with plain transformers, from the Hub (at a revision) or a folder."""
        from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

        if str(model) not in self.loaded:
            name, _, revision = (str(model), "", "") if isinstance(model, Path) else model.partition("@")
            loaded = AutoModelForSemanticSegmentation.from_pretrained(name, revision=revision or None)
            self.loaded[str(model)] = loaded.eval(), AutoImageProcessor.from_pretrained(name, revision=revision or None)
        return self.loaded[str(model)]

    def metrics(self, model: str | Path, dataset: str, split: str = "test") -> dict[str, float]:
        """``mean_iou``, ``pixel_accuracy`` and ``iou/<class>`` of ``model`` on ``dataset:split``."""
        key = (str(model), dataset, split)
        if key not in self.scores:
            self.scores[key] = self.evaluate(*self.load(model), dataset, split, name=str(model))
        return self.scores[key]

    def miou(self, model: str | Path, dataset: str, split: str = "test") -> float:
        return self.metrics(model, dataset, split)["mean_iou"]

    def ensemble(self, models: Sequence[str], dataset: str) -> float:
        """Test mIoU of the output ensemble of ``models`` (each input through the first one's processor)."""
        members = [self.load(m)[0] for m in models]
        return self.evaluate(SoftmaxEnsemble(members), self.load(models[0])[1], dataset, "test",
                             name="ensemble")["mean_iou"]

    def recalibrated(self, model: str | Path, unlabeled: str, dataset: str) -> float:
        """Test mIoU after re-estimating every BatchNorm's statistics on ``unlabeled``'s train images (AdaBN).

        A diagnostic, neither the paper's method nor hfmerge's: Eq. 1 gives the last shared
        layers (the decoder's BatchNorm among them) the anchor's statistics, measured on
        the anchor's own features, while the merged encoder feeds it others.
        """
        import copy

        original, processor = self.load(model)
        recalibrated = copy.deepcopy(original).eval()
        norms = [m for m in recalibrated.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # a cumulative average over every batch
            norm.train()
        images = [image.convert("RGB") for image in self.bench.split(unlabeled, "train")["image"]]
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            for start in range(0, len(pixels), 64):
                recalibrated(pixel_values=pixels[start:start + 64])
        recalibrated.eval()
        return self.evaluate(recalibrated, processor, dataset, "test", name=f"{model} (AdaBN)")["mean_iou"]

    def evaluate(self, model: torch.nn.Module, processor: Any, dataset: str, split: str, *,
                 name: str) -> dict[str, float]:
        """hfmerge's segmentation evaluation (:func:`evaluate_segmenter`) of ``model`` on ``dataset:split``."""
        from hfmerge.eval import SegmentationSamples, evaluate_segmenter

        rows = self.bench.split(dataset, split)
        samples = SegmentationSamples(rows["image"], rows["annotation"], processor, dataset=dataset, split=split)
        report = evaluate_segmenter(model, [(f"{dataset}:{split}", samples)], batch_size=64, progress=False,
                                    name=name, per_class=True, measure_cost=False)
        return report.tasks[0].metrics


# -- merging ------------------------------------------------------------------------------------
@dataclass
class Merged:
    """A merge's output folder and class count, or hfmerge's refusal."""

    folder: Path | None = None
    classes: int | None = None
    error: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    """The plan's details (layerwise: ``layer_weights``, one row per shared layer)."""


def merge(bench: Bench, label: str, sources: Sequence[str], method: str, **kwargs: Any) -> Merged:
    """:meth:`Bench.merge`; an hfmerge refusal (:class:`hfmerge.errors.HfMergeError`) is kept as its message."""
    from hfmerge.errors import HfMergeError

    try:
        result = bench.merge(label, sources, method, **kwargs)
    except HfMergeError as exc:
        return Merged(error=f"{type(exc).__name__}: {exc}")
    folder = bench.work / label.replace("/", "_").replace(" ", "_")
    config = json.loads((folder / "config.json").read_text())
    return Merged(folder, len(config["id2label"]), details=dict(result.details))


# -- the tables ---------------------------------------------------------------------------------
@dataclass
class Rows:
    """Per-seed values of a table's rows, made into cells (mean ± half range over the seeds) at the end."""

    columns: list[str]
    values: dict[str, list[list[Value]]] = field(default_factory=dict)

    def add(self, label: str, *values: Value) -> None:
        self.values.setdefault(label, []).append(list(values))

    def cell(self, label: str, column: str) -> Value:
        measured = [row[self.columns.index(column)] for row in self.values[label]]
        numbers = [v for v in measured if isinstance(v, float)]
        if len(numbers) == len(measured):
            return Cell.of(numbers)
        return measured[0]

    def table(self, title: str) -> Table:
        table = Table(title, self.columns)
        for label in self.values:
            table.add(label, [self.cell(label, column) for column in self.columns])
        return table


def both(scorer: Scorer, model: str | Path, data: Data) -> tuple[float, float]:
    """(target test mIoU, source test mIoU)."""
    return scorer.miou(model, data.target), scorer.miou(model, data.source)


def merged_row(rows: Rows, label: str, merged: Merged, scorer: Scorer, data: Data, *, classes: bool = False) -> None:
    """A merge's row: its scores, or "refused" in every column when hfmerge refused it."""
    if merged.error is not None:
        rows.add(label, *["refused"] * len(rows.columns))
        return
    rows.add(label, *([merged.classes] if classes else []), *both(scorer, merged.folder, data))


LW = "layer-wise (`layerwise`)"
AVG = "isotropic average (`average`)"
BEST = "UDA: the best on target validation (the anchor below)"
STRIPPED = 'isotropic average of the shared layers, `heads="anchor"`'
WEIGHTED = "diagnostic: `average` of the best 2 weighted as layer-wise's mean over layers"
TARGET = "target mIoU"


def mean_layer_weights(layerwise: Merged) -> list[float]:
    """[anchor, other]: a layer-wise merge of two models' weights averaged over its shared layers (≈ ¾, ¼).

    The weighted average with these weights mixes in as much of the other model
    as Eq. 1 does in all, spread evenly over the layers instead of decaying with
    depth: it tells the layer profile's effect apart from the amount mixed in.
    """
    rows = layerwise.details["layer_weights"]
    other = sum(row["each_other"] for row in rows) / len(rows)
    return [1.0 - other, other]


def uda_rows(bench: Bench, scorer: Scorer, data: Data, zoo: Zoo, notes: list[str]) -> Rows:
    """Tables 2–3: each UDA model, their ensemble, merges of the best k, Fisher, and each anchor.

    Table 2's protocol: the models ranked by performance (here target validation
    mIoU, as the paper presumes the metrics known, §3.1), the best k merged for
    k = 2..M with the best as the anchor. Table 3's: every model as the anchor.
    """
    rows = Rows(["target mIoU", "source mIoU"])
    rows.add("source-only (no adaptation)", *both(scorer, zoo.source_only, data))
    for run in zoo.runs:
        s, models = run.seed, run.uda
        for method, repo in models.items():
            rows.add(f"UDA: {NAMES[method]}", *both(scorer, repo, data))
        ranked = sorted(models.values(), key=lambda m: scorer.miou(m, data.target, "validation"), reverse=True)
        rows.add(BEST, *both(scorer, ranked[0], data))
        for k in range(2, len(ranked) + 1):
            best = ranked[:k]
            rows.add(f"output ensemble of the best {k} (reference, {k}× compute)",
                     *(scorer.ensemble(best, d) for d in (data.target, data.source)))
            probe = {"eval_data": [f"{data.target}:test"]} if (s, k) == (zoo.runs[0].seed, 2) else {}
            average = merge(bench, f"avg-best{k}-s{s}", best, "average", **probe)
            if average.error and probe:
                notes.append(f"`hfmerge.merge(..., eval_data=[\"{data.target}:test\"])` cannot evaluate a "
                             f"segmentation dataset: {average.error}. The merges here are therefore scored by "
                             "`hfmerge.eval.evaluate_segmenter` on the saved folder, through the same dataset id.")
                average = merge(bench, f"avg-best{k}-s{s}", best, "average")
            merged_row(rows, f"{AVG} of the best {k}", average, scorer, data)
            layerwise = merge(bench, f"lw-best{k}-s{s}", best, "layerwise", anchor=best[0])
            merged_row(rows, f"{LW} of the best {k}, anchor the best", layerwise, scorer, data)
            if k == 2 and layerwise.error is None:
                weights = mean_layer_weights(layerwise)
                merged_row(rows, WEIGHTED, merge(bench, f"wavg-best{k}-s{s}", best, "average", weights=weights),
                           scorer, data)
        fisher = merge(bench, f"fisher-s{s}", list(models.values()), "fisher", data=[f"{data.target}:train"])
        if fisher.error and s == zoo.runs[0].seed:
            notes.append(f"Fisher is not applicable: hfmerge refuses it for segmenters — {fisher.error}")
        merged_row(rows, f"Fisher (`fisher`) of all {len(models)}, --data target train", fisher, scorer, data)
        for method, repo in models.items():
            merged_row(rows, f"{LW} of all {len(models)}, anchor {NAMES[method]}",
                       merge(bench, f"lw-{method}-s{s}", list(models.values()), "layerwise", anchor=repo),
                       scorer, data)
    notes.append("\"The best k\": the UDA models ranked by target validation mIoU, per seed (Table 2 merges the "
                 "models in order of performance, the best as the anchor).")
    return rows


def class_count_rows(bench: Bench, scorer: Scorer, data: Data, zoo: Zoo, notes: list[str]) -> tuple[Rows, dict]:
    """Table 4a: the 5-class self-training model merged with the 4-class construction model."""
    rows = Rows(["classes", "target mIoU", "source mIoU"])
    facts: dict[str, Any] = {}
    pairs: list[tuple[str, Path]] = []
    for run in zoo.runs:
        s, a, c = run.seed, run.anchor, run.construction
        first = s == zoo.runs[0].seed
        rows.add("UDA: self-training (the anchor)", len(CLASSES), *both(scorer, a, data))
        rows.add("UDA: construction model (own 4 classes, own test labels)", len(CONSTRUCTION_CLASSES),
                 scorer.miou(c, data.target_construction), scorer.miou(c, data.source_construction))
        if first:
            refused = merge(bench, f"avg-heads-s{s}", [a, c], "average", heads="average")
            facts["average refused"] = refused.error
            merged_row(rows, "isotropic average, `heads=\"average\"`", refused, scorer, data, classes=True)
            if refused.error:
                notes.append(f"`average` with `heads=\"average\"` refuses: {refused.error}")
            concat = merge(bench, f"avg-concat-s{s}", [a, c], "average")
            if concat.error is None:
                labels = list(json.loads((concat.folder / "config.json").read_text())["id2label"].values())
                twice = [label for label in labels if label.endswith("/road")]
                notes.append(
                    f"`average` with its default head policy does not refuse: the label sets differ, so it "
                    f"concatenates the two classifiers into one head of {concat.classes} outputs, the classes both "
                    f"models have twice ({' and '.join(f'`{t}`' for t in twice)}, …); that model is not scored "
                    "against the 5-class test labels here.")
        stripped = merge(bench, f"avg-anchor-s{s}", [a, c], "average", heads="anchor")
        merged_row(rows, STRIPPED, stripped, scorer, data, classes=True)
        merged = merge(bench, f"lw-classes-s{s}", [a, c], "layerwise", anchor=a)
        facts.setdefault("layerwise classes", []).append(merged.classes if merged.error is None else merged.error)
        merged_row(rows, f"{LW}, anchor self-training", merged, scorer, data, classes=True)
        if merged.error is not None and first:
            notes.append(f"layerwise refused models of different class counts: {merged.error}")
        if merged.error is None:
            pairs.append((a, merged.folder))
    if pairs:
        notes.append(class_iou_note(scorer, data.target, pairs, "the anchor", "layer-wise"))
        facts["adabn"] = [[scorer.recalibrated(m, data.target, data.target) for m in pair] for pair in pairs]
        anchor, merged = (sum(v[i] for v in facts["adabn"]) / len(pairs) for i in (0, 1))
        notes.append("Diagnostic (not a merge method): with every BatchNorm's statistics re-estimated on the target "
                     f"train images (AdaBN), the anchor scores {anchor:.3f} and the layer-wise merge {merged:.3f} "
                     "on the target (means over the seeds).")
    return rows, facts


def class_iou_note(scorer: Scorer, dataset: str, pairs: Sequence[tuple[str | Path, str | Path]], first: str,
                   second: str) -> str:
    """Per-class target IoU of two models (means over the seeds' pairs): where a merge gains or loses."""
    parts = []
    for name in CLASSES:
        values = [[scorer.metrics(m, dataset).get(f"iou/{name}", 0.0) for m in pair] for pair in pairs]
        a, b = (sum(v[i] for v in values) / len(values) for i in (0, 1))
        parts.append(f"{name} {a:.3f} → {b:.3f}")
    return f"Per-class target IoU, {first} → {second} (mean over the seeds): " + ", ".join(parts) + "."


def checkpoint_rows(bench: Bench, scorer: Scorer, data: Data, zoo: Zoo) -> tuple[Rows, dict[str, list]]:
    """Fig. 3: the checkpoints of one self-training run, and merges of the last k with the final as anchor."""
    rows = Rows(["target mIoU", "source mIoU"])
    curves: dict[str, list[list[float]]] = {AVG: [], LW: []}
    for run in zoo.runs:
        count = len(run.checkpoints)
        for k, checkpoint in enumerate(run.checkpoints, start=1):
            rows.add(f"checkpoint {k} of {count}" + (" (final)" if k == count else ""), *both(scorer, checkpoint, data))
        final = scorer.miou(run.checkpoints[-1], data.target)
        per_k = {AVG: [final], LW: [final]}
        for k in range(2, count + 1):
            last = list(run.checkpoints[-k:])
            for name, method, extra in ((AVG, "average", {}), (LW, "layerwise", {"anchor": last[-1]})):
                merged = merge(bench, f"ck-{method}-{k}-s{run.seed}", last, method, **extra)
                merged_row(rows, f"{name} of the last {k}" + (", anchor the final" if method == "layerwise" else ""),
                           merged, scorer, data)
                per_k[name].append(scorer.miou(merged.folder, data.target) if merged.error is None else float("nan"))
        for name in curves:
            curves[name].append(per_k[name])
    return rows, curves


# -- claims, plot, text --------------------------------------------------------------------------
def claims(uda: Rows, classes: Rows, facts: dict[str, Any], checkpoints: Rows, methods: Sequence[str],
           count: int) -> dict[str, Claim]:
    """The paper's claims, computed from the tables' cells, by a key :func:`findings` reads."""
    out = {}
    for k in range(2, len(methods) + 1):
        out[f"table2-{k}"] = at_least(
            f"Layer-wise merging of the best {k} UDA models ≥ their isotropic average on the target (Table 2)",
            uda.cell(f"{LW} of the best {k}, anchor the best", TARGET), uda.cell(f"{AVG} of the best {k}", TARGET),
            ("layer-wise", "average"))
    for method in methods:
        name = NAMES[method]
        out[f"table3-{method}"] = at_least(
            f"Layer-wise merging of all {len(methods)} ≥ its anchor on the target, anchor {name} (Table 3)",
            uda.cell(f"{LW} of all {len(methods)}, anchor {name}", TARGET), uda.cell(f"UDA: {name}", TARGET),
            ("layer-wise", "anchor"))
    made = facts["layerwise classes"]
    refused = facts.get("average refused")
    ran = all(n == len(CLASSES) for n in made)
    out["classes"] = Claim(
        "Layer-wise merging merges models of different class counts and `average` cannot (Table 4a)",
        ran and refused is not None,
        f"layerwise gave {made[0] if ran else made} classes (the anchor's {len(CLASSES)}) from {len(CLASSES)}- and "
        f"{len(CONSTRUCTION_CLASSES)}-class models; average(heads=average) "
        f"{'refused' if refused else 'did not refuse'}")
    if ran:
        out["classes-anchor"] = at_least(
            "Layer-wise merging of different class counts ≥ its anchor on the target (Table 4a)",
            classes.cell(f"{LW}, anchor self-training", TARGET),
            classes.cell("UDA: self-training (the anchor)", TARGET), ("layer-wise", "anchor"))
    if count > 1:
        out["checkpoints"] = at_least(
            f"Layer-wise merging of {count} checkpoints ≥ their isotropic average on the target (Fig. 3)",
            checkpoints.cell(f"{LW} of the last {count}, anchor the final", TARGET),
            checkpoints.cell(f"{AVG} of the last {count}", TARGET), ("layer-wise", "average"))
    return out


def _mean(rows: Rows, label: str, column: str = TARGET) -> float:
    value = rows.cell(label, column)
    return value.mean if isinstance(value, Cell) else float("nan")


def findings(uda: Rows, classes: Rows, facts: dict[str, Any], checkpoints: Rows, methods: Sequence[str],
             checked: dict[str, Claim]) -> list[str]:
    """What the numbers say where a claim failed: each paragraph computed from the tables."""
    failed = {key for key, claim in checked.items() if not claim.passed}
    out = [_best_k(uda, k) for k in range(2, len(methods) + 1) if f"table2-{k}" in failed]
    if any(key.startswith("table3") for key in failed):
        out.append(_interpolation(uda, methods))
    if any(key.startswith(("table2", "table3")) for key in failed):
        out += _complementarity(uda, len(methods))
    if "classes-anchor" in failed and facts.get("adabn"):
        out.append(_class_count_loss(classes, facts["adabn"]))
    if "checkpoints" in failed:
        out.append(_checkpoint_trend(checkpoints, checked["checkpoints"]))
    out += _weak_adaptation(uda, methods)
    return out


def _weak_adaptation(uda: Rows, methods: Sequence[str]) -> list[str]:
    """UDA models that do not beat the source-only model on the target: the merges then mix in a weak model."""
    source_only = _mean(uda, "source-only (no adaptation)")
    weak = [f"{NAMES[m]} {_mean(uda, f'UDA: {NAMES[m]}'):.3f}" for m in methods
            if _mean(uda, f"UDA: {NAMES[m]}") <= source_only + 0.002]
    if not weak:
        return []
    return [f"Not every strategy adapts at this size: {', '.join(weak)} against {source_only:.3f} for the "
            "source-only model on the target (within 0.002 or below). The merges still include them, as Table 2 "
            "includes its weaker models."]


def _best_k(uda: Rows, k: int) -> str:
    """A Table 2 failure: where layer-wise lands against its anchor, the average, the ensemble and (k = 2) the
    weighted average with layer-wise's mean weights."""
    anchor, merged = _mean(uda, BEST), _mean(uda, f"{LW} of the best {k}, anchor the best")
    average = _mean(uda, f"{AVG} of the best {k}")
    ensemble = _mean(uda, f"output ensemble of the best {k} (reference, {k}× compute)")
    text = (f"Best {k} on the target: the anchor {anchor:.3f}, layer-wise {merged:.3f}, the isotropic average "
            f"{average:.3f}, the output ensemble {ensemble:.3f}.")
    if min(anchor, average) - 1e-3 <= merged <= max(anchor, average) + 1e-3:
        text += " Layer-wise lands between its anchor and the average."
    if k == 2 and WEIGHTED in uda.values:
        weighted = _mean(uda, WEIGHTED)
        text += (f" A plain weighted average with layer-wise's mean weight over the layers (about ¾ anchor, ¼ the "
                 f"other) scores {weighted:.3f}: ")
        if abs(weighted - merged) <= 0.003:
            text += ("the same as layer-wise, so what counts here is how much of the other model is mixed in, not "
                     "how Eq. 1 spreads it over the depth; the average mixes in more.")
        elif weighted > merged:
            text += ("more than layer-wise, so spreading the other model's share evenly over the depth beats "
                     "keeping the later layers the anchor's, against the premise of Eq. 1 (§3.2: later layers "
                     "differ most across UDA models).")
        else:
            text += ("less than layer-wise, so keeping the later layers the anchor's helps, as Eq. 1 intends; the "
                     "isotropic average gains more by mixing in more of the other model.")
    return text


def _checkpoint_trend(checkpoints: Rows, claim: Claim) -> str:
    """A Fig. 3 failure: is the final checkpoint, layer-wise's anchor, the run's best?"""
    scores = [_mean(checkpoints, label) for label in checkpoints.values if label.startswith("checkpoint")]
    listed = ", ".join(f"{v:.3f}" for v in scores)
    if scores == sorted(scores):
        return (f"The checkpoints score {listed} on the target, oldest first: the run is still improving, so each "
                f"older checkpoint mostly adds an earlier, worse model ({claim.detail}).")
    best = max(range(len(scores)), key=scores.__getitem__) + 1
    return (f"The checkpoints score {listed} on the target, oldest first: the final checkpoint, the anchor (the "
            f"paper's choice, §4.2), is not the run's best (checkpoint {best} is). Layer-wise stays near its "
            f"anchor while the isotropic average moves towards the better earlier checkpoints ({claim.detail}).")


def _complementarity(uda: Rows, m: int) -> list[str]:
    """Table 2–3 failures: when the output ensemble, which keeps every model's knowledge, does not beat the best
    model, there is little for any merge to gain."""
    best = _mean(uda, BEST)
    ensembles = {k: _mean(uda, f"output ensemble of the best {k} (reference, {k}× compute)") for k in range(2, m + 1)}
    if max(ensembles.values()) > best:
        return []
    listed = ", ".join(f"{v:.3f} (best {k})" for k, v in ensembles.items())
    return [f"Little to combine: the output ensemble scores {listed} on the target against {best:.3f} for the best "
            "model alone. Every UDA model starts from the one source-only model and trains briefly on the same data, "
            "so their errors largely coincide and a weight merge has no complementary knowledge to gain; the "
            "paper's gains over the anchor are largest where the strategies differ most (Table 3: adversarial with "
            "entropy minimisation)."]


def _interpolation(uda: Rows, methods: Sequence[str]) -> str:
    """Table 3 failures: where each anchored merge lands between its anchor and the isotropic average."""
    m = len(methods)
    average = _mean(uda, f"{AVG} of the best {m}")
    moves, between = [], 0
    for x in methods:
        anchor, merged = _mean(uda, f"UDA: {NAMES[x]}"), _mean(uda, f"{LW} of all {m}, anchor {NAMES[x]}")
        moves.append(f"{NAMES[x]} {anchor:.3f} → {merged:.3f}")
        between += min(anchor, average) - 1e-3 <= merged <= max(anchor, average) + 1e-3
    text = (f"Anchor → layer-wise merge of all {m}: {', '.join(moves)}; the isotropic average of all {m} scores "
            f"{average:.3f}. {between} of the {m} merges lie between their anchor and that average (within 0.001)")
    if between == m:
        return text + (": layer-wise merging acts as an interpolation towards the average, lifting anchors below it "
                       "and lowering those above it.")
    return text + "."


def _class_count_loss(classes: Rows, adabn: list[list[float]]) -> str:
    """Table 4a failure: the size of the loss before and after re-estimating BatchNorm statistics (AdaBN)."""
    anchor, merged = _mean(classes, "UDA: self-training (the anchor)"), _mean(classes, f"{LW}, anchor self-training")
    anchor_bn, merged_bn = (sum(pair[i] for pair in adabn) / len(adabn) for i in (0, 1))
    before, after = anchor - merged, anchor_bn - merged_bn
    verdict = ("most of the loss is that mismatch" if after < before / 2
               else "so that mismatch does not explain the loss")
    return (f"With the 4-class model, layer-wise scores {merged:.3f} against its anchor's {anchor:.3f} (the isotropic "
            f"average of the shared layers: {_mean(classes, STRIPPED):.3f}). Eq. 1 gives the last shared layers — "
            "the decoder's fuse convolution and BatchNorm — (almost) the anchor's weights and running statistics, "
            "while the encoder under them is partly the other model's. With every BatchNorm's statistics "
            f"re-estimated on the target train images (AdaBN), the anchor scores {anchor_bn:.3f} and the merge "
            f"{merged_bn:.3f}: a gap of {after:.3f} instead of {before:.3f}, {verdict}. The per-class note under "
            "B.2 shows which classes lose.")


def checkpoint_plot(curves: dict[str, list[list[float]]]) -> str:
    """Target mIoU against the number of checkpoints merged (1 = the final alone), mean over the seeds (Fig. 3).

    The y axis spans whole multiples of 0.05, so its two-decimal tick labels stay distinct.
    """
    series = {}
    for name, runs in curves.items():
        means = [sum(values) / len(values) for values in zip(*runs)]
        series[name.split(" (")[0]] = [(k, m) for k, m in enumerate(means, start=1)]
    values = [y for points in series.values() for _, y in points]
    low = math.floor(min(values) * 20) / 20
    high = max(math.ceil(max(values) * 20) / 20, low + 0.05)
    return line_plot_svg("Merging the last k checkpoints of a self-training run (anchor: the final; mean over seeds)",
                         "checkpoints merged (1 = the final alone)", "target test mIoU", series, y_range=(low, high))


def intro(sizes: Sizes, zoo: Zoo, data: Data) -> str:
    s, t = sizes.scenes, sizes.training
    return (
        f"Synthetic street scenes of {s.size}×{s.size} px with {len(CLASSES)} classes ({', '.join(CLASSES)}): "
        f"a clean synthetic **source** domain (`{data.source}`: flat colours, sharp fence stripes) and a "
        f"shifted **target** domain (`{data.target}`: other textures and colours, colour cast, lower contrast, "
        f"blur, noise), as GTA is to Cityscapes in the paper. {s.train} train, {s.validation} validation and "
        f"{s.test} test images per domain; UDA reads only the images of the target's train split. "
        f"Model: a SegFormer with a {len(t.hidden_sizes)}-stage MiT-style encoder (widths "
        f"{'/'.join(map(str, t.hidden_sizes))}, one block per stage) and the all-MLP decoder, {zoo.parameters:,} "
        f"parameters, logits at a quarter of the input size. The source-only model trains {t.source_steps} "
        f"steps of {t.batch} source images (AdamW, lr {t.learning_rate:g}, colour jitter); each UDA model "
        f"starts from it and trains {t.uda_steps} steps of {t.batch} source + {t.batch} target images "
        f"(lr {t.uda_learning_rate:g}) by one strategy: {'; '.join(UDA_METHODS[m] for m in t.methods)}. "
        f"The construction model self-trains the same way from the source-only "
        f"model with fence merged into building (4 classes). {len(zoo.runs)} UDA seed(s): a cell `m ± s` is "
        f"the mean over the UDA seeds with half their range; every merge is deterministic given its sources, "
        f"so the spread is that of the UDA training. mIoU by hfmerge's `evaluate_segmenter` on the test splits "
        f"read by dataset id; the merged models read back from their folders with plain transformers."
    )


# -- the section --------------------------------------------------------------------------------
def run(bench: Bench) -> Section:
    """Build the scenes and the zoo, run every merge by repo id, and return Table B's section."""
    sizes = SIZES[bench.mode]
    seeds = bench.seeds[:sizes.seeds]
    data = push_data(bench, sizes)
    zoo = build_zoo(bench, sizes, seeds)
    bench.log(f"  zoo ready: {zoo.source_only} and {len(zoo.runs)} UDA seed(s)")
    scorer = Scorer(bench)
    uda_notes: list[str] = []
    class_notes: list[str] = []
    uda = uda_rows(bench, scorer, data, zoo, uda_notes)
    classes, facts = class_count_rows(bench, scorer, data, zoo, class_notes)
    checkpoints, curves = checkpoint_rows(bench, scorer, data, zoo)
    section = Section(key="B", heading=HEADING, intro=intro(sizes, zoo, data))
    first = uda.table("B.1 — models adapted by different UDA strategies (Tables 2–3): test mIoU")
    first.notes += uda_notes
    second = classes.table("B.2 — different class counts (Table 4a): test mIoU")
    second.notes += class_notes
    third = checkpoints.table("B.3 — checkpoints of one self-training run (Fig. 3): test mIoU")
    third.notes.append("The checkpoints are successive commits of one repo, merged as `repo@<commit>`.")
    section.tables = [first, second, third]
    checked = claims(uda, classes, facts, checkpoints, sizes.training.methods, sizes.training.checkpoints)
    section.claims = list(checked.values())
    section.findings = findings(uda, classes, facts, checkpoints, sizes.training.methods, checked)
    section.plots["table_b_checkpoints.svg"] = checkpoint_plot(curves)
    return section
