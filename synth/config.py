"""One YAML file describes a synthesis run; these dataclasses are its schema.

OmegaConf merges the YAML over these defaults and checks every key and type,
so a typo (``cluster.kk``) or a wrong type fails at load time, naming the key
and the file. Defaults that come from the paper cite its section.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from synth.selection.ingest import IngestSource
from synth.model_parts.clip import DEFAULT_CLIP


@dataclass
class IngestConfig:
    sources: list[IngestSource] = field(default_factory=list)
    verify_images: bool = True  # decode every image in full, so later stages meet only images that decode
    max_caption_chars: int = 1000  # longer "captions" are scraped text, not descriptions
    # images whose header claims more pixels are rejected before decoding (decompression bombs);
    # Pillow's own default limit. Raising it past ~179 M also needs PIL.Image.MAX_IMAGE_PIXELS raised.
    max_image_pixels: int = 89_478_485


@dataclass
class ScoreConfig:
    # a hub id / path, or a ModelSource mapping ({preset: tiny}); section 4.1 uses clip-vit-base-patch16
    clip: Any = DEFAULT_CLIP
    min_score: float = 30.0  # section 4.1: pairs scoring under 30 are filtered out
    batch_size: int = 256
    shard_size: int = 8192  # pairs per output shard: the most a crash can lose
    num_workers: int = 4  # image-decoding processes per device
    store_dtype: str = "float16"  # embeddings on disk; clustering reads them as float32


@dataclass
class ClusterConfig:
    k: int = 4096  # section 4.1: "classify the cleaned CC3M dataset into 4096 clusters"
    min_cluster_size: int = 32  # section 4.1: "clusters with less than 32 images are regarded as outliers"
    niter: int = 20
    nredo: int = 1  # k-means restarts, best objective kept
    spherical: bool = False  # section 3.2 clusters the raw pooled features
    seed: int = 0


@dataclass
class SampleConfig:
    num_groups: int = 30000  # groups to generate conversations for (the paper kept 25,629 conversations)
    group_sizes: list[int] = field(default_factory=lambda: [2, 3, 4])  # section 4.1: n in {2, 3, 4}
    seed: int = 0


@dataclass
class EndpointConfig:
    """Where requests go and how patiently: shared by generate (the conversations) and review (the judge)."""

    # openai (any OpenAI-compatible endpoint), local (a causal LM in this process), offline (rule-based composer)
    # or world (the world's composer, synth.world.composer; generate only)
    backend: str = "openai"
    model: str = "gpt-4"  # section 4.1
    base_url: str | None = None  # e.g. http://localhost:8000/v1 for vLLM; None: api.openai.com
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from this variable, never from files
    # backend local: the model as a source mapping ({pretrained: DIR, options: {gguf_file: F}, dtype: ...});
    # None: the model as a hub id or directory
    local: Any = None
    device: str | None = None  # backend local: cuda or cpu (default: cuda when available)
    batch_size: int = 8  # backend local: requests per forward (concurrency should be at least this)
    temperature: float = 1.0  # section 4.1
    top_p: float = 1.0  # section 4.1
    max_tokens: int = 2048
    concurrency: int = 16  # requests in flight
    requests_per_minute: float = 0  # 0: no limit
    tokens_per_minute: float = 0  # 0: no limit
    max_attempts: int = 6
    backoff_seconds: float = 2.0
    max_backoff_seconds: float = 60.0
    timeout: float = 120.0  # seconds per request
    max_consecutive_failures: int = 20  # this many failed requests in a row, none answered: the run stops
    seed: int = 0
    # USD per million tokens by model, over the built-in table (synth.generation.costs.DEFAULT_PRICES), e.g.
    # {my-model: {prompt: 0.2, completion: 0.2}}; a model with no price is reported in tokens only
    prices: dict[str, Any] = field(default_factory=dict)
    tokenizer: str | None = None  # counts prompt tokens for the estimate (hub id or directory); else tiktoken/4 chars
    expected_completion_tokens: int = 1024  # for the estimate and the budget reservation
    max_cost: float | None = None  # USD this run may spend (needs a known price); a rerun continues
    max_tokens_total: int | None = None  # prompt + completion tokens this run may use; a rerun continues


@dataclass
class GenerateConfig(EndpointConfig):
    seed_set: str | None = None  # JSONL of labelled examples; None: the bundled Appendix B seeds
    num_examples: int = 3  # section 3.3: three in-context examples per prompt
    world: str | None = None  # backend world: the scenes.jsonl of the pictures ingested (synth.world)
    # Structured generation, off by default (null: section 3.2's free text, then the filter). grammar: Appendix
    # A's format as a GBNF grammar (llama.cpp's server, vLLM, the local backend); json_schema: the same as a strict
    # JSON schema (OpenAI's structured outputs). See synth.generation.structured; the filter still runs.
    structured: str | None = None
    # how an OpenAI-compatible server takes the grammar: grammar (llama.cpp's server), structured_outputs
    # (vLLM >= 0.10.2) or guided_grammar (older vLLM)
    grammar_field: str = "grammar"
    # messages in a constrained dialogue, [min, max]: Appendix A asks for fewer than 6, the released filter keeps
    # 3 or more, and a dialogue ends with the Assistant: 4
    structured_turns: list[int] = field(default_factory=lambda: [4, 5])
    structured_text_chars: int = 240  # the longest run of text between images and turn boundaries


@dataclass
class ReviewConfig(EndpointConfig):
    """``synth review``: an LLM judge labels each kept conversation as section 3.3's annotators do (Table 2's
    quality and characteristics) and names section 4.4's errors. Not part of ``synth run``: it costs a request
    per conversation, so it runs when asked."""

    temperature: float = 0.0  # a judge: the same verdict on a rerun
    max_tokens: int = 512
    expected_completion_tokens: int = 200
    rubric: str | None = None  # the judge's prompt file; None: the bundled synth/review/rubric.txt (copy, edit)
    # the verdict under a strict JSON schema (response_format; llguidance in the local backend): small judges
    # otherwise write no JSON at all
    structured: bool = False
    # quality labels whose conversations go to review/conversations.jsonl (e.g. [Excellent, Satisfactory]);
    # empty: every reviewed conversation, with its verdict in meta
    keep: list[str] = field(default_factory=list)


@dataclass
class FilterConfig:
    max_edit_distance: float = 0.1  # section 3.2: drop conversations whose descriptions drift further
    # how the edit distance is normalised: "caption" (edits / caption length, the released process_mim.py)
    # or "longer" (edits / the longer string's length, ours: always within [0, 1])
    edit_distance_norm: str = "caption"
    min_messages: int = 3  # released process_mim.py: min_turn_num=3 (Human and Assistant messages)
    require_image: bool = True  # released process_mim.py: has_image
    drop_duplicate_responses: bool = True  # released process_mim.py: repeat_response
    drop_trailing_user_turn: bool = True  # nothing to learn after the last user message
    # speaker names the parser accepts (case-insensitive, markdown bold allowed); Appendix A's by default,
    # e.g. [Human, User] for open models that write "User:" or "USER:"
    user_names: list[str] = field(default_factory=lambda: ["Human"])
    assistant_names: list[str] = field(default_factory=lambda: ["Assistant"])


@dataclass
class SynthConfig:
    work_dir: str = "runs/synth"
    ingest: IngestConfig = field(default_factory=IngestConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    review: ReviewConfig = field(default_factory=ReviewConfig)

    @property
    def work_path(self) -> Path:
        return Path(self.work_dir)


def load_config(path: str | os.PathLike[str], overrides: list[str] | None = None) -> SynthConfig:
    """The run config at ``path`` with ``key=value`` overrides (``cluster.k=64``) applied."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from synth.resolvers import config_error_message, register_resolvers

    register_resolvers()
    try:
        merged = OmegaConf.merge(OmegaConf.structured(SynthConfig), OmegaConf.load(path),
                                 OmegaConf.from_dotlist(overrides or []))
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        raise ValueError(f"{path}: {config_error_message(error)}") from None
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: {error}") from None
    if not config.ingest.sources:
        raise ValueError(f"{path}: ingest.sources is empty; name at least one folder, table or webdataset source")
    from synth.generation.prompt import QUALITY_LABELS

    unknown = sorted(set(config.review.keep) - set(QUALITY_LABELS))
    if unknown:
        raise ValueError(f"{path}: review.keep {unknown} are not quality labels; use some of {list(QUALITY_LABELS)}")
    generate = config.generate
    if generate.structured is not None:
        from synth.generation.structured import GRAMMAR_FIELDS, KINDS, DialogueFormat

        if generate.structured not in KINDS:
            raise ValueError(f"{path}: generate.structured must be one of {KINDS} or null, got {generate.structured!r}")
        if generate.grammar_field not in GRAMMAR_FIELDS:
            raise ValueError(f"{path}: generate.grammar_field must be one of {GRAMMAR_FIELDS}, got "
                             f"{generate.grammar_field!r}")
        if len(generate.structured_turns) != 2:
            raise ValueError(f"{path}: generate.structured_turns is [min, max], got {generate.structured_turns}")
        try:  # the turn range and text length, checked once here rather than per group
            DialogueFormat(("a",), *generate.structured_turns, generate.structured_text_chars)
        except ValueError as error:
            raise ValueError(f"{path}: generate.structured_*: {error}") from None
    return config
