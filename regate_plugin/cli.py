"""The `regate` command. Each command builds its options only when it runs (or asks for its help), so `regate --help`
imports neither torch nor transformers; the demo and precompute options are generated from `DemoConfig` and
`PrecomputeConfig` (`cli_options`)."""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .cli_options import Parser, add_config_options, config_from_args

if TYPE_CHECKING:
    from .eval.base import ModelRunner, PredictionFile


def _demo(args: argparse.Namespace) -> int:
    import torch

    from .demo import DemoConfig, run_demo
    from .demo.report import clock_line, format_results, plot_curves, takeaways

    torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="regate-demo-"))
    cfg = config_from_args(DemoConfig, args)
    results = run_demo(out, cfg)
    print()
    print(format_results(results, cfg.task))
    print("\n" + "\n".join(takeaways(results, cfg.task)))
    print(f"\n{clock_line(results)}")
    print(f"\ndata (train.json, test.json, the test split in its benchmark's layout): {out / 'data'}")
    print(f"reference cache: {out / 'reference_cache'}")
    print(f"checkpoints: {out / 'checkpoints'}")
    print(f"accuracy against answer tokens: {plot_curves(results, out / 'accuracy_vs_tokens.png', cfg.task)}")
    return 0


def _zoo_list(args: argparse.Namespace) -> int:
    from .model_zoo import format_table

    print(format_table())
    return 0


def _zoo_show(args: argparse.Namespace) -> int:
    from .model_zoo import get_entry

    entry = get_entry(args.name)
    print(entry.card.read_text())
    print(f"entry: {entry.card.with_suffix('.json')}")
    return 0


def _zoo_load(args: argparse.Namespace) -> int:
    from .model_zoo import load

    loaded = load(args.name, model_base=args.model_base)
    print(loaded.summary())
    if loaded.entry is not None and loaded.entry.files:
        print(f"{len(loaded.entry.files)} shipped files match their sha256")
    return 0


def _precompute(args: argparse.Namespace) -> int:
    from .core import distributed
    from .data import DataError
    from .data.anyres import AnyresLayout
    from .data.hf_visual import hf_video_rows, hf_visual_rows
    from .data.visual import visual_rows_from_path
    from .reference.precompute import PrecomputeConfig, run_precompute

    visual_tokens, anyres, processor_rows, video_rows = args.visual_tokens, None, None, None
    if args.student:
        from .model_zoo import get_entry, reference_for

        entry = get_entry(args.student)
        args.reference = args.reference or reference_for(entry)
        args.template = args.template or entry.reference_template
        print(f"reference LLM and template from model_zoo entry {entry.name}: {args.reference}, {args.template}")
    if not args.reference or not args.template:
        raise DataError(
            "pass --reference and --template, or --student NAME (a model_zoo entry) to take them from its entry"
        )
    if args.student_config:
        if visual_tokens is not None:
            raise DataError("pass --visual-tokens or --student-config (which reads them off the student), not both")
        processor_rows = hf_visual_rows(args.student_config) if Path(args.student_config).is_dir() else None
        rows = processor_rows or visual_rows_from_path(args.student_config)
        if processor_rows is not None:
            print(f"visual rows per image, from {args.student_config}: from each image's size, as its processor counts")
        elif isinstance(rows, AnyresLayout):
            anyres = rows
            print(f"visual rows per image, from {args.student_config}: from each image's size ({rows.merge} merge)")
        else:
            visual_tokens = rows
            print(f"visual rows per placeholder, from {args.student_config}: {visual_tokens}")
    if args.video_token_id is not None:  # an HF-native video student: its rows per video, from its directory
        video_rows = hf_video_rows(args.student_config, args.num_frames) if args.student_config else None
        if video_rows is None:
            raise DataError(
                "--video-token-id needs --student-config DIR, the directory of an HF-native LLaVA-NeXT-Video student "
                "(its config.json, processor_config.json and video_preprocessor_config.json)"
            )
        print(f"visual rows per video, from {args.student_config}: {args.num_frames} frames, from each video's size")
    summary = run_precompute(
        config_from_args(
            PrecomputeConfig,
            args,
            visual_tokens=visual_tokens,
            anyres=anyres,
            processor_rows=processor_rows,
            video_rows=video_rows,
        )
    )
    if distributed.rank() == 0:
        print(summary.format())
        for problem in summary.bad[:20]:
            print(f"skipped: {problem}")
        print(f"reference cache: {args.out}")
    return 0


def _cache_verify(args: argparse.Namespace) -> int:
    from .store import read_manifest, verify_cache

    manifest = read_manifest(args.cache)
    problems = verify_cache(args.cache, manifest)
    for problem in problems:
        print(f"BAD  {problem}")
    if problems:
        print(
            f"{args.cache}: {len(problems)} of {len(manifest.shards)} shards bad; `regate precompute --resume` sets "
            "them aside and scores their samples again"
        )
    elif not manifest.shards:
        print(
            f"{args.cache}: holds no samples (no shard committed: the precompute stopped before its first shard or "
            "has not merged its parts); run the precompute again, with --resume to keep what its parts hold"
        )
    else:
        print(f"{args.cache}: {len(manifest.shards)} shards, {manifest.samples} samples, all hashes match")
    return 1 if problems or not manifest.shards else 0


def _cache_stats(args: argparse.Namespace) -> int:
    from .reference.report import cache_stats, format_stats, plot_histogram
    from .store import ReferenceLossCache

    cache = ReferenceLossCache(args.cache)
    print(format_stats(cache_stats(cache)))
    plot = Path(args.plot or "reference_losses.png")
    try:
        print(f"histogram: {plot_histogram(cache, plot)}")
    except ImportError:
        print('warning: no histogram: it needs matplotlib (pip install "regate-plugin[plots]")', file=sys.stderr)
    except OSError as err:
        print(f"warning: no histogram: cannot write {plot} ({err}); choose another path with --plot", file=sys.stderr)
    return 0


def _write_json(out: Path | None, **files: object) -> None:
    import json

    if out is None:
        return
    from .core.files import write_bytes_atomically
    from .eval import BenchmarkError

    for name, content in files.items():
        try:
            write_bytes_atomically(out / f"{name}.json", json.dumps(content, indent=2).encode())
        except OSError as err:
            raise BenchmarkError(f"cannot write {out / f'{name}.json'}: {err.strerror or err}") from None
    print(f"metrics: {out / 'metrics.json'}")


def _check_data(args: argparse.Namespace) -> int:
    """--check-data: the paths --data-root lacks (exit 1), or that it is complete (exit 0)."""
    from .eval.base import missing_report
    from .eval.mvbench import missing_paths

    mvbench = args.eval_command == "mvbench"
    missing = missing_paths(args.data_root, args.tasks) if mvbench else _benchmark(args).missing_data()
    print(missing_report(args.eval_command, Path(args.data_root), missing))
    return 1 if missing else 0


def _runner_and_run(
    args: argparse.Namespace, settings: dict[str, Any], answers: Path, read: Callable[[Path], PredictionFile]
) -> tuple[ModelRunner, dict[str, Any]]:
    """The model runner, and the run description its answers carry (eval/provenance.py). The answer file is
    checked to be this run's before the model loads (after, for a hub id not yet in the local cache)."""
    from .eval.provenance import model_fingerprint, resumable, run_description
    from .eval.runners import load_located, locate_model

    model, entry = locate_model(args.model)
    settings = {"runner": args.runner, "dtype": args.dtype, "model_base": args.model_base, **settings}
    if args.runner == "llava":
        settings["conv_mode"] = args.conv_mode
    chat_template = Path(args.chat_template).read_text() if args.chat_template else None
    if chat_template is not None:
        settings["chat_template_sha256"] = hashlib.sha256(chat_template.encode()).hexdigest()
    weights = model_fingerprint(model)
    if weights is not None and not args.overwrite:
        resumable(answers, read, run_description(args.model, weights, settings), overwrite=False)
    runner = load_located(
        args.runner, model, entry, args.model_base, args.conv_mode, args.device, args.dtype, chat_template
    )
    return runner, run_description(args.model, weights or model_fingerprint(model) or model, settings)


def _eval_mvbench(args: argparse.Namespace) -> int:
    from .eval import aggregate, get_protocol, load_mvbench, predict, read_predictions
    from .eval.mvbench import by_uid, questions_per_task
    from .eval.provenance import default_out

    if args.check_data:
        return _check_data(args)
    data = load_mvbench(args.data_root, args.tasks, args.allow_missing)
    if args.limit:
        data.questions = [q for q in data.questions if q.index < args.limit]
    out = Path(args.out) if args.out else default_out(args.model, "mvbench")
    predictions = out / f"predictions-{args.protocol}.jsonl"
    num_frames = get_protocol(args.protocol, args.num_frames).num_frames
    settings = {"protocol": args.protocol, "num_frames": num_frames}
    runner, run = _runner_and_run(args, settings, predictions, read_predictions)
    protocol = get_protocol(args.protocol, num_frames, getattr(runner.model.config, "model_type", ""))
    for _ in predict(data, protocol, runner, predictions, not args.no_progress, args.batch_size, run, args.overwrite):
        pass
    wanted = {q.uid for q in data.questions}
    written = read_predictions(predictions)
    records = [r for uid, r in by_uid(written).items() if uid in wanted]
    result = aggregate(records, data.missing, questions_per_task(data.questions), written.unreadable)
    print(result.table())
    _write_json(out, metrics=result.to_dict(), upload_leaderboard=result.leaderboard())
    return 0


def _eval_score_mvbench(args: argparse.Namespace) -> int:
    from .eval import aggregate, get_protocol, load_mvbench, load_prediction_file
    from .eval.mvbench import questions_per_task

    data = load_mvbench(args.data_root, allow_missing=True) if args.data_root else None
    protocol = get_protocol(args.protocol) if data is not None else None
    predictions = load_prediction_file(Path(args.pred), protocol, data)
    result = aggregate(
        predictions.records,
        data.missing if data else None,
        questions_per_task(data.questions) if data else None,
        predictions.unreadable,
    )
    print(result.table())
    if predictions.unreadable and data is None:
        print("pass --data-root to count the questions of the unreadable lines as unanswered")
    _write_json(Path(args.out) if args.out else None, metrics=result.to_dict(), upload_leaderboard=result.leaderboard())
    return 0


def _benchmark(args: argparse.Namespace):
    from .eval.image import get_benchmark

    options = {dest: getattr(args, dest) for dest in args.benchmark_options}
    return get_benchmark(args.benchmark, args.data_root, **options)


def _eval_image(args: argparse.Namespace) -> int:
    from .eval.image import predict, read_answers, score_answers
    from .eval.provenance import default_out

    if args.check_data:
        return _check_data(args)
    benchmark = _benchmark(args)
    questions = benchmark.load()
    if args.limit:
        questions = questions[: args.limit]
    out = Path(args.out) if args.out else default_out(args.model, benchmark.name)
    answers = out / "answers.jsonl"
    print(f"{benchmark.title}: {len(questions)} questions from {benchmark.root}")
    runner, run = _runner_and_run(args, benchmark.settings(), answers, lambda path: read_answers(path, missing_ok=True))
    for _ in predict(
        benchmark,
        questions,
        runner,
        answers,
        Path(args.model).name,
        args.batch_size,
        not args.no_progress,
        run,
        args.overwrite,
    ):
        pass
    score = score_answers(benchmark, questions, read_answers(answers), asked_only=True)
    print(score.table())
    _write_json(out, metrics=score.to_dict())
    return 0


def _eval_score_image(args: argparse.Namespace) -> int:
    from .eval.image import read_answers, score_answers

    benchmark = _benchmark(args)
    score = score_answers(benchmark, benchmark.load(), read_answers(Path(args.pred)))
    print(score.table())
    _write_json(Path(args.out) if args.out else None, metrics=score.to_dict())
    return 0


def _patch_apply(args: argparse.Namespace) -> int:
    from .patching import apply_patch

    print(apply_patch(args.codebase, args.repo))
    return 0


def _at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer no smaller than `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _runner_options(parser: argparse.ArgumentParser) -> None:
    from .core.dtypes import DTYPE_NAMES
    from .eval.runners import RUNNERS

    model_or_check = parser.add_mutually_exclusive_group(required=True)
    model_or_check.add_argument(
        "--model",
        help="checkpoint: HF-native directory or hub id (--runner hf), "
        "or an upstream LLaVA checkpoint (--runner llava)",
    )
    model_or_check.add_argument(
        "--check-data", action="store_true", help="list what --data-root lacks (exit 1) instead of running a model"
    )
    parser.add_argument(
        "--runner",
        choices=RUNNERS.names(),
        default="hf",
        help="hf: transformers (default); llava: haotian-liu/LLaVA's own loader, in its environment; others: "
        "registered under the regate_plugin.runners entry-point group",
    )
    parser.add_argument("--model-base", help="--runner llava: base LLM of a LoRA or projector-only checkpoint")
    parser.add_argument(
        "--conv-mode", default="vicuna_v1", help="--runner llava: conversation template (default: vicuna_v1)"
    )
    parser.add_argument(
        "--chat-template",
        help="--runner hf: a Jinja chat template file, for a processor that has none (or to replace its own)",
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument(
        "--dtype",
        choices=["auto", *DTYPE_NAMES],
        default="auto",
        help="model dtype (auto: the checkpoint's for --runner hf; float32 on cpu, float16 on cuda for --runner llava)",
    )
    parser.add_argument(
        "--batch-size",
        type=_at_least(1),
        default=1,
        help="requests per generate call (--runner hf batches with left padding)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="answer every question again into --out's answer file, whatever model or settings its answers came from "
        "(without it, a rerun adds only to a file of the same model and settings)",
    )
    parser.add_argument("--no-progress", action="store_true")


def _eval_options(evaluate: argparse.ArgumentParser) -> None:
    from .eval import BENCHMARKS
    from .eval.mvbench import PROTOCOLS

    eval_commands = evaluate.add_subparsers(dest="eval_command", required=True)
    score = eval_commands.add_parser("score", help="score an existing prediction file")
    score_commands = score.add_subparsers(dest="score_benchmark", required=True)

    mvbench = eval_commands.add_parser("mvbench", help="MVBench, official (VideoChat2) or VideoLLaMA2 protocol")
    _runner_options(mvbench)
    mvbench.add_argument("--data-root", required=True, help="MVBench root holding json/ and video/")
    mvbench.add_argument("--protocol", choices=PROTOCOLS.names(), default="official")
    mvbench.add_argument("--num-frames", type=_at_least(1), help="frames per video (official: 16, videollama2: 8)")
    mvbench.add_argument("--tasks", nargs="+", help="task names (default: all 20)")
    mvbench.add_argument("--allow-missing", action="store_true", help="score the tasks present (labelled N-task)")
    mvbench.add_argument(
        "--limit", type=_at_least(0), default=0, help="first N questions of each task (smoke runs; 0: all)"
    )
    mvbench.add_argument(
        "--out", help="predictions (resumable) and metrics.json (default: eval_out/<model name>/mvbench)"
    )
    mvbench.set_defaults(run=_eval_mvbench)
    score_mvbench = score_commands.add_parser(
        "mvbench", help="ours (re-parsed) or VideoLLaMA2's {vid, task_type, pred, gt}"
    )
    score_mvbench.add_argument("--pred", required=True)
    score_mvbench.add_argument("--data-root", help="re-parse raw outputs against this MVBench root")
    score_mvbench.add_argument("--protocol", choices=PROTOCOLS.names(), default="official")
    score_mvbench.add_argument("--out", help="write metrics.json and upload_leaderboard.json here")
    score_mvbench.set_defaults(run=_eval_score_mvbench)

    for name, benchmark in BENCHMARKS.items():
        run = eval_commands.add_parser(name, help=f"{benchmark.title}, LLaVA-1.5 prompt, official scoring")
        _runner_options(run)
        rescore = score_commands.add_parser(name, help=f"{benchmark.title}: a LLaVA answer file or ours")
        rescore.add_argument("--pred", required=True, help="answers jsonl ({question_id, prompt, text, ...} per line)")
        rescore.add_argument("--out", help="write metrics.json here")
        for parser in (run, rescore):
            parser.add_argument("--data-root", required=True, help=f"holds {benchmark.data_layout}")
            dests = [parser.add_argument(*names, **kwargs).dest for names, kwargs in benchmark.flags]
            parser.set_defaults(benchmark=name, benchmark_options=dests)
        run.add_argument("--limit", type=_at_least(0), default=0, help="first N questions (smoke runs; 0: all)")
        run.add_argument(
            "--out",
            help=f"answers.jsonl (resumable, LLaVA's format) and metrics.json (default: eval_out/<model name>/{name})",
        )
        run.set_defaults(run=_eval_image)
        rescore.set_defaults(run=_eval_score_image)


def _demo_options(demo: argparse.ArgumentParser) -> None:
    from .demo import DemoConfig

    add_config_options(demo, DemoConfig)
    demo.add_argument("--out", help="output directory (default: a new temporary directory)")
    demo.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default: 1; two were 1.4x faster on two idle cores but up to 10x slower beside other "
        "jobs)",
    )
    demo.set_defaults(run=_demo)


def _precompute_options(pre: argparse.ArgumentParser) -> None:
    from .core.dtypes import DTYPE_NAMES
    from .core.reference import REFERENCE_MODES
    from .data.templates import ALIASES, TEMPLATES
    from .data.visual import DEFAULT_FRAMES
    from .reference.precompute import PrecomputeConfig

    # What PrecomputeConfig's fields do not say themselves: --reference and --template may come from --student.
    add_config_options(
        pre,
        PrecomputeConfig,
        reference={"required": False},
        template={"required": False, "choices": sorted([*TEMPLATES, *ALIASES])},
        mode={"choices": REFERENCE_MODES},
        cache_dtype={"flag": "dtype", "choices": DTYPE_NAMES},
        model_dtype={"choices": ["auto", *DTYPE_NAMES]},
    )
    pre.add_argument(
        "--student",
        help="a model_zoo entry: its reference LLM and template are the defaults of --reference and --template",
    )
    pre.add_argument(
        "--student-config",
        help="read the visual rows off the student's config.json (LLaVA-NeXT anyres: counted per image from its size); "
        "instead of --visual-tokens",
    )
    pre.add_argument(
        "--num-frames",
        type=_at_least(1),
        default=DEFAULT_FRAMES,
        help="frames sampled per video, as the training dataset samples them (LlavaHFDataset's num_frames; "
        f"HF-native video students, with --video-token-id; default: {DEFAULT_FRAMES})",
    )
    pre.set_defaults(run=_precompute)


def _zoo_options(zoo: argparse.ArgumentParser) -> None:
    zoo_commands = zoo.add_subparsers(dest="zoo_command", required=True)
    zoo_commands.add_parser("list", help="every entry, as a table, and the checkpoint formats").set_defaults(
        run=_zoo_list
    )
    show = zoo_commands.add_parser("show", help="an entry's model card")
    show.add_argument("name")
    show.set_defaults(run=_zoo_show)
    zoo_load = zoo_commands.add_parser("load", help="load an entry or a local checkpoint directory and summarise it")
    zoo_load.add_argument("name", help="entry name or checkpoint directory")
    zoo_load.add_argument("--model-base", help="for LoRA / projector-only LLaVA checkpoints")
    zoo_load.set_defaults(run=_zoo_load)


def _cache_options(cache: argparse.ArgumentParser) -> None:
    cache_commands = cache.add_subparsers(dest="cache_command", required=True)
    verify = cache_commands.add_parser("verify", help="re-hash and parse every shard against the manifest")
    verify.add_argument("cache")
    verify.set_defaults(run=_cache_verify)
    stats = cache_commands.add_parser("stats", help="loss distribution and a histogram PNG")
    stats.add_argument("cache")
    stats.add_argument(
        "--plot", help="histogram PNG path (default: reference_losses.png in the current directory, never the cache)"
    )
    stats.set_defaults(run=_cache_stats)


def _patch_options(patch: argparse.ArgumentParser) -> None:
    from .patching import PATCHES

    patch_commands = patch.add_subparsers(dest="patch_command", required=True)
    apply = patch_commands.add_parser("apply", help="apply patches/<codebase>-<commit>.diff to a checkout")
    apply.add_argument("codebase", choices=sorted(PATCHES))
    apply.add_argument("--repo", required=True, help="root of the upstream checkout")
    apply.set_defaults(run=_patch_apply)


@dataclass(frozen=True)
class Command:
    help: str
    options: Callable[[argparse.ArgumentParser], None]
    """Adds the command's options and subcommands (importing what they need)."""


COMMANDS: dict[str, Command] = {
    "demo": Command("train a tiny LLaVA with none / regate / random elision, offline", _demo_options),
    "precompute": Command("score a training set with the reference LLM into a cache", _precompute_options),
    "zoo": Command("the checkpoint registry (model_zoo)", _zoo_options),
    "cache": Command("inspect a reference cache", _cache_options),
    "eval": Command("run a model on a benchmark and score it, or score a prediction file", _eval_options),
    "patch": Command("add --token_elision to an upstream train.py (pinned commit)", _patch_options),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `regate` parser, with the options of `command` only (None: of every command; any other name: of none,
    which is all `regate --help` needs)."""
    parser = Parser(prog="regate", description="ReGATE token elision for multimodal-LLM training")
    parser.add_argument("--version", action="version", version=f"regate-plugin {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, spec in COMMANDS.items():
        sub = commands.add_parser(name, help=spec.help, description=spec.help)
        if command is None or command == name:
            spec.options(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((arg for arg in argv if not arg.startswith("-")), "")
    args = build_parser(command).parse_args(argv)
    from .core.errors import UserError

    try:
        return int(args.run(args))
    except (UserError, FileNotFoundError) as err:
        # The plugin's own errors for bad input, and a file the user named that does not exist (its message names
        # it), are one line (exit 2). Anything else is a bug and keeps its traceback.
        print(f"regate {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
