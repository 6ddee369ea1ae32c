"""hfmerge.data: naming datasets, reading them from the (local) Hub and from folders, and feeding image processors."""

from __future__ import annotations

import logging
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from hfmerge.data import DataSpec, ProcessedImages, label_map_for, load_image_data, resolve_data_specs
from hfmerge.errors import DataError, HubUnreachableError
from hfmerge.testing.ports import free_port
from hfmerge.testing.tasks import push_digit_datasets, write_parquet_repo


@pytest.fixture(autouse=True)
def short_stream_shutdown(monkeypatch):
    """datasets 5.2 sleeps 5 s at the end of every parquet stream (for apache/arrow#45214); 0.2 s is enough here."""
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0.2)


# -- DataSpec ----------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("org/ds", ("org/ds", None, None)),
    ("org/ds@v1", ("org/ds", "v1", None)),
    ("org/ds:validation", ("org/ds", None, "validation")),
    ("org/ds@refs/pr/1:test", ("org/ds", "refs/pr/1", "test")),
    ("./images", ("./images", None, None)),
    ("/abs/images:train", ("/abs/images", None, "train")),
])
def test_data_spec_reads_every_text_form(text, expected):
    spec = DataSpec.parse(text)
    assert (spec.dataset, spec.revision, spec.split) == expected
    assert spec.is_local == expected[0].startswith((".", "/"))
    assert spec.ref == text
    assert DataSpec.parse(spec.to_dict()) == spec


def test_an_existing_folder_wins_over_a_repo_id_and_keeps_its_colon(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "ds").mkdir(parents=True)
    (tmp_path / "odd:name").mkdir()
    shadowing = DataSpec.parse("org/ds:test")
    assert (shadowing.dataset, shadowing.split, shadowing.is_local) == ("org/ds", "test", True)
    assert DataSpec.parse("org/ds@main:test").is_local is False  # a revision names the Hub repo
    whole = DataSpec.parse("odd:name")
    assert (whole.dataset, whole.split, whole.is_local) == ("odd:name", None, True)
    with caplog.at_level(logging.WARNING, logger="hfmerge.data.load"), pytest.raises(
            DataError, match="folder 'ds' is empty; give a folder of images"):
        load_image_data("org/ds:test")
    assert "the Hub dataset org/ds was not used (write org/ds@main for it)" in caplog.text


def test_data_spec_yaml_mapping_pins_a_commit():
    sha = "a" * 40
    spec = DataSpec.parse({"dataset": "org/ds", "revision": "v1", "split": "test", "commit": sha})
    assert spec == DataSpec("org/ds", "v1", "test", sha)
    assert spec.to_dict() == {"dataset": "org/ds", "revision": "v1", "split": "test", "commit": sha}
    assert DataSpec.parse({"dataset": "org/ds:test"}).split == "test"


@pytest.mark.parametrize("bad, message", [
    ("", "names no dataset"),
    ("org/ds@", "with both parts"),
    ("org/ds:a/b", "write the split after ':'"),
    ({"dataset": "org/ds", "rev": "v1"}, r"unknown field\(s\) \['rev'\]"),
    ({"split": "test"}, "has no 'dataset'"),
    ({"dataset": "./images", "revision": "v1"}, "a folder has no revision"),
])
def test_malformed_data_specs_say_how_to_write_them(bad, message):
    with pytest.raises(DataError, match=message):
        DataSpec.parse(bad)


def test_data_specs_are_given_once_per_source_or_once_for_all():
    a, b = DataSpec.parse("org/a:test"), DataSpec.parse("org/b:test")
    assert resolve_data_specs(["org/a:test"], 3) == [a, a, a]
    assert resolve_data_specs([a, "org/b:test"], 2) == [a, b]
    assert resolve_data_specs([], 2) == []
    with pytest.raises(DataError, match="3 datasets .* for 2 sources"):
        resolve_data_specs([a, b, a], 2)
    with pytest.raises(DataError, match="2 datasets .* for 3 sources"):
        resolve_data_specs([a, b], 3)


# -- from the Hub ------------------------------------------------------------------


def _digits_low_test() -> tuple[np.ndarray, np.ndarray]:
    """The demo's test split of digits 0-4, computed here as the demo does, apart from hfmerge.testing.tasks."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    _, x_test, _, y_test = train_test_split(data.images, data.target, test_size=0.3, random_state=0,
                                            stratify=data.target)
    keep = y_test < 5
    return x_test[keep], y_test[keep]


@pytest.fixture(scope="module")
def digits(hub_api):
    return push_digit_datasets(hub_api, "org", ("digits-low",))["digits-low"]


@pytest.fixture(scope="module")
def versioned(hub_api, tmp_path_factory):
    """org/data-versions: tag v1 has 12 test rows, main (a later commit) 5; returns (v1 sha, main sha)."""
    def task(rows: int) -> datasets.DatasetDict:
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
        images = [Image.new("RGB", (4, 4), (20 * i, 0, 0)) for i in range(rows)]
        table = datasets.Dataset.from_dict({"image": images, "label": [i % 2 for i in range(rows)]}, features=features)
        return datasets.DatasetDict({"train": table, "test": table})

    repo = "org/data-versions"
    hub_api.create_repo(repo, repo_type="dataset", exist_ok=True)
    shas = []
    for rows in (12, 5):
        folder = write_parquet_repo(tmp_path_factory.mktemp("versions"), "versions", task(rows))
        shas.append(hub_api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="dataset",
                                          commit_message=f"{rows} rows").oid)
        if rows == 12:
            hub_api.create_tag(repo, tag="v1", repo_type="dataset")
    return shas[0], shas[1]


def test_a_hub_split_loads_by_dataset_id_with_its_commit_images_and_labels(digits, hub_api):
    data = load_image_data(f"{digits}:test")
    x_test, y_test = _digits_low_test()
    assert data.name == "org/digits-low:test" and data.split == "test"
    assert data.commit_sha == hub_api.dataset_info(digits).sha
    assert (data.image_column, data.label_column) == ("image", "label")
    assert data.label_names == ["0", "1", "2", "3", "4"]
    assert data.labels == y_test.tolist() and len(data) == len(y_test) and data.skipped == 0
    first = np.asarray(data.images[0])
    assert first.shape == (16, 16, 3)
    expected = np.rint(x_test[0] / 16 * 255).astype(np.uint8).repeat(2, 0).repeat(2, 1)
    assert (first[..., 0] == expected).all() and (first[..., 2] == expected).all()
    assert load_image_data(digits).split == "train"  # no split named: train


def test_a_revision_and_a_pinned_commit_read_that_commit(versioned):
    v1, main = versioned
    assert v1 != main
    on_tag = load_image_data("org/data-versions@v1:test")
    assert (len(on_tag), on_tag.commit_sha, on_tag.name) == (12, v1, "org/data-versions@v1:test")
    on_main = load_image_data("org/data-versions:test")
    assert (len(on_main), on_main.commit_sha) == (5, main)
    pinned = load_image_data(DataSpec("org/data-versions", revision="main", split="test", commit=v1))
    assert (len(pinned), pinned.commit_sha) == (12, v1)
    assert on_tag.pinned == DataSpec("org/data-versions", revision="v1", split="test", commit=v1)
    assert load_image_data(on_main.pinned).fingerprint == on_main.fingerprint
    streamed = load_image_data("org/data-versions@v1:test", samples=3, streaming=True)
    assert streamed.streamed and streamed.commit_sha == v1 and len(streamed) == 3


@pytest.mark.parametrize("streaming", [True, False], ids=["streamed", "downloaded"])
def test_seeded_selection_is_reproducible_and_another_seed_selects_others(digits, streaming):
    first = load_image_data(f"{digits}:test", samples=20, seed=0, streaming=streaming)
    again = load_image_data(f"{digits}:test", samples=20, seed=0, streaming=streaming)
    other = load_image_data(f"{digits}:test", samples=20, seed=1, streaming=streaming)
    assert len(first) == 20 and first.streamed is streaming
    assert first.fingerprint == again.fingerprint and first.labels == again.labels
    assert [im.tobytes() for im in first.images] == [im.tobytes() for im in again.images]
    assert other.fingerprint != first.fingerprint
    assert [im.tobytes() for im in other.images] != [im.tobytes() for im in first.images]
    everything = {im.tobytes() for im in load_image_data(f"{digits}:test").images}
    assert {im.tobytes() for im in first.images} <= everything  # a subset of the split, not other data


def test_a_small_split_is_downloaded_rather_than_streamed_unless_asked(digits):
    auto = load_image_data(f"{digits}:test", samples=20, seed=0)
    assert not auto.streamed  # its 60 kB file is below STREAM_MIN_BYTES
    assert auto.fingerprint == load_image_data(f"{digits}:test", samples=20, seed=0, streaming=False).fingerprint


@pytest.mark.parametrize("streaming", [True, False], ids=["streamed", "downloaded"])
def test_fewer_samples_than_asked_warns_and_uses_all(versioned, caplog, streaming):
    with caplog.at_level(logging.WARNING, logger="hfmerge.data.load"):
        data = load_image_data("org/data-versions:test", samples=50, streaming=streaming)
    assert len(data) == 5
    assert "has 5 samples, fewer than the 50 asked; using all 5" in caplog.text


def test_missing_dataset_revision_and_split_are_one_line_data_errors(digits):
    with pytest.raises(DataError, match=r"org/no-such-data is not a folder here and not a dataset on the Hub"):
        load_image_data("org/no-such-data")
    with pytest.raises(DataError, match=r"revision 'v9' does not exist in dataset org/digits-low"):
        load_image_data(f"{digits}@v9")
    with pytest.raises(DataError) as caught:
        load_image_data(f"{digits}:validation")
    assert "split 'validation' does not exist in org/digits-low; its splits are: train, test" in str(caught.value)
    assert "\n" not in str(caught.value)
    with pytest.raises(DataError, match="samples must be a positive number"):
        load_image_data(digits, samples=0)


def test_a_split_without_samples_is_a_data_error(hub_api, tmp_path):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a"])})
    table = datasets.Dataset.from_dict({"image": [Image.new("RGB", (2, 2))], "label": [0]}, features=features)
    folder = write_parquet_repo(tmp_path, "empty", datasets.DatasetDict({"train": table, "test": table.select([])}))
    hub_api.create_repo("org/data-empty", repo_type="dataset", exist_ok=True)
    hub_api.upload_folder(folder_path=str(folder), repo_id="org/data-empty", repo_type="dataset")
    with pytest.raises(DataError, match="org/data-empty:test has no samples"):
        load_image_data("org/data-empty:test")
    with pytest.raises(DataError, match="org/data-empty:test has no samples"):
        load_image_data("org/data-empty:test", samples=4, streaming=True)


def test_a_dataset_without_images_names_its_columns(hub_api, tmp_path):
    table = datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]})
    table.to_parquet(tmp_path / "train-00000-of-00001.parquet")
    hub_api.create_repo("org/data-text", repo_type="dataset", exist_ok=True)
    hub_api.upload_folder(folder_path=str(tmp_path), path_in_repo="data", repo_id="org/data-text",
                          repo_type="dataset")
    with pytest.raises(DataError, match=r"org/data-text:train has no image column; its columns are: text, label"):
        load_image_data("org/data-text")


def test_an_unreachable_hub_is_hub_unreachable_error(monkeypatch):
    from huggingface_hub import constants

    endpoint = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    with pytest.raises(HubUnreachableError, match=f"cannot reach the Hub at {endpoint}"):
        load_image_data("org/far-data:test", samples=4)


def test_offline_a_cached_dataset_loads_from_the_cache_without_a_request(digits, local_hub, monkeypatch):
    from huggingface_hub import constants

    online = load_image_data(f"{digits}:test", samples=8, seed=3, streaming=False)  # downloads and caches
    before = len(local_hub.requests)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    offline = load_image_data(f"{digits}:test", samples=8, seed=3)
    assert not offline.streamed
    assert (offline.fingerprint, offline.commit_sha) == (online.fingerprint, online.commit_sha)
    assert len(local_hub.requests) == before
    with pytest.raises(DataError, match="is not in the local cache and HF_HUB_OFFLINE is set"):
        load_image_data(DataSpec(digits, split="test", commit="b" * 40))
    with pytest.raises(DataError, match="is not in the local cache and HF_HUB_OFFLINE is set"):
        load_image_data("org/never-downloaded:test")
    with pytest.raises(DataError, match="streaming needs the Hub and HF_HUB_OFFLINE is set"):
        load_image_data(f"{digits}:test", samples=8, streaming=True)


# -- from folders ------------------------------------------------------------------


def _png(path: Path, colour: tuple[int, int, int], size: int = 6) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)
    return path


def test_a_flat_folder_is_unlabeled(tmp_path):
    folder = tmp_path / "shots"
    for i in range(3):
        _png(folder / f"{i}.png", (i * 50, 0, 0))
    data = load_image_data(str(folder))
    assert (len(data), data.labels, data.label_names, data.label_column) == (3, None, None, None)
    assert data.name == "shots" and data.commit_sha is None
    assert sorted(im.getpixel((0, 0))[0] for im in data.images) == [0, 50, 100]
    with pytest.raises(DataError, match="shots has no label column; its columns are: image"):
        load_image_data(str(folder), labeled=True)
    with pytest.raises(DataError, match="shots has no labels"):
        label_map_for(data, {0: "a"})


def test_one_subfolder_per_class_is_labeled_and_a_corrupt_image_is_skipped_and_counted(tmp_path, caplog):
    folder = tmp_path / "pets"
    for i in range(2):
        _png(folder / "cat" / f"{i}.png", (255, 0, 0))
    for i in range(3):
        _png(folder / "dog" / f"{i}.png", (0, 0, 255))
    (folder / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    with caplog.at_level(logging.WARNING, logger="hfmerge.data.load"):
        data = load_image_data(str(folder), labeled=True)
    assert data.label_names == ["cat", "dog"]
    assert sorted(data.labels) == [0, 0, 1, 1, 1] and data.skipped == 1
    assert all(im.getpixel((0, 0)) == ((255, 0, 0) if y == 0 else (0, 0, 255)) for im, y in zip(data.images, data.labels))
    assert "1 of 6 images failed to decode and were skipped (dog/broken.png)" in caplog.text


def test_no_image_that_decodes_is_a_data_error(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    for i in range(2):
        (folder / f"{i}.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="folder 'broken' has no images: 0.png, 1.png are not images"):
        load_image_data(str(folder))
    with pytest.raises(DataError, match=": there is no such folder"):
        load_image_data(str(tmp_path / "missing"))


def test_save_to_disk_folders_dataset_dict_and_dataset(tmp_path):
    features = datasets.Features({"img": datasets.Image(), "fine": datasets.ClassLabel(names=["x", "y", "z"]),
                                  "coarse": datasets.Value("int64")})
    rows = {"img": [Image.new("RGB", (3, 3), (i, i, i)) for i in range(6)], "fine": [0, 1, 2, 0, 1, 2],
            "coarse": [5, 5, 5, 6, 6, 6]}
    table = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict({"train": table.select(range(4)), "test": table.select(range(4, 6))}).save_to_disk(
        tmp_path / "dd")
    test = load_image_data(f"{tmp_path / 'dd'}:test")
    assert (test.name, test.split, test.image_column, test.label_column) == ("dd:test", "test", "img", "fine")
    assert test.labels == [1, 2] and test.label_names == ["x", "y", "z"]
    assert [im.getpixel((0, 0)) for im in test.images] == [(4, 4, 4), (5, 5, 5)]
    coarse = load_image_data(str(tmp_path / "dd"), label_column="coarse")
    assert coarse.split == "train" and coarse.label_names == ["0", "1", "2", "3", "4", "5", "6"]
    assert coarse.labels == [5, 5, 5, 6]
    with pytest.raises(DataError, match=r"dd has no column 'nope'; its columns are: img, fine, coarse"):
        load_image_data(str(tmp_path / "dd"), image_column="nope")
    with pytest.raises(DataError, match="split 'validation' does not exist in folder 'dd'; its splits are: test, train"):
        load_image_data(f"{tmp_path / 'dd'}:validation")


# -- labels and processors ---------------------------------------------------------


@pytest.fixture
def pets(tmp_path) -> Path:
    folder = tmp_path / "pets"
    _png(folder / "cat" / "0.png", (255, 0, 0), size=10)
    _png(folder / "dog" / "0.png", (0, 255, 0), size=10)
    return folder


def test_label_map_matches_names_and_names_the_labels_a_model_lacks(pets):
    data = load_image_data(str(pets))
    assert label_map_for(data, {0: "dog", 1: "bird", 2: "cat"}) == {0: 2, 1: 0}
    assert label_map_for(data, {"0": "cat", "1": "dog"}) == {0: 0, 1: 1}  # id2label keys as read from JSON
    with pytest.raises(DataError, match=r"pets has labels the model does not know: 'cat'; the model's labels are 'dog'"):
        label_map_for(data, {0: "dog"})


def test_processed_images_go_through_the_models_processor_with_mapped_labels(pets):
    from hfmerge.testing.tiny import image_processor

    processor = image_processor("vit")
    size = processor.size["height"]
    data = load_image_data(str(pets))
    items = ProcessedImages(data, processor, label_map={0: 2, 1: 0})
    assert len(items) == 2
    by_label = {item["labels"]: item["pixel_values"] for item in (items[0], items[1])}
    assert set(by_label) == {0, 2}
    red, green = by_label[2], by_label[0]  # cat (red) -> 2, dog (green) -> 0
    assert red.shape == (3, size, size) and red.dtype == torch.float32
    # ViTImageProcessor: x / 255, then (x - 0.5) / 0.5 per channel
    assert torch.allclose(red, torch.tensor([1.0, -1.0, -1.0])[:, None, None].expand(3, size, size))
    assert torch.allclose(green, torch.tensor([-1.0, 1.0, -1.0])[:, None, None].expand(3, size, size))
    unmapped = ProcessedImages(data, processor)
    assert sorted(unmapped[i]["labels"] for i in range(2)) == [0, 1]


# -- the digit tasks ---------------------------------------------------------------


def test_digit_tasks_are_the_demos_splits_deterministic_to_the_byte(tmp_path):
    from hfmerge.testing.tasks import digit_task

    upright, mirrored, high = digit_task("digits"), digit_task("digits-mirrored"), digit_task("digits-high")
    _, y_test = _digits_low_test()
    assert len(upright["test"]) == 540 and len(upright["train"]) == 1257  # 30 % of 1797, stratified
    assert high["test"].features["label"].names == ["5", "6", "7", "8", "9"]
    assert len(high["test"]) == 540 - len(y_test) and set(high["test"]["label"]) == {0, 1, 2, 3, 4}
    a, b = np.asarray(upright["test"][7]["image"]), np.asarray(mirrored["test"][7]["image"])
    assert (b == a[:, ::-1]).all() and not (a == b).all()
    first = write_parquet_repo(tmp_path / "one", "digits-high", high) / "data" / "test-00000-of-00001.parquet"
    second = write_parquet_repo(tmp_path / "two", "digits-high", digit_task.__wrapped__("digits-high"))  # rebuilt
    assert first.read_bytes() == (second / "data" / "test-00000-of-00001.parquet").read_bytes()
