"""The ``local`` backend: a causal LM in this process writes the conversations, several groups per forward.

The model comes through :func:`synth.model_parts.build_llm`, so it can be a hub id, a
directory or a GGUF file (``{pretrained: DIR, options: {gguf_file: F}}``), in
any dtype, on any device; its own chat template renders Appendix A's prompt.
Requests from the generate stage (``concurrency`` of them in flight) are
gathered into batches of up to ``batch_size``: one left-padded forward per
step for the whole batch, with a KV cache. Each row samples with its own
generator seeded by the request's seed, so a group's output does not depend
on which groups share its batch (up to floating-point noise from padding).
The forward runs in a worker thread, so the event loop keeps writing results
as they arrive: the same resume and exactly-once guarantees as the API backend.

Structured generation (``generate.structured``) holds each row to its group's grammar or JSON schema through
llguidance (guidance-ai's Rust engine, which llama.cpp, vLLM and SGLang also build on): before each token the
row's matcher gives the tokens the grammar allows, every other logit is set to -inf, and the chosen token is fed
back. llguidance is chosen over xgrammar and outlines because it reads llama.cpp's GBNF and JSON Schema as they
are, needs nothing but its own wheel (xgrammar pulls triton; outlines its own stack), and computes a mask in
microseconds on a CPU.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

import numpy as np

from synth.generation.completions import BackendError, Completion
from synth.generation.structured import Constraint
from synth.decoding import nucleus_sample


@dataclass
class _Request:
    prompt: str
    seed: int
    future: asyncio.Future
    constraint: Constraint | None = None


class _Matcher:
    """One row's grammar state: which tokens may come next, fed the tokens chosen."""

    def __init__(self, tokenizer, constraint: Constraint, width: int) -> None:
        import llguidance

        # JSON without free whitespace: a small model otherwise spends its tokens on blank lines between keys
        spec = constraint.spec if constraint.kind == "grammar" else json.dumps(
            {**constraint.spec, "x-guidance": {"whitespace_flexible": False}})
        self.matcher = llguidance.LLMatcher(tokenizer, llguidance.grammar_from(
            "gbnf" if constraint.kind == "grammar" else "json_schema", spec))
        if self.matcher.is_error():
            raise BackendError(f"the {constraint.kind} cannot be compiled: {self.matcher.get_error()}", False)
        self.width = width

    def mask(self, logits: torch.Tensor, stop: set[int]) -> None:
        """Set every logit the grammar forbids to -inf (the chat's end tokens only once the grammar may end)."""
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        allowed = torch.zeros(logits.shape[-1], dtype=torch.bool)
        usable = min(len(bits), logits.shape[-1])
        allowed[:usable] = torch.from_numpy(bits[:usable].astype(bool))
        ending = self.matcher.is_accepting()
        for token in stop:
            if token < len(allowed):
                allowed[token] = ending
        logits.masked_fill_(~allowed, float("-inf"))

    def feed(self, token: int) -> bool:
        """Take the chosen token; False once the grammar is complete (only the end may follow)."""
        accepted = self.matcher.consume_token(token)
        return bool(accepted) and not self.matcher.is_stopped() and not self.matcher.is_error()


class LocalChatBackend:
    """Generates with a local causal LM; ``batch_sizes`` records the size of every batched forward run."""

    name = "local"

    def __init__(self, source: Any, temperature: float = 1.0, top_p: float = 1.0, max_tokens: int = 2048,
                 batch_size: int = 8, device: str | None = None) -> None:
        from synth.model_parts import ModelSource, build_llm

        if batch_size < 1:
            raise ValueError(f"generate.batch_size must be at least 1, got {batch_size}")
        self.source = ModelSource.parse(source)
        bundle = build_llm(self.source)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = bundle.model.to(self.device).eval()
        self.tokenizer = bundle.tokenizer
        self.model_name = (self.source.options.get("gguf_file") or self.source.pretrained or self.source.preset or
                           "local")
        self.temperature, self.top_p, self.max_tokens, self.batch_size = temperature, top_p, max_tokens, batch_size
        self.batch_sizes: list[int] = []
        # the prefill's logits for every prompt position are never read: a 49k vocabulary over a 1,500-token
        # prompt is gigabytes, so ask for the last position only where the model takes logits_to_keep
        self.keep_last = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(
            self.model.forward).parameters else {}
        self._constraint_tokenizer = None  # llguidance's view of the tokenizer, built on first use (~1 s)
        self.queue: asyncio.Queue[_Request] | None = None
        self.worker: asyncio.Task | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.lock = threading.Lock()

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    async def complete(self, prompt: str, captions: Sequence[str], seed: int,
                       constraint: Constraint | None = None) -> Completion:
        loop = asyncio.get_running_loop()
        if self.queue is None or self.loop is not loop or self.worker is None or self.worker.done():
            # first request, or a new event loop (each asyncio.run has its own): the old worker is gone
            self.loop, self.queue = loop, asyncio.Queue()
            self.worker = loop.create_task(self._serve())
        future = loop.create_future()
        await self.queue.put(_Request(prompt, seed, future, constraint))
        completion = await future
        if constraint is not None:
            completion.text = constraint.decode(completion.text)
        return completion

    async def _serve(self) -> None:
        assert self.queue is not None
        while True:
            batch = [await self.queue.get()]
            await asyncio.sleep(0)  # let every request already in flight reach the queue
            while len(batch) < self.batch_size and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            batch = [request for request in batch if not request.future.cancelled()]
            if not batch:
                continue
            try:
                completions = await asyncio.to_thread(self._generate, [r.prompt for r in batch],
                                                      [r.seed for r in batch], [r.constraint for r in batch])
            except BackendError as error:  # a grammar that cannot be compiled: the same on every attempt
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(error)
                continue
            except (RuntimeError, ValueError) as error:  # e.g. out of memory: a retryable failure of this batch
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(BackendError(f"local model failed: {error}", True))
                continue
            for request, completion in zip(batch, completions):
                if not request.future.done():
                    request.future.set_result(completion)

    def _matchers(self, constraints: list[Constraint | None], width: int) -> list[_Matcher | None]:
        if all(c is None for c in constraints):
            return [None] * len(constraints)
        if self._constraint_tokenizer is None:
            try:
                import llguidance.hf
            except ImportError:
                raise BackendError("structured generation in the local backend needs llguidance: pip install "
                                   "llguidance (or textbind[structured])", False, fatal=True) from None
            try:
                self._constraint_tokenizer = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=width)
            except ValueError as error:  # not a fast (Rust) tokenizer
                raise BackendError(f"structured generation needs a fast tokenizer: {error}", False,
                                   fatal=True) from None
        return [_Matcher(self._constraint_tokenizer, c, width) if c is not None else None for c in constraints]

    @torch.no_grad()
    def _generate(self, prompts: list[str], seeds: list[int], constraints: list[Constraint | None] | None = None
                  ) -> list[Completion]:
        """One batch: left-padded prefill, then one forward per token for every row still writing."""
        constraints = constraints or [None] * len(prompts)
        with self.lock:
            self.batch_sizes.append(len(prompts))
            tokenizer, model = self.tokenizer, self.model
            encoded = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                     tokenize=True, return_dict=True)["input_ids"] for p in prompts]
            encoded = [list(ids[0]) if ids and isinstance(ids[0], list) else list(ids) for ids in encoded]
            width = max(len(ids) for ids in encoded)
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
            mask = torch.zeros((len(prompts), width), dtype=torch.long)
            for row, ids in enumerate(encoded):
                input_ids[row, width - len(ids):] = torch.tensor(ids)
                mask[row, width - len(ids):] = 1
            input_ids, mask = input_ids.to(self.device), mask.to(self.device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            samplers = [torch.Generator().manual_seed(seed) for seed in seeds]
            configured = getattr(model.generation_config, "eos_token_id", None)  # chat models: end-of-turn too
            stop = {tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])} - {None}
            outputs: list[list[int]] = [[] for _ in prompts]
            done = [False] * len(prompts)
            stopped = [False] * len(prompts)  # ended by an end token (else by max_tokens)
            keep = self.keep_last
            output = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, **keep)
            matchers = self._matchers(constraints, output.logits.shape[-1])
            for _ in range(self.max_tokens):
                logits = output.logits[:, -1].float().cpu()
                for row, matcher in enumerate(matchers):
                    if matcher is not None and not done[row]:
                        matcher.mask(logits[row], stop)
                tokens = [nucleus_sample(logits[row], self.temperature, self.top_p, samplers[row]) if not done[row]
                          else pad
                          for row in range(len(prompts))]
                for row, token in enumerate(tokens):
                    if done[row]:
                        continue
                    if token in stop:
                        done[row] = stopped[row] = True
                    else:
                        outputs[row].append(token)
                        if matchers[row] is not None and not matchers[row].feed(token):
                            done[row] = stopped[row] = True  # the grammar is complete: only its end may follow
                if all(done):
                    break
                step = torch.tensor(tokens, device=self.device)[:, None]
                mask = torch.cat([mask, torch.tensor([[0 if d else 1] for d in done], device=self.device)], dim=1)
                positions = positions[:, -1:] + 1
                output = model(input_ids=step, attention_mask=mask, position_ids=positions, use_cache=True, **keep,
                               **{self._cache_name(output): getattr(output, self._cache_name(output))})
            return [Completion(tokenizer.decode(ids, skip_special_tokens=True), len(prompt_ids), len(ids),
                               self.model_name, "stop" if ended else "length")
                    for ids, prompt_ids, ended in zip(outputs, encoded, stopped)]

    @staticmethod
    def _cache_name(output) -> str:
        return "cache" if getattr(output, "cache", None) is not None else "past_key_values"

    async def close(self) -> None:
        if self.worker is not None:
            self.worker.cancel()
            await asyncio.gather(self.worker, return_exceptions=True)
            self.worker, self.queue = None, None
