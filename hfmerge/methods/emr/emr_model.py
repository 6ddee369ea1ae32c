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
  normalisation statistics, integer buffers).

The config (:class:`EmrMergedConfig`) holds the sources' own config, the task names,
each task's labels and the shapes of the stored tensors. :func:`task_state_dict`
rebuilds task i's checkpoint from any getter of the stored tensors, and
:func:`build_task_model` turns it into an ordinary model of the sources' class.

This file is SELF-CONTAINED (torch, transformers and the standard library only):
hfmerge copies it into the merged repo as ``modeling_hfmerge_emr.py``, so that
``AutoModel.from_pretrained(repo, trust_remote_code=True)`` loads
:class:`EmrMergedModel`, whose ``forward`` takes ``task=`` (an index or a task name).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import transformers
from torch import Tensor, nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

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
        kwargs: the rest of ``PretrainedConfig``.
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
        for name, values in (("task_labels", self.task_labels), ("task_tensors", self.task_tensors)):
            if len(values) != len(self.tasks):
                raise ValueError(f"{name} has {len(values)} entries for {len(self.tasks)} tasks")
        super().__init__(**kwargs)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def task_index(self, task: int | str | None) -> int:
        """The index of ``task``: an index, or a task's name (the source's repo id as it was given).

        Raises:
            ValueError: no task given, or one that is not a task of this merge (the message lists them).
        """
        names = ", ".join(f"{i}: {name!r}" for i, name in enumerate(self.tasks))
        if task is None:
            raise ValueError(f"this EMR merge holds one model per task: say which with task= ({names})")
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
    own head and labels) is rebuilt from them when first asked for and kept until
    another task is asked for, so memory holds the merge and one task's model.
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
        self._current: list[tuple[int, PreTrainedModel]] = []  # a list, so the task's model is no submodule
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
        if not self._current or self._current[0][0] != index:
            self._current.clear()
            architecture = self.config.source["architectures"][0]
            model_class = getattr(transformers, architecture, None)
            if model_class is None:
                raise ValueError(f"the sources' class {architecture} is not part of transformers; load this merge "
                                 "with hfmerge.load(repo, task=...)")
            state = task_state_dict(lambda name: self.stored(name).detach(), self.config, index,
                                    dtype=self.base_dtype())
            model = build_task_model(model_class, self.config.task_config(index), state)
            self._current.append((index, model.to(self.rescalers.device)))
        model = self._current[0][1]
        model.train(self.training)
        return model

    def base_dtype(self) -> torch.dtype:
        """The dtype the stored base tensors have here (that of the rebuilt weights)."""
        for parameter in self.base.parameters():
            return parameter.dtype
        return torch.float32

    def forward(self, pixel_values: Tensor | None = None, task: int | str | None = None, **kwargs: Any) -> Any:
        """Run task ``task``'s model (index or name) on ``pixel_values``; its output, with its own head's logits.

        Raises:
            ValueError: ``task`` missing or not a task of this merge.
        """
        return self.task_model(task)(pixel_values=pixel_values, **kwargs)
