"""The benchmark suite's twelve tasks (``benchmarks/suite/tasks.py``): shapes, labels, determinism, shifts, splits."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from benchmarks.suite import tasks

COUNTS = (3, 2, 2)


@pytest.fixture(scope="module")
def built() -> dict:
    return {task: tasks.build_task(task, COUNTS) for task in tasks.TASKS}


def _digests(split) -> list[str]:
    return [hashlib.sha256(np.asarray(image).tobytes()).hexdigest() for image in split["image"]]


def test_twelve_tasks_with_five_to_ten_labels_unique_across_tasks():
    assert len(tasks.TASKS) == 12 and len(set(tasks.TASKS)) == 12
    names = [name for task in tasks.TASKS for name in tasks.label_names(task)]
    assert len(names) == len(set(names))
    for task in tasks.TASKS:
        assert 5 <= len(tasks.label_names(task)) <= 10
        assert task.replace("-", "").isalnum() and task == task.lower()
        assert tasks.describe(task).startswith(task) and "\n" not in tasks.describe(task)


@pytest.mark.parametrize("task", tasks.TASKS)
def test_every_task_has_three_splits_of_the_asked_size_and_image_size(built, task):
    data = built[task]
    assert list(data) == ["train", "validation", "test"]
    labels = tasks.label_names(task)
    for split, count in zip(data, COUNTS):
        assert data[split].features["label"].names == labels
        assert len(data[split]) == count * len(labels)
        assert np.bincount(data[split]["label"], minlength=len(labels)).tolist() == [count] * len(labels)
        image = data[split][0]["image"]
        assert image.mode == "RGB" and image.size == (tasks.IMAGE_SIZE, tasks.IMAGE_SIZE)


@pytest.mark.parametrize("task", tasks.TASKS)
def test_splits_share_no_image(built, task):
    seen = [set(_digests(built[task][split])) for split in ("train", "validation", "test")]
    assert sum(len(s) for s in seen) == len(set().union(*seen))


def test_a_build_is_deterministic_to_the_byte(built):
    for task in ("digits", "scenes", "letters"):
        again = tasks.build_task(task, COUNTS)
        for split in again:
            assert again[split].data.table.equals(built[task][split].data.table)
            assert again[split]["label"] == built[task][split]["label"]


def test_rendered_images_do_not_depend_on_the_other_counts():
    small, large = tasks.build_task("shapes", (1, 1, 2)), tasks.build_task("shapes", (2, 3, 2))
    assert _digests(small["test"]) == _digests(large["test"])


def test_real_sets_are_capped_by_what_exists_train_last():
    spec = tasks._task("digits")
    kept = {split: len(tasks._class_images(spec, split, 0, (500, 7, 11))) for split in (0, 1, 2)}
    zeros = len(spec.pool(0))  # 178 zeros in scikit-learn's digits
    assert (kept[2], kept[1], kept[0]) == (11, 7, zeros - 18)


@pytest.mark.parametrize("shift", tasks.SHIFTS)
def test_each_shift_changes_the_pixels_not_the_rows(built, shift):
    for task in ("digits", "textures", "colours"):
        shifted = tasks.build_task(task, COUNTS, shift=shift)
        for split in shifted:
            assert shifted[split]["label"] == built[task][split]["label"]
            for before, after in zip(built[task][split]["image"], shifted[split]["image"]):
                assert after.size == before.size and after.mode == "RGB"
                assert not np.array_equal(np.asarray(before), np.asarray(after))


def test_unknown_names_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="choose one of digits"):
        tasks.build_task("mnist", COUNTS)
    with pytest.raises(ValueError, match="colour"):
        tasks.build_task("digits", COUNTS, shift="rotate")
    with pytest.raises(ValueError, match="three positive ints"):
        tasks.build_task("digits", (1, 0, 1))


def test_the_animal_files_are_read_as_arrays_only(tmp_path):
    import gzip
    import os
    import pickle

    path = tmp_path / "evil.gz"
    with gzip.open(path, "wb") as handle:
        pickle.dump(os.getcwd, handle)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        tasks._load_arrays(path)
    images, labels = tasks._animal_pool()
    assert images.shape[1:] == (28, 28) and images.dtype == np.uint8 and len(images) == len(labels) > 9000


def test_push_task_names_and_keys_the_dataset():
    calls = []

    class FakeBench:
        def push_dataset(self, name, build, key, description):
            calls.append((name, key, description))
            return f"bench/{name}"

    assert tasks.push_task(FakeBench(), "arrows", (1, 1, 1), shift="blur") == "bench/arrows-blur"
    assert tasks.push_task(FakeBench(), "arrows", (1, 1, 1)) == "bench/arrows"
    (_, blur_key, text), (_, plain_key, _) = calls
    assert blur_key != plain_key and "blur" in text
