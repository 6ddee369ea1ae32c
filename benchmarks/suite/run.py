"""Run the suite's tables against a local Hub and write RESULTS.md with their plots and claim lines."""

from __future__ import annotations

import contextlib
import importlib
import os
import platform
import shutil
import time
import traceback
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.suite.bench import Bench
from benchmarks.suite.report import Section

TABLES = {"A": "benchmarks.suite.table_a", "B": "benchmarks.suite.table_b", "C": "benchmarks.suite.table_c",
          "D": "benchmarks.suite.table_d"}
TOKEN = "hf_local_bench_token"


@contextlib.contextmanager
def open_bench(mode: str, *, cache: Path, out: Path, seeds: int | None = None) -> Iterator[Bench]:
    """A :class:`Bench` on a fresh local Hub on loopback, ``HF_ENDPOINT`` pointing at it, for one run.

    ``HF_HOME`` is a folder of the run's own (removed at the end), so nothing is
    read from or written to the user's Hub cache, and telemetry is off.
    """
    from hfmerge.testing.local_hub import LocalHub

    out.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    work = cache / f".run-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    saved = {k: os.environ.get(k) for k in _ENV}
    hub = LocalHub(token=TOKEN, orgs=("bench",)).start()
    os.environ.update(HF_ENDPOINT=hub.endpoint, HF_TOKEN=TOKEN, HF_HOME=str(work / "hf_home"),
                      HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
                      TRANSFORMERS_VERBOSITY="error", GRADIO_ANALYTICS_ENABLED="False", TQDM_DISABLE="1",
                      HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    os.environ.pop("HF_HUB_OFFLINE", None)
    try:
        from huggingface_hub import HfApi

        count = seeds if seeds is not None else (3 if mode == "full" else 1)
        yield Bench(mode=mode, cache=cache, work=work, out=out, api=HfApi(endpoint=hub.endpoint, token=TOKEN),
                    seeds=tuple(range(count)), log=lambda line: print(line, flush=True))
    finally:
        hub.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(work, ignore_errors=True)


_ENV = ("HF_ENDPOINT", "HF_TOKEN", "HF_HOME", "HF_HUB_DISABLE_TELEMETRY", "HF_HUB_DISABLE_PROGRESS_BARS",
        "TRANSFORMERS_VERBOSITY", "GRADIO_ANALYTICS_ENABLED", "TQDM_DISABLE", "HF_HUB_OFFLINE",
        "HF_DATASETS_DISABLE_PROGRESS_BARS")


def run_suite(mode: str, tables: list[str], *, out: Path, cache: Path, seeds: int | None = None,
              command: str = "python -m benchmarks.suite") -> int:
    """Run ``tables`` in ``mode``; write ``out/RESULTS.md`` and the plots. 0 when every table ran, else 1.

    A table that raises is reported in RESULTS.md with its traceback; the others still run.
    """
    import logging
    import warnings

    import torch

    logging.getLogger("hfmerge").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    # The suite's models are tiny: a second intra-op thread gains little, and when the machine is busy
    # threads that wait for each other make every forward pass many times slower.
    torch.set_num_threads(1)
    started = time.perf_counter()
    sections: list[Section] = []
    with open_bench(mode, cache=cache, out=out, seeds=seeds) as bench:
        for key in tables:
            bench.log(f"Table {key} ({mode})")
            table_started = time.perf_counter()
            try:
                section = importlib.import_module(TABLES[key]).run(bench)
            except Exception:  # noqa: BLE001 - one table's failure is reported, the others still run
                section = Section(key=key, heading=f"Table {key}", error=traceback.format_exc())
                bench.log(section.error)
            section.seconds = time.perf_counter() - table_started
            bench.log(f"Table {key}: {section.seconds:.0f} s")
            sections.append(section)
            for name, svg in section.plots.items():
                (out / name).write_text(svg)
    total = time.perf_counter() - started
    text = render(sections, mode=mode, command=command, seconds=total, seeds=bench.seeds)
    failed = any(s.error for s in sections)
    # A run of some tables, or one whose table failed, never replaces a complete RESULTS.md.
    name = "RESULTS.md" if set(tables) == set(TABLES) and not failed else "RESULTS.partial.md"
    (out / name).write_text(text)
    print(f"wrote {out / name} ({total:.0f} s)")
    return 1 if failed else 0


def _versions() -> str:
    from importlib.metadata import version

    names = ("torch", "transformers", "huggingface-hub", "datasets", "accelerate", "safetensors", "pot",
             "torchmetrics")
    found = []
    for name in names:
        with contextlib.suppress(Exception):
            found.append(f"{name} {version(name)}")
    return ", ".join(found)


def _hardware() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    device = f"GPU: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores ({cpu}), {device}, Python {platform.python_version()}"


def render(sections: list[Section], *, mode: str, command: str, seconds: float, seeds: tuple[int, ...]) -> str:
    """RESULTS.md: how it was made, each section's tables, plots and findings, then every claim line."""
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    banner = {"smoke": "> **Smoke setting:** models and data this small say nothing about the methods; the "
                       "numbers and the PASS/FAIL lines only show that the suite runs. The benchmark is "
                       "`python -m benchmarks.suite`.",
              "quick": "> **Quick setting:** smaller tasks, models and one seed; the numbers are indicative "
                       "only. The benchmark is `python -m benchmarks.suite`."}
    lines = [f"# hfmerge merge-quality benchmark ({mode})", "", *([banner[mode], ""] if mode in banner else []),
             "Made by the command below; every number is measured by that run, nothing is typed in. "
             "A cell `m ± s` is the mean over the seeds of the merge's random parts (and of fine-tuning where "
             "the row fine-tunes) with half their range; a difference smaller than the spread is a tie.", "",
             f"- command: `{command}`",
             f"- date: {when}; wall time {seconds / 60:.1f} min",
             f"- seeds: {', '.join(map(str, seeds))}",
             f"- hardware: {_hardware()}",
             f"- versions: {_versions()}", ""]
    for section in sections:
        lines += [f"## {section.heading}", ""]
        if section.error:
            lines += ["This table did not finish:", "", "```", section.error.rstrip(), "```", ""]
            continue
        if section.intro:
            lines += [section.intro, ""]
        for table in section.tables:
            lines += [f"**{table.title}**", "", table.markdown(), ""]
            lines += [*(f"{note}\n" for note in table.notes)]
        for name in section.plots:
            lines += [f"![{name}]({name})", ""]
        if section.claims:
            lines += ["Claims:", "", *(claim.line() for claim in section.claims), ""]
        if section.findings:
            lines += ["What we found:", "", *(f"{finding}\n" for finding in section.findings)]
        lines += [f"_Table {section.key} took {section.seconds / 60:.1f} min._", ""]
    claims = [claim for section in sections for claim in section.claims]
    lines += ["## Claims", "", f"{sum(c.passed for c in claims)} of {len(claims)} hold in this run.", ""]
    lines += [claim.line() for claim in claims]
    return "\n".join(lines) + "\n"
