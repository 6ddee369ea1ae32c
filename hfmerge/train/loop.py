"""One training loop for every method that trains after merging (fusion's fine-tuning first; later the
gating network and CLAFusion's fine-tuning and distillation).

The loop is a plain Accelerate loop: one :class:`accelerate.Accelerator`, AdamW, a learning rate that
decays linearly from ``learning_rate`` to 0 over the planned steps (no warm-up: fine-tuning a merged
model starts from good weights, as parameter-fusion.txt §III does), gradient clipping, a validation
pass each epoch with early stopping, and the best epoch's weights restored at the end from an
in-memory CPU copy (no checkpoint files). It runs unchanged on CPU, on one GPU and under
``accelerate launch`` with several processes: the validation metric is computed over the predictions
gathered from every process, the main process's value decides for all, and the restored weights are
broadcast from the main process so every process ends with identical weights.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from hfmerge.errors import RecipeError, TrainingError
from hfmerge.train.options import TrainOptions, TrainReport

if TYPE_CHECKING:
    from accelerate import Accelerator

logger = logging.getLogger(__name__)

LossFn = Callable[[torch.nn.Module, dict], torch.Tensor]
MetricFn = Callable[[torch.Tensor, torch.Tensor], float]

_POSTFIX_SECONDS = 0.5


def top1_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of samples whose highest logit (class dimension 1) is their label."""
    predictions = logits.argmax(dim=1)
    if predictions.shape != labels.shape:
        raise TrainingError(
            f"the default metric (top-1 accuracy) needs logits [batch, classes, ...] and labels of the "
            f"matching shape, got logits {tuple(logits.shape)} and labels {tuple(labels.shape)}; pass a metric_fn"
        )
    return (predictions == labels).float().mean().item()


def model_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """The default loss: what a transformers model returns as ``.loss`` when the batch has ``labels``."""
    loss = getattr(model(**batch), "loss", None)
    if loss is None:
        raise TrainingError(
            "the model returned no loss; give the training samples a 'labels' entry (transformers models then "
            "return .loss) or pass a loss_fn(model, batch)"
        )
    return loss


def train_model(model: torch.nn.Module, train_set: Dataset, options: TrainOptions, *,
                val_set: Dataset | None = None, loss_fn: LossFn | None = None, metric_fn: MetricFn | None = None,
                accelerator: Accelerator | None = None, progress: bool = True, desc: str = "Fine-tuning",
                metric_name: str | None = None) -> TrainReport:
    """Train ``model`` in place; at the end it holds the best validation epoch's weights.

    Args:
        model: trained in place; its object holds the result, back on its own device and in its own
            train/eval mode.
        train_set: map-style dataset of dicts of tensors (``pixel_values``, ``labels``, ...), batched with
            torch's default collate.
        options: see :class:`TrainOptions`.
        val_set: validation samples (with ``labels``); None holds out ``options.validation_fraction``
            of ``train_set``, seeded; with a fraction of 0 there is no validation and every epoch runs.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``; default ``model(**batch).loss``.
        metric_fn: ``metric_fn(logits, labels) -> float``, higher is better, over the whole validation
            set; default top-1 accuracy. Logits are the model output's ``.logits`` (or the output itself).
        accelerator: the caller's Accelerator (its mixed precision wins over the options'); None makes
            one. Accelerate keeps a reference to what it prepared: call ``accelerator.free_memory()``
            between trainings on a shared one.
        progress: show a tqdm bar per epoch (main process only) with the running loss and last metric.
        desc: the bars' and log lines' label.
        metric_name: the metric's name in the report and logs; default "accuracy", or metric_fn's name.

    Returns:
        A :class:`TrainReport`; ``history`` has one entry per epoch.

    Raises:
        TrainingError: no training samples, too few to hold out validation, no trainable parameters,
            no loss, or validation samples without labels.
        RecipeError: a mixed precision that this process's Accelerate state cannot take.
    """
    from accelerate.utils import set_seed

    started = time.perf_counter()
    own_accelerator = accelerator is None
    accelerator = new_accelerator(options) if accelerator is None else accelerator
    set_seed(options.seed)
    compute_loss = loss_fn if loss_fn is not None else model_loss
    metric = metric_fn if metric_fn is not None else top1_accuracy
    name = metric_name or ("accuracy" if metric_fn is None else getattr(metric_fn, "__name__", "metric"))
    train_part, val_part = _split(train_set, val_set, options)

    parameters = [p for p in model.parameters() if p.requires_grad]
    if not parameters:
        raise TrainingError("the model has no trainable parameters (every parameter has requires_grad=False)")
    home = parameters[0].device
    was_training = model.training
    own_forward = model.__dict__.get("forward")  # mixed precision patches the instance's forward
    optimizer = torch.optim.AdamW(parameters, lr=options.learning_rate, weight_decay=options.weight_decay)
    shuffle_generator = torch.Generator().manual_seed(options.seed)
    # A last batch of one image cannot be batch-normalised in training mode (BatchNorm needs two values per
    # channel), so that one image sits out each epoch: the shuffle changes which one.
    lonely = len(train_part) > 1 and len(train_part) % options.batch_size == 1
    train_loader = DataLoader(train_part, batch_size=options.batch_size, shuffle=True, generator=shuffle_generator,
                              drop_last=lonely)
    if val_part is not None:
        val_loader = DataLoader(val_part, batch_size=options.batch_size)
        prepared, optimizer, train_loader, val_loader = accelerator.prepare(
            model, optimizer, train_loader, val_loader)
    else:
        val_loader = None
        prepared, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    # Stepped once per optimizer step on each process; not prepared, since Accelerate would step it
    # once per process per step and ``total_steps`` already counts this process's batches.
    total_steps = max(1, options.epochs * len(train_loader))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer.optimizer,
                                                 lambda step: max(0.0, 1.0 - step / total_steps))

    history: list[dict[str, float]] = []
    best_metric: float | None = None
    best_epoch = 0
    best_state: dict[str, torch.Tensor] | None = None
    since_best = 0
    last_metric: dict[str, str] = {}
    show = progress and accelerator.is_local_main_process
    epoch = 0
    try:
        for epoch in range(1, options.epochs + 1):
            epoch_started = time.perf_counter()
            bar = tqdm(train_loader, desc=f"{desc} {epoch}/{options.epochs}", unit="batch", disable=not show,
                       leave=False, dynamic_ncols=True)
            train_loss = _train_epoch(prepared, bar, optimizer, schedule, accelerator, compute_loss,
                                      options.max_grad_norm, last_metric if show else None)
            record = {"epoch": float(epoch), "train_loss": train_loss, "learning_rate": schedule.get_last_lr()[0]}
            if val_loader is not None:
                value, val_loss = _validate(prepared, val_loader, accelerator, metric,
                                            use_model_loss=loss_fn is None)
                record[name] = value
                if val_loss is not None:
                    record["val_loss"] = val_loss
                if best_metric is None or value > best_metric:
                    best_metric, best_epoch, since_best = value, epoch, 0
                    best_state = _cpu_copy(accelerator.unwrap_model(prepared).state_dict())
                else:
                    since_best += 1
                last_metric = {name: f"{value:.4f}"}
            else:
                best_epoch = epoch
            record["seconds"] = time.perf_counter() - epoch_started
            history.append(record)
            bar.set_postfix(loss=f"{train_loss:.4f}", **last_metric)
            bar.close()
            logger.info("%s epoch %d/%d: %s", desc, epoch, options.epochs,
                        ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "epoch"))
            if val_loader is not None and since_best >= options.patience:
                break

        trained = accelerator.unwrap_model(prepared)
        if best_state is not None and best_epoch != epoch:
            trained.load_state_dict(best_state)
        if accelerator.num_processes > 1:
            _broadcast_from_main(trained)
        if trained is not model:  # prepare handed back another object: the caller's must hold the result
            model.load_state_dict(trained.state_dict())
    finally:  # on success or failure, the caller's model is as it came: its own forward, device and mode
        _restore_forward(model, own_forward)
        model.to(home)
        model.train(was_training)
        if own_accelerator:
            accelerator.free_memory()
    precision = str(accelerator.mixed_precision)
    stopped_early = epoch < options.epochs
    if stopped_early:
        logger.info("%s stopped early after epoch %d: no better %s for %d epochs; weights of epoch %d restored",
                    desc, epoch, name, options.patience, best_epoch)
    return TrainReport(epochs_run=epoch, best_epoch=best_epoch, best_metric=best_metric, metric_name=name,
                       stopped_early=stopped_early, seconds=time.perf_counter() - started, history=history,
                       mixed_precision=precision, train_samples=len(train_part),
                       val_samples=0 if val_part is None else len(val_part))


def _train_epoch(model: torch.nn.Module, batches: tqdm, optimizer: torch.optim.Optimizer,
                 schedule: torch.optim.lr_scheduler.LRScheduler, accelerator: Accelerator, compute_loss: LossFn,
                 max_grad_norm: float | None, postfix: dict[str, str] | None) -> float:
    """One pass over the training batches (a tqdm bar over them); the mean loss over every process's steps.

    With ``postfix`` (the last validation metric) given, the bar shows it with the running loss; the
    running loss is read at most every ``_POSTFIX_SECONDS``, since reading it waits for the device.
    """
    model.train()
    loss_sum = torch.zeros((), device=accelerator.device)
    steps = 0
    shown_at = time.monotonic()
    for batch in batches:
        loss = compute_loss(model, batch)
        accelerator.backward(loss)
        if max_grad_norm is not None:
            accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        if not accelerator.optimizer_step_was_skipped:
            schedule.step()
        optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach().float()
        steps += 1
        if postfix is not None and time.monotonic() - shown_at >= _POSTFIX_SECONDS:
            batches.set_postfix(loss=f"{loss_sum.item() / steps:.4f}", **postfix, refresh=False)
            shown_at = time.monotonic()
    return accelerator.reduce(loss_sum / max(steps, 1), reduction="mean").item()


def new_accelerator(options: TrainOptions) -> Accelerator:
    """An Accelerator with the options' mixed precision.

    Accelerate fixes mixed precision once per process, so an unset option defers to a choice already
    made (``accelerate launch --mixed_precision``, ACCELERATE_MIXED_PRECISION, an earlier Accelerator)
    and otherwise picks bf16 on a CUDA device that has it.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    chosen = options.mixed_precision
    if chosen is None and "ACCELERATE_MIXED_PRECISION" not in os.environ and not AcceleratorState._shared_state:
        chosen = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    try:
        return Accelerator(mixed_precision=chosen)
    except ValueError as exc:
        if "already been initialized" not in str(exc):
            raise
        held = AcceleratorState().mixed_precision
        raise RecipeError(
            f"mixed_precision={chosen!r} was asked, but Accelerate already runs this process with {held!r}; "
            f"ask for {held!r} (or leave mixed_precision unset), or pass that Accelerator"
        ) from None


def _split(train_set: Dataset, val_set: Dataset | None, options: TrainOptions) -> tuple[Dataset, Dataset | None]:
    """The training and validation samples: the given ones, or a seeded hold-out of the training set."""
    size = len(train_set)
    if size == 0:
        raise TrainingError("the training set is empty; give it at least one sample")
    if val_set is not None:
        if len(val_set) == 0:
            raise TrainingError("the validation set is empty; give it samples, or pass none to hold some out")
        _need_labels(val_set[0])
        return train_set, val_set
    if options.validation_fraction == 0:
        return train_set, None
    _need_labels(train_set[0])
    held = max(1, round(size * options.validation_fraction))
    if held >= size:
        raise TrainingError(
            f"cannot hold out {options.validation_fraction:g} of {size} training sample(s) for validation and "
            "keep any to train on; give more samples, a validation set, or validation_fraction=0"
        )
    order = torch.randperm(size, generator=torch.Generator().manual_seed(options.seed)).tolist()
    return Subset(train_set, order[held:]), Subset(train_set, order[:held])


def _need_labels(sample: Any) -> None:
    if not isinstance(sample, Mapping) or "labels" not in sample:
        raise TrainingError("validation samples need a 'labels' entry for the metric; label them, "
                            "or train without validation (validation_fraction=0)")


def _logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TrainingError(f"cannot find logits in the model's output ({type(output).__name__}); "
                        "return a tensor or an object with .logits")


def _validate(model: torch.nn.Module, loader: DataLoader, accelerator: Accelerator, metric: MetricFn, *,
              use_model_loss: bool) -> tuple[float, float | None]:
    """The metric over every process's gathered predictions (the main process's value, for all), and
    the mean validation loss when the model computes it."""
    from accelerate.utils import broadcast_object_list

    model.eval()
    all_logits, all_labels, losses = [], [], []
    with torch.no_grad():
        for batch in loader:
            if use_model_loss:
                output = model(**batch)
                if getattr(output, "loss", None) is not None:
                    losses.append(output.loss.detach().float())
            else:
                output = model(**{k: v for k, v in batch.items() if k != "labels"})
            logits, labels = accelerator.gather_for_metrics((_logits(output).detach(), batch["labels"]))
            all_logits.append(logits.float().cpu())
            all_labels.append(labels.cpu())
    value = float(metric(torch.cat(all_logits), torch.cat(all_labels)))
    val_loss = None
    if losses:
        val_loss = accelerator.reduce(torch.stack(losses).mean(), reduction="mean").item()
    if accelerator.num_processes > 1:
        value = broadcast_object_list([value], from_process=0)[0]
    return value, val_loss


def _restore_forward(model: torch.nn.Module, own_forward: Any) -> None:
    """Undo Accelerate's mixed-precision patch of ``model.forward`` exactly.

    ``unwrap_model(keep_fp32_wrapper=False)`` unwraps every ``__wrapped__`` level, transformers' own
    forward decorators included, so the instance attribute is put back as it was instead.
    """
    model.__dict__.pop("_original_forward", None)
    if own_forward is None:
        model.__dict__.pop("forward", None)
    else:
        model.__dict__["forward"] = own_forward


def _cpu_copy(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: tensor.detach().to("cpu", copy=True) for key, tensor in state.items()}


def _broadcast_from_main(model: torch.nn.Module) -> None:
    """Every process takes the main process's weights and buffers, so all end bitwise identical."""
    from accelerate.utils import broadcast

    with torch.no_grad():
        for tensor in model.state_dict().values():
            broadcast(tensor, from_process=0)
