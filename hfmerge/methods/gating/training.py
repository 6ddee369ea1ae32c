"""The gating merge's own stage: training its gate network before the merge (vit-gating-merge §3.2)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from hfmerge.errors import DataError
from hfmerge.methods.stages import DataNeed, Phase, Stage

if TYPE_CHECKING:
    from collections.abc import Callable

    from hfmerge.adapters.layout import ModelLayout
    from hfmerge.engine.plan import MergeContext
    from hfmerge.io.checkpoint import TensorTable
    from hfmerge.methods.stages import StageRun

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainGate(Stage):
    """A gate network trained before the merge to tell the sources' data apart; its weights are the table ``gate``.

    ``gate`` is the role of the gate model in ``ctx.auxiliary``; it gets a head of one output per
    source and learns which source's data an image comes from, on at most ``fraction`` of each
    source's data (the rest measures it), with the other fields as training options. ``feed``
    wraps the gate as the merged model feeds it (``feed(gate, output config)``: pixels in, logits
    and a loss out); ``None``: the gated ViT's :class:`~hfmerge.methods.gating.gate.GateInput`.
    """

    gate: str
    fraction: float
    epochs: int
    learning_rate: float
    batch_size: int
    need: DataNeed = DataNeed(required=True)
    feed: Callable[[Any, Any], Any] | None = None
    name: ClassVar[str] = "gate"
    phase: ClassVar[Phase] = Phase.PREPARE
    all_processes: ClassVar[bool] = True

    def data_need(self) -> DataNeed:
        return self.need

    def resolve(self, ctx: MergeContext) -> TrainGate | None:
        return self if ctx.data else None

    def image_processors(self, ctx: MergeContext) -> list[ModelLayout]:
        """Every source's images go through the anchor's processor, as the gated model's pixels will."""
        return [ctx.anchor]

    def describe(self, ctx: MergeContext) -> list[str]:
        gate = ctx.auxiliary.get(self.gate)
        what = f"the gate network {gate.source.name}" if gate is not None else "the method's network"
        return [f"training stage: {what}, on {self.fraction:.0%} of each source's data (label = the source)"]

    def run(self, run: StageRun) -> TensorTable | None:
        table = train_gate(self, run)
        if table is not None:
            run.record.tables[self.name] = table
        return table


class _SourceIndexed:
    """A source's images labelled with the source's index: the gate's task (vit-gating-merge §3.2)."""

    def __init__(self, images: Any, index: int) -> None:
        self.images = images
        self.index = index

    def __len__(self) -> int:
        return len(self.images)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"pixel_values": self.images[i]["pixel_values"], "labels": self.index}


@dataclass
class GateTrained:
    """What the gate's training did, for the card."""

    name: str
    train_images: list[int]
    held_out: list[int]
    per_source: list[tuple[str, float]]
    accuracy: float
    epochs_run: int
    seconds: float

    def card_facts(self) -> dict[str, Any]:
        return {"name": self.name, "trained": True, "train_images": self.train_images, "held_out": self.held_out,
                "per_source": self.per_source, "accuracy": self.accuracy, "epochs_run": self.epochs_run}


def train_gate(request: TrainGate, run: StageRun) -> TensorTable | None:
    """Fine-tune the gating merge's gate network and return its weights as a table the merge copies from.

    The gate (a MobileNetV2 image classifier, ``gate``) gets a new head of N
    outputs and learns which source's data an image comes from, label = the
    source's index, from at most ``gate_fraction`` of each source's data
    (vit-gating-merge §3.2, §4.1: "no more than 15% of the test dataset
    randomly selected from each task"); the rest is held out and measures the
    gate's accuracy for the card. Images go through the merged model's own
    (the anchor's) image processor and then the gate's in-model resizing and
    normalisation, exactly as the merged model feeds its gate at inference.
    """
    import math
    import shutil
    import tempfile
    import weakref

    import torch
    from torch.utils.data import ConcatDataset, DataLoader, Subset

    from hfmerge.data.load import ProcessedImages
    from hfmerge.io.checkpoint import CheckpointReader
    from hfmerge.methods.gating.gate import GateInput
    from hfmerge.train import TrainOptions, train_model

    started = time.perf_counter()
    context, accelerator = run.context, run.accelerator
    gate_layout = context.auxiliary[request.gate]
    config = run.plan.output.config  # type: ignore[union-attr]
    processor = run.source_processor(context.anchor)
    seed = run.seed
    fraction = request.fraction
    train_parts, held_parts, names = [], [], []
    for i, layout in enumerate(context.sources):
        data = run.source_data(i, samples=None, labeled=False)
        images = _SourceIndexed(ProcessedImages(data, processor), i)
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed + i)).tolist()
        cut = math.floor(fraction * len(order))  # "no more than 15%" (§4.1): never rounded up
        if cut < 2 or cut >= len(order):
            raise DataError(
                f"{data.name} has {len(order)} images, and gate_fraction={fraction:g} of them is {cut}: the gate "
                "trains on at least 2 of each source's images and is measured on the rest; give more data or "
                "another gate_fraction"
            )
        train_parts.append(Subset(images, order[:cut]))
        held_parts.append(Subset(images, order[cut:]))
        names.append(config.gate_labels[i])
    torch.manual_seed(seed)
    gate = run.source_model(gate_layout)
    gate.classifier = torch.nn.Linear(gate.classifier.in_features, len(context.sources))
    gate.num_labels = len(context.sources)
    gate.config.num_labels = len(context.sources)
    gate.config.id2label = dict(enumerate(names))
    gate.config.label2id = {name: i for i, name in enumerate(names)}
    model = (request.feed or GateInput)(gate, config)
    options = TrainOptions(epochs=request.epochs, learning_rate=request.learning_rate,
                           batch_size=request.batch_size, seed=seed)
    report = train_model(model, ConcatDataset(train_parts), options, accelerator=accelerator, progress=run.progress,
                         desc="Training the gate")
    accelerator.free_memory()
    model.eval()
    per_source = []
    with torch.inference_mode():
        for name, part in zip(names, held_parts):
            right = 0
            for batch in DataLoader(part, batch_size=options.batch_size):
                right += int((model(batch["pixel_values"]).logits.argmax(-1) == batch["labels"]).sum())
            per_source.append((name, right / max(1, len(part))))
    held = [len(p) for p in held_parts]
    facts = GateTrained(
        gate_layout.source.name, [len(p) for p in train_parts], held, per_source,
        sum(acc * n for (_, acc), n in zip(per_source, held)) / max(1, sum(held)), report.epochs_run,
        time.perf_counter() - started,
    )
    run.record.details["gate"] = facts.card_facts()
    logger.info("trained the gate on %d images in %.1f s: it picks the right source for %.2f%% of %d held-out images",
                sum(facts.train_images), facts.seconds, 100 * facts.accuracy, sum(held))
    if not accelerator.is_main_process:
        return None  # only the main process merges
    folder = tempfile.mkdtemp(prefix="hfmerge-gate-")
    gate.save_pretrained(folder)
    table = CheckpointReader(folder, label="the trained gate")
    weakref.finalize(table, shutil.rmtree, folder, True)
    return table
