"""SDXL, the image decoder (paper section 5.1), through ``diffusers``.

The tiny preset mirrors the shapes of SDXL base scaled down (diffusers' own
test components): two CLIP text encoders whose penultimate hidden states are
concatenated into ``prompt_embeds`` (77 x 64 here, 77 x 2048 for SDXL base)
and a pooled projection (32 here, 1280 for SDXL base). A 64 px image takes
well under a second on a CPU when the pipeline is given embeddings directly.
"""

from __future__ import annotations

from synth.model_parts.source import ModelSource, check_preset, preset_weights_rng
from synth.model_parts.text_tokenizers import tiny_clip_tokenizer

#: Paper section 5.1: the decoder is Stable Diffusion XL; the released demo uses base 1.0.
DEFAULT_SDXL = "stabilityai/stable-diffusion-xl-base-1.0"


def _tiny_text_encoder_config(vocab_size: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                          num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
                          bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)


def tiny_sdxl_components() -> dict:
    """Every SDXL pipeline component at toy size, randomly initialised."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = tiny_clip_tokenizer()
    tokenizer_2 = tiny_clip_tokenizer(pad_token="!")  # SDXL's second tokenizer pads with "!"
    text_config = _tiny_text_encoder_config(len(tokenizer))
    text_encoder = CLIPTextModel(text_config)
    text_encoder_2 = CLIPTextModelWithProjection(text_config)
    pooled_dim = text_config.projection_dim
    time_embed_dim = 8
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim, transformer_layers_per_block=(1, 1),
        # SDXL's added condition: pooled text (pooled_dim) + 6 micro-conditioning scalars.
        projection_class_embeddings_input_dim=6 * time_embed_dim + pooled_dim,
        cross_attention_dim=2 * text_config.hidden_size, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), latent_channels=4, sample_size=64,
        norm_num_groups=8,
    )
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                       beta_schedule="scaled_linear", timestep_spacing="leading")
    return dict(vae=vae.eval(), text_encoder=text_encoder.eval(), text_encoder_2=text_encoder_2.eval(),
                tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet.eval(), scheduler=scheduler)


#: The refiner the released demo hands over to (scripts/run_demo.sh SD_REFINER).
DEFAULT_SDXL_REFINER = "stabilityai/stable-diffusion-xl-refiner-1.0"


def _check_watermark(watermark: bool) -> None:
    if watermark:
        from diffusers.utils import is_invisible_watermark_available

        if not is_invisible_watermark_available():
            raise ImportError("watermark=True needs SDXL's invisible watermark: pip install invisible-watermark")


def build_sdxl(source: ModelSource | str | dict = DEFAULT_SDXL, watermark: bool = False):
    """A ``StableDiffusionXLPipeline`` from a checkpoint (hub id or directory) or a preset.

    ``watermark``: stamp images with SDXL's invisible watermark, as ``DiffusionPipeline.from_pretrained``
    did in the released demo when the ``invisible-watermark`` package was installed.
    """
    from diffusers import StableDiffusionXLPipeline

    _check_watermark(watermark)
    source = ModelSource.parse(source)
    if source.preset is not None:
        check_preset(source, "SDXL")
        with preset_weights_rng():
            components = tiny_sdxl_components()
        return StableDiffusionXLPipeline(**components, add_watermarker=watermark)
    kwargs = source.pretrained_kwargs()
    kwargs.setdefault("use_safetensors", True)
    kwargs.setdefault("add_watermarker", watermark)
    if source.torch_dtype is not None:
        kwargs["torch_dtype"] = source.torch_dtype
    return StableDiffusionXLPipeline.from_pretrained(source.pretrained, **kwargs)


def tiny_refiner_unet(base):
    """A refiner UNet at toy size: conditioned on text_encoder_2 alone, with the aesthetic-score micro-condition."""
    from diffusers import UNet2DConditionModel

    hidden = base.text_encoder_2.config.hidden_size
    time_embed_dim = 8
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim, transformer_layers_per_block=(1, 1),
        # pooled text + 5 micro-conditions (size 2, crop 2, aesthetic score 1), as SDXL's refiner
        projection_class_embeddings_input_dim=5 * time_embed_dim + base.text_encoder_2.config.projection_dim,
        cross_attention_dim=hidden, norm_num_groups=8).eval()


def build_sdxl_refiner(source: ModelSource | str | dict, base, watermark: bool = False):
    """SDXL's refiner, sharing ``text_encoder_2`` and the VAE with ``base`` (as the released demo loads it)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    _check_watermark(watermark)
    source = ModelSource.parse(source)
    shared = dict(text_encoder_2=base.text_encoder_2, tokenizer_2=base.tokenizer_2, vae=base.vae)
    if source.preset is not None:
        check_preset(source, "SDXL refiner")
        with preset_weights_rng():
            unet = tiny_refiner_unet(base)
        return StableDiffusionXLImg2ImgPipeline(
            **shared, text_encoder=None, tokenizer=None, unet=unet, scheduler=base.scheduler,
            requires_aesthetics_score=True, force_zeros_for_empty_prompt=False, add_watermarker=watermark)
    kwargs = source.pretrained_kwargs()
    kwargs.setdefault("use_safetensors", True)
    kwargs.setdefault("add_watermarker", watermark)
    if source.torch_dtype is not None:
        kwargs["torch_dtype"] = source.torch_dtype
    return StableDiffusionXLImg2ImgPipeline.from_pretrained(source.pretrained, text_encoder_2=base.text_encoder_2,
                                                            vae=base.vae, **kwargs)


def build_sdxl_text_encoders(source: ModelSource | str | dict = DEFAULT_SDXL):
    """Only SDXL's tokenizers and text encoders, as a pipeline whose ``encode_prompt`` works.

    Computing text-embedding targets needs neither the UNet (10 GB) nor the VAE;
    diffusers' own ``encode_prompt`` then does exactly what SDXL generation does.
    """
    from diffusers import StableDiffusionXLPipeline
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    source = ModelSource.parse(source)
    if source.preset is not None:
        check_preset(source, "SDXL")
        with preset_weights_rng():
            components = tiny_sdxl_components()
        parts = {key: components[key] for key in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")}
    else:
        kwargs = source.pretrained_kwargs()
        dtype = {"dtype": source.torch_dtype} if source.torch_dtype is not None else {}
        parts = {
            "tokenizer": AutoTokenizer.from_pretrained(source.pretrained, subfolder="tokenizer", **kwargs),
            "tokenizer_2": AutoTokenizer.from_pretrained(source.pretrained, subfolder="tokenizer_2", **kwargs),
            "text_encoder": CLIPTextModel.from_pretrained(source.pretrained, subfolder="text_encoder",
                                                          **kwargs, **dtype),
            "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(
                source.pretrained, subfolder="text_encoder_2", **kwargs, **dtype),
        }
    return StableDiffusionXLPipeline(vae=None, unet=None, scheduler=None, add_watermarker=False, **parts)


def sdxl_text_dims(source: ModelSource | str | dict = DEFAULT_SDXL) -> tuple[int, int, int]:
    """(tokens, prompt_embeds width, pooled width): (77, 2048, 1280) for SDXL base. Reads configs only."""
    from transformers import CLIPTextConfig

    source = ModelSource.parse(source)
    if source.preset is not None:
        check_preset(source, "SDXL")
        config = _tiny_text_encoder_config(len(tiny_clip_tokenizer()))
        return config.max_position_embeddings, 2 * config.hidden_size, config.projection_dim
    kwargs = source.pretrained_kwargs()
    first = CLIPTextConfig.from_pretrained(source.pretrained, subfolder="text_encoder", **kwargs)
    second = CLIPTextConfig.from_pretrained(source.pretrained, subfolder="text_encoder_2", **kwargs)
    return first.max_position_embeddings, first.hidden_size + second.hidden_size, second.projection_dim
