"""One data pass of a model that collects exactly the statistics a method asked for.

Data-dependent methods need a few quantities of each source model on its own
data, never the data itself:

- **Gram matrices** of a linear layer's inputs, G = XᵀX over every row x of
  the input (every token of every sample), for RegMean (Jin et al., "Dataless
  Knowledge Fusion by Merging Weights of Language Models", Eq. 2; the ViT
  paper's appendix A);
- **diagonal Fisher information**, F = Σₙ (∂ log p(yₙ|xₙ) / ∂θ)², for Fisher
  merging (Matena & Raffel, "Merging Models with Fisher-Weighted Averaging",
  §2 Eq. 3–4), with yₙ drawn from the model's own prediction or the data's labels;
- **activations** of chosen modules for the first t samples (OTFusion, CLAFusion).

:func:`collect_statistics` runs the pass under one ``accelerate.Accelerator``:
the DataLoader is sharded across processes (``accelerate launch``), forward
hooks (registered only for what was asked, removed afterwards, also on error)
accumulate float64 sums and row/sample counts, and at the end the sums are
reduced across processes, so every process holds the result of one process
reading all the data. :class:`StatisticsCache` keeps results as safetensors
files so that a second merge over the same models and data reads them back.

Precision. Each batch's Gram product XᵀX is computed in float32 and added to a
float64 running sum (:func:`add_upper_gram_`); the diagonal Fisher's squares
and sums are float64 (their cost is the per-sample backward pass, not the
sums); kept activations are float32 copies of what the model computed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hfmerge.errors import SourceError, StatisticsError
from hfmerge.io.checkpoint import SafetensorsFile, TensorTable
from hfmerge.io.disk import SpaceNeed, check_free_space, full_disk_is_an_error, owner_tag

if TYPE_CHECKING:
    import accelerate

logger = logging.getLogger(__name__)

STATISTICS_FORMAT = "hfmerge-statistics-2"
"""Part of every cache key: bump it when the meaning of a stored statistic changes.

2: Gram products in float32 summed in float64 (1: float64 products), stored as packed upper triangles."""

FISHER_LABELS = ("model", "empirical")

CACHE_ROOM_FIX = "make room there, or set HF_HOME to a folder on a disk with more room"

GRAM_BLOCK = 768
"""Column block of the upper-triangular Gram update (see :func:`add_upper_gram_`)."""


@dataclass(frozen=True)
class StatisticsRequest:
    """What one statistics pass collects; empty fields cost nothing.

    Attributes:
        grams: in-memory names of ``nn.Linear`` modules; the Gram matrix XᵀX of each one's input.
            One per shared-input group is enough (``ModelLayout.linear_groups``).
        fisher: in-memory parameter names; their diagonal Fisher information.
        fisher_labels: ``"model"``: y drawn from the model's own softmax (seeded; the true Fisher);
            ``"empirical"``: the batch's ``labels`` (the empirical Fisher).
        activations: module names; their outputs (batch first) for the first ``activation_samples`` samples.
        activation_samples: t, how many samples' activations to keep.
        activation_pool: convolution outputs (``[B, C, H, W]``; a linear layer's ``[B, H, W, C]``) are
            average-pooled to at most ``activation_pool`` × ``activation_pool`` positions before they are
            kept (0: every position).
            Per channel this is a local mean, the same for every model, so channels stay comparable,
            while 200 images of a 224 px ResNet keep 64 values per channel and image instead of 3,136.
    """

    grams: tuple[str, ...] = ()
    fisher: tuple[str, ...] = ()
    fisher_labels: str = "model"
    activations: tuple[str, ...] = ()
    activation_samples: int = 0
    activation_pool: int = 0

    def __post_init__(self) -> None:
        for name in ("grams", "fisher", "activations"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.fisher_labels not in FISHER_LABELS:
            raise ValueError(f"fisher_labels must be one of {FISHER_LABELS}, not {self.fisher_labels!r}")
        if self.activation_samples < 0:
            raise ValueError(f"activation_samples must be >= 0, not {self.activation_samples}")

    @property
    def samples_labels(self) -> bool:
        """Whether the pass draws labels at random (so the seed changes the result)."""
        return bool(self.fisher) and self.fisher_labels == "model"

    def cache_key(self) -> str:
        """A stable hex digest of what is asked: names are a set, unused options do not count."""
        described = {
            "format": STATISTICS_FORMAT,
            "grams": sorted(set(self.grams)),
            "fisher": sorted(set(self.fisher)),
            "fisher_labels": self.fisher_labels if self.fisher else None,
            "activations": sorted(set(self.activations)) if self.activation_samples else [],
            "activation_samples": self.activation_samples if self.activations else 0,
        }
        if self.activations and self.activation_pool:  # absent when unused: earlier cache keys stay valid
            described["activation_pool"] = self.activation_pool
        if self.activations and self.activation_samples:
            # activations kept as copies: earlier files could hold outputs the model changed in place afterwards
            described["activations_copied"] = True
        return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


INPUT_SUFFIX = "#input"
"""An activation named ``<module>#input`` is what ``<module>`` receives (its first argument), not what it returns:
a ResNet block's stream after the shortcut's addition, before its ReLU, is the input of the block's activation."""


def module_of(activation: str) -> str:
    """The module an activation name observes (``<module>`` or ``<module>#input``)."""
    return activation.removesuffix(INPUT_SUFFIX)


def label_seed(seed: int, sample_index: int) -> int:
    """The generator seed for drawing the label of sample ``sample_index`` (its position in the data).

    One generator per sample makes the draw independent of batching and of how
    the data is sharded across processes.
    """
    return (seed * 0x9E3779B97F4A7C15 + sample_index) % (2**63)


def gram_product_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype one batch's Gram product XᵀX is computed in: float64 for float64 inputs, float32 for all others.

    Not bfloat16 or float16, even on a GPU: rounding X to 8 (11) mantissa bits
    moves each product by about 2⁻⁹ (2⁻¹²) relative, far above float32's
    rounding; converting a bfloat16 or float16 activation to float32 is exact.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def add_upper_gram_(gram: torch.Tensor, x: torch.Tensor, block: int = GRAM_BLOCK) -> None:
    """Add XᵀX to the upper block triangle of ``gram`` in place: G[i, j] += xᵢᵀxⱼ for column blocks i ≤ j.

    A Gram matrix is symmetric, so the blocks below the diagonal need not be
    computed: with b blocks this is (b + 1) / 2b of a full product (0.62 for
    ViT-B's 3072-wide MLP input). :func:`symmetric_from_upper` completes it.

    The product is computed in ``x``'s dtype and added to ``gram`` in
    ``gram``'s: the statistics pass gives float32 rows and a float64 sum.
    That is enough, and twice as fast as float64 products on a CPU: an entry
    of one batch's product sums the K = rows of that batch, and float32's
    rounding of such a sum is bounded by γ_K·Σₖ|xₖᵢ||xₖⱼ| ≤ γ_K·√(GᵢᵢGⱼⱼ)
    (Higham, *Accuracy and Stability of Numerical Algorithms*, §3.1,
    γ_K ≈ K·u, u = 2⁻²⁴; Cauchy–Schwarz for the second step), and typically
    ~√K·u·√(GᵢᵢGⱼⱼ) since rounding errors have random signs. Summing batches
    in float64 adds nothing measurable and does not let the error grow with
    the number of batches: each batch's error is relative to its own share
    of G. For ViT-B at batch 32 (K = 6,304 rows) √K·u ≈ 5e-6;
    ``benchmarks/statistics.py`` measures the error on ViT-B's inputs and the
    change it makes to RegMean's merged weights (``benchmarks/README.md``).
    """
    n = x.shape[1]
    same = x.dtype == gram.dtype
    for start in range(0, n, block):
        rows, upper = x[:, start : start + block].T, gram[start : start + block, start:]
        if same:
            upper.addmm_(rows, x[:, start:])
        else:
            upper.add_(rows @ x[:, start:])


def symmetric_from_upper(gram: torch.Tensor) -> torch.Tensor:
    """The full symmetric matrix whose upper triangle (diagonal included) is ``gram``'s."""
    return torch.triu(gram) + torch.triu(gram, diagonal=1).T


def symmetrize_upper_(gram: torch.Tensor) -> torch.Tensor:
    """Make ``gram`` the full symmetric matrix of its upper triangle, in place, and return it.

    The reduction completes every running sum this way, so the pass never holds
    a second copy of all its Gram matrices (1 GiB in float64 for ViT-B): one
    matrix-sized temporary (the strict upper triangle) at a time.
    """
    strict_upper = torch.triu(gram, diagonal=1)
    return gram.triu_().add_(strict_upper.T)


GRAM_UPPER = "gram_upper/"
"""The key prefix of a Gram matrix stored as its packed upper triangle (see :func:`pack_grams_`)."""


def pack_upper(gram: torch.Tensor) -> torch.Tensor:
    """The upper triangle of a square ``gram`` (diagonal included), row by row: n(n + 1)/2 entries.

    Only the upper triangle is read, so ``gram`` may hold anything below its
    diagonal (the running sums of :func:`add_upper_gram_` hold nothing there).
    One copy of each row's tail, twice as fast as indexing with a triangular mask.
    """
    n = gram.shape[0]
    gram = gram.cpu()
    return torch.cat([gram[r, r:] for r in range(n)])


def pack_grams_(statistics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace each ``gram/{m}`` of ``statistics`` by ``gram_upper/{m}``, its upper triangle row by row; return it.

    A Gram matrix is symmetric: its n(n + 1)/2 upper entries (diagonal
    included) are all of it, exactly, so a stored or held Gram takes little
    more than half the bytes (0.54 instead of 1.07 GiB for ViT-B's 49 in
    float64). Each full matrix leaves the dict as its triangle enters, so
    packing holds one extra triangle at a time. :class:`StatisticsTable` reads
    them back whole.
    """
    for key in [k for k in statistics if k.startswith("gram/")]:
        gram = statistics.pop(key)
        statistics[GRAM_UPPER + key.removeprefix("gram/")] = pack_upper(gram)
        del gram
    return statistics


@functools.lru_cache(maxsize=8)
def packed_row_starts(n: int) -> tuple[int, ...]:
    """Where each row of an n × n upper triangle starts in its packed form, and its end (n + 1 offsets)."""
    starts = [0]
    for r in range(n):
        starts.append(starts[-1] + n - r)
    return tuple(starts)


@functools.lru_cache(maxsize=8)
def packed_diagonal(n: int) -> torch.Tensor:
    """The positions of the diagonal entries G[r, r] in a packed upper triangle of an n × n matrix."""
    return torch.tensor(packed_row_starts(n)[:-1], dtype=torch.int64)


def unpack_gram(packed: torch.Tensor, block: int = 256) -> torch.Tensor:
    """The full symmetric ``[n, n]`` matrix whose upper triangle :func:`pack_grams_` packed into ``packed``.

    The rows' tails are copied in, then the lower triangle is filled a block of
    columns at a time from the transposed rows above it, so every copy reads
    and writes memory in runs (2× faster than a masked scatter and a
    full-matrix transposed add at ViT-B's 3072).
    """
    n = packed_order(packed.shape[0])
    starts = packed_row_starts(n)
    full = torch.empty(n, n, dtype=packed.dtype)
    for r in range(n):
        full[r, r:] = packed[starts[r] : starts[r + 1]]
    for start in range(0, n, block):
        stop = min(start + block, n)
        full[stop:, start:stop] = full[start:stop, stop:].T
        diagonal = full[start:stop, start:stop]
        diagonal.triu_().add_(torch.triu(diagonal, 1).T)
    return full


def packed_order(length: int) -> int:
    """n, for a packed upper triangle of ``length`` = n(n + 1)/2 entries."""
    n = (math.isqrt(8 * length + 1) - 1) // 2
    if n * (n + 1) // 2 != length:
        raise ValueError(f"{length} entries are no upper triangle of a square matrix")
    return n


class StatisticsTable(TensorTable):
    """Stored statistics read as a pass returns them: each packed ``gram_upper/{m}`` also read as the full ``gram/{m}``.

    Every key passes through, so an op that works on packed triangles (RegMean
    sums them before unpacking) reads ``gram_upper/{m}`` as stored. Whether ``stored`` is the cache file (read
    without memory-mapping: :class:`~hfmerge.io.checkpoint.SafetensorsFile`) or
    a table in memory (``cache=false``), a Gram is unpacked when a merge op asks
    for it and freed with it.
    """

    def __init__(self, stored: TensorTable) -> None:
        super().__init__()
        self.stored = stored
        self._packed: dict[str, str] = {}  # gram/{m} -> gram_upper/{m}
        where = Path(getattr(stored, "path", "statistics"))
        for key in stored.keys():
            if key.startswith(GRAM_UPPER):
                n = packed_order(stored.shape(key)[0])
                full = "gram/" + key.removeprefix(GRAM_UPPER)
                self._packed[full] = key
                self._add(full, where, (n, n), stored.dtype(key))
            self._add(key, where, stored.shape(key), stored.dtype(key))

    def get(self, key: str) -> torch.Tensor:
        if key in self._packed:
            return unpack_gram(self.stored.get(self._packed[key]))
        return self.stored.get(key)

    def close(self) -> None:
        self.stored.close()


def collect_statistics(
    model: torch.nn.Module,
    loader: Iterable[dict[str, torch.Tensor]],
    request: StatisticsRequest,
    *,
    accelerator: accelerate.Accelerator | None = None,
    seed: int = 0,
    progress: bool = True,
    desc: str = "Statistics",
    packed: bool = False,
    image_encoder: str = "",
) -> dict[str, torch.Tensor]:
    """Run ``model`` over ``loader`` once and return the statistics ``request`` asks for.

    The model runs in eval mode (no dropout; BatchNorm uses its running
    statistics) and is moved to the accelerator's device. Gram matrices and
    activations are taken under ``torch.inference_mode``. The diagonal Fisher
    needs per-sample gradients: each sample of a batch is run alone through
    the model and ``autograd`` (exact, at the memory of one backward pass);
    only image classifiers (logits ``[batch, classes]``) are accepted, since
    a segmentation model's per-pixel likelihood is a different estimator.
    A module called several times in one forward pass (Mask2Former's
    predictors, once per decoder layer) adds every call's rows to its Gram
    matrix; its activation is its first call's output.

    Under several processes the DataLoader is sharded with ``even_batches``
    off, so no sample is repeated to pad the last batch, and the label drawn
    for a sample depends only on ``seed`` and its position in the data
    (:func:`label_seed`): the reduced result equals the one-process result.

    Args:
        model: the model; a transformers model called as ``model(pixel_values=...)``.
        loader: batches ``{"pixel_values": [B, C, H, W], "labels": [B]?}``; a
            ``torch.utils.data.DataLoader`` (required under several processes,
            which shard it), or any iterable of such batches in one process.
        request: what to collect.
        accelerator: the run's accelerator; one is created when not given.
        seed: seeds the labels drawn from the model for the Fisher.
        progress: show a tqdm bar (on the main process only).
        desc: the bar's description.
        packed: return each Gram as ``gram_upper/{module}``, its packed upper triangle
            (:func:`pack_grams_`'s form, as the cache stores it), never whole.
        image_encoder: the model's method that encodes images, called in the forward's place, where the forward
            reads more than images (a ``CLIPModel``: ``get_image_features``, which runs the image encoder and its
            projection).

    Returns:
        ``gram/{module}`` float64 ``[in, in]``: Σ xxᵀ over every input row (``gram_upper/{module}``,
        ``[in·(in + 1)/2]``, with ``packed``);
        ``rows/{module}`` int64 ``[]``: the rows summed; ``fisher/{param}``
        float64, the parameter's shape, summed over samples; ``samples`` int64
        ``[]``; ``activation/{module}`` float32 ``[t, ...]`` (fewer when the
        data has fewer samples). Tensors are on the CPU, identical on every process.

    Raises:
        StatisticsError: no sample reached the pass; Fisher asked of a model that is
            not a classifier; empirical Fisher without labels in the batches.
        ValueError: a requested name that the model does not have (a method's mistake).
    """
    from accelerate import Accelerator

    accelerator = accelerator if accelerator is not None else Accelerator()
    started = time.perf_counter()
    modules = dict(model.named_modules())
    parameters = dict(model.named_parameters())
    _check_names(request, modules, parameters)
    device = accelerator.device
    was_training = model.training
    model.eval().to(device)
    # a CNN runs its convolutions a quarter faster channels-last on the CPU (oneDNN); values are unchanged
    channels_last = sum(isinstance(m, torch.nn.Conv2d) for m in modules.values()) > 1
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:
        model.to(memory_format=torch.channels_last)

    encoder = getattr(model, image_encoder) if image_encoder else model
    pass_state = _PassState(request, modules, parameters, device)
    batches, batch_size = _shard(loader, accelerator)
    hooks = pass_state.register_hooks(modules)
    try:
        from tqdm.auto import tqdm

        total = len(batches) if hasattr(batches, "__len__") else None
        bar = tqdm(batches, desc=desc, total=total, unit="batch",
                   disable=not progress or not accelerator.is_local_main_process)
        for local_batch, batch in enumerate(bar):
            pixels = batch["pixel_values"].to(device).contiguous(memory_format=memory_format)
            if batch_size is None:  # one process: positions are the running count
                first_index = pass_state.samples
            else:  # accelerate deals batches round-robin: this process reads batches p, p + N, p + 2N...
                global_batch = local_batch * accelerator.num_processes + accelerator.process_index
                first_index = global_batch * batch_size
            pass_state.run_batch(encoder, pixels, batch.get("labels"), first_index, seed)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
        if channels_last:
            model.to(memory_format=torch.contiguous_format)
        _forget_prepared(accelerator, batches)

    result = pass_state.reduce(accelerator, packed)
    samples = int(result["samples"])
    if samples == 0:
        raise StatisticsError("no sample reached the statistics pass: the data is empty; give data with images")
    dataset = getattr(loader, "dataset", None)
    if dataset is not None and hasattr(dataset, "__len__") and samples != len(dataset):
        logger.warning("the statistics pass saw %d samples of a dataset of %d", samples, len(dataset))
    for name in request.grams:
        if int(result[f"rows/{name}"]) == 0:
            logger.warning("linear layer %s never ran on the data: its Gram matrix is zero", name)
    logger.info("statistics: %d samples (%s) in %.1f s", samples, _describe(request, samples),
                time.perf_counter() - started)
    return result


def _describe(request: StatisticsRequest, samples: int | None = None) -> str:
    parts = []
    if request.grams:
        parts.append(f"{len(request.grams)} Gram matrices")
    if request.fisher:
        parts.append(f"Fisher of {len(request.fisher)} parameters, {request.fisher_labels} labels")
    if request.activations and request.activation_samples:
        kept = request.activation_samples if samples is None else min(samples, request.activation_samples)
        parts.append(f"activations of {len(request.activations)} modules for {kept} samples")
    return ", ".join(parts) or "nothing asked"


def _check_names(request: StatisticsRequest, modules: dict[str, torch.nn.Module],
                 parameters: dict[str, torch.nn.Parameter]) -> None:
    not_linear = [n for n in request.grams if not isinstance(modules.get(n), torch.nn.Linear)]
    if not_linear:
        raise ValueError(f"Gram matrices are of nn.Linear inputs; {not_linear[0]!r} is no linear module of the model")
    missing = [n for n in request.fisher if n not in parameters]
    if missing:
        raise ValueError(f"the model has no parameter {missing[0]!r} for the Fisher")
    missing = [n for n in request.activations if module_of(n) not in modules]
    if missing:
        raise ValueError(f"the model has no module {missing[0]!r} whose activations to keep")


def _shard(loader: Iterable[dict[str, torch.Tensor]],
           accelerator: accelerate.Accelerator) -> tuple[Iterable[dict[str, torch.Tensor]], int | None]:
    """The batches this process reads, and under several processes the loader's batch size.

    With the batch size, a sample's position in the data (its index in the
    order one process would read it) follows from the batch number; in one
    process positions are simply counted (the batch size is None).
    ``even_batches`` is turned off while the loader is prepared: with it,
    accelerate pads the last round of batches with samples from the start,
    which a sum would count twice; so is ``split_batches``, so that whole
    batches are dealt round-robin.
    """
    from torch.utils.data import DataLoader

    several = accelerator.num_processes > 1
    if not isinstance(loader, DataLoader):
        if several:
            raise ValueError("under several processes the statistics pass needs a torch DataLoader to shard")
        return loader, None
    if several and loader.batch_size is None:
        raise ValueError("under several processes the statistics DataLoader needs a batch_size, not a batch_sampler")
    config = accelerator.dataloader_config
    even, split = config.even_batches, config.split_batches
    config.even_batches = config.split_batches = False
    try:
        prepared = accelerator.prepare(loader)
    finally:
        config.even_batches, config.split_batches = even, split
    return prepared, loader.batch_size if several else None


def _forget_prepared(accelerator: accelerate.Accelerator, batches: Iterable[dict[str, torch.Tensor]]) -> None:
    """Drop the accelerator's reference to a DataLoader it prepared for one pass.

    ``Accelerator.prepare`` keeps every DataLoader it prepares (for its
    ``even_batches`` context manager and ``free_memory``), and with it the
    dataset: the decoded images of every source visited, one pass after
    another, memory that would grow with the number of sources.
    """
    prepared = getattr(accelerator, "_dataloaders", None)
    if isinstance(prepared, list):
        prepared[:] = [loader for loader in prepared if loader is not batches]


def _logits(output: Any) -> torch.Tensor:
    logits = output if isinstance(output, torch.Tensor) else getattr(output, "logits", None)
    if logits is None:
        raise StatisticsError(f"the model's output ({type(output).__name__}) has no logits to take a Fisher of")
    return logits


class _PassState:
    """Running sums of one process, the hooks that fill them, and their reduction."""

    def __init__(self, request: StatisticsRequest, modules: dict[str, torch.nn.Module],
                 parameters: dict[str, torch.nn.Parameter], device: torch.device) -> None:
        self.request = request
        self.samples = 0
        self.grams = {
            name: torch.zeros(modules[name].in_features, modules[name].in_features, dtype=torch.float64, device=device)
            for name in dict.fromkeys(request.grams)
        }
        self.rows = dict.fromkeys(self.grams, 0)
        self.fisher = {name: torch.zeros(parameters[name].shape, dtype=torch.float64, device=device)
                       for name in dict.fromkeys(request.fisher)}
        self.parameters = parameters
        self.keep = request.activation_samples if request.activations else 0
        self.activations: dict[str, list[torch.Tensor]] = {name: [] for name in dict.fromkeys(request.activations)}
        self.positions: list[int] = []  # the data positions of the kept activations
        self.hooks_on = False           # hooks record only during the inference-mode forward pass
        self.batch_keep = 0             # how many leading samples of the current batch to keep
        self.batch_n = 0
        self.called: set[str] = set()

    def register_hooks(self, modules: dict[str, torch.nn.Module]) -> list[torch.utils.hooks.RemovableHandle]:
        handles = []
        try:
            for name in self.grams:
                handles.append(modules[name].register_forward_hook(self._gram_hook(name), with_kwargs=True))
            for name in self.activations:
                handles.append(modules[module_of(name)].register_forward_hook(self._activation_hook(name)))
        except BaseException:
            for handle in handles:
                handle.remove()
            raise
        return handles

    def _gram_hook(self, name: str):
        gram = self.grams[name]

        def hook(module: torch.nn.Linear, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            if not self.hooks_on:
                return
            x = args[0] if args else kwargs["input"]
            x = x.detach().reshape(-1, module.in_features)
            add_upper_gram_(gram, x.to(gram_product_dtype(x.dtype)))  # G += XᵀX: float32 product, float64 sum
            self.rows[name] += x.shape[0]

        return hook

    def _activation_hook(self, name: str):
        def hook(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not self.hooks_on or self.batch_keep == 0 or name in self.called:
                return
            self.called.add(name)
            out = args[0] if name.endswith(INPUT_SUFFIX) else output
            out = out if isinstance(out, torch.Tensor) else out[0]
            if out.dim() == 3 and out.shape[0] != self.batch_n and out.shape[0] % self.batch_n == 0:
                # a module run on windows of each image ([batch × windows, tokens, features], image-major, as
                # Swin's window attention): each image's windows side by side, [batch, windows × tokens, features]
                out = out.reshape(self.batch_n, -1, out.shape[-1])
            if out.shape[0] != self.batch_n:
                raise ValueError(f"module {name} gives outputs of shape {list(out.shape)}, whose first dimension "
                                 f"is not the batch ({self.batch_n}): its activations cannot be kept per sample")
            pool = self.request.activation_pool
            # a linear layer's features are last (ConvNeXt's pointwise convolutions read and write [B, H, W, C])
            features_last = isinstance(module, torch.nn.Linear)
            if features_last:
                out = out.movedim(-1, 1)
            if pool and out.dim() == 4 and out.shape[2] * out.shape[3] > pool * pool:
                out = torch.nn.functional.adaptive_avg_pool2d(out[: self.batch_keep],
                                                              (min(out.shape[2], pool), min(out.shape[3], pool)))
            if features_last:
                out = out.movedim(1, -1)
            # a copy, always: the model may go on to change its output in place (ResNet adds the shortcut
            # into its last BatchNorm's output with +=), and a kept view would then hold the sum
            self.activations[name].append(out[: self.batch_keep].detach().to("cpu", torch.float32, copy=True))

        return hook

    def run_batch(self, model: torch.nn.Module, pixels: torch.Tensor, labels: torch.Tensor | None,
                  first_index: int, seed: int) -> None:
        n = self.batch_n = pixels.shape[0]
        self.batch_keep = max(0, min(n, self.keep - len(self.positions)))
        if self.grams or self.batch_keep:
            self.called.clear()
            self.hooks_on = True
            try:
                with torch.inference_mode():
                    model(pixel_values=pixels)
            except RuntimeError as exc:
                if "shape" not in str(exc) and "size" not in str(exc):
                    raise
                raise StatisticsError(
                    f"the images, as the source's image processor prepares them ({list(pixels.shape[1:])}), do not "
                    f"fit the model ({str(exc).splitlines()[0]}): check the preprocessor_config.json beside its "
                    "weights"
                ) from None
            finally:
                self.hooks_on = False
            self.positions.extend(range(first_index, first_index + self.batch_keep))
        if self.fisher:
            self._fisher_batch(model, pixels, labels, first_index, seed)
        self.samples += n

    def _fisher_batch(self, model: torch.nn.Module, pixels: torch.Tensor, labels: torch.Tensor | None,
                      first_index: int, seed: int) -> None:
        """Add Σₙ (∂ log p(yₙ|xₙ)/∂θ)² over the batch, one sample at a time (Matena & Raffel, Eq. 4)."""
        empirical = self.request.fisher_labels == "empirical"
        if empirical and labels is None:
            raise StatisticsError(
                "the empirical Fisher needs labeled data, but the batches have no 'labels': "
                "give data with a label column, or draw labels from the model (empirical=false)"
            )
        names = list(self.fisher)
        wanted = [self.parameters[name] for name in names]
        flags = {name: p.requires_grad for name, p in self.parameters.items()}
        try:
            for name, parameter in self.parameters.items():
                parameter.requires_grad_(name in self.fisher)
            for i in range(pixels.shape[0]):
                with torch.enable_grad():
                    logits = _logits(model(pixel_values=pixels[i : i + 1]))
                    if logits.dim() != 2:
                        raise StatisticsError(
                            f"the Fisher needs an image classifier (logits [batch, classes]); "
                            f"{type(model).__name__} gives logits of shape {list(logits.shape)}: "
                            "per-pixel Fisher of segmentation models is not supported"
                        )
                    log_probs = torch.log_softmax(logits[0].float(), dim=-1)
                    if empirical:
                        y = int(labels[i])
                    else:
                        generator = torch.Generator().manual_seed(label_seed(seed, first_index + i))
                        y = int(torch.multinomial(log_probs.detach().double().exp().cpu(), 1, generator=generator))
                    grads = torch.autograd.grad(log_probs[y], wanted, allow_unused=True)
                for name, grad in zip(names, grads):
                    if grad is not None:
                        self.fisher[name].add_(grad.detach().to(torch.float64).square())
        finally:
            for name, parameter in self.parameters.items():
                parameter.requires_grad_(flags[name])

    def reduce(self, accelerator: accelerate.Accelerator, packed: bool = False) -> dict[str, torch.Tensor]:
        """Sum every count and sum across processes; activations gathered and put back in data order.

        Each Gram is handed over as it is completed (no second copy of every Gram): packed
        (``gram_upper/``, :func:`pack_upper`) or made whole in place (``gram/``).
        """
        sums: dict[str, torch.Tensor] = {"samples": torch.tensor(self.samples, dtype=torch.int64)}
        for name in list(self.grams):
            upper = self.grams.pop(name)
            if packed:
                sums[GRAM_UPPER + name] = pack_upper(upper)
            else:
                sums[f"gram/{name}"] = symmetrize_upper_(upper)
            del upper
            sums[f"rows/{name}"] = torch.tensor(self.rows[name], dtype=torch.int64)
        for name, fisher in self.fisher.items():
            sums[f"fisher/{name}"] = fisher
        distributed = accelerator.num_processes > 1
        result: dict[str, torch.Tensor] = {}
        for key in sorted(sums):  # one order on every process: collectives pair up
            tensor = sums[key].to(accelerator.device)
            if distributed:
                tensor = accelerator.reduce(tensor, reduction="sum")
            result[key] = tensor.cpu()
        if self.activations:
            result.update(self._gathered_activations(distributed))
        return result

    def _gathered_activations(self, distributed: bool) -> dict[str, torch.Tensor]:
        local = {name: torch.cat(chunks) if chunks else None for name, chunks in self.activations.items()}
        pieces = [(self.positions, local)]
        if distributed:
            from accelerate.utils import gather_object

            pieces = gather_object(pieces)
        out: dict[str, torch.Tensor] = {}
        for name in self.activations:
            rows = [(position, tensors[name][j]) for positions, tensors in pieces if tensors[name] is not None
                    for j, position in enumerate(positions)]
            rows.sort(key=lambda row: row[0])
            rows = rows[: self.keep]
            if rows:
                out[f"activation/{name}"] = torch.stack([row for _, row in rows])
        return out


class StatisticsCache:
    """Statistics as safetensors files, keyed by (model commit or folder fingerprint, data fingerprint, request).

    Files live in ``$HF_HOME/hfmerge/statistics`` (HF_HOME as huggingface_hub
    resolves it), named by a digest of the key, written to a temporary file
    and renamed, so a reader never sees half a file. Under several processes
    only the main process should :meth:`save`.
    """

    def __init__(self, folder: Path | None = None) -> None:
        if folder is None:
            from huggingface_hub import constants

            folder = Path(constants.HF_HOME) / "hfmerge" / "statistics"
        self.folder = Path(folder)

    def path(self, model_key: str, data_key: str, request: StatisticsRequest, *, seed: int | None = None) -> Path:
        """The file for these statistics. ``seed`` counts only when the request draws labels (model Fisher)."""
        key = [STATISTICS_FORMAT, model_key, data_key, request.cache_key()]
        if request.samples_labels:
            key.append(str(seed if seed is not None else 0))
        digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()
        return self.folder / f"{digest}.safetensors"

    def load(self, path: Path) -> StatisticsTable | None:
        """The stored statistics (read, not memory-mapped), or None when there are none (or they are unreadable)."""
        path = Path(path)
        if not path.is_file():
            return None
        try:
            return StatisticsTable(SafetensorsFile(path, label=f"statistics cache {path.name}"))
        except (SourceError, ValueError) as exc:
            logger.warning("ignoring the unreadable statistics cache file %s (%s)", path, exc)
            return None

    def check_room(self, size: int, what: str = "the statistics") -> None:
        """Refuse ``size`` bytes of statistics that the cache's disk cannot hold.

        Raises:
            DiskSpaceError: the cache's file system has less than ``size`` bytes free.
        """
        check_free_space([SpaceNeed(self.folder, size, what)], CACHE_ROOM_FIX)

    def save(self, path: Path, tensors: dict[str, torch.Tensor]) -> None:
        """Write ``tensors`` to ``path`` atomically: a temporary file in the same folder, then renamed.

        Full ``gram/`` matrices are stored packed (:func:`pack_grams_`, on a copy of the dict: pack the
        statistics first to spare the memory of both forms). The temporary file is named by its process
        (:func:`~hfmerge.io.disk.owner_tag`), so that a run killed while it writes leaves a file the next
        run removes.

        Raises:
            DiskSpaceError: the disk cannot hold the statistics, or filled while they were written (the
                temporary file is removed).
        """
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        packed = pack_grams_(dict(tensors))
        self.check_room(sum(t.nbytes for t in packed.values()))
        temporary = path.with_name(f".{path.name}.{owner_tag()}.tmp")
        try:
            with full_disk_is_an_error(path.parent, "the statistics cache", CACHE_ROOM_FIX):
                save_file({k: v.detach().cpu().contiguous() for k, v in packed.items()}, str(temporary),
                          metadata={"format": STATISTICS_FORMAT})
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)


def stored_bytes(request: StatisticsRequest, model: torch.nn.Module) -> int:
    """The bytes the cache will store for ``request`` on ``model``, known before the pass.

    The Gram matrices as their packed upper triangles (in·(in + 1)/2 entries: :func:`pack_grams_`) and the
    Fisher diagonals (each parameter's shape), in float64; the activations are left out, as their size is
    known only from the outputs (a few megabytes: ``t`` samples, pooled), and :meth:`StatisticsCache.save`
    checks the exact size again.
    """
    modules = dict(model.named_modules())
    parameters = dict(model.named_parameters())
    widths = [getattr(modules.get(name), "in_features", 0) for name in set(request.grams)]
    grams = sum(n * (n + 1) // 2 for n in widths)
    fisher = sum(parameters[name].numel() for name in set(request.fisher) if name in parameters)
    return (grams + fisher) * torch.empty((), dtype=torch.float64).element_size()

