"""How much GPU memory MIM's training needs per device, from parameter counts, per strategy and stage.

The parameter counts are exact: the paper's parts are built on the meta device
from their configurations (no weights, no network). The bytes per parameter
follow how each strategy keeps weights, gradients and AdamW's two moments:

==========================  =========================================  ==========================
strategy                    trained parameter (T)                      frozen parameter (F)
==========================  =========================================  ==========================
ddp (bf16-mixed)            4 weight + 4 grad + 8 AdamW = 16           2 (stored in bf16)
deepspeed_stage_2           2 bf16 weight + 2/N grad + 12/N            2
                            (fp32 master + AdamW, partitioned)
deepspeed_stage_2_offload   2 + 2/N on the GPU; 12/N in host memory     2
deepspeed_stage_3           (2 + 2 + 12) / N                           2 / N
fsdp (full shard, fp32      (4 + 4 + 8) / N                            2 / N (LLM); the vision
sharded, bf16 compute)                                                 tower stays whole: 2
==========================  =========================================  ==========================

Activations are not included: they depend on batch size, sequence length and
gradient checkpointing, and are measured, not computed (benchmarks/README.md).
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3
#: Llama-2-7b (section 5.1): the shapes of meta-llama/Llama-2-7b-chat-hf's config.json.
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class PartSizes:
    """Parameter counts of MIM's parts."""

    llm: int
    vision: int
    qformer: int  # Q-Former + query tokens + projection into the LLM
    head: int
    lora: int  # adapters on the LLM for the given rank

    def trained_and_frozen(self, stage: str, lora: bool) -> tuple[int, int]:
        """(trained, frozen) parameter counts in a stage (section 5.2)."""
        if stage == "alignment":
            return self.qformer, self.llm + self.vision + self.head
        if stage != "instruction":
            raise ValueError(f"stage must be 'alignment' or 'instruction', got {stage!r}")
        if lora:
            return self.qformer + self.head + self.lora, self.llm + self.vision
        return self.qformer + self.head + self.llm, self.vision


def paper_part_sizes(lora_rank: int = 16, head_tokens: int = 2) -> PartSizes:
    """Exact parameter counts of the paper's MIM: Llama-2-7b, BLIP-2 ViT-g and Q-Former (flan-t5-xxl's)."""
    import torch
    from transformers import Blip2QFormerConfig, Blip2QFormerModel, Blip2VisionConfig, Blip2VisionModel, LlamaConfig
    from transformers import LlamaForCausalLM

    config = LlamaConfig(**LLAMA2_7B)
    with torch.device("meta"):
        llm = LlamaForCausalLM(config)
        vision = Blip2VisionModel(Blip2VisionConfig())  # defaults are ViT-g/14 at 224 px, as in BLIP-2
        qformer = Blip2QFormerModel(Blip2QFormerConfig())
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    hidden, qformer_hidden = config.hidden_size, qformer.config.hidden_size
    query_and_projection = 32 * qformer_hidden + qformer_hidden * hidden + hidden  # 32 queries (BLIP-2)
    return PartSizes(llm=count(llm), vision=count(vision), qformer=count(qformer) + query_and_projection,
                     head=2 * head_tokens * hidden, lora=lora_parameters(config, lora_rank))


def lora_parameters(config, rank: int, targets: tuple[str, ...] = LORA_TARGETS) -> int:
    """A and B matrices of rank ``rank`` on each targeted Linear of every decoder layer."""
    hidden, inner = config.hidden_size, config.intermediate_size
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    shapes = {"q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv_heads * head_dim),
              "v_proj": (hidden, kv_heads * head_dim), "o_proj": (heads * head_dim, hidden),
              "gate_proj": (hidden, inner), "up_proj": (hidden, inner), "down_proj": (inner, hidden)}
    per_layer = sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets)
    return per_layer * config.num_hidden_layers


STRATEGIES = ("ddp", "deepspeed_stage_2", "deepspeed_stage_2_offload", "deepspeed_stage_3", "fsdp")


def training_bytes(sizes: PartSizes, strategy: str, world_size: int, stage: str, lora: bool = False
                   ) -> tuple[float, float]:
    """(GPU bytes, host bytes) per device for weights, gradients and optimizer states; no activations."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    trained, frozen = sizes.trained_and_frozen(stage, lora)
    n = world_size
    if strategy == "ddp":
        return 16 * trained + 2 * frozen, 0.0
    if strategy == "deepspeed_stage_2":
        return (2 + 2 / n + 12 / n) * trained + 2 * frozen, 0.0
    if strategy == "deepspeed_stage_2_offload":
        return (2 + 2 / n) * trained + 2 * frozen, 12 / n * trained
    if strategy == "deepspeed_stage_3":
        return 16 / n * trained + 2 / n * frozen, 0.0
    vision_frozen = sizes.vision  # fsdp: the frozen vision tower is not sharded, the rest is
    return 16 / n * trained + 2 / n * (frozen - vision_frozen) + 2 * vision_frozen, 0.0


def memory_table(sizes: PartSizes, world_size: int = 8) -> list[dict]:
    """Rows for docs/scaling.md: each stage and strategy, GiB per device."""
    rows = []
    for stage, lora in (("alignment", False), ("instruction", False), ("instruction", True)):
        trained, frozen = sizes.trained_and_frozen(stage, lora)
        for strategy in STRATEGIES:
            gpu, host = training_bytes(sizes, strategy, world_size, stage, lora)
            rows.append({"stage": stage + (" (LoRA)" if lora else ""), "strategy": strategy,
                         "trained": trained, "frozen": frozen, "gpu_gib": gpu / GIB, "host_gib": host / GIB})
    return rows
