"""The offline end-to-end demo behind `make demo`.

1. Starts a local Hub-compatible server on loopback and points HF_ENDPOINT at it,
   and pushes scikit-learn's handwritten digits (shipped with the package, no
   download) to it as five dataset repos (:mod:`hfmerge.testing.tasks`):
   upright digits, mirrored and inverted digits (other domains), digits 0–4 and
   5–9 (two tasks).
2. Trains small ViTs on them from one shared initialisation
   (:mod:`hfmerge.testing.digit_models`): a base model pre-trained a little on
   upright and mirrored digits, then fine-tuned copies — upright, mirrored,
   inverted, low and high — and publishes them to the local Hub, with a tiny
   MobileNetV2 to serve as the gating merge's gate; and a tiny CLIP model with
   two vision towers fine-tuned from it on mirrored and inverted digits under
   its frozen zero-shot head (:mod:`hfmerge.testing.digit_clip`), as the
   model-merging papers' CLIP task towers are.
3. Merges them *by repo id and dataset id* with every method through the same
   CLI a user runs — regmean and fisher reading each source's data, fusion
   fine-tuned on the tasks' data — evaluates each merge on the test splits
   (``--eval-data``), so every pushed card carries an evaluation table, and
   prints the accuracies the cards report. The CLIP towers are merged against
   the CLIP base, written as a full ``CLIPModel`` (``--output-format clip``) and
   scored zero-shot with the base's text tower.
4. Runs ``hfmerge evaluate`` on the average merge beside its sources and their ensemble.
5. Publishes a Gradio demo Space for the average merge, one for the gated
   merge and one for the CLIP merge (zero-shot, among the labels the user
   types) with `hfmerge space`, starts each from its own folder as the Hub
   would, and asks its `/predict` API.
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
    GRADIO_ANALYTICS_ENABLED="False", TQDM_DISABLE="1",
)
os.environ.pop("HF_HUB_OFFLINE", None)

import shutil  # noqa: E402

from hfmerge.cli import main as hfmerge_cli  # noqa: E402
from hfmerge.testing.digit_clip import TOWERS as CLIP_TOWERS  # noqa: E402
from hfmerge.testing.digit_clip import train_digit_clip, zero_shot_accuracy  # noqa: E402
from hfmerge.testing.digit_models import GATING_MODELS, DigitViT, accuracy, train_digit_models  # noqa: E402
from hfmerge.testing.digit_resnets import train_digit_resnets  # noqa: E402
from hfmerge.testing.local_hub import LocalHub  # noqa: E402
from hfmerge.testing.tasks import DIGIT_NAMES, digit_split, push_digit_datasets  # noqa: E402
from hfmerge.testing.tiny_gate import save_tiny_gate  # noqa: E402

# the demo's ViTs: 16 px digits in 4 px patches, hidden size 64, 3 layers of 4 heads
DEMO_VIT = DigitViT(hidden_size=64, layers=3, heads=4, base_epochs=20, finetune_epochs=8,
                    learning_rate=1e-3, finetune_learning_rate=5e-4)
DOMAINS = {"upright": "demo/digits", "mirrored": "demo/digits-mirrored"}
GATED = {"upright": "demo/digits", "inverted": "demo/digits-inverted"}
GATE = "demo/tiny-mobilenet-gate"  # stands in for google/mobilenet_v2_1.0_224, which needs the network
TASKS = {"0-4": "demo/digits-low", "5-9": "demo/digits-high", "all 10": "demo/digits"}
SEEDS = {"seed0": "demo/resnet-digits-seed0", "seed1": "demo/resnet-digits-seed1"}  # ResNets from two seeds
CLIP_TASKS = {name: f"demo/{task}" for name, task in CLIP_TOWERS.items()}  # each CLIP tower's task
OUTPUT_REPOS = {"otfusion": "demo/resnet-digits-otfusion", "resnet_average": "demo/resnet-digits-average",
                "clip_task_arithmetic": "demo/clip-digits-task-arithmetic", "clip_ties": "demo/clip-digits-ties"}


def clip_repo(name: str) -> str:
    return f"demo/clip-digits-{name}"


def repo(name: str) -> str:
    return f"demo/vit-digits-{name.replace('_', '-')}"


def merges() -> dict[str, list[str]]:
    """Every merge the demo runs, by method (or variant), as the CLI's arguments."""
    pair = [repo("upright"), repo("mirrored")]
    base = ["--base", repo("base")]
    domain_data = ["--data", "demo/digits:train", "--data", "demo/digits-mirrored:train", "--param", "samples=200"]
    domain_eval = ["--eval-data", "demo/digits:test", "--eval-data", "demo/digits-mirrored:test"]
    task_eval = ["--eval-data", "demo/digits:test", "--eval-data", "demo/digits-low:test",
                 "--eval-data", "demo/digits-high:test"]
    tasks = [repo("low"), repo("high"), "--method", "fusion"]
    return {
        "average": [*pair, "--method", "average", *domain_eval],
        "task_arithmetic": [*pair, "--method", "task_arithmetic", *base, "--lambda", "0.7", *domain_eval],
        "ties": [*pair, "--method", "ties", *base, "--param", "density=0.2", "--lambda", "1.0", *domain_eval],
        "dare": [*pair, "--method", "dare", *base, "--param", "drop_rate=0.9", "--lambda", "0.7", "--seed", "0",
                 *domain_eval],
        "layerwise": [*pair, "--method", "layerwise", "--anchor", repo("upright"), *domain_eval],
        "regmean": [*pair, "--method", "regmean", *domain_data, *domain_eval],
        "fisher": [*pair, "--method", "fisher", *domain_data, *domain_eval],
        "fusion": [*tasks, *task_eval],
        "fusion_finetuned": [*tasks, "--data", "demo/digits-low:train", "--data", "demo/digits-high:train",
                             "--param", "finetune_epochs=3", "--param", "learning_rate=1e-3", *task_eval],
        "otfusion": [*SEEDS.values(), "--method", "otfusion", "--data", "demo/digits:train", "--param", "samples=200",
                     "--eval-data", "demo/digits:test"],
        "resnet_average": [*SEEDS.values(), "--method", "average", "--eval-data", "demo/digits:test"],
        "gating": [repo("upright"), repo("inverted"), "--method", "gating", "--data", "demo/digits:train",
                   "--data", "demo/digits-inverted:train", "--param", "m=1", "--param", f"gate={GATE}",
                   "--param", "gate_epochs=4", "--eval-data", "demo/digits:test",
                   "--eval-data", "demo/digits-inverted:test"],
        **clip_merges(),
    }


def clip_merges() -> dict[str, list[str]]:
    """The CLIP towers merged against the CLIP base, each written as a ``CLIPModel`` and scored zero-shot."""
    towers = [clip_repo(name) for name in CLIP_TOWERS]
    common = ["--base", clip_repo("base"), "--output-format", "clip",
              *(arg for task in CLIP_TASKS.values() for arg in ("--eval-data", f"{task}:test"))]
    return {
        "clip_task_arithmetic": [*towers, "--method", "task_arithmetic", "--lambda", "0.5", *common],
        "clip_ties": [*towers, "--method", "ties", "--param", "density=0.2", "--lambda", "1.0", *common],
    }


def card_accuracies(repo_id: str) -> dict[str, float]:
    """The accuracies a pushed card's ``model-index`` reports, by dataset id (read back from the Hub)."""
    from huggingface_hub import ModelCard

    card = ModelCard.load(repo_id)
    return {r.dataset_name.split(":")[0].split("@")[0]: r.metric_value
            for r in card.data.eval_results if r.metric_type == "accuracy"}


def digit_examples(folder: Path, *, inverted: bool = False) -> list[Path]:
    """A few held-out digits as 128-pixel PNGs, upright and mirrored (or inverted), for the Space's examples."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    other = "digits-inverted" if inverted else "digits-mirrored"
    for digit, task in ((3, "digits"), (7, "digits"), (5, other), (9, other)):
        images, targets, _ = digit_split(task, "test")
        image = images[int((targets == digit).nonzero()[0][0])]
        path = folder / f"digit-{digit}{'-' + other.split('-')[1] if task == other else ''}.png"
        Image.fromarray(image).convert("RGB").resize((128, 128), Image.NEAREST).save(path)
        paths.append(path)
    return paths


def hfmerge(args: list[str], shown: list[str] | None = None) -> int:
    """Run the CLI in this process, printing the command line a user would type (it runs with ``--quiet``)."""
    shown = [arg.replace(f"{ROOT}{os.sep}", "") for arg in (shown or args)]
    print(f"\n$ hfmerge {' '.join(shown)}", flush=True)
    started = time.time()
    code = hfmerge_cli([*args, "--quiet"] if args[0] in ("merge", "evaluate") else args)
    print(f"  ({time.time() - started:.0f} s)", flush=True)
    return code


def ask_space(folder: Path, examples: list[Path], screenshot: Path | None = None, labels: str | None = None) -> int:
    """Start the Space's app.py in its own process, as the Hub would, and call /predict on each example.

    ``labels``, for a zero-shot Space, are the comma-separated labels a user types. With ``screenshot``, headless
    Chromium also opens the page, types the labels, uploads the last example, waits for every model's answer and
    saves the page, down to the card's evaluation table, as a PNG.
    """
    from gradio_client import Client, handle_file

    from hfmerge.testing.space_app import running_space

    try:
        with running_space(folder, OUT / "space.log") as url:
            client = Client(url, verbose=False)
            print(f"  the Space runs at {url} while the demo runs; its /predict API answers:")
            for path in examples:
                typed = () if labels is None else (labels,)
                answer = client.predict(handle_file(str(path)), *typed, api_name="/predict")
                merged = ", ".join(f"{t['label']} {t['score']:.2f}" for t in answer["merged"][:3])
                sources = "; ".join(f"{name.split('/')[-1].split('@')[0]}: {top[0]['label']}"
                                    for name, top in answer["sources"].items())
                print(f"    {path.name:22s} merged: {merged:26s}  sources: {sources}")
            if screenshot is not None:
                take_screenshot(url, examples[-1], screenshot, boxes=1 + len(answer["sources"]), labels=labels)
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


def take_screenshot(url: str, image: Path, path: Path, boxes: int, labels: str | None = None) -> None:
    from hfmerge.testing.browser import chromium_missing, headless_chromium, show_image

    missing = chromium_missing()
    if missing:
        print(f"  no screenshot: {missing}")
        return
    browser = headless_chromium(width=1280, height=1200)  # down to the card's evaluation table
    try:
        ids = ["merged", *(f"source-{i}" for i in range(1, boxes))]
        show_image(browser, url, image, ids, ready=lambda text: len(text.splitlines()) > 2, labels=labels)
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
    try:
        return run(screenshot, started, hub)
    finally:
        hub.stop()


def run(screenshot: Path | None, started: float, hub: LocalHub) -> int:
    import torch
    from huggingface_hub import HfApi

    torch.set_num_threads(1)  # tiny models: a second thread gains little, and on a busy machine costs much

    api = HfApi()
    print("1/5  pushing scikit-learn's digits to the local Hub at", hub.endpoint, "as dataset repos", flush=True)
    for name, repo_id in push_digit_datasets(api, "demo").items():
        sizes = " / ".join(str(len(digit_split(name, split)[1])) for split in ("train", "test"))
        print(f"     {repo_id:22s} train/test: {sizes} images", flush=True)

    print("2/5  training demo ViTs (one shared initialisation, one CPU thread) and publishing them", flush=True)
    folders = train_digit_models(OUT / "sources", DEMO_VIT, models=GATING_MODELS,
                                 report=lambda line: print("     " + line, flush=True))
    for name, folder in folders.items():
        api.create_repo(repo(name), exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo(name))
    gate = save_tiny_gate(OUT / "sources" / "tiny-mobilenet-gate")
    api.create_repo(GATE, exist_ok=True)
    api.upload_folder(folder_path=str(gate), repo_id=GATE)
    print(f"     {GATE}: a tiny MobileNetV2 image classifier, the gating merge's gate network", flush=True)
    resnets = train_digit_resnets(OUT / "sources", tuple(SEEDS))
    for name, folder in resnets.items():
        api.create_repo(SEEDS[name], exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=SEEDS[name])
    print(f"     {', '.join(SEEDS.values())}: tiny ResNets trained on the digits from two random seeds", flush=True)
    clips = train_digit_clip(OUT / "sources", report=lambda line: print("     " + line, flush=True))
    for name, folder in clips.items():
        api.create_repo(clip_repo(name), exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=clip_repo(name))
    print(f"     {clip_repo('base')}: a tiny CLIPModel; {', '.join(clip_repo(n) for n in CLIP_TOWERS)}: its vision "
          "towers fine-tuned under its zero-shot head", flush=True)

    print("\n3/5  merging by repo id and dataset id with each method (the same CLI a user runs)", flush=True)
    outputs = {}
    for method, args in merges().items():
        out = OUT / "merged" / method
        code = hfmerge(["merge", *args, "--output", str(out), "--push-to-hub", OUTPUT_REPOS.get(method, repo(method))])
        if code != 0:
            return code
        outputs[method] = out

    from transformers import AutoModel, AutoModelForImageClassification

    sources = {name: AutoModelForImageClassification.from_pretrained(folders[name]) for name in folders}
    print("\nAccuracy on held-out digits (domains: upright and mirrored images); merges as their pushed cards report")
    print(f"  {'model':28s} {'upright':>8s} {'mirrored':>9s} {'mean':>6s}")
    for name in ("base", "upright", "mirrored"):
        scores = [accuracy(sources[name], task.split("/")[1]) for task in DOMAINS.values()]
        print(f"  {name:28s} {scores[0]:8.3f} {scores[1]:9.3f} {sum(scores) / 2:6.3f}")
    for method in ("average", "task_arithmetic", "ties", "dare", "layerwise", "regmean", "fisher"):
        reported = card_accuracies(repo(method))
        scores = [reported[task] for task in DOMAINS.values()]
        print(f"  {'merged: ' + method:28s} {scores[0]:8.3f} {scores[1]:9.3f} {sum(scores) / 2:6.3f}")

    print("\nAccuracy of the task models and their fusion (0–4 and 5–9 → one 10-way classifier)")
    print(f"  {'model':38s} {'0-4':>6s} {'5-9':>6s} {'all 10':>7s}")
    print(f"  {'low (5 labels)':38s} {accuracy(sources['low'], 'digits-low'):6.3f} {'—':>6s} {'—':>7s}")
    print(f"  {'high (5 labels)':38s} {'—':>6s} {accuracy(sources['high'], 'digits-high'):6.3f} {'—':>7s}")
    for method, label in (("fusion", "merged: fusion"), ("fusion_finetuned", "merged: fusion, fine-tuned")):
        reported = card_accuracies(repo(method))
        print(f"  {label + ' (10 labels)':38s} {reported[TASKS['0-4']]:6.3f} {reported[TASKS['5-9']]:6.3f} "
              f"{reported[TASKS['all 10']]:7.3f}")

    print("\nAccuracy of one gated model on upright and inverted digits, told no task (the gate picks it per image)")
    print(f"  {'model':38s} {'upright':>8s} {'inverted':>9s} {'mean':>6s}")
    for name in ("upright", "inverted"):
        scores = [accuracy(sources[name], task.split("/")[1]) for task in GATED.values()]
        print(f"  {name:38s} {scores[0]:8.3f} {scores[1]:9.3f} {sum(scores) / 2:6.3f}")
    reported = card_accuracies(repo("gating"))
    scores = [reported[task] for task in GATED.values()]
    print(f"  {'merged: gating, m=1':38s} {scores[0]:8.3f} {scores[1]:9.3f} {sum(scores) / 2:6.3f}")

    print("\nAccuracy of two ResNets trained from different seeds, averaged as they are and fused by OTFusion")
    print(f"  {'model':38s} {'digits':>7s}")
    for name, folder in resnets.items():
        model = AutoModelForImageClassification.from_pretrained(folder)
        print(f"  {'resnet, ' + name:38s} {accuracy(model, 'digits'):7.3f}")
    for method, label in (("resnet_average", "merged: average"), ("otfusion", "merged: otfusion (neurons aligned)")):
        print(f"  {label:38s} {card_accuracies(OUTPUT_REPOS[method])['demo/digits']:7.3f}")

    print("\nZero-shot accuracy of the CLIP base, its towers and their merges (as their pushed cards report), each "
          "image encoder scored with the base's text tower")
    scored = {name: {CLIP_TASKS[task]: zero_shot_accuracy(AutoModel.from_pretrained(clips[name]), clips["base"], t)
                     for task, t in CLIP_TOWERS.items()} for name in ("base", *CLIP_TOWERS)}
    print(f"  {'model':38s} {'mirrored':>9s} {'inverted':>9s} {'mean':>6s}")
    rows = [(f"{name} (zero-shot)" if name == "base" else f"tower, {name}", scored[name])
            for name in ("base", *CLIP_TOWERS)]
    rows += [(f"merged: {method.removeprefix('clip_')}", card_accuracies(OUTPUT_REPOS[method]))
             for method in clip_merges()]
    for label, reported in rows:
        scores = [reported[task] for task in CLIP_TASKS.values()]
        print(f"  {label:38s} {scores[0]:9.3f} {scores[1]:9.3f} {sum(scores) / 2:6.3f}")

    print("\n4/5  evaluating the average merge beside its sources and their ensemble, as a user would", flush=True)
    results = OUT / "evaluation-average.json"
    evaluate = ["evaluate", repo("average"), "--data", "demo/digits:test", "--data", "demo/digits-mirrored:test",
                "--compare", repo("upright"), repo("mirrored"), "--ensemble", "--json", str(results),
                "--update-card", "--push"]
    code = hfmerge(evaluate)
    if code != 0:
        return code

    print("\n5/5  a demo Space for the average merge", flush=True)
    examples = digit_examples(OUT / "examples")
    space_args = ["space", repo("average"), "--space-id", repo("average") + "-demo",
                  "--output", str(OUT / "space"), "--examples", *map(str, examples)]
    code = hfmerge(space_args, [*space_args[:6], "--examples", "..."])
    if code == 0:
        code = ask_space(OUT / "space", examples, screenshot)
    if code != 0:
        return code
    print("\n   and one for the gated merge, whose page shows the gate's probability of each task", flush=True)
    gated_examples = digit_examples(OUT / "examples-gated", inverted=True)
    space_args = ["space", repo("gating"), "--space-id", repo("gating") + "-demo",
                  "--output", str(OUT / "space-gated"), "--examples", *map(str, gated_examples)]
    code = hfmerge(space_args, [*space_args[:6], "--examples", "..."])
    if code == 0:
        shot = screenshot.with_name(f"{screenshot.stem}-gated{screenshot.suffix}") if screenshot else None
        code = ask_space(OUT / "space-gated", gated_examples, shot)
    if code != 0:
        return code
    print("\n   and one for the CLIP merge, which answers among the labels the user types", flush=True)
    clip_examples = digit_examples(OUT / "examples-clip", inverted=True)
    merged_clip = OUTPUT_REPOS["clip_task_arithmetic"]
    space_args = ["space", merged_clip, "--space-id", merged_clip + "-demo", "--output", str(OUT / "space-clip"),
                  "--examples", *map(str, clip_examples)]
    code = hfmerge(space_args, [*space_args[:6], "--examples", "..."])
    if code == 0:
        shot = screenshot.with_name(f"{screenshot.stem}-clip{screenshot.suffix}") if screenshot else None
        code = ask_space(OUT / "space-clip", clip_examples, shot, labels=", ".join(DIGIT_NAMES))
    if code != 0:
        return code

    print(f"\nDone in {time.time() - started:.0f} s. Where everything is:")
    print(f"  source models:   {(OUT / 'sources').relative_to(ROOT)}/")
    print(f"  merged models:   {(OUT / 'merged').relative_to(ROOT)}/<method>/  (load with transformers; "
          "merged/gating/ with hfmerge.load, or transformers and trust_remote_code=True; merged/clip_*/ as CLIPModel, "
          "with pipeline('zero-shot-image-classification'))")
    print(f"  model card:      {(outputs['fusion_finetuned'] / 'README.md').relative_to(ROOT)}  (its Evaluation "
          "section: the merge beside its sources and their ensemble, and evaluation.svg)")
    print(f"  pinned recipe:   {(outputs['fusion_finetuned'] / 'hfmerge.yaml').relative_to(ROOT)}  (models and "
          "datasets pinned to their commits)")
    print(f"  evaluation:      {results.relative_to(ROOT)}")
    print(f"  demo Spaces:     {(OUT / 'space').relative_to(ROOT)}/, space-gated/, space-clip/  (stopped; run one "
          "again from the cache with")
    print(f"                   cd {(OUT / 'space').relative_to(ROOT)} && HF_HOME=../hf_home HF_HUB_OFFLINE=1 "
          "../../.venv/bin/python app.py)")
    print(f"  Hub cache:       {(OUT / 'hf_home').relative_to(ROOT)}/  (the local Hub ran at {hub.endpoint})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
