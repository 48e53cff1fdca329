"""``mim chat``: a conversation with MIM in the terminal.

Type a message and press Enter. ``/image PATH`` attaches an image to your next
message (put ``<image>`` in the text where it belongs, or it goes first);
``/reset`` starts over; ``/quit`` (or Ctrl-D) leaves. Generated images are
saved under ``out_dir`` and their paths printed where they appear.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def chat_loop(chat, out_dir: Path, ask: Callable[[str], str] = input, say: Callable[[str], None] = print,
              strict: bool = False) -> int:
    """The interactive loop; returns the exit status. ``strict`` (scripts, ``--message``): the first
    error (an image that cannot be attached, a message the model cannot take) ends it with status 1."""
    from mim.inference.interleaved import ImagePart

    out_dir.mkdir(parents=True, exist_ok=True)
    attached: list[str] = []
    turn = 0
    say("MIM chat. /image PATH attaches an image, /reset starts over, /quit leaves.")
    while True:
        try:
            line = ask("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            say("")
            return 0
        if not line:
            continue
        if line == "/quit":
            return 0
        if line == "/reset":
            chat.reset()
            attached.clear()
            say("(new conversation)")
            continue
        if line.startswith("/image"):
            path = line[len("/image"):].strip()
            if not Path(path).is_file():
                say(f"(no such file: {path!r})")
                if strict:
                    return 1
            else:
                attached.append(path)
                say(f"(attached {path}; {len(attached)} image(s) for the next message)")
            continue
        try:
            result = chat.send(line, attached)
        except (ValueError, OSError) as error:
            say(f"(error: {error})")
            if strict:
                return 1
            continue
        attached = []
        turn += 1
        pieces = []
        for index, part in enumerate(result.parts):
            if isinstance(part, ImagePart):
                path = out_dir / f"turn{turn:03d}_image{index:02d}.png"
                part.image.save(path)
                pieces.append(f"[image: {path}{f' ({part.caption})' if part.caption else ''}]")
            else:
                pieces.append(part.text)
        say("mim> " + " ".join(piece.strip() for piece in pieces if piece.strip()))


def chat(model: str, sdxl: dict | str | None = None, refiner: dict | str | None = None, out_dir: str = "chat_images",
         device: str | None = None, dtype: str | None = None, max_new_tokens: int = 256, max_images: int = 2,
         image_size: int = 1024, num_inference_steps: int = 40, high_noise_frac: float = 0.8,
         guidance_scale: float = 5.0, watermark: bool = False, do_sample: bool = False,
         top_p: float = 0.9, image_bias: float = 0.0, seed: int = 0, message: str | None = None,
         images: list[str] | None = None, quantization: str | None = None, sdxl_offload: bool = False,
         trust_remote_code: bool = False) -> int:
    """Chat with a MIM directory (or .ckpt) in the terminal, or send one message (``--message``).

    Args:
        model: MIM directory (``mim export``/``mim convert``) or Lightning checkpoint.
        sdxl: the SDXL that draws images (default: recorded in the directory, else SDXL base 1.0).
        refiner: an SDXL refiner (e.g. stabilityai/stable-diffusion-xl-refiner-1.0, as the released demo).
        out_dir: where generated images are saved.
        device: cuda or cpu (default: cuda when available).
        dtype: float16 or bfloat16 on GPUs.
        max_new_tokens: tokens per reply.
        max_images: generated images per reply.
        image_size: generated image size.
        num_inference_steps: SDXL steps (40 in the released demo).
        high_noise_frac: where SDXL base hands over to the refiner (0.8 in the released demo).
        guidance_scale: SDXL classifier-free guidance (5.0, diffusers' SDXL default, as the released demo).
        watermark: SDXL's invisible watermark on every image (the released demo's pipelines added it when
            invisible-watermark was installed); needs ``pip install invisible-watermark``.
        do_sample: top-p sampling instead of greedy (the released demo decodes greedily).
        top_p: nucleus mass.
        image_bias: added to the image trigger's logit (positive: more images).
        seed: for sampling and images.
        message: send this one message (with ``images``), print the reply, and exit: for scripts.
            Any error exits with status 1.
        images: image files for ``message``.
        quantization: 8bit or 4bit: the LLM through bitsandbytes, for a GPU too small for it in 16 bits
            (a LoRA or ``mim export --merge_lora true`` directory).
        sdxl_offload: keep SDXL in host memory and move each part to the GPU only while it runs.
        trust_remote_code: let the model's own sources run their Python code (a mim.json or checkpoint that
            asks for ``trust_remote_code``); refused without it. Only for models you trust.
    """
    from mim.inference.chat import MIMChat
    from mim.inference.interleaved import GenerationSettings, trigger_bias

    loaded = MIMChat.from_pretrained(model, sdxl=sdxl, refiner=refiner, device=device, dtype=dtype,
                                     watermark=watermark, quantization=quantization, sdxl_offload=sdxl_offload,
                                     trust_remote_code=trust_remote_code)
    loaded.settings = GenerationSettings(
        max_new_tokens=max_new_tokens, max_images=max_images, image_size=image_size,
        num_inference_steps=num_inference_steps, high_noise_frac=high_noise_frac,
        guidance_scale=guidance_scale, do_sample=do_sample, top_p=top_p,
        seed=seed, logit_bias=trigger_bias(loaded.generator.model.head, image_bias))
    if message is None:
        return chat_loop(loaded, Path(out_dir))
    commands = [f"/image {path}" for path in images or []] + [message, "/quit"]
    return chat_loop(loaded, Path(out_dir), ask=lambda prompt: commands.pop(0), strict=True)
