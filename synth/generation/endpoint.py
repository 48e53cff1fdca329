"""One config section -> a backend to send requests to, its price, its token counter, and the run's limits:
what ``synth generate`` (the conversations) and ``synth review`` (the judge) share."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

from synth.generation.completions import ChatBackend
from synth.generation.costs import Estimate, Price, TokenCounter, estimate, price_for, price_table
from synth.generation.generate import Budget, Request, RetryPolicy, Tally, run_requests

#: Backends that compose rather than call a model: no network, nothing to price.
COMPOSERS = ("offline", "world")


@dataclass
class Endpoint:
    backend: ChatBackend
    model: str  # as priced and reported (a local model: its file or directory name)
    price: Price | None
    counter: TokenCounter

    @property
    def offline(self) -> bool:
        """A composer that needs no network and costs nothing (the offline templates, the world's composer)."""
        return self.backend.name in COMPOSERS


def open_endpoint(section: Any) -> Endpoint:
    """The backend a section (``generate``/``review``: an ``EndpointConfig``) names, priced from its table."""
    from synth.generation.backends import build_backend

    if section.backend == "local":
        from synth.model_parts import ModelSource

        source = ModelSource.parse(section.local if section.local is not None else section.model)
        settings = dict(source=source, temperature=section.temperature, top_p=section.top_p,
                        max_tokens=section.max_tokens, batch_size=section.batch_size, device=section.device)
    elif section.backend == "offline":
        settings = {}
    elif section.backend == "world":
        settings = {"scenes": getattr(section, "world", None)}
    else:
        settings = dict(model=section.model, base_url=section.base_url, api_key_env=section.api_key_env,
                        temperature=section.temperature, top_p=section.top_p, max_tokens=section.max_tokens,
                        timeout=section.timeout, grammar_field=getattr(section, "grammar_field", "grammar"))
    backend = build_backend(section.backend, **settings)
    if section.backend in COMPOSERS:
        return Endpoint(backend, section.backend, None, TokenCounter.for_model("offline"))
    if section.backend == "local":  # priced only if the user's table names it: a local model is free by default
        model = backend.model_name
        return Endpoint(backend, model, price_for(model, price_table(section.prices)),
                        TokenCounter(backend.count_tokens, "counted with the local model's tokenizer"))
    return Endpoint(backend, section.model, price_for(section.model, price_table(section.prices)),
                    TokenCounter.for_model(section.model, section.tokenizer))


def forecast(endpoint: Endpoint, section: Any, prompts: Sequence[str]) -> Estimate:
    return estimate(prompts, endpoint.counter, min(section.max_tokens, section.expected_completion_tokens),
                    section.max_tokens, endpoint.price)


async def send(endpoint: Endpoint, section: Any, requests: Sequence[Request], out_path, failures_path,
               total: int, desc: str, unit: str) -> tuple[Tally, dict[str, Any]]:
    """:func:`run_requests` under the section's concurrency, rate limits, retries and budget; the tally and a
    summary of this run (counts, tokens, seconds, cost when the price is known)."""
    start = time.perf_counter()
    tally = await run_requests(
        requests, endpoint.backend, out_path, failures_path, total, section.concurrency,
        section.requests_per_minute, section.tokens_per_minute,
        RetryPolicy(section.max_attempts, section.backoff_seconds, section.max_backoff_seconds), endpoint.price,
        min(section.max_tokens, section.expected_completion_tokens),
        Budget(section.max_cost, section.max_tokens_total, endpoint.price), section.max_consecutive_failures,
        endpoint.counter.count, desc, unit)
    this_run = {"generated": tally.generated, "failed": tally.failed, "attempts": tally.attempts,
                **({"batch_sizes": endpoint.backend.batch_sizes} if hasattr(endpoint.backend, "batch_sizes") else {}),
                "already_done": tally.already_done, "errors": tally.errors, "prompt_tokens": tally.prompt_tokens,
                "completion_tokens": tally.completion_tokens, "seconds": round(time.perf_counter() - start, 2)}
    if endpoint.price is not None:
        this_run["cost_usd"] = round(endpoint.price.cost(tally.prompt_tokens, tally.completion_tokens), 4)
    return tally, this_run


def estimate_record(plan: Estimate) -> dict[str, Any]:
    return {"requests": plan.requests, "prompt_tokens": plan.prompt_tokens,
            "completion_tokens": plan.completion_tokens, "method": plan.method,
            **({"cost_usd": round(plan.cost, 4)} if plan.cost is not None else {})}
