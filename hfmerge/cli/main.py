"""The ``hfmerge`` command line: a thin shell over :class:`~hfmerge.recipe.Recipe` and the pipeline.

Data (paths, commit URLs, plans) goes to stdout, messages to stderr. A
mistake in the input prints one line saying what is wrong and how to fix it
and exits with status 2; nothing is written.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from hfmerge.errors import HfMergeError, RecipeError

EXIT_USAGE = 2
EXIT_READER_GONE = 128 + 13
"""The status after the reader of stdout went away: 128 + SIGPIPE, the status a shell reports for
``git log | head -1``, whom SIGPIPE ends, so that ``set -o pipefail`` knows the output was cut short.
hfmerge exits with it rather than dying of the signal as git does, so that its temporary folders
(a merge's staging folder) are still removed on the way out."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"hfmerge: error: {message} (see `{self.prog} --help`)\n")


def _methods_that(test: Callable[[Any], Any]) -> list[str]:
    """The registered methods (plug-ins' included) for which ``test(method)`` holds, for a help text.

    A method whose answer raises (a broken plug-in) is left out: its error shows when it is used.
    """
    from hfmerge.methods import available_methods, get_method

    def holds(name: str) -> bool:
        try:
            return bool(test(get_method(name)))
        except Exception:  # noqa: BLE001 - the help must come whatever a plug-in does
            return False

    return [name for name in available_methods() if holds(name)]


def _build_parser() -> argparse.ArgumentParser:
    from hfmerge import __version__
    from hfmerge.methods import available_methods

    # the help names the methods each option is for, as the registry declares them (no torch is imported)
    anchored = ", ".join(_methods_that(lambda m: m.uses_anchor))
    based = ", ".join(_methods_that(lambda m: m.needs_base))
    if base_optional := ", ".join(_methods_that(lambda m: m.accepts_base and not m.needs_base)):
        based += f"; optional for {base_optional}"
    scaled = ", ".join(_methods_that(lambda m: any(p.name == "lambda" for p in m.parameters)))
    seeded = ", ".join(_methods_that(lambda m: m.uses_seed))
    reading = ", ".join(_methods_that(lambda m: m.data_needs().any))
    per_source = ", ".join(_methods_that(lambda m: m.data_needs().per_source))

    parser = _Parser(prog="hfmerge", description="Merge fine-tuned vision models from the Hugging Face Hub.")
    parser.add_argument("--version", action="version", version=f"hfmerge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def add_output_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--output", "-o", help="folder to write the merged model to")
        p.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the result to this Hub repo in one commit")
        p.add_argument("--private", action="store_true", help="create the Hub repo as private")
        p.add_argument("--overwrite", action="store_true",
                       help="replace an earlier hfmerge output in the output folder "
                            "(refused, naming them, where it holds files hfmerge did not write)")
        p.add_argument("--dry-run", action="store_true", help="print the plan and write nothing")
        p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")

    merge = sub.add_parser("merge", help="merge models named by repo id or folder")
    merge.add_argument("sources", nargs="+", metavar="SOURCE", help="org/name, org/name@revision, or a folder")
    merge.add_argument("--method", "-m", required=True, help=f"one of: {', '.join(available_methods())}")
    merge.add_argument("--weights", help="comma-separated weight per source, e.g. 0.5,0.3,0.2")
    merge.add_argument("--anchor", help=f"the source whose head and config are kept ({anchored}; "
                                        "any method with --heads anchor)")
    merge.add_argument("--base", help=f"the pre-trained model the sources were fine-tuned from ({based})")
    merge.add_argument("--lambda", dest="lambda_", type=str, help=f"task-vector scale λ ({scaled}); auto: chosen on --eval-data's validation data")
    merge.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="a method parameter")
    merge.add_argument("--heads", metavar="POLICY",
                       help="classifier heads: concat (union of labels), average (one label set) or anchor "
                            "(default: concat if the label sets differ, else average; anchor for layerwise)")
    merge.add_argument("--seed", help=f"seed of methods that draw random numbers ({seeded}) or sample data (default 0)")
    merge.add_argument("--data", action="append", metavar="DATASET",
                       help=f"data of a method that reads data ({reading}): "
                            "org/name[@revision][:split], an image folder or a save_to_disk folder; "
                            "once per source in source order, or once for all"
                            + (f" ({per_source}: once per source)" if per_source else ""))
    merge.add_argument("--eval-data", action="append", metavar="DATASET",
                       help="evaluate the result on this dataset (one per task) and put the results in the card")
    merge.add_argument("--prompt", action="append", metavar="TEMPLATE",
                       help="with --eval-data on CLIP towers: a zero-shot prompt template with {} for the class name "
                            "(repeatable; default: CLIP's 'a photo of a {}.' and six plain variations)")
    merge.add_argument("--data-column", help="the image column of the data (default: detected)")
    merge.add_argument("--label-column", help="the label column of the data (default: detected)")
    merge.add_argument("--dtype", help="output dtype: float32, float16 or bfloat16 (default: the sources')")
    merge.add_argument("--output-format", metavar="FORMAT",
                       help="write the merge as another architecture of its family, the base's: clip (CLIP "
                            "towers as a CLIPModel with the --base's text tower, for zero-shot pipelines)")
    merge.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    merge.add_argument("--allow-pickle", action="store_true",
                       help="accept *.bin/*.pt sources, read with torch.load(weights_only=True)")
    add_output_options(merge)

    run = sub.add_parser("run", help="run a YAML recipe")
    run.add_argument("recipe", metavar="RECIPE.yaml")
    add_output_options(run)

    inspect = sub.add_parser("inspect", help="show a model's family, task, layers, head and labels")
    inspect.add_argument("source", metavar="SOURCE")
    inspect.add_argument("--allow-pickle", action="store_true")

    space = sub.add_parser("space", help="write a Gradio demo Space for a merged model and push it")
    space.add_argument("model", metavar="MODEL", help="the merged model: org/name[@revision] (a folder with --output)")
    space.add_argument("--space-id", help="the Space to create or update (default: MODEL-demo)")
    space.add_argument("--sources", nargs="+", metavar="SOURCE",
                       help="models to show beside it (default: the sources in its hfmerge.yaml)")
    space.add_argument("--no-sources", action="store_true", help="show the merged model alone")
    space.add_argument("--examples", nargs="+", metavar="IMAGE", help="example images (default: a few of the model's evaluation data, else of its merge data, else none)")
    space.add_argument("--labels", nargs="+", metavar="LABEL",
                       help="a zero-shot (CLIP) model's first labels in the Space (default: the class names of its "
                            "evaluation data, at most 20, else cat, dog, bird)")
    space.add_argument("--title", help="the Space's title (default: '<model name> demo')")
    space.add_argument("--private", action="store_true", help="create the Space as private")
    space.add_argument("--output", "-o", help="write the Space folder here; without --space-id nothing is pushed")
    space.add_argument("--overwrite", action="store_true",
                       help="replace an earlier Space written by hfmerge in the output folder "
                            "(refused, naming them, where it holds files hfmerge did not write)")

    evaluate = sub.add_parser("evaluate", help="evaluate a merged model (and its sources, the ensemble) on datasets")
    evaluate.add_argument("model", metavar="MODEL", help="a merged model: a folder, or org/name[@revision]")
    evaluate.add_argument("--data", action="append", required=True, metavar="DATASET",
                          help="a labeled dataset per task: org/name[@revision][:split] or a folder")
    evaluate.add_argument("--compare", nargs="+", metavar="SOURCE",
                          help="models to evaluate beside it (default with --ensemble: the sources in its hfmerge.yaml)")
    evaluate.add_argument("--ensemble", action="store_true",
                          help="also evaluate the ensemble of the compared models (averaged softmax)")
    evaluate.add_argument("--metric", help="an extra metric: a Hugging Face `evaluate` module name "
                          "(pip install 'hfmerge[eval]') or a local module file")
    evaluate.add_argument("--base", metavar="CLIP",
                          help="for CLIP image encoders: the pre-trained CLIPModel whose text tower scores them by "
                               "zero-shot classification over each dataset's class names")
    evaluate.add_argument("--prompt", action="append", metavar="TEMPLATE",
                          help="a zero-shot prompt template with {} for the class name, e.g. 'a satellite photo of "
                               "{}.' (repeatable; default: CLIP's 'a photo of a {}.' and six plain variations)")
    evaluate.add_argument("--samples", type=int, help="evaluate on at most this many images per dataset")
    evaluate.add_argument("--batch-size", type=int, default=32, help="images per batch (default 32)")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the sample selection with --samples")
    evaluate.add_argument("--data-column", help="the image column (default: detected)")
    evaluate.add_argument("--label-column", help="the label column (default: detected)")
    evaluate.add_argument("--json", metavar="FILE", help="write the results as JSON to FILE")
    evaluate.add_argument("--update-card", action="store_true",
                          help="replace the evaluation in the model's card (table, model-index, chart) with these results")
    evaluate.add_argument("--push", action="store_true", help="with --update-card on a Hub model: push the card")
    evaluate.add_argument("--quiet", "-q", action="store_true", help="no progress bar")

    sub.add_parser("methods", help="list the merge methods (plug-ins' included) and their parameters")
    return parser


def _recipe_from_merge_args(args: argparse.Namespace) -> Any:
    from hfmerge.recipe import Recipe

    params: dict[str, Any] = {}
    for item in args.param:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"--param {item!r} is not KEY=VALUE; write e.g. --param start_layer=3")
        params[key.strip()] = value.strip()
    if args.lambda_ is not None:
        params["lambda"] = args.lambda_
    weights = None
    if args.weights:
        weights = []
        for part in args.weights.split(","):
            try:
                weights.append(float(part))
            except ValueError:
                raise RecipeError(f"--weights {args.weights!r}: {part!r} is not a number; write e.g. 0.5,0.5") from None
    return Recipe(
        sources=list(args.sources), method=args.method, parameters=params, weights=weights,
        anchor=args.anchor, base=args.base, dtype=args.dtype, allow_pickle=args.allow_pickle,
        max_shard_size=args.max_shard_size, heads=args.heads, seed=args.seed, data=args.data,
        eval_data=args.eval_data, prompts=args.prompt, data_column=args.data_column, label_column=args.label_column,
        output_format=args.output_format,
    )


def _execute(recipe: Any, args: argparse.Namespace) -> int:
    from dataclasses import replace

    _quiet_transformers()

    from hfmerge.run.pipeline import plan_merge, run_recipe

    recipe = replace(recipe, output=args.output or recipe.output, push_to_hub=args.push_to_hub or recipe.push_to_hub,
                     private=args.private or recipe.private)
    if args.dry_run:
        print(plan_merge(recipe, metadata_only=True).describe())
        return 0
    if not recipe.output and not recipe.push_to_hub:
        raise RecipeError("say where the result goes: --output DIR and/or --push-to-hub REPO_ID")
    result = run_recipe(recipe, overwrite=args.overwrite, progress=not args.quiet)
    if result is None:  # a process of `accelerate launch` other than the main one: the main one wrote
        return 0
    if result.saved_to:
        print(f"saved: {result.saved_to}")
    if result.commit_url:
        print(f"pushed: {result.commit_url}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    _quiet_transformers()
    from hfmerge.adapters import inspect_source
    from hfmerge.adapters.base import ZERO_SHOT_LABELS
    from hfmerge.hub.resolve import resolve_source

    source = resolve_source(args.source, allow_pickle=args.allow_pickle)
    layout = inspect_source(source, allow_pickle=args.allow_pickle)
    pin = f" @ {source.commit_sha}" if source.commit_sha else ""
    print(f"source: {source.name}{pin}")
    print(f"family: {layout.family.name}")
    print(f"architecture: {layout.architecture}")
    print(f"task: {layout.task}")
    print(f"parameters: {layout.num_parameters:,} in {len(layout.tensors)} tensors")
    print(f"license: {source.license or 'unknown'}")
    print(f"layers ({len(layout.layers)}, in the order a forward pass runs them):")
    counts: dict[str, int] = {}
    for info in layout.tensors.values():
        counts[info.module] = counts.get(info.module, 0) + 1
    for j, module in enumerate(layout.layers, start=1):
        print(f"  {j:4d}  {module}  ({counts[module]} tensors)")
    others = [m for m in layout.modules if m not in set(layout.layers)]
    if others:
        print(f"not layers ({len(others)}: their output does not reach the model's output; layerwise keeps the anchor's):")
        for module in others:
            print(f"     -  {module}  ({counts[module]} tensors)")
    print("head:")
    for info in layout.head_tensors:
        print(f"  {info.name}  {list(info.shape)}  (file: {info.key})")
    if not layout.head_tensors:
        print("  (none)")
    text_tower = layout.family.zero_shot
    if text_tower is not None:  # its config's id2label is transformers' default, not labels
        whose = ("its own" if layout.architecture == text_tower
                 else f"a {text_tower}'s, given to hfmerge evaluate as --base")
        print(f"labels: none; {ZERO_SHOT_LABELS} ({whose})")
        return 0
    labels = layout.id2label
    print(f"labels ({len(labels)}):")
    for i, label in labels.items():
        print(f"  {i}: {label}")
    return 0


def _space(args: argparse.Namespace) -> int:
    _quiet_transformers()
    from hfmerge.publish.space import SpaceOptions, check_space_push, push_space, save_space

    if args.no_sources and args.sources:
        raise RecipeError("--sources and --no-sources contradict each other; give one")
    options = SpaceOptions(
        model=args.model, space_id=args.space_id, sources=[] if args.no_sources else args.sources,
        examples=args.examples, title=args.title, private=args.private, labels=args.labels,
    )
    folder = None
    if args.output and args.space_id:
        check_space_push(options)  # before the folder is written
    if args.output:
        folder = save_space(options, args.output, overwrite=args.overwrite)
        print(f"written: {folder}")
        if not args.space_id:
            return 0
    space_id, url = push_space(options, folder=folder)
    print(f"pushed: {url}")
    from huggingface_hub import constants

    print(f"space: {constants.ENDPOINT}/spaces/{space_id}")
    return 0


def _methods() -> int:
    from hfmerge.methods import available_methods, get_method
    from hfmerge.plugins import METHODS_GROUP, origin

    for name in available_methods():
        method = get_method(name)
        print(f"{name}: {method.title}")
        print(f"    {method.reference}" + (f" — {method.reference_url}" if method.reference_url else ""))
        plugin = origin(METHODS_GROUP, name)
        if plugin:
            print(f"    plug-in: {plugin}")
        try:
            data = method.data_needs()
        except Exception as exc:  # noqa: BLE001 - a plug-in's bug: say so, and list the others
            print(f"    (what it needs cannot be read: {type(exc).__name__}: {exc})")
            continue
        needs = [w for w, flag in (("--data", data.required), ("--base", method.needs_base),
                                    ("--anchor", method.uses_anchor), ("--weights", method.uses_weights),
                                    ("--seed", method.uses_seed or data.required)) if flag]
        if data.optional:
            needs.append(f"--data ({data.when})")
        if needs:
            print(f"    takes: {', '.join(needs)}")
        for p in method.parameters:
            grid = f" [auto with --eval-data: chosen from {', '.join(f'{v:g}' for v in p.grid)}]" if p.grid else ""
            print(f"    --param {p.name}={p.default!r}  {p.help}{grid}")
    return 0


def _quiet_transformers() -> None:
    """Silence transformers' own warnings; imported here, when a command needs models, so that
    ``--help``, ``methods`` and usage errors load neither torch nor transformers."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" of models hfmerge opens itself: noise


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is when a record comes, not what it was when the handler was made."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - logging's own contract: report, never raise
            self.handleError(record)


class _CliFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        if record.levelno == logging.INFO:
            return f"hfmerge: {record.getMessage()}"
        return f"hfmerge: {record.levelname.lower()}: {record.getMessage()}"


def _log_to_stderr(quiet: bool = False) -> None:
    """The library's warnings reach the user as ``hfmerge: warning: …`` lines on stderr, once each.

    Without ``quiet``, a command also logs one line per stage with its time;
    with it, only warnings, and no progress bar (huggingface_hub's and datasets' included).
    """
    handler = _StderrHandler()
    handler.setFormatter(_CliFormatter())
    logger = logging.getLogger("hfmerge")
    logger.handlers = [handler]
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False
    if quiet:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
        if "datasets" in sys.modules:
            sys.modules["datasets"].disable_progress_bars()
        else:
            os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"  # read when datasets is imported


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``hfmerge`` and ``python -m hfmerge``.

    A reader that goes away (``hfmerge methods | head -1``) ends the command quietly with
    :data:`EXIT_READER_GONE`, as ``git log | head -1`` ends, rather than with a ``BrokenPipeError``
    traceback.
    """
    try:
        try:
            status = _run_command(argv)
        except SystemExit:  # argparse's --help, --version and usage errors: their text is still buffered
            sys.stdout.flush()
            raise
        sys.stdout.flush()  # the end of the output, here where a reader that went away can still be caught
        return status
    except BrokenPipeError:
        return _reader_gone()


def _reader_gone() -> int:
    """Send what is left of the output nowhere and return :data:`EXIT_READER_GONE`.

    Python flushes ``sys.stdout`` once more on its way out; pointed at the null device, that
    flush cannot fail again with a second traceback (the recipe in the documentation of Python's
    ``signal`` module, "Note on SIGPIPE").
    """
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, sys.stdout.fileno())
    os.close(null)
    return EXIT_READER_GONE


def _run_command(argv: list[str] | None) -> int:
    _log_to_stderr()
    parser = _build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "quiet", False):
        _log_to_stderr(quiet=True)
    try:
        if args.command == "merge":
            return _execute(_recipe_from_merge_args(args), args)
        if args.command == "run":
            from hfmerge.recipe import Recipe

            return _execute(Recipe.from_yaml(args.recipe), args)
        if args.command == "inspect":
            return _inspect(args)
        if args.command == "space":
            return _space(args)
        if args.command == "evaluate":
            _quiet_transformers()
            from hfmerge.cli.evaluate import run_evaluate_command

            return run_evaluate_command(args)
        return _methods()
    except HfMergeError as exc:
        print(f"hfmerge: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:
        from hfmerge.hub.connection import TRANSPORT_ERRORS, hub_unreachable

        if not isinstance(exc, TRANSPORT_ERRORS):
            raise
        print(f"hfmerge: error: {hub_unreachable(exc)}", file=sys.stderr)  # a Hub call the library did not wrap
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("hfmerge: interrupted; nothing was written", file=sys.stderr)
        return 130
