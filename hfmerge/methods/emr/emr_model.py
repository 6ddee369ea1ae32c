"""An EMR merge: one repository that serves each of N tasks with its own weights, rebuilt on demand.

Huang et al., "EMR-Merging: Tuning-Free High-Performance Model Merging" (NeurIPS 2024, §3):
the N task vectors τ_i = θ_i − θ_base are replaced by one unified task vector
τ_uni and, per task, a binary mask M_i and a scalar rescaler λ_i; task i's model is

    θ_i ≈ θ_base + λ_i · (M_i ⊙ τ_uni)                          (§3.3)

The repository stores, under these names (safetensors):

- ``base.<key>``: θ_base for every tensor that has a task vector (``<key>`` is the
  sources' checkpoint key);
- ``unified.<key>``: τ_uni for that tensor;
- ``masks.<key>``: the N masks of that tensor, bit-packed: a ``uint8`` tensor of shape
  (N, ⌈numel/8⌉), row i the flattened M_i, eight entries per byte, most significant bit
  first (``numpy.packbits``' order), the last byte padded with zeros;
- ``rescalers``: (λ_1..λ_N);
- ``tasks.<i>.<key>``: what each task keeps of its own source (its classifier head,
  normalisation statistics, integer buffers);
- ``gate.<key>``, where the merge has a gate: an image classifier with one output per
  task, trained to tell which source's data an image comes from (the gating merge's
  gate, Ye et al. 2023, §3.2), so that images with no task id are served too.

The config (:class:`EmrMergedConfig`) holds the sources' own config, the task names,
each task's labels and the shapes of the stored tensors. :func:`task_state_dict`
rebuilds task i's checkpoint from any getter of the stored tensors, and
:func:`build_task_model` turns it into an ordinary model of the sources' class.

This file is SELF-CONTAINED (torch, transformers and the standard library only):
hfmerge copies it into the merged repo as ``modeling_hfmerge_emr.py``, so that
``AutoModel.from_pretrained(repo, trust_remote_code=True)`` loads
:class:`EmrMergedModel`, whose ``forward`` takes ``task=`` (an index or a task name), or,
where the merge has a gate, no task: the gate then picks each image's task.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput

MODEL_TYPE = "hfmerge-emr"
MODELING_FILE = "modeling_hfmerge_emr.py"
RESCALERS = "rescalers"

_BIT_SHIFTS = (7, 6, 5, 4, 3, 2, 1, 0)  # most significant bit first, as numpy.packbits


class EmrMergedConfig(PretrainedConfig):
    """Configuration of :class:`EmrMergedModel`.

    Args:
        source: the sources' config (``to_dict()`` of the first source, without its labels); its
            ``architectures[0]`` is the class each task's model is built as.
        tasks: a name per task, in source order: the source's repo id as it was given (a local folder: its name).
        task_labels: per task, its source's ``id2label``.
        unified: checkpoint key -> shape of every tensor with a task vector (stored as base, unified and masks).
        task_tensors: per task, checkpoint key -> shape of the tensors it keeps of its own source.
        integer_tensors: the keys among ``task_tensors`` that are integer buffers (``num_batches_tracked``).
        rescaling: how the rescalers were computed (for the record: ``tensor_means`` or ``entries``).
        gate: where the merge has a gate, the gate's config (``to_dict()`` of an image classifier with one
            output per task); ``None``: no gate, ``task=`` is required.
        gate_labels: with a gate, a name per task: the prefix its labels carry where the union of the labels
            (``id2label``) tells clashing ones apart.
        source_labels: with a gate, per task, the union label id (in ``id2label``) of each of its outputs.
        source_image_mean, source_image_std: the normalisation of the pixel values the tasks' models read
            (their image processor's), undone to make the gate's input.
        gate_image_mean, gate_image_std, gate_image_size: the gate's input normalisation and size.
        kwargs: the rest of ``PretrainedConfig``; ``id2label`` is the union of every task's labels.
    """

    model_type = MODEL_TYPE

    def __init__(
        self,
        source: dict[str, Any] | None = None,
        tasks: Sequence[str] | None = None,
        task_labels: Sequence[dict[str, str]] | None = None,
        unified: dict[str, Sequence[int]] | None = None,
        task_tensors: Sequence[dict[str, Sequence[int]]] | None = None,
        integer_tensors: Sequence[str] | None = None,
        rescaling: str = "tensor_means",
        gate: dict[str, Any] | None = None,
        gate_labels: Sequence[str] | None = None,
        source_labels: Sequence[Sequence[int]] | None = None,
        source_image_mean: Sequence[float] = (0.5, 0.5, 0.5),
        source_image_std: Sequence[float] = (0.5, 0.5, 0.5),
        gate_image_mean: Sequence[float] = (0.5, 0.5, 0.5),
        gate_image_std: Sequence[float] = (0.5, 0.5, 0.5),
        gate_image_size: int | Sequence[int] = 224,
        **kwargs: Any,
    ) -> None:
        self.source = dict(source or {})
        self.tasks = [str(t) for t in tasks or []]
        self.task_labels = [{str(k): str(v) for k, v in labels.items()} for labels in task_labels or []]
        self.unified = {key: [int(d) for d in shape] for key, shape in (unified or {}).items()}
        self.task_tensors = [{key: [int(d) for d in shape] for key, shape in tensors.items()}
                             for tensors in task_tensors or []]
        self.integer_tensors = list(integer_tensors or [])
        self.rescaling = rescaling
        self.gate = dict(gate) if gate is not None else None
        self.gate_labels = [str(name) for name in gate_labels] if gate_labels is not None else None
        self.source_labels = [[int(i) for i in ids] for ids in source_labels] if source_labels is not None else None
        self.source_image_mean = [float(v) for v in source_image_mean]
        self.source_image_std = [float(v) for v in source_image_std]
        self.gate_image_mean = [float(v) for v in gate_image_mean]
        self.gate_image_std = [float(v) for v in gate_image_std]
        self.gate_image_size = gate_image_size if isinstance(gate_image_size, int) else [int(v) for v in gate_image_size]
        checked = [("task_labels", self.task_labels), ("task_tensors", self.task_tensors)]
        if self.gate is not None:
            checked += [("gate_labels", self.gate_labels or []), ("source_labels", self.source_labels or [])]
        for name, values in checked:
            if len(values) != len(self.tasks):
                raise ValueError(f"{name} has {len(values)} entries for {len(self.tasks)} tasks")
        super().__init__(**kwargs)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def has_gate(self) -> bool:
        """Whether the merge has a gate, and so serves images with no task id."""
        return self.gate is not None

    def task_index(self, task: int | str | None) -> int:
        """The index of ``task``: an index, or a task's name (the source's repo id as it was given).

        Raises:
            ValueError: no task given, or one that is not a task of this merge (the message lists them).
        """
        names = ", ".join(f"{i}: {name!r}" for i, name in enumerate(self.tasks))
        if task is None:
            raise ValueError(f"this EMR merge holds one model per task and has no gate to choose one: say which "
                             f"with task= ({names})")
        if isinstance(task, bool) or not isinstance(task, (int, str)):
            raise ValueError(f"task= must be a task's index or name, not {type(task).__name__} ({names})")
        if isinstance(task, int):
            if 0 <= task < self.num_tasks:
                return task
            raise ValueError(f"task={task} is out of range: this EMR merge has {self.num_tasks} tasks ({names})")
        if task in self.tasks:
            return self.tasks.index(task)
        raise ValueError(f"task={task!r} is not a task of this EMR merge; its tasks are {names}")

    def task_config(self, task: int) -> PretrainedConfig:
        """The config of task ``task``'s model: the sources' config with that task's labels."""
        values = dict(self.source)
        model_type = values.pop("model_type")
        labels = {int(k): v for k, v in self.task_labels[task].items()}
        values.update(id2label=labels, label2id={v: k for k, v in labels.items()})
        return AutoConfig.for_model(model_type, **values)


@dataclass
class EmrRoutedOutput(ImageClassifierOutput):
    """What an EMR merge with a gate returns for images given with no task id.

    ``logits`` (batch, union labels): image b's chosen task's logits at that task's labels
    (``config.source_labels[task]``) and −inf at every other label, so their argmax, read
    with ``config.id2label``, is the label the chosen task's model predicts (under its
    union name: ``<gate label>/<label>`` where tasks share a label name); ``gate_probs``
    (batch, N) the gate's softmax and ``task`` (batch) its argmax, the task each image went to.
    """

    gate_probs: torch.FloatTensor | None = None
    task: torch.LongTensor | None = None


def gate_logits(gate: nn.Module, config: EmrMergedConfig, pixel_values: Tensor) -> Tensor:
    """The gate's logits (batch, N) for the pixel values the tasks' models read.

    The gate's input is made from them, so one image processor (the merge's) serves both:
    undo its normalisation, resize (bilinear) to the gate's input size, normalise as the
    gate's processor does, as the gating merge feeds its gate (Ye et al. 2023, §3.2).
    """
    device = pixel_values.device

    def channels(values: Sequence[float]) -> Tensor:
        return torch.tensor(values, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    images = pixel_values.float() * channels(config.source_image_std) + channels(config.source_image_mean)
    size = config.gate_image_size
    size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if tuple(images.shape[-2:]) != size:
        images = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=False)
    images = (images - channels(config.gate_image_mean)) / channels(config.gate_image_std)
    dtype = next(gate.parameters()).dtype
    return gate(pixel_values=images.to(dtype)).logits


def unpack_mask(packed: Tensor, numel: int) -> Tensor:
    """One task's mask from its packed row (⌈numel/8⌉ bytes, most significant bit first): ``numel`` booleans."""
    shifts = torch.tensor(_BIT_SHIFTS, dtype=torch.uint8, device=packed.device)
    bits = (packed.to(torch.uint8).unsqueeze(-1) >> shifts) & 1
    return bits.reshape(-1)[:numel].bool()


def task_state_dict(get: Callable[[str], Tensor], config: EmrMergedConfig, task: int,
                    dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Task ``task``'s checkpoint (by the sources' checkpoint keys), rebuilt from the stored tensors.

    θ = θ_base + λ_task · (M_task ⊙ τ_uni), computed in float32 and cast to ``dtype``
    (default: the stored base's dtype), for every tensor with a task vector; the task's own
    tensors as they are stored.
    """
    rescaler = float(get(RESCALERS)[task])
    state: dict[str, Tensor] = {}
    for key, shape in config.unified.items():
        base = get(f"base.{key}")
        unified = get(f"unified.{key}").to(torch.float32)
        mask = unpack_mask(get(f"masks.{key}")[task], math.prod(shape)).view(*shape)
        rebuilt = base.to(torch.float32) + rescaler * torch.where(mask, unified, 0.0)
        state[key] = rebuilt.to(dtype or base.dtype)
    for key in config.task_tensors[task]:
        state[key] = get(f"tasks.{task}.{key}")
    return state


def build_task_model(model_class: type[PreTrainedModel], config: PretrainedConfig, state: dict[str, Tensor],
                     **kwargs: Any) -> PreTrainedModel:
    """An ordinary ``model_class`` with ``state`` (checkpoint keys), loaded as ``from_pretrained`` loads a checkpoint.

    ``from_pretrained`` renames checkpoint keys to the class's own parameter names, as it
    does for a checkpoint on disk, under any transformers version.
    """
    return model_class.from_pretrained(None, config=config, state_dict=state, **kwargs).eval()


def _tensor_tree(shapes: dict[str, Sequence[int]], dtypes: Callable[[str], torch.dtype]) -> nn.Module:
    """Modules nested along the dotted keys, holding a tensor of each shape: floating ones as (frozen) parameters,
    integer ones as buffers, so that ``from_pretrained`` loads ``<tree name>.<key>`` into each."""
    root = nn.Module()
    for key, shape in shapes.items():
        module = root
        *path, leaf = key.split(".")
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        value = torch.zeros(tuple(shape), dtype=dtypes(key))
        if value.is_floating_point():
            module.register_parameter(leaf, nn.Parameter(value, requires_grad=False))
        else:
            module.register_buffer(leaf, value)
    return root


def _lookup(tree: nn.Module, key: str) -> Tensor:
    module = tree
    *path, leaf = key.split(".")
    for part in path:
        module = getattr(module, part)
    return getattr(module, leaf)


class EmrMergedModel(PreTrainedModel):
    """The N tasks of an EMR merge in one model: ``forward(pixel_values, task=...)`` runs that task's model.

    The stored tensors are its parameters (names as in the repository); a task's model
    (:meth:`task_model`, an ordinary transformers model of the sources' class with its
    own head and labels) is rebuilt from them when first asked for and kept while
    ``kept_task_models`` (default 1) allow, the least recently used let go first: memory
    holds the merge and one task's model. Where the merge has a gate, ``forward`` without
    ``task`` sends each image to the task the gate picks (:class:`EmrRoutedOutput`); a batch
    that mixes tasks runs each of their models once, so a stream of mixed batches rebuilds
    models unless ``kept_task_models`` is raised to the number of tasks.
    """

    config_class = EmrMergedConfig
    main_input_name = "pixel_values"

    def __init__(self, config: EmrMergedConfig) -> None:
        super().__init__(config)
        floating = getattr(torch, str(getattr(config, "dtype", None) or "float32").removeprefix("torch."))
        if not (isinstance(floating, torch.dtype) and floating.is_floating_point):
            floating = torch.float32
        n = config.num_tasks
        self.base = _tensor_tree(config.unified, lambda key: floating)
        self.unified = _tensor_tree(config.unified, lambda key: floating)
        self.masks = _tensor_tree({key: (n, (math.prod(shape) + 7) // 8) for key, shape in config.unified.items()},
                                  lambda key: torch.uint8)
        integers = set(config.integer_tensors)
        self.tasks = nn.ModuleList(
            _tensor_tree(tensors, lambda key: torch.int64 if key in integers else floating)
            for tensors in config.task_tensors
        )
        self.rescalers = nn.Parameter(torch.ones(n, dtype=torch.float32), requires_grad=False)
        self.gate = None
        if config.gate is not None:
            values = dict(config.gate)
            gate_config = AutoConfig.for_model(values.pop("model_type"), **values)
            self.gate = getattr(transformers, gate_config.architectures[0])(gate_config)
        self.kept_task_models = 1
        self._built: list[tuple[int, PreTrainedModel]] = []  # a list, so the tasks' models are no submodules
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Nothing: every stored tensor comes from the repository."""

    def stored(self, name: str) -> Tensor:
        """A stored tensor by its name in the repository (``base.<key>``, ``masks.<key>``, ``rescalers``...)."""
        if name == RESCALERS:
            return self.rescalers
        tree, key = name.split(".", 1)
        if tree == "tasks":
            index, key = key.split(".", 1)
            return _lookup(self.tasks[int(index)], key)
        return _lookup(getattr(self, tree), key)

    def task_model(self, task: int | str | None) -> PreTrainedModel:
        """Task ``task``'s model (index or name): an ordinary model of the sources' class, θ_base + λ·(M ⊙ τ_uni).

        Raises:
            ValueError: ``task`` missing or not a task of this merge.
        """
        index = self.config.task_index(task)
        built = dict(self._built)
        model = built.get(index)
        if model is None:
            architecture = self.config.source["architectures"][0]
            model_class = getattr(transformers, architecture, None)
            if model_class is None:
                raise ValueError(f"the sources' class {architecture} is not part of transformers; load this merge "
                                 "with hfmerge.load(repo, task=...)")
            del built
            while self._built and len(self._built) >= max(1, self.kept_task_models):
                self._built.pop(0)  # let go before building: memory never holds one model more than kept
            state = task_state_dict(lambda name: self.stored(name).detach(), self.config, index,
                                    dtype=self.base_dtype())
            model = build_task_model(model_class, self.config.task_config(index), state).to(self.rescalers.device)
        else:
            self._built.remove((index, model))
        self._built.append((index, model))
        model.train(self.training)
        return model

    def base_dtype(self) -> torch.dtype:
        """The dtype the stored base tensors have here (that of the rebuilt weights)."""
        for parameter in self.base.parameters():
            return parameter.dtype
        return torch.float32

    def gate_logits(self, pixel_values: Tensor) -> Tensor:
        """The gate's logits (batch, N) for the merge's ``pixel_values`` (:func:`gate_logits`).

        Raises:
            ValueError: the merge has no gate.
        """
        if self.gate is None:
            raise ValueError("this EMR merge has no gate: give task= to say which task's model runs")
        return gate_logits(self.gate, self.config, pixel_values)

    def forward(self, pixel_values: Tensor | None = None, task: int | str | None = None, **kwargs: Any) -> Any:
        """Run task ``task``'s model (index or name) on ``pixel_values``; its output, with its own head's logits.

        Without ``task``, a merge with a gate sends each image to the task of the gate's
        argmax and returns an :class:`EmrRoutedOutput` (logits over the union of the labels);
        ``kwargs`` then go unused (options that ``pipeline`` passes to image classifiers).

        Raises:
            ValueError: ``task`` missing (and no gate) or not a task of this merge.
        """
        if task is None and self.gate is not None:
            return self.route(pixel_values)
        return self.task_model(task)(pixel_values=pixel_values, **kwargs)

    def route(self, pixel_values: Tensor) -> EmrRoutedOutput:
        """Each image through the model of the task the gate picks for it (per image; a batch may mix tasks).

        Image b's logits are its task's at that task's union label ids and −inf elsewhere,
        as the gated merge returns them (its classifier of argmax p, Ye et al. 2023, Eq. 3).
        """
        if pixel_values is None or pixel_values.shape[0] == 0:
            raise ValueError("pixel_values holds no image")
        probs = self.gate_logits(pixel_values).float().softmax(dim=-1)
        chosen = probs.argmax(dim=-1)
        built = {index for index, _ in self._built}
        logits: Tensor | None = None
        for task in sorted(chosen.unique().tolist(), key=lambda t: t not in built):  # models already built first
            index = (chosen == task).nonzero().squeeze(1)
            own = self.task_model(task)(pixel_values=pixel_values[index]).logits
            if logits is None:
                logits = own.new_full((pixel_values.shape[0], len(self.config.id2label)), -math.inf)
            columns = torch.tensor(self.config.source_labels[task], dtype=torch.long, device=own.device)
            logits[index.unsqueeze(1).to(own.device), columns.unsqueeze(0)] = own
        return EmrRoutedOutput(logits=logits, gate_probs=probs, task=chosen)
