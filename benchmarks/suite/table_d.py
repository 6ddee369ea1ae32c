"""Table D: parameter fusion of task models with disjoint label sets (parameter-fusion Tables I–IV).

The paper trains three classifiers on disjoint five-class subsets, averages
their feature extractors, concatenates their classifier heads into one
fifteen-way classifier, and fine-tunes that on the combined data (§III, Fig. 3).
Here the three sources are the first three task ViTs of Table A's zoo (one
pre-training, so their feature extractors share a basin); the fused model is
scored over the union of labels with no task id, as a user of one fused
classifier would use it, and each source on its own labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from benchmarks.suite import tasks as suite_tasks
from benchmarks.suite.bench import Bench
from benchmarks.suite.report import Cell, Section, Table, at_least
from benchmarks.suite.table_a import SIZES as ZOO_SIZES
from benchmarks.suite.zoo import vit_zoo


@dataclass(frozen=True)
class Sizes:
    tasks: int = 3
    finetune_epochs: int = 4
    learning_rate: float = 5e-4


SIZES = {"smoke": Sizes(finetune_epochs=1), "quick": Sizes(finetune_epochs=3), "full": Sizes(finetune_epochs=5)}


def run(bench: Bench) -> Section:
    sizes, zoo = SIZES[bench.mode], ZOO_SIZES[bench.mode]
    names = list(suite_tasks.TASKS)
    data = {task: suite_tasks.push_task(bench, task, zoo.counts) for task in names}
    labels = {task: suite_tasks.label_names(task) for task in names}
    repos = vit_zoo(bench, data, labels, zoo.vit)
    tasks = names[:sizes.tasks]
    sources = [repos[t] for t in tasks]
    test = [f"{data[t]}:test" for t in tasks]
    train = [f"{data[t]}:train" for t in tasks]
    section = Section(key="D", heading="Table D — parameter fusion of task models with disjoint labels "
                      "(parameter-fusion Tables I–IV)", intro=_intro(sizes, tasks, labels))
    one_shot = bench.merge("fusion", sources, "fusion", eval_data=test).evaluation
    tuned = [bench.merge(f"fusion-ft-{seed}", sources, "fusion", data=train, eval_data=test, seed=seed,
                         finetune_epochs=sizes.finetune_epochs, learning_rate=sizes.learning_rate).evaluation
             for seed in bench.seeds]
    table = Table("Table D: test accuracy (sources on their own labels; the others over the union, no task id)",
                  [*tasks, "mean", "labels", "parameters"])
    individual = _sources(one_shot, tasks)
    table.add("each task model, on its own labels", [*(Cell.of([individual[t]]) for t in tasks),
                                                     Cell.of([sum(individual.values()) / len(tasks)]),
                                                     len(labels[tasks[0]]), _source_parameters(one_shot)])
    ensemble = _row(one_shot, "ensemble", tasks)
    table.add("ensemble of the task models (averaged softmax)", [*_cells([ensemble], tasks),
                                                                  len(ensemble_labels(labels, tasks)), None])
    fused = _row(one_shot, "merged", tasks)
    table.add("fusion, before fine-tuning", [*_cells([fused], tasks), len(ensemble_labels(labels, tasks)),
                                             _merged_parameters(one_shot)])
    tuned_rows = [_row(report, "merged", tasks) for report in tuned]
    epochs = f"{sizes.finetune_epochs} epoch{'s' if sizes.finetune_epochs != 1 else ''}"
    table.add(f"fusion + fine-tuning ({epochs} on the union)",
              [*_cells(tuned_rows, tasks), len(ensemble_labels(labels, tasks)), _merged_parameters(tuned[0])])
    section.tables.append(table)
    mean_tuned = Cell.of([sum(r.values()) / len(tasks) for r in tuned_rows])
    mean_individual = sum(individual.values()) / len(tasks)
    section.claims.append(at_least("fusion + fine-tuning within 5 points of the individual models over the union",
                                   mean_tuned, mean_individual, ("fusion + fine-tuning", "individual"),
                                   margin=0.05))
    return section


def ensemble_labels(labels: dict[str, list[str]], tasks: list[str]) -> list[str]:
    return [label for task in tasks for label in labels[task]]


def _intro(sizes: Sizes, tasks: list[str], labels: dict[str, list[str]]) -> str:
    return (f"Sources: the fine-tuned ViTs of Table A's zoo for {', '.join(f'`{t}`' for t in tasks)} "
            f"({', '.join(str(len(labels[t])) for t in tasks)} classes; disjoint label sets). `method=fusion` "
            "averages the feature extractors and concatenates the heads into one classifier over the "
            f"{sum(len(labels[t]) for t in tasks)} labels; fine-tuning runs hfmerge's own loop on the union of "
            f"the three training splits (learning rate {sizes.learning_rate:g}, a tenth held out for early "
            "stopping), once per seed. Accuracies are hfmerge's evaluation of each merge (`eval_data` = the "
            "test splits, by dataset id).")


def _row(report: Any, role: str, tasks: list[str]) -> dict[str, float]:
    model = next(m for m in report.models if m.role == role)
    return {tasks[i]: r.metrics["accuracy"] for i, r in enumerate(model.tasks)}


def _sources(report: Any, tasks: list[str]) -> dict[str, float]:
    """Each source scored on the one task whose labels it has (hfmerge scores a source where it can)."""
    sources = [m for m in report.models if m.role == "source"]
    return {task: source.tasks[0].metrics["accuracy"] for task, source in zip(tasks, sources)}


def _cells(rows: list[dict[str, float]], tasks: list[str]) -> list[Cell]:
    return [*(Cell.of([r[t] for r in rows]) for t in tasks), Cell.of([sum(r.values()) / len(tasks) for r in rows])]


def _merged_parameters(report: Any) -> int:
    return next(m for m in report.models if m.role == "merged").parameters


def _source_parameters(report: Any) -> int:
    return next(m for m in report.models if m.role == "source").parameters

