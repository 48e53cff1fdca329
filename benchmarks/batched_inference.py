"""Conversations per second of ``mim generate`` at batch 1 vs batch 8, in one run, on the tiny preset.

The bundled sample conversations (7, repeated to ``--conversations``) are
answered greedily with at most ``--max_new_tokens`` tokens by a tiny random-
weight MIM, once a conversation at a time and once eight at a time, through
the same code path (``generate_replies``: batched forward, replies appended to
a file). ``--image_bias`` pushes the model to draw (the tiny SDXL then runs
inside the batch); ``--max_images 0`` measures text alone (a random model that sees its
pictures picks the image trigger now and then even without a bias).

    python benchmarks/batched_inference.py
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=56)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--image_bias", type=float, default=0.0)
    parser.add_argument("--max_images", type=int, default=None, help="images per reply (default: the settings')")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()

    from heads import LanguageDescriptionHead
    from mim.inference.reply_files import conversation_prompts, generate_replies
    from mim.inference.chat import MIMChat
    from mim.modeling.directory import save_directory
    from mim.inference.interleaved import GenerationSettings, trigger_bias
    from mim.modeling.mim_model import MIM
    from synth.samples import CONVERSATIONS_FILE, LLAVA_CONVERSATIONS_FILE, sample_image_dir

    prompts, _ = conversation_prompts([str(CONVERSATIONS_FILE), str(LLAVA_CONVERSATIONS_FILE)],
                                      str(sample_image_dir()))
    prompts = [(f"{record_id}#{n}", messages) for n in range(-(-args.conversations // len(prompts)))
               for record_id, messages in prompts][:args.conversations]
    with tempfile.TemporaryDirectory() as work:
        save_directory(MIM(LanguageDescriptionHead(), llm="tiny", blip2="tiny"), Path(work) / "mim",
                       sdxl={"preset": "tiny"})
        chat = MIMChat.from_pretrained(Path(work) / "mim", device="cpu")
        limit = {} if args.max_images is None else {"max_images": args.max_images}
        chat.settings = GenerationSettings(max_new_tokens=args.max_new_tokens, image_size=64, num_inference_steps=2,
                                           logit_bias=trigger_bias(chat.generator.model.head, args.image_bias),
                                           **limit)
        rates = {}
        for batch_size in args.batch_sizes:
            summary = generate_replies(chat, prompts, Path(work) / f"out{batch_size}", batch_size, progress=False)
            rates[batch_size] = summary["per_second"]
            print(f"batch {batch_size}: {summary['answered']} conversations in {summary['seconds']:.2f} s = "
                  f"{summary['per_second']:.2f} conversations/s")
    first, last = args.batch_sizes[0], args.batch_sizes[-1]
    print(f"batch {last} / batch {first}: {rates[last] / rates[first]:.2f}x")


if __name__ == "__main__":
    main()
