"""Stage 5, generate: one LLM conversation per image group (sections 3.2, 4.1).

Requests run concurrently (``concurrency`` in flight), under optional
requests- and tokens-per-minute limits. A failed attempt is retried with
capped exponential backoff and jitter when it is worth retrying (429, 5xx,
timeouts, broken connections, malformed replies), honouring ``Retry-After``;
a group whose attempts run out is written to ``failures.jsonl`` with its
last error, and the run goes on. A fatal error (a refused key: HTTP 401, 403,
404), or a long run of failed groups with no success between them, stops the
run at once: no point failing 30,000 groups one by one. A :class:`Budget`
(dollars or tokens per run) stops it cleanly when reached.

Every finished group is appended to ``generations.jsonl`` the moment it
arrives. A rerun reads that file and sends only the groups not yet in it, so
a crash, a kill or Ctrl-C loses at most the requests in flight and never
duplicates one. Failed groups are retried by the next run. Everything written
passes through a :class:`~synth.redact.Redactor`, so no API key reaches a file.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from synth.generation.backends import BackendError, ChatBackend
from synth.generation.completions import Completion
from synth.generation.costs import Price
from synth.generation.prompt import SeedExample, choose_examples, render_prompt
from synth.generation.structured import Constraint
from synth.redact import Redactor


@dataclass
class RetryPolicy:
    max_attempts: int = 6
    backoff_seconds: float = 2.0
    max_backoff_seconds: float = 60.0

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        """Full-jitter exponential backoff, at least the server's Retry-After."""
        ceiling = min(self.max_backoff_seconds, self.backoff_seconds * 2 ** (attempt - 1))
        delay = rng.uniform(0, ceiling)
        return min(self.max_backoff_seconds, max(delay, retry_after or 0.0))


class RateLimiter:
    """Sliding one-minute windows for requests and (estimated) tokens; 0 disables a limit."""

    def __init__(self, requests_per_minute: float = 0, tokens_per_minute: float = 0, window: float = 60.0):
        self.rpm, self.tpm, self.window = requests_per_minute, tokens_per_minute, window
        self.events: deque[tuple[float, int]] = deque()
        self.lock = asyncio.Lock()

    async def acquire(self, tokens: int) -> None:
        if not self.rpm and not self.tpm:
            return
        if self.tpm and tokens > self.tpm:
            raise ValueError(f"one request needs ~{tokens} tokens, more than tokens_per_minute={self.tpm}")
        async with self.lock:
            while True:
                now = time.monotonic()
                while self.events and now - self.events[0][0] >= self.window:
                    self.events.popleft()
                used = sum(count for _, count in self.events)
                if (not self.rpm or len(self.events) < self.rpm) and (not self.tpm or used + tokens <= self.tpm):
                    self.events.append((now, tokens))
                    return
                await asyncio.sleep(max(0.01, self.window - (now - self.events[0][0])))


@dataclass
class Tally:
    generated: int = 0
    failed: int = 0
    already_done: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    attempts: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    stopped: str | None = None  # why the run stopped before every group was tried: "budget"

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Budget:
    """Limits on what one run may spend; a run that reaches one stops sending requests and ends
    cleanly (the requests in flight finish and are kept), and a rerun carries on.

    Before each request its estimated tokens (and cost, when the price is known) are reserved, so
    the requests in flight together cannot overshoot the limit by more than the estimate's error.
    """

    max_cost: float | None = None  # US dollars; needs a known price
    max_tokens_total: int | None = None  # prompt + completion tokens
    price: Price | None = None

    def __post_init__(self) -> None:
        if self.max_cost is not None and self.price is None:
            raise ValueError("generate.max_cost needs the model's price, and none is known: add it under "
                             "generate.prices, or limit tokens with generate.max_tokens_total instead")

    def allows(self, tally: Tally, reserved_tokens: int, reserved_cost: float, tokens: int, cost: float) -> bool:
        if self.max_tokens_total is not None and tally.tokens + reserved_tokens + tokens > self.max_tokens_total:
            return False
        spent = self.price.cost(tally.prompt_tokens, tally.completion_tokens) if self.price else 0.0
        return self.max_cost is None or spent + reserved_cost + cost <= self.max_cost


class GenerationAborted(RuntimeError):
    """No further request can succeed (a refused key, an unknown model, an endpoint that fails every
    request): the run stopped at once. Groups already generated are kept; a rerun resumes."""


def read_done(path: Path, key: str = "group_id") -> set[str]:
    """Ids (``key`` of each line) already written. A last line cut short by a kill is removed from the file."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    good_end = data.rfind(b"\n") + 1
    if good_end < len(data):
        with open(path, "r+b") as handle:
            handle.truncate(good_end)
    done = set()
    for line in data[:good_end].splitlines():
        if line.strip():
            try:
                done.add(json.loads(line)[key])
            except (json.JSONDecodeError, KeyError):
                continue
    return done


def read_groups(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


class _Appender:
    """Append-only JSONL writer: one whole line per record, flushed at once, secrets redacted."""

    def __init__(self, path: Path, redact: Callable[[str], str] = Redactor()):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(path, "a", encoding="utf-8")
        self.redact = redact

    def write(self, record: dict[str, Any]) -> None:
        self.handle.write(self.redact(json.dumps(record, ensure_ascii=False)) + "\n")
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


def group_prompt(group: dict[str, Any], seeds: Sequence[SeedExample], num_examples: int, seed: int
                 ) -> tuple[str, list[SeedExample], random.Random]:
    """The group's prompt and examples, and the random state its attempts go on with: the same on every rerun."""
    rng = random.Random(f"{seed}:{group['group_id']}")
    examples = choose_examples(seeds, rng, num_examples)
    return render_prompt([pair["caption"] for pair in group["pairs"]], examples), examples, rng


def generation_record(group: dict[str, Any], examples: Sequence[SeedExample], model: str | None, output: str,
                      attempts: int, prompt_tokens: int, completion_tokens: int, **extra: Any) -> dict[str, Any]:
    """One line of ``generations.jsonl``, as the filter stage reads it (a live run and a batch import alike)."""
    return {"group_id": group["group_id"], "cluster": group.get("cluster"), "pairs": group["pairs"],
            "examples": [example.id for example in examples], "model": model, "output": output,
            "attempts": attempts, "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
            **extra}


def pending_groups(groups: Sequence[dict[str, Any]], out_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The groups ``generations.jsonl`` does not hold yet."""
    done = read_done(Path(out_dir) / "generations.jsonl")
    return [group for group in groups if group["group_id"] not in done]


@dataclass
class Request:
    """One prompt to send: its id (the key of its output line), what the backend needs, and how its line reads."""

    id: str
    prompt: str
    captions: list[str]
    rng: random.Random  # the request's seed and its retries' jitter: the same on every rerun
    record: Callable[[Completion, int], dict[str, Any]]  # (completion, attempts) -> its output line
    constraint: Constraint | None = None
    group: dict[str, Any] | None = None  # the image group, for backends that write from it (uses_group)


async def run_requests(
    requests: Sequence[Request],
    backend: ChatBackend,
    out_path: str | os.PathLike[str],
    failures_path: str | os.PathLike[str],
    total: int | None = None,
    concurrency: int = 16,
    requests_per_minute: float = 0,
    tokens_per_minute: float = 0,
    retry: RetryPolicy | None = None,
    price: Price | None = None,
    expected_completion_tokens: int = 1024,
    budget: Budget | None = None,
    max_consecutive_failures: int = 20,
    count_tokens: Callable[[str], int] | None = None,
    desc: str = "generate",
    unit: str = "group",
) -> Tally:
    """Send every request (those whose output line exists are the caller's to leave out), ``concurrency`` in
    flight, rate-limited, retried, budgeted; append each result to ``out_path`` and each exhausted request to
    ``failures_path`` as it ends. ``total``: the whole job's size, for the progress bar (done = total - len);
    ``desc`` and ``unit`` name the job and what it counts on the bar and in messages.

    Raises :class:`GenerationAborted` on a fatal error (HTTP 401/403/404), or once
    ``max_consecutive_failures`` requests in a row have failed with none answered in between.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    retry, budget = retry or RetryPolicy(), budget or Budget()
    count_tokens = count_tokens or (lambda text: -(-len(text) // 4))
    total = len(requests) if total is None else total
    tally = Tally(already_done=total - len(requests))
    limiter = RateLimiter(requests_per_minute, tokens_per_minute)
    semaphore = asyncio.Semaphore(concurrency)
    redact = getattr(backend, "redact", Redactor())
    outputs = _Appender(Path(out_path), redact)
    failures = _Appender(Path(failures_path), redact)
    progress = tqdm(total=total, initial=tally.already_done, desc=f"{desc} ({backend.name})", unit=unit)
    reserved = {"tokens": 0, "cost": 0.0}
    state = {"consecutive_failures": 0, "abort": None}

    def show() -> None:
        postfix = {"failed": tally.failed, "tokens": tally.tokens}
        if price is not None:
            postfix["cost"] = f"${price.cost(tally.prompt_tokens, tally.completion_tokens):.2f}"
        progress.set_postfix(refresh=False, **postfix)

    def record_failure(request_id: str, attempt: int, error: BackendError) -> None:
        tally.failed += 1
        failures.write({"group_id": request_id, "attempts": attempt, "error": str(error),
                        "retryable": error.retryable, "fatal": error.fatal, "time": round(time.time(), 3)})
        state["consecutive_failures"] += 1
        if error.fatal:
            state["abort"] = f"stopped at once: {error}"
        elif state["consecutive_failures"] >= max_consecutive_failures:
            state["abort"] = (f"stopped after {state['consecutive_failures']} {unit}s in a row failed (last error: "
                              f"{error}); the endpoint seems unusable, see {Path(failures_path).name}")

    async def one(request: Request) -> None:
        held = {"constraint": request.constraint} if request.constraint is not None else {}  # backends without it
        if getattr(backend, "uses_group", False):
            held["group"] = request.group
        need_tokens = count_tokens(request.prompt) + expected_completion_tokens
        need_cost = price.cost(need_tokens - expected_completion_tokens, expected_completion_tokens) if price else 0.0
        rng = request.rng
        async with semaphore:
            for attempt in range(1, retry.max_attempts + 1):
                if state["abort"] or tally.stopped:
                    return
                if not budget.allows(tally, reserved["tokens"], reserved["cost"], need_tokens, need_cost):
                    tally.stopped = "budget"
                    return
                reserved["tokens"] += need_tokens
                reserved["cost"] += need_cost
                try:
                    await limiter.acquire(need_tokens)
                    tally.attempts += 1
                    completion = await backend.complete(request.prompt, request.captions, rng.randrange(2**31),
                                                        **held)
                except BackendError as error:
                    kind = str(error).split(":")[0]
                    tally.errors[kind] = tally.errors.get(kind, 0) + 1
                    if error.retryable and not error.fatal and attempt < retry.max_attempts:
                        await asyncio.sleep(retry.delay(attempt, error.retry_after, rng))
                        continue
                    record_failure(request.id, attempt, error)
                    break
                finally:
                    reserved["tokens"] -= need_tokens
                    reserved["cost"] -= need_cost
                tally.generated += 1
                state["consecutive_failures"] = 0
                tally.prompt_tokens += completion.prompt_tokens
                tally.completion_tokens += completion.completion_tokens
                outputs.write(request.record(completion, attempt))
                break
        progress.update()
        show()

    tasks = [asyncio.ensure_future(one(request)) for request in requests]
    try:
        pending = set(tasks)
        while pending:
            _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if state["abort"]:
                for task in pending:  # requests in flight are dropped, never recorded: a rerun sends them again
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
                break
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()
    finally:
        for task in tasks:
            task.cancel()
        outputs.close()
        failures.close()
        progress.close()
        await backend.close()
    if state["abort"]:
        raise GenerationAborted(f"{desc}: {state['abort']}. {tally.generated} {unit}(s) done in this run are kept; "
                                "fix the cause and rerun to continue.")
    return tally


def group_request(group: dict[str, Any], seeds: Sequence[SeedExample], num_examples: int, seed: int,
                  constraint_for: Callable[[list[str]], Constraint | None] | None = None) -> Request:
    """A group's generation request: Appendix A's prompt with its examples, and its constraint if any."""
    captions = [pair["caption"] for pair in group["pairs"]]
    prompt, examples, rng = group_prompt(group, seeds, num_examples, seed)
    constraint = constraint_for(captions) if constraint_for is not None else None

    def record(completion: Completion, attempts: int) -> dict[str, Any]:
        return generation_record(group, examples, completion.model, completion.text, attempts,
                                 completion.prompt_tokens, completion.completion_tokens,
                                 finish_reason=completion.finish_reason,
                                 **({"structured": constraint.kind} if constraint is not None else {}),
                                 **completion.meta)

    return Request(group["group_id"], prompt, captions, rng, record, constraint, group)


async def generate_groups(
    groups: Sequence[dict[str, Any]],
    backend: ChatBackend,
    out_dir: str | os.PathLike[str],
    seeds: Sequence[SeedExample],
    concurrency: int = 16,
    requests_per_minute: float = 0,
    tokens_per_minute: float = 0,
    retry: RetryPolicy | None = None,
    price: Price | None = None,
    num_examples: int = 3,
    seed: int = 0,
    expected_completion_tokens: int = 1024,
    budget: Budget | None = None,
    max_consecutive_failures: int = 20,
    count_tokens: Callable[[str], int] | None = None,
    constraint_for: Callable[[list[str]], Constraint | None] | None = None,
) -> Tally:
    """Generate every group not yet in ``out_dir/generations.jsonl``; return the tally of this run.
    ``constraint_for(captions)``: the structured-generation constraint for a group (None: free text).

    Raises :class:`GenerationAborted` on a fatal error (HTTP 401/403/404), or once
    ``max_consecutive_failures`` groups in a row have failed with none generated in between.
    """
    out_dir = Path(out_dir)
    requests = [group_request(group, seeds, num_examples, seed, constraint_for)
                for group in pending_groups(groups, out_dir)]
    return await run_requests(requests, backend, out_dir / "generations.jsonl", out_dir / "failures.jsonl",
                              len(groups), concurrency, requests_per_minute, tokens_per_minute, retry, price,
                              expected_completion_tokens, budget, max_consecutive_failures, count_tokens)
