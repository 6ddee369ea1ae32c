"""What a training run is asked to do (:class:`TrainOptions`) and what it did (:class:`TrainReport`).

Kept apart from the loop so that recipes and methods can build and validate
options without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hfmerge.errors import RecipeError

MIXED_PRECISION_CHOICES = ("no", "fp16", "bf16")


@dataclass(frozen=True)
class TrainOptions:
    """Options of :func:`hfmerge.train.train_model`, validated when built.

    Attributes:
        epochs: the most epochs to train; early stopping may end sooner.
        learning_rate: AdamW's peak learning rate; it decays linearly to 0 over
            ``epochs`` epochs (no warm-up).
        batch_size: samples per step on each process.
        weight_decay: AdamW's decoupled weight decay.
        patience: epochs in a row without a better validation metric before
            training stops.
        validation_fraction: share of the training set held out (seeded) for
            validation when no validation set is given; 0 trains every epoch on
            all of it, with no validation and no early stopping.
        seed: seeds every random choice (initial RNG state, shuffling, the
            held-out split), so two runs with one seed give identical weights
            on CPU.
        mixed_precision: "no", "fp16" or "bf16"; None picks bf16 on a CUDA
            device that supports it and "no" elsewhere (or what ``accelerate
            launch`` was told).
        max_grad_norm: gradients are clipped to this total norm; None leaves
            them as they are.
    """

    epochs: int = 3
    learning_rate: float = 5e-5
    batch_size: int = 32
    weight_decay: float = 0.0
    patience: int = 2
    validation_fraction: float = 0.1
    seed: int = 0
    mixed_precision: str | None = None
    max_grad_norm: float | None = 1.0

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise RecipeError(f"training option {name} must be {what}, got {getattr(self, name)!r}")

        def is_int(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def is_number(value: object) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool)

        need(is_int(self.epochs) and self.epochs >= 1, "epochs", "an integer >= 1")
        need(is_number(self.learning_rate) and self.learning_rate >= 0, "learning_rate", "a number >= 0")
        need(is_int(self.batch_size) and self.batch_size >= 1, "batch_size", "an integer >= 1")
        need(is_number(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "a number >= 0")
        need(is_int(self.patience) and self.patience >= 1, "patience", "an integer >= 1")
        need(is_number(self.validation_fraction) and 0 <= self.validation_fraction < 1, "validation_fraction",
             "a number in [0, 1)")
        need(is_int(self.seed), "seed", "an integer")
        need(self.mixed_precision is None or self.mixed_precision in MIXED_PRECISION_CHOICES, "mixed_precision",
             f"one of {', '.join(MIXED_PRECISION_CHOICES)} (or unset for automatic)")
        need(self.max_grad_norm is None or (is_number(self.max_grad_norm) and self.max_grad_norm > 0),
             "max_grad_norm", "a number > 0 (or unset for no clipping)")


@dataclass
class TrainReport:
    """What :func:`hfmerge.train.train_model` did.

    Attributes:
        epochs_run: epochs trained (fewer than asked when stopped early).
        best_epoch: 1-based epoch whose weights the model holds at the end
            (the last epoch when there was no validation).
        best_metric: that epoch's validation metric; None without validation.
        metric_name: the validation metric's name ("accuracy" by default).
        stopped_early: whether early stopping ended training before ``epochs``.
        seconds: wall time of the whole run.
        history: one entry per epoch: ``epoch``, ``train_loss``, ``learning_rate``
            (at the epoch's end), ``seconds``, and with validation the metric
            under ``metric_name`` plus ``val_loss`` when the default loss is used.
        mixed_precision: what Accelerate trained with: "no", "fp16" or "bf16".
        train_samples: samples trained on (after any hold-out).
        val_samples: samples validated on (0 without validation).
    """

    epochs_run: int
    best_epoch: int
    best_metric: float | None
    metric_name: str
    stopped_early: bool
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    mixed_precision: str = "no"
    train_samples: int = 0
    val_samples: int = 0
