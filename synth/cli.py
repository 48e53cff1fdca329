"""``synth``: the TextBind data synthesis pipeline, one subcommand per stage."""

from __future__ import annotations

import json
import sys
from pathlib import Path



def validate(paths: list[Path], format: str = "auto", max_errors: int = 20) -> int:
    """Check conversation files against the schema and list every rejected record.

    Args:
        paths: JSON or JSONL files in the TextBind or LLaVA format.
        format: auto, textbind or llava.
        max_errors: how many rejections to print in full (all are counted).
    """
    from synth.data.conversation_io import read_conversations

    _, report = read_conversations(paths, on_error="skip", format=format)
    for error in report.rejected[:max_errors]:
        print(f"[{error.rule}] {error}")
    if len(report.rejected) > max_errors:
        print(f"... and {len(report.rejected) - max_errors} more")
    print(report.summary())
    return 1 if report.rejected else 0


def describe(paths: list[Path], format: str = "auto") -> int:
    """Print the paper's Table 3 statistics and section 4.3 diversity for conversation files.

    Args:
        paths: JSON or JSONL files in the TextBind or LLaVA format; bad records are skipped and counted.
        format: auto, textbind or llava.
    """
    from synth.data.conversation_io import read_conversations
    from synth.statistics.stats import describe as describe_conversations

    conversations, report = read_conversations(paths, on_error="skip", format=format)
    print(report.summary())
    if not conversations:
        return 1
    print(describe_conversations(conversations), end="")
    return 0


def convert_dataset(paths: list[Path], out: Path, format: str, image_dir: str | None = None,
                    max_errors: int = 20, to: str = "textbind") -> int:
    """Convert a dataset between formats: a source's published format (``synth.data.sources``), TextBind,
    LLaVA, ShareGPT or OpenAI chat in; TextBind, ShareGPT or OpenAI chat JSONL out.

    Args:
        paths: the source files (e.g. Open-Platypus JSON/parquet, MiniGPT-4's filter_cap.json).
        out: the JSONL to write.
        format: the input's format (auto: by each record's fields).
        image_dir: recorded as every record's ``image_dir`` (relative to where training resolves images).
        max_errors: how many rejections to print in full (all are counted).
        to: the output format.
    """
    from synth.data.chat_formats import materialize_inline_images
    from synth.data.schema import Location, SchemaError
    from synth.data.conversation_io import read_conversations, write_conversations

    if out.is_dir():
        print(f"synth convert-dataset: --out {out} is a folder; name the JSONL file to write", file=sys.stderr)
        return 2
    if out.resolve() in {path.resolve() for path in paths}:
        print(f"synth convert-dataset: --out {out} is one of the inputs; the inputs are never written",
              file=sys.stderr)
        return 2
    conversations, rejected, summaries, unreadable = [], [], [], []
    for path in paths:  # one file that cannot be read costs only itself
        try:
            read, report = read_conversations(path, on_error="skip", format=format, inline_images=True)
        except (OSError, ImportError, ValueError) as error:
            unreadable.append(f"{path}: {error}")
            continue
        for conversation in read:  # data: URL images become files beside the output, named by content
            if conversation.extra.get("_inline_images"):
                try:
                    materialize_inline_images(conversation, out.parent / f"{out.stem}_images", f"{out.stem}_images")
                except SchemaError as error:
                    report.rejected.append(error.at(Location(str(path), 0, conversation.id)))
                    report.read -= 1
                    continue
            conversations.append(conversation)
        rejected += report.rejected
        summaries.append(report.summary())
    for conversation in conversations:
        if image_dir is not None and conversation.image_dir != f"{out.stem}_images":
            conversation.image_dir = image_dir
    for error in rejected[:max_errors]:
        print(f"[{error.rule}] {error}")
    for problem in unreadable:
        print(f"[unreadable_file] {problem}", file=sys.stderr)
    written = write_conversations(out, conversations, to)
    print(f"{'; '.join(summaries) or 'nothing read'}; {len(unreadable)} file(s) unreadable; {written} written to {out}")
    return 0 if written else 1


def download_images_command(paths: list[Path], image_root: Path, complete: Path | None, workers: int,
                            timeout: float, attempts: int, size: int, failures: Path | None,
                            deadline: float = 60.0, allow_private_addresses: bool = False,
                            pixel_budget: int | None = None) -> int:
    """Download the images of released TextBind conversations (their url_list), resized and padded as the release."""
    from synth.data.conversation_io import read_conversations, write_conversations
    from synth.data.download import DEFAULT_PIXEL_BUDGET, download_images

    failures = failures or image_root / "download_failures.jsonl"
    inputs = {path.resolve() for path in paths}
    for flag, output in (("--failures", failures), ("--complete", complete)):
        if output is not None and output.resolve() in inputs:
            print(f"synth download-images: {flag} {output} is one of the input files; choose another path "
                  "(the inputs are never written)", file=sys.stderr)
            return 2
    conversations, read = read_conversations(paths, on_error="skip")
    print(read.summary())
    report, kept = download_images(conversations, image_root, failures, size=size, workers=workers, timeout=timeout,
                                   attempts=attempts, deadline=deadline,
                                   allow_private_addresses=allow_private_addresses,
                                   pixel_budget=pixel_budget or DEFAULT_PIXEL_BUDGET)
    print(json.dumps(report.as_dict()) + f"; failures: {failures}")
    if complete is not None:
        write_conversations(complete, kept)
        print(f"{len(kept)} conversation(s) with every image written to {complete}")
    return 0 if kept or not conversations else 1


def build_parser():
    import argparse

    from synth.data.conversation_io import FORMATS, WRITERS

    parser = argparse.ArgumentParser(prog="synth", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for function in (validate, describe):
        summary, _, _ = (function.__doc__ or "").partition("\n")
        command = commands.add_parser(function.__name__, help=summary, description=summary)
        command.add_argument("paths", nargs="+", type=Path, help="JSON or JSONL conversation files")
        command.add_argument("--format", choices=FORMATS, default="auto")
        if function is validate:
            command.add_argument("--max-errors", type=int, default=20, help="rejections printed in full")
    from synth.pipeline import STAGES

    stage_help = {"ingest": "read image-caption pairs from folders, tables and webdataset shards",
                  "score": "CLIP match score and image embedding per pair (torchrun for several GPUs)",
                  "cluster": "FAISS k-means over the kept embeddings",
                  "sample": "topic-aware image groups to generate conversations from",
                  "generate": "one LLM conversation per image group (OpenAI-compatible endpoint or offline)",
                  "filter": "parse generations into the conversation schema; reject with reasons",
                  "stats": "Table 3, diversity, image positions, indicators; JSON and PNG plots",
                  "run": "every stage in order, skipping finished ones"}
    for stage in (*STAGES, "run"):
        command = commands.add_parser(stage, help=stage_help[stage], description=stage_help[stage])
        command.add_argument("--config", type=Path, required=True, help="run config YAML (configs/synth/*.yaml)")
        command.add_argument("--force", action="store_true", help="redo the stage(s) even if finished")
        command.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                             help="config overrides, e.g. cluster.k=64 work_dir=runs/x")
        if stage == "run":
            command.add_argument("--until", choices=STAGES, default=STAGES[-1], help="last stage to run")
    command = commands.add_parser("convert-dataset", help="a dataset in its own format (Platypus, MiniGPT-4, "
                                  "Shikra, MultiInstruct, LLaVA, ShareGPT, OpenAI chat) -> TextBind, ShareGPT or "
                                  "OpenAI chat JSONL")
    command.add_argument("paths", nargs="+", type=Path, help="the source's files")
    command.add_argument("--out", type=Path, required=True, help="the JSONL to write")
    command.add_argument("--format", choices=list(FORMATS), required=True, help="the input's format")
    command.add_argument("--to", choices=list(WRITERS), default="textbind", help="the output's format")
    command.add_argument("--image-dir", default=None, help="image_dir to record in every conversation")
    command = commands.add_parser("download-images", help="fetch the images of released TextBind conversations "
                                  "(url_list), resized and padded to 512 px white as the release did")
    command.add_argument("paths", nargs="+", type=Path, help="TextBind-format conversation files with url_list")
    command.add_argument("--image-root", type=Path, required=True, help="where image_dir resolves (images go there)")
    command.add_argument("--complete", type=Path, default=None,
                         help="write the conversations whose images all arrived here (JSONL)")
    command.add_argument("--workers", type=int, default=16)
    command.add_argument("--timeout", type=float, default=20.0, help="seconds for each connect and each read")
    command.add_argument("--deadline", type=float, default=60.0,
                         help="seconds for a whole request, redirects included (a slow trickle ends here)")
    command.add_argument("--allow-private-addresses", action="store_true",
                         help="let URLs and redirects reach loopback, private and link-local addresses "
                              "(a local mirror); refused by default")
    command.add_argument("--pixel-budget", type=int, default=None,
                         help="pixels all workers may hold decoded at once (default 200M, about 1.2 GB)")
    command.add_argument("--attempts", type=int, default=5, help="tries per URL (5 in the release)")
    command.add_argument("--size", type=int, default=512, help="square side after resize and pad (512 in the release)")
    command.add_argument("--failures", type=Path, default=None, help="default: IMAGE_ROOT/download_failures.jsonl")
    command = commands.add_parser("world", help="write world pictures (with their attributes) and conversations "
                                  "about them whose answers are stored (synth.world)")
    command.add_argument("--out", type=Path, required=True, help="folder for the pictures, scenes.jsonl and "
                         "conversations.jsonl")
    command.add_argument("--scenes", type=int, default=1000)
    command.add_argument("--conversations", type=int, default=1000)
    command.add_argument("--seed", type=int, default=0)
    command.add_argument("--split", choices=["train", "held_out"], default="train",
                         help="held_out: every picture holds a colour-shape pair no train picture has")
    command.add_argument("--mismatched", type=float, default=0.0, help="share of pairs with another's caption")
    command.add_argument("--image-size", type=int, default=64)
    command = commands.add_parser("annotate", help="label generated conversations; grow the seed set (section 3.3)")
    command.add_argument("--config", type=Path, required=True, help="run config YAML")
    command.add_argument("--limit", type=int, default=None, help="label at most this many now")
    command.add_argument("--all", action="store_true", help="include generations the filter rejected")
    command.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    command = commands.add_parser("review", help="an LLM judge labels the kept conversations (Table 2's quality "
                                  "and characteristics, section 4.4's errors); resumable, budgeted")
    command.add_argument("--config", type=Path, required=True, help="run config YAML (its review section)")
    command.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                         help="config overrides, e.g. review.model=gpt-4o review.keep=[Excellent,Satisfactory]")
    command = commands.add_parser("batch", help="generate through batch files: OpenAI's Batch API (half price) "
                                  "or vLLM's run_batch")
    command.add_argument("action", choices=["export", "import"], help="export the pending requests, or import "
                         "a results file")
    command.add_argument("file", type=Path, help="the requests file to write (export) or the results to read")
    command.add_argument("--config", type=Path, required=True, help="run config YAML")
    command.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    return parser


def run_batch(action: str, file: Path, config_path: Path, overrides: list[str]) -> int:
    from synth.config import load_config
    from synth.generation.batch_files import export_batch, import_batch

    config = load_config(config_path, overrides)
    try:
        return export_batch(config, file) if action == "export" else import_batch(config, file)
    except (FileExistsError, FileNotFoundError) as error:
        print(f"synth batch {action}: {error}", file=sys.stderr)
        return 2


def run_review_command(config_path: Path, overrides: list[str]) -> int:
    from synth.config import load_config
    from synth.generation.generate import GenerationAborted
    from synth.pipeline import StageIncomplete, run_review

    try:
        run_review(load_config(config_path, overrides))
    except StageIncomplete as error:
        print(f"synth review: {error}", file=sys.stderr)
        return EXIT_INCOMPLETE
    except (ValueError, RuntimeError, OSError, GenerationAborted) as error:
        print(f"synth review: {error}", file=sys.stderr)
        return 1
    return 0


def run_annotate(config_path: Path, overrides: list[str], limit: int | None, include_rejected: bool) -> int:
    import json

    from synth.review.annotate import annotate
    from synth.config import load_config

    config = load_config(config_path, overrides)
    generations = config.work_path / "generate" / "generations.jsonl"
    if not generations.exists():
        print(f"synth annotate: {generations} does not exist; run `synth generate` first", file=sys.stderr)
        return 1
    kept = config.work_path / "filter" / "conversations.jsonl"
    only = None
    if not include_rejected and kept.exists():
        only = {json.loads(line)["meta"]["group_id"] for line in kept.read_text().splitlines() if line.strip()}
    counts = annotate(generations, config.work_path / "annotate", only, limit)
    print(f"labelled now: {counts}; seed set: {config.work_path / 'annotate' / 'seeds.jsonl'} "
          "(set generate.seed_set to it for the next round)")
    return 0


#: Exit status of a stage that stopped cleanly before finishing (a budget was reached): rerun to continue.
EXIT_INCOMPLETE = 3


def run_stages(command: str, config_path: Path, overrides: list[str], force: bool, until: str | None) -> int:
    """Run a stage or the pipeline; exit 0 only when every stage asked for finished and produced something."""
    from synth.config import load_config
    from synth.generation.generate import GenerationAborted
    from synth.pipeline import StageIncomplete, produced_nothing, run_all, run_stage

    try:
        config = load_config(config_path, overrides)
        if command == "run":
            run_all(config, force=force, until=until)
        else:
            run_stage(config, command, force=force)
    except StageIncomplete as error:
        print(f"synth {command}: {error}", file=sys.stderr)
        return EXIT_INCOMPLETE
    except (ValueError, RuntimeError, GenerationAborted) as error:  # StageMismatch, EmptyStageError are RuntimeErrors
        print(f"synth {command}: {error}", file=sys.stderr)
        return 1
    if command in ("run", "filter", "stats"):
        problems = produced_nothing(config)
        for problem in problems:
            print(f"synth {command}: {problem}", file=sys.stderr)
        if problems:
            return 1
    return 0


def main(argv: list[str] | None = None) -> None:
    from synth.library_noise import quiet_library_noise

    quiet_library_noise()
    args = build_parser().parse_args(argv)
    if args.command == "validate":
        sys.exit(validate(args.paths, format=args.format, max_errors=args.max_errors))
    if args.command == "describe":
        sys.exit(describe(args.paths, format=args.format))
    if args.command == "download-images":
        sys.exit(download_images_command(args.paths, args.image_root, args.complete, args.workers, args.timeout,
                                         args.attempts, args.size, args.failures, args.deadline,
                                         args.allow_private_addresses, args.pixel_budget))
    if args.command == "convert-dataset":
        sys.exit(convert_dataset(args.paths, args.out, args.format, args.image_dir, to=args.to))
    if args.command == "world":
        from synth.world.dialogues import write_conversations as write_world_conversations
        from synth.world.scenes import read_scenes, write_world

        scenes = read_scenes(write_world(args.out, args.scenes, args.seed, args.split, args.mismatched,
                                         args.image_size))
        path = write_world_conversations(scenes, args.out / "conversations.jsonl", args.conversations, args.seed,
                                         prefix=f"world-{args.split}")
        print(f"{len(scenes)} scene(s) and {args.conversations} conversation(s) written under {args.out} ({path})")
        sys.exit(0)
    if args.command == "annotate":
        sys.exit(run_annotate(args.config, args.overrides, args.limit, args.all))
    if args.command == "batch":
        sys.exit(run_batch(args.action, args.file, args.config, args.overrides))
    if args.command == "review":
        sys.exit(run_review_command(args.config, args.overrides))
    sys.exit(run_stages(args.command, args.config, args.overrides, args.force, getattr(args, "until", None)))


if __name__ == "__main__":
    main()
