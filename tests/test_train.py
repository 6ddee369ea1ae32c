"""The training loop: it learns, it is seeded, it stops early and restores the best epoch, on 1 and 2 processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hfmerge.errors import RecipeError, TrainingError
from hfmerge.testing.tiny import tiny_model
from hfmerge.train import TrainOptions, train_model


class ChannelTask(torch.utils.data.Dataset):
    """Random 3×side×side images whose label is the channel that was brightened: learnable, not trivial."""

    def __init__(self, size: int, seed: int, shift: float = 0.3, side: int = 4):
        generator = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 3, (size,), generator=generator)
        self.images = torch.randn(size, 3, side, side, generator=generator)
        self.images[torch.arange(size), self.labels] += shift

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.images[index], "labels": self.labels[index]}


class Indexed(torch.utils.data.Dataset):
    """Sample i carries i as its label, so a test can see which samples went where."""

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": torch.full((3, 4, 4), float(index)), "labels": torch.tensor(index)}


class TinyNet(torch.nn.Module):
    """A linear classifier over 3×4×4 inputs that returns ``.loss`` when given labels, as transformers models do."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.linear = torch.nn.Linear(48, 3)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> SimpleNamespace:
        logits = self.linear(pixel_values.flatten(1))
        loss = None if labels is None else torch.nn.functional.cross_entropy(logits, labels)
        return SimpleNamespace(logits=logits, loss=loss)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine threads make them crawl."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def loss_and_accuracy(model: torch.nn.Module, data: ChannelTask) -> tuple[float, float]:
    """Cross-entropy and top-1 accuracy over the whole set, computed here, not by the code under test."""
    with torch.no_grad():
        logits = model(pixel_values=data.images).logits
    loss = torch.nn.functional.cross_entropy(logits, data.labels).item()
    return loss, (logits.argmax(-1) == data.labels).float().mean().item()


def test_training_a_vit_lowers_the_loss_and_raises_accuracy_in_the_callers_object():
    model = tiny_model("vit")
    before = snapshot(model)
    held_out = ChannelTask(96, seed=1, side=16)
    loss_before, accuracy_before = loss_and_accuracy(model, held_out)
    options = TrainOptions(epochs=3, learning_rate=3e-3, batch_size=16)
    report = train_model(model, ChannelTask(160, seed=0, side=16), options, val_set=held_out, progress=False)
    loss_after, accuracy_after = loss_and_accuracy(model, held_out)
    assert not same(before, snapshot(model))  # the caller's object holds the trained weights
    assert loss_after < 0.7 * loss_before
    assert accuracy_before < 0.5 and accuracy_after > 0.8
    assert report.history[-1]["train_loss"] < report.history[0]["train_loss"]
    assert report.metric_name == "accuracy"
    assert report.best_metric == pytest.approx(max(h["accuracy"] for h in report.history))
    best = report.history[report.best_epoch - 1]
    assert best["accuracy"] == pytest.approx(accuracy_after)  # the model ends with the best epoch's weights
    assert not model.training  # back in the eval mode it came in


def test_one_seed_gives_identical_weights_and_another_seed_different_ones():
    def run(seed: int) -> dict[str, torch.Tensor]:
        model = tiny_model("vit")
        options = TrainOptions(epochs=2, learning_rate=1e-3, batch_size=8, seed=seed)
        train_model(model, ChannelTask(64, seed=0, side=16), options, progress=False)
        return snapshot(model)

    first, again, other = run(0), run(0), run(1)
    assert same(first, again)
    assert not same(first, other)


def test_early_stopping_stops_after_patience_epochs_and_restores_the_best_epoch():
    from accelerate import Accelerator

    model = TinyNet()
    scores = [0.2, 0.6, 0.4, 0.5, 0.9, 0.95]  # best at epoch 2, then two epochs without improvement
    seen: list[dict[str, torch.Tensor]] = []

    def score(logits: torch.Tensor, labels: torch.Tensor) -> float:
        seen.append(snapshot(model))  # the weights this epoch's metric is about
        return scores[len(seen) - 1]

    report = train_model(model, ChannelTask(48, seed=0), TrainOptions(epochs=6, learning_rate=1e-2, batch_size=8,
                                                                      patience=2),
                         val_set=ChannelTask(8, seed=1), metric_fn=score, accelerator=Accelerator(), progress=False)
    assert report.epochs_run == 4 and report.stopped_early
    assert report.best_epoch == 2 and report.best_metric == 0.6 and report.metric_name == "score"
    assert [h["score"] for h in report.history] == scores[:4]
    assert same(snapshot(model), seen[1])
    assert not same(seen[1], seen[3])  # the restore really changed something


def test_without_validation_every_epoch_runs_and_no_metric_is_computed():
    def never(logits: torch.Tensor, labels: torch.Tensor) -> float:
        raise AssertionError("no validation was asked for")

    report = train_model(TinyNet(), ChannelTask(32, seed=0), TrainOptions(epochs=3, patience=1,
                                                                          validation_fraction=0),
                         metric_fn=never, progress=False)
    assert (report.epochs_run, report.best_epoch, report.best_metric, report.stopped_early) == (3, 3, None, False)


def test_the_held_out_split_is_seeded_disjoint_and_the_asked_fraction():
    def run(seed: int) -> tuple[set[int], set[int]]:
        trained: set[int] = set()
        validated: set[int] = set()

        def loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
            trained.update(batch["labels"].tolist())
            return model(pixel_values=batch["pixel_values"]).logits.square().mean()

        def record(logits: torch.Tensor, labels: torch.Tensor) -> float:
            validated.update(labels.tolist())
            return 0.0

        train_model(TinyNet(), Indexed(40), TrainOptions(epochs=1, batch_size=8, validation_fraction=0.25, seed=seed),
                    loss_fn=loss, metric_fn=record, progress=False)
        return trained, validated

    trained, validated = run(0)
    assert len(validated) == 10 and trained == set(range(40)) - validated
    assert run(0) == (trained, validated)
    assert run(1)[1] != validated


def test_a_custom_loss_fn_is_what_gets_minimised():
    calls = []

    def shrink(model: torch.nn.Module, batch: dict) -> torch.Tensor:
        calls.append(len(batch["labels"]))
        return sum(p.square().sum() for p in model.parameters())  # ignores the labels: pulls weights to 0

    model = TinyNet()
    norm_before = sum(p.square().sum() for p in model.parameters()).item()
    train_model(model, ChannelTask(40, seed=0), TrainOptions(epochs=2, learning_rate=0.05, batch_size=16,
                                                             validation_fraction=0, max_grad_norm=None),
                loss_fn=shrink, progress=False)
    assert calls == [16, 16, 8] * 2
    assert sum(p.square().sum() for p in model.parameters()).item() < 0.5 * norm_before


def test_progress_false_prints_no_bar(capsys):
    options = TrainOptions(epochs=1, batch_size=8, validation_fraction=0)
    train_model(TinyNet(), ChannelTask(16, seed=0), options, progress=False, desc="Tuning")
    assert "Tuning 1/1" not in capsys.readouterr().err  # the bar's text; a log line says "Tuning epoch 1/1"
    train_model(TinyNet(), ChannelTask(16, seed=0), options, progress=True, desc="Tuning")
    assert "Tuning 1/1" in capsys.readouterr().err


@pytest.mark.parametrize("field, value", [("epochs", 0), ("batch_size", 2.5), ("patience", 0),
                                          ("validation_fraction", 1.0), ("mixed_precision", "fp64"),
                                          ("learning_rate", -1.0), ("max_grad_norm", 0)])
def test_bad_options_name_the_field(field, value):
    with pytest.raises(RecipeError, match=field):
        TrainOptions(**{field: value})


def test_bad_data_is_one_clear_error():
    options = TrainOptions(epochs=1, batch_size=4)
    with pytest.raises(TrainingError, match="training set is empty"):
        train_model(TinyNet(), ChannelTask(0, seed=0), options, progress=False)
    with pytest.raises(TrainingError, match="cannot hold out"):
        train_model(TinyNet(), ChannelTask(1, seed=0), options, progress=False)

    class Unlabeled(ChannelTask):
        def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
            return {"pixel_values": self.images[index]}

    model = TinyNet().eval()
    with pytest.raises(TrainingError, match="returned no loss"):
        train_model(model, Unlabeled(8, seed=0), TrainOptions(epochs=1, validation_fraction=0), progress=False)
    assert not model.training  # a failed run leaves the caller's model in the mode it came in
    with pytest.raises(TrainingError, match="'labels'"):
        train_model(TinyNet(), ChannelTask(8, seed=0), options, val_set=Unlabeled(4, seed=0), progress=False)
    with pytest.raises(TrainingError, match="'labels'"):  # held out of unlabeled training samples
        train_model(TinyNet(), Unlabeled(8, seed=0), options, loss_fn=lambda m, b: m(**b).logits.sum(),
                    progress=False)


_TWO_PROCESSES = """
import sys, torch
from accelerate import PartialState
sys.path.insert(0, sys.argv[2])
from test_train import ChannelTask, TinyNet
from hfmerge.train import TrainOptions, top1_accuracy, train_model

sizes = []
def accuracy(logits, labels):
    sizes.append(len(labels))
    return top1_accuracy(logits, labels)

model = TinyNet()
start = [p.detach().clone() for p in model.parameters()]
report = train_model(model, ChannelTask(64, seed=0), TrainOptions(epochs=3, learning_rate=0.05, batch_size=8),
                     val_set=ChannelTask(21, seed=1), metric_fn=accuracy, progress=False)
history = [{k: v for k, v in record.items() if k != "seconds"} for record in report.history]
rank = PartialState().process_index
patched = sorted({"forward", "_original_forward"} & set(vars(model)))
torch.save({"weights": model.state_dict(), "start": start, "sizes": sizes, "precision": report.mixed_precision,
            "patched": patched, "report": [report.epochs_run, report.best_epoch, report.best_metric, history]},
           f"{sys.argv[1]}/rank{rank}.pt")
PartialState().destroy_process_group()  # a gloo group left to the interpreter's exit can abort the process
"""


def test_two_processes_in_bf16_end_with_identical_weights_and_metrics(tmp_path):
    script = tmp_path / "train_two.py"
    script.write_text(_TWO_PROCESSES)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "bf16", "--dynamo_backend", "no", str(script), str(tmp_path),
         str(Path(__file__).parent)],
        capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert same(ranks[0]["weights"], ranks[1]["weights"])
    assert ranks[0]["report"] == ranks[1]["report"]
    assert not torch.equal(ranks[0]["weights"]["linear.weight"], ranks[0]["start"][0])
    # 21 validation samples over 2 processes: the metric sees each once, the padding dropped
    assert ranks[0]["sizes"] == ranks[1]["sizes"] == [21] * ranks[0]["report"][0]
    # options left unset: the launcher's bf16, and its forward patch taken off the caller's model afterwards
    assert [r["precision"] for r in ranks] == ["bf16", "bf16"] and [r["patched"] for r in ranks] == [[], []]


class NormNet(TinyNet):
    """TinyNet behind a BatchNorm: a batch of one image cannot be normalised in training mode."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.BatchNorm1d(48)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> SimpleNamespace:
        return super().forward(self.norm(pixel_values.flatten(1)).view_as(pixel_values), labels)


def test_a_last_batch_of_one_image_sits_out_so_batch_norm_trains():
    """33 images in batches of 32 would end each epoch on one image, which BatchNorm refuses in training."""
    data = ChannelTask(33, seed=0)
    report = train_model(NormNet(), data, TrainOptions(epochs=2, batch_size=32, validation_fraction=0),
                         progress=False)
    assert report.epochs_run == 2
