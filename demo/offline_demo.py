"""The offline end-to-end demo behind `make demo`.

1. Starts a local Hub-compatible server on loopback and points HF_ENDPOINT at it.
2. Trains small ViTs on scikit-learn's handwritten digits (shipped with the
   package, no download), all from one shared initialisation: a base model
   pre-trained on every digit, then fine-tuned copies — upright digits,
   mirrored digits (another domain), digits 0–4 and digits 5–9 (two tasks).
3. Publishes them to the local Hub and merges them *by repo id* with each
   method — average, task_arithmetic, layerwise and fusion — through the same
   CLI a user runs, pushes every result back, and evaluates sources and merges.
4. Publishes a Gradio demo Space for the average merge with `hfmerge space`,
   starts it from its own folder as the Hub would, and asks its `/predict` API.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "demo-output"
with socket.socket() as _sock:
    _sock.bind(("127.0.0.1", 0))
    PORT = _sock.getsockname()[1]
TOKEN = "hf_local_demo_token"
os.environ.update(
    HF_ENDPOINT=f"http://127.0.0.1:{PORT}", HF_TOKEN=TOKEN, HF_HOME=str(OUT / "hf_home"),
    HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error",
    GRADIO_ANALYTICS_ENABLED="False",
)
os.environ.pop("HF_HUB_OFFLINE", None)

import shutil  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil  # noqa: E402

from hfmerge.cli import main as hfmerge_cli  # noqa: E402
from hfmerge.testing.local_hub import LocalHub  # noqa: E402

SIZE = 16


def digits() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """8x8 digits scaled to 16x16 RGB in [-1, 1] (what the saved image processor produces)."""
    data = load_digits()
    images = torch.tensor(data.images / 16.0, dtype=torch.float32)
    images = torch.nn.functional.interpolate(images[:, None], size=(SIZE, SIZE), mode="nearest").repeat(1, 3, 1, 1)
    images = (images - 0.5) / 0.5
    x_train, x_test, y_train, y_test = train_test_split(
        images, torch.tensor(data.target), test_size=0.3, random_state=0, stratify=data.target)
    return {"train": (x_train, y_train), "test": (x_test, y_test)}


def mirrored(x: torch.Tensor) -> torch.Tensor:
    return torch.flip(x, dims=[-1])


def train(model: ViTForImageClassification, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float) -> None:
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 64):
            idx = order[start:start + 64]
            loss = torch.nn.functional.cross_entropy(model(pixel_values=x[idx]).logits, y[idx])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    model.eval()


@torch.inference_mode()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, label_of: dict[int, str]) -> float:
    """Top-1 accuracy, reading predictions through the model's own id2label."""
    predicted = model(pixel_values=x).logits.argmax(-1)
    names = [model.config.id2label[int(i)] for i in predicted]
    return float(np.mean([n == label_of[int(t)] for n, t in zip(names, y)]))


def subset(x: torch.Tensor, y: torch.Tensor, digits_kept: range, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    keep = (y >= digits_kept.start) & (y < digits_kept.stop)
    return x[keep], y[keep] - offset


def model_with_labels(base: ViTForImageClassification, labels: list[str]) -> ViTForImageClassification:
    config = ViTConfig(**{**base.config.to_dict(), "id2label": dict(enumerate(labels)),
                          "label2id": {l: i for i, l in enumerate(labels)}})
    model = ViTForImageClassification(config)
    state = {k: v for k, v in base.state_dict().items() if not k.startswith("classifier.")}
    model.load_state_dict(state, strict=False)
    return model


def digit_examples(images: torch.Tensor, targets: torch.Tensor, folder: Path) -> list[Path]:
    """A few held-out digits as 128-pixel PNGs, upright and mirrored, for the Space's examples."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for digit, flip in ((3, False), (7, False), (5, True), (9, True)):
        image = images[int((targets == digit).nonzero()[0])]
        image = mirrored(image) if flip else image
        pixels = ((image[0] * 0.5 + 0.5).clamp(0, 1) * 255).to(torch.uint8).numpy()
        path = folder / f"digit-{digit}{'-mirrored' if flip else ''}.png"
        Image.fromarray(pixels).convert("RGB").resize((128, 128), Image.NEAREST).save(path)
        paths.append(path)
    return paths


def ask_space(folder: Path, examples: list[Path], screenshot: Path | None = None) -> int:
    """Start the Space's app.py in its own process, as the Hub would, and call /predict on each example.

    With ``screenshot``, headless Chromium also opens the page, uploads the last
    example, waits for every model's answer and saves the page as a PNG.
    """
    from gradio_client import Client, handle_file

    from hfmerge.testing.space_app import running_space

    try:
        with running_space(folder, OUT / "space.log") as url:
            client = Client(url, verbose=False)
            print(f"  the Space runs at {url} while the demo runs; its /predict API answers:")
            for path in examples:
                answer = client.predict(handle_file(str(path)), api_name="/predict")
                merged = ", ".join(f"{t['label']} {t['score']:.2f}" for t in answer["merged"][:3])
                sources = "; ".join(f"{name.split('/')[-1].split('@')[0]}: {top[0]['label']}"
                                    for name, top in answer["sources"].items())
                print(f"    {path.name:22s} merged: {merged:26s} sources: {sources}")
            if screenshot is not None:
                take_screenshot(url, examples[-1], screenshot, boxes=1 + len(answer["sources"]))
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


def take_screenshot(url: str, image: Path, path: Path, boxes: int) -> None:
    from hfmerge.testing.browser import chromium_missing, headless_chromium, show_image

    missing = chromium_missing()
    if missing:
        print(f"  no screenshot: {missing}")
        return
    browser = headless_chromium(width=1280, height=640)
    try:
        ids = ["merged", *(f"source-{i}" for i in range(1, boxes))]
        show_image(browser, url, image, ids, ready=lambda text: len(text.splitlines()) > 2)
        time.sleep(0.5)  # let the bars finish their transition
        path.parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(path))
        print(f"  screenshot: {path}")
    finally:
        browser.quit()


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="hfmerge's offline end-to-end demo")
    parser.add_argument("--screenshot", type=Path, help="save a PNG of the demo Space's page (needs Chromium)")
    screenshot = parser.parse_args(argv).screenshot
    started = time.time()
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    hub = LocalHub(token=TOKEN, port=PORT).start()
    from huggingface_hub import HfApi

    api = HfApi()
    data = digits()
    (x_tr, y_tr), (x_te, y_te) = data["train"], data["test"]
    digit_names = [str(d) for d in range(10)]
    processor = ViTImageProcessorPil(size={"height": SIZE, "width": SIZE}, image_mean=[0.5] * 3, image_std=[0.5] * 3)

    print("1/4  training demo models on scikit-learn's digits (one shared initialisation)", flush=True)
    training_started = time.time()
    torch.manual_seed(0)
    config = ViTConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
                       image_size=SIZE, patch_size=4, id2label=dict(enumerate(digit_names)),
                       label2id={d: i for i, d in enumerate(digit_names)})
    base = ViTForImageClassification(config)
    # "pre-training": a little on both domains, so the base knows digits but no domain well
    half = len(x_tr) // 2
    train(base, torch.cat([x_tr[:half], mirrored(x_tr[half:])]), y_tr, epochs=20, lr=1e-3)
    print(f"     base trained ({time.time() - training_started:.0f} s)", flush=True)

    models: dict[str, ViTForImageClassification] = {"base": base}
    for name, x in (("upright", x_tr), ("mirrored", mirrored(x_tr))):
        models[name] = model_with_labels(base, digit_names)
        models[name].load_state_dict(base.state_dict())
        train(models[name], x, y_tr, epochs=8, lr=5e-4)
        print(f"     {name} trained ({time.time() - training_started:.0f} s)", flush=True)
    for name, kept, offset in (("low", range(0, 5), 0), ("high", range(5, 10), 5)):
        models[name] = model_with_labels(base, digit_names[kept.start:kept.stop])
        train(models[name], *subset(x_tr, y_tr, kept, offset), epochs=8, lr=5e-4)
        print(f"     {name} trained ({time.time() - training_started:.0f} s)", flush=True)

    print("2/4  publishing them to the local Hub at", hub.endpoint, flush=True)
    for name, model in models.items():
        folder = OUT / "sources" / f"vit-digits-{name}"
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        (folder / "README.md").write_text(
            f"---\nlicense: apache-2.0\nlibrary_name: transformers\npipeline_tag: image-classification\n---\n"
            f"# vit-digits-{name}\n\nA tiny ViT trained by hfmerge's offline demo.\n")
        api.create_repo(f"demo/vit-digits-{name}", exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=f"demo/vit-digits-{name}")

    print("3/4  merging by repo id with each method (the same CLI a user runs)", flush=True)
    merges = {
        "average": ["demo/vit-digits-upright", "demo/vit-digits-mirrored", "--method", "average"],
        "task_arithmetic": ["demo/vit-digits-upright", "demo/vit-digits-mirrored", "--method", "task_arithmetic",
                            "--base", "demo/vit-digits-base", "--lambda", "0.7"],
        "ties": ["demo/vit-digits-upright", "demo/vit-digits-mirrored", "--method", "ties",
                 "--base", "demo/vit-digits-base", "--param", "density=0.2", "--lambda", "1.0"],
        "dare": ["demo/vit-digits-upright", "demo/vit-digits-mirrored", "--method", "dare",
                 "--base", "demo/vit-digits-base", "--param", "drop_rate=0.9", "--lambda", "0.7", "--seed", "0"],
        "layerwise": ["demo/vit-digits-upright", "demo/vit-digits-mirrored", "--method", "layerwise",
                      "--anchor", "demo/vit-digits-upright"],
        "fusion": ["demo/vit-digits-low", "demo/vit-digits-high", "--method", "fusion"],
    }
    outputs = {}
    for method, args in merges.items():
        out = OUT / "merged" / method
        print(f"\n$ hfmerge merge {' '.join(args)} --output {out.relative_to(ROOT)} "
              f"--push-to-hub demo/vit-digits-{method.replace('_', '-')}", flush=True)
        code = hfmerge_cli(["merge", *args, "--output", str(out), "--push-to-hub",
                            f"demo/vit-digits-{method.replace('_', '-')}", "--quiet"])
        if code != 0:
            hub.stop()
            return code
        outputs[method] = out

    from transformers import AutoModelForImageClassification

    label_of = {d: str(d) for d in range(10)}
    test_sets = {"upright": (x_te, y_te), "mirrored": (mirrored(x_te), y_te)}
    rows = [(name, models[name]) for name in ("base", "upright", "mirrored")]
    rows += [(f"merged: {m}", AutoModelForImageClassification.from_pretrained(outputs[m]))
             for m in ("average", "task_arithmetic", "ties", "dare", "layerwise")]
    print("\nAccuracy on held-out digits (domains: upright and mirrored images)")
    print(f"  {'model':28s} {'upright':>8s} {'mirrored':>9s} {'mean':>6s}")
    for name, model in rows:
        scores = [accuracy(model, x, y, label_of) for x, y in test_sets.values()]
        print(f"  {name:28s} {scores[0]:8.3f} {scores[1]:9.3f} {np.mean(scores):6.3f}")

    fused = AutoModelForImageClassification.from_pretrained("demo/vit-digits-fusion")  # pulled back from the Hub
    low_x, low_y = subset(x_te, y_te, range(0, 5), 0)
    high_x, high_y = subset(x_te, y_te, range(5, 10), 0)
    print("\nAccuracy of the task models and their fusion (0–4 and 5–9 → one 10-way classifier)")
    print(f"  {'model':28s} {'0-4':>8s} {'5-9':>9s} {'all 10':>6s}")
    low_names = {d: str(d) for d in range(5)}
    high_names = {d: str(d + 5) for d in range(5)}
    print(f"  {'low (5 labels)':28s} {accuracy(models['low'], low_x, low_y, low_names):8.3f} {'—':>9s} {'—':>6s}")
    high_model_y = high_y - 5
    print(f"  {'high (5 labels)':28s} {'—':>8s} {accuracy(models['high'], high_x, high_model_y, high_names):9.3f}"
          f" {'—':>6s}")
    print(f"  {'merged: fusion (10 labels)':28s} {accuracy(fused, low_x, low_y, label_of):8.3f} "
          f"{accuracy(fused, high_x, high_y, label_of):9.3f} {accuracy(fused, x_te, y_te, label_of):6.3f}")

    print("\n4/4  a demo Space for the average merge", flush=True)
    examples = digit_examples(x_te, y_te, OUT / "examples")
    space_args = ["space", "demo/vit-digits-average", "--space-id", "demo/vit-digits-average-demo",
                  "--output", str(OUT / "space"), "--examples", *map(str, examples)]
    print(f"$ hfmerge {' '.join(space_args[:4])} --output {(OUT / 'space').relative_to(ROOT)} --examples ...",
          flush=True)
    code = hfmerge_cli(space_args)
    if code == 0:
        code = ask_space(OUT / "space", examples, screenshot)
    if code != 0:
        hub.stop()
        return code

    hub.stop()
    print(f"\nDone in {time.time() - started:.0f} s. Where everything is:")
    print(f"  source models:   {(OUT / 'sources').relative_to(ROOT)}/")
    print(f"  merged models:   {(OUT / 'merged').relative_to(ROOT)}/<method>/  (load with transformers)")
    print(f"  model card:      {(outputs['layerwise'] / 'README.md').relative_to(ROOT)}")
    print(f"  pinned recipe:   {(outputs['layerwise'] / 'hfmerge.yaml').relative_to(ROOT)}")
    print(f"  demo Space:      {(OUT / 'space').relative_to(ROOT)}/  (stopped; run it again from the cache with")
    print(f"                   cd {(OUT / 'space').relative_to(ROOT)} && HF_HOME=../hf_home HF_HUB_OFFLINE=1 "
          "../../.venv/bin/python app.py)")
    print(f"  Hub cache:       {(OUT / 'hf_home').relative_to(ROOT)}/  (the local Hub ran at {hub.endpoint})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
