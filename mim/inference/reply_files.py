"""``mim generate``: the assistant's reply to every conversation in a file, several at a time.

Each conversation is answered after its last user turn (anything after that
turn is left out). Batches of conversations go through
:class:`~mim.inference.batched.BatchedGenerator`: left-padded prompts, one KV cache,
each row with its own positions, images included. Replies are appended to
``replies.jsonl`` as each batch finishes, with their images under ``images/``;
a rerun answers only what is missing (a line cut short by a kill is dropped
and answered again).
"""

from __future__ import annotations

import json
import time
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Any

REPLIES_FILE = "replies.jsonl"
FAILURES_FILE = "failures.jsonl"  # records that could not be answered, with why; retried by the next run


def conversation_prompts(paths: list[str], image_root: str | None = None, format: str = "auto"
                         ) -> tuple[list[tuple[str, list[dict[str, Any]]]], list[str]]:
    """(id, messages up to the last user turn) for every readable conversation; the problems met (the reader
    rejects a conversation without a user turn, so each one read has a turn to answer)."""
    from mim.evaluation.held_out import read_message_lists

    read, problems = read_message_lists(paths, image_root, format)
    prompts = []
    for _, conversation, messages in read:
        last_user = max(i for i, message in enumerate(messages) if message["role"] == "user")
        prompts.append((conversation.id, messages[:last_user + 1]))
    return prompts, problems


def _seed(base: int, record_id: str) -> int:
    """A per-conversation seed: the same reply whatever batch the conversation lands in, on every rerun."""
    return base + zlib.crc32(record_id.encode()) % 1_000_003


def generate_replies(chat, prompts: list[tuple[str, list[dict[str, Any]]]], out_dir: Path, batch_size: int = 8,
                     progress: bool = True) -> dict[str, Any]:
    """Answer every prompt not yet in ``out_dir/replies.jsonl``; returns counts and timing.

    A record that cannot be answered (an image that does not decode, a prompt or an image count over the
    model's context, a generation that fails on that row) costs only itself: it goes to
    ``out_dir/failures.jsonl`` with its id and reason, the rest of its batch is answered, and the next run
    tries it again."""
    from tqdm import tqdm

    from mim.evaluation.cases import RecordError, admit, generate_isolated
    from mim.evaluation.held_out import safe_stem
    from mim.inference.batched import BatchedGenerator
    from mim.inference.interleaved import ImagePart
    from synth.generation.generate import read_done

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "images").mkdir(exist_ok=True)
    replies = out_dir / REPLIES_FILE
    done = read_done(replies, key="id")
    todo = [(record_id, messages) for record_id, messages in prompts if record_id not in done]
    batched = BatchedGenerator(chat.generator)
    start, written, failed = time.perf_counter(), 0, []
    with open(replies, "a", encoding="utf-8") as output, open(out_dir / FAILURES_FILE, "a", encoding="utf-8") as errors, \
            tqdm(total=len(todo), unit="conv", desc="mim generate", disable=not progress) as bar:
        for first in range(0, len(todo), batch_size):
            batch = todo[first:first + batch_size]
            admitted, rejected = [], []
            for record_id, messages in batch:
                setting = replace(chat.settings, seed=_seed(chat.settings.seed, record_id))
                try:
                    admitted.append((record_id, admit(messages, chat.generator, setting), setting))
                except RecordError as error:
                    rejected.append((record_id, error))
            results = generate_isolated(batched.generate, [m for _, m, _ in admitted], [s for _, _, s in admitted]
                                        ) if admitted else []
            lines = []
            for (record_id, _, setting), result in zip(admitted, results):
                if isinstance(result, RecordError):
                    rejected.append((record_id, result))
                    continue
                images = []
                for index, part in enumerate(p for p in result.parts if isinstance(p, ImagePart)):
                    name = f"images/{safe_stem(record_id)}-{index}.png"
                    part.image.save(out_dir / name)
                    images.append({"path": name, "caption": part.caption})
                lines.append(json.dumps({"id": record_id, "reply": result.text, "images": images,
                                         "seed": setting.seed}, ensure_ascii=False) + "\n")
            output.write("".join(lines))  # a batch's lines after its images: a kill loses at most this batch
            output.flush()
            for record_id, error in rejected:
                errors.write(json.dumps({"id": record_id, "error": str(error), "time": round(time.time(), 3)},
                                        ensure_ascii=False) + "\n")
                failed.append(record_id)
            errors.flush()
            written += len(lines)
            bar.update(len(batch))
            bar.set_postfix(refresh=False, failed=len(failed))
    seconds = time.perf_counter() - start
    return {"conversations": len(prompts), "already_done": len(prompts) - len(todo), "answered": written,
            "failed": len(failed), "failed_ids": failed[:20],
            "seconds": round(seconds, 3), "per_second": round(written / seconds, 3) if written else 0.0}


def generate(model: str, input: str | list[str], out_dir: str, image_root: str | None = None, batch_size: int = 8,
             sdxl: dict | str | None = None, device: str | None = None, dtype: str | None = None,
             max_new_tokens: int = 256, max_images: int = 2, image_size: int = 1024, num_inference_steps: int = 40,
             do_sample: bool = False, top_p: float = 0.9, seed: int = 0, image_bias: float = 0.0,
             quantization: str | None = None, sdxl_offload: bool = False, trust_remote_code: bool = False) -> int:
    """Answer the last user turn of every conversation in ``input`` files, ``batch_size`` at a time.

    Args:
        model: MIM directory (``mim export``) or Lightning checkpoint.
        input: a conversation file, or a list of them (``'[a.jsonl,b.json]'``): TextBind JSON/JSONL or LLaVA's format.
        out_dir: where ``replies.jsonl`` and ``images/`` go; a rerun continues there.
        image_root: folder the files' image names are relative to (default: each file's folder).
        batch_size: conversations per batched forward.
        sdxl: the SDXL that draws images (default: recorded in the directory, else SDXL base 1.0).
        device: cuda or cpu (default: cuda when available).
        dtype: float16 or bfloat16 on GPUs.
        max_new_tokens: tokens per reply.
        max_images: generated images per reply.
        image_size: generated image size.
        num_inference_steps: SDXL steps.
        do_sample: nucleus sampling (seeded per conversation) instead of greedy decoding.
        top_p: nucleus mass when sampling.
        seed: base seed; each conversation's is derived from it and its id.
        image_bias: added to the image trigger's logit (positive: more images).
        quantization: 8bit or 4bit: the LLM through bitsandbytes, for a GPU too small for it in 16 bits
            (a LoRA or ``mim export --merge_lora true`` directory).
        sdxl_offload: keep SDXL in host memory and move each part to the GPU only while it runs.
        trust_remote_code: let the model's own sources run their Python code (a mim.json or checkpoint that
            asks for ``trust_remote_code``); refused without it. Only for models you trust.
    """
    import sys

    from mim.inference.chat import MIMChat
    from mim.inference.interleaved import GenerationSettings, trigger_bias

    input = [input] if isinstance(input, str) else list(input)
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        print(f"mim generate: out_dir {out_dir} is a file, not a folder; choose another", file=sys.stderr)
        return 2
    prompts, problems = conversation_prompts(input, image_root)
    for problem in problems:
        print(f"skipped: {problem}", file=sys.stderr)
    if not prompts:
        print(f"mim generate: no conversation to answer in {', '.join(input)}", file=sys.stderr)
        return 1
    settings = GenerationSettings(max_new_tokens=max_new_tokens, max_images=max_images, image_size=image_size,
                                  num_inference_steps=num_inference_steps, do_sample=do_sample, top_p=top_p,
                                  seed=seed)
    chat = MIMChat.from_pretrained(model, sdxl=sdxl, device=device, dtype=dtype, quantization=quantization,
                                   sdxl_offload=sdxl_offload, trust_remote_code=trust_remote_code)
    chat.settings = replace(settings, logit_bias=trigger_bias(chat.generator.model.head, image_bias))
    summary = generate_replies(chat, prompts, Path(out_dir), batch_size)
    print(json.dumps(summary))
    if summary["failed"]:
        print(f"mim generate: {summary['failed']} conversation(s) could not be answered; reasons in "
              f"{Path(out_dir) / FAILURES_FILE} (a rerun tries them again)", file=sys.stderr)
        return 1
    return 0
