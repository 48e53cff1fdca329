"""Where conversations come from: an OpenAI-compatible endpoint, or an offline composer.

Both implement :class:`ChatBackend`. The generate stage owns retries, rate
limits and bookkeeping; a backend makes one attempt and says whether a
failure is worth retrying.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence

from synth.generation.prompt import image_tag
from synth.redact import Redactor
from synth.generation.completions import FATAL_STATUSES, BackendError, ChatBackend, Completion
from synth.generation.structured import GRAMMAR_FIELDS, Constraint, request_fields

__all__ = ["FATAL_STATUSES", "BackendError", "ChatBackend", "Completion", "OpenAIChatBackend", "OfflineComposer",
           "build_backend"]


class OpenAIChatBackend:
    """Any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, Ollama, ...) via the ``openai`` client.

    The key is read from the environment variable ``api_key_env`` and is never
    stored anywhere else: not in configs, outputs, logs or error records.
    """

    name = "openai"

    def __init__(self, model: str, base_url: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                 temperature: float = 1.0, top_p: float = 1.0, max_tokens: int | None = 2048,
                 timeout: float = 120.0, grammar_field: str = "grammar"):
        from openai import AsyncOpenAI

        key = os.environ.get(api_key_env)
        self.api_key_env = api_key_env
        self.redact = Redactor([key])
        if key is None:
            if base_url is None:
                raise ValueError(f"set the API key in the environment variable {api_key_env} (it is read from "
                                 "nowhere else), or point generate.base_url at a server that needs none")
            key = "unused"  # local servers (vLLM, Ollama) accept any key
        # max_retries=0: retries, backoff and rate limits belong to the generate stage
        self._client = AsyncOpenAI(api_key=key, base_url=base_url, timeout=timeout, max_retries=0)
        self.model = model
        if grammar_field not in GRAMMAR_FIELDS:
            raise ValueError(f"generate.grammar_field must be one of {GRAMMAR_FIELDS}, got {grammar_field!r}")
        self.grammar_field = grammar_field  # how the server takes a grammar (llama.cpp: grammar; vLLM: ...)
        self.sampling = {"temperature": temperature, "top_p": top_p}
        if max_tokens:
            self.sampling["max_tokens"] = max_tokens

    async def complete(self, prompt: str, captions: Sequence[str], seed: int,
                       constraint: Constraint | None = None) -> Completion:
        try:
            completion = await self._complete(prompt, request_fields(constraint, self.grammar_field))
        except BackendError as error:  # error bodies can echo the Authorization header
            raise BackendError(self.redact(str(error)), error.retryable, error.retry_after, error.fatal) from None
        if constraint is not None:
            completion.text = constraint.decode(completion.text)
        return completion

    async def _complete(self, prompt: str, extra_body: dict) -> Completion:
        import openai

        try:
            response = await self._client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": prompt}], **self.sampling,
                **({"extra_body": extra_body} if extra_body else {}))
        except openai.RateLimitError as error:
            raise BackendError(f"rate limited (429): {error.message}", True, _retry_after(error)) from None
        except openai.APITimeoutError:
            raise BackendError("request timed out", True) from None
        except openai.APIConnectionError as error:
            raise BackendError(f"connection error: {error.message}", True) from None
        except openai.APIStatusError as error:
            retryable = error.status_code >= 500 or error.status_code in (408, 409)
            hint = FATAL_STATUSES.get(error.status_code)
            message = f"HTTP {error.status_code}: {error.message}"
            if hint:
                message += f" ({hint}; the key is read from ${self.api_key_env})"
            raise BackendError(message, retryable, _retry_after(error), fatal=hint is not None) from None
        except openai.APIResponseValidationError as error:
            raise BackendError(f"malformed reply: {error.message}", True) from None
        except openai.OpenAIError as error:
            raise BackendError(f"malformed reply: {error}", True) from None
        except json.JSONDecodeError as error:  # a 200 whose body is not JSON at all
            raise BackendError(f"malformed reply: body is not JSON ({error.msg})", True) from None
        choices = getattr(response, "choices", None)
        if not choices or not isinstance(getattr(choices[0].message, "content", None), str):
            raise BackendError("malformed reply: no message content", True)
        usage = getattr(response, "usage", None)
        return Completion(choices[0].message.content, getattr(usage, "prompt_tokens", 0) or 0,
                          getattr(usage, "completion_tokens", 0) or 0, getattr(response, "model", self.model),
                          getattr(choices[0], "finish_reason", None) or "stop")

    async def close(self) -> None:
        await self._client.close()


def _retry_after(error) -> float | None:
    response = getattr(error, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class OfflineComposer:
    """A rule-based composer: fills conversation templates with the group's captions.

    It needs no network and no model, so the quick start and the tests run
    anywhere. Its conversations are template text in the spirit of
    template-built instruction data, not LLM writing: they exercise every
    stage after generation (parsing, filtering, statistics, training) with the
    exact output format the prompt asks an LLM for, and say nothing about
    what an LLM would write.
    """

    name = "offline"

    _OPENERS = (
        ("Human: I'm putting together a short presentation and found these: {a} and {b} How could I connect them?",
         "Assistant: They fit together well. The first shows {ca}, and the second shows {cb}. You could present "
         "them as two sides of one story, moving from the first scene to the second."),
        ("Human: Look at these two pictures: {a} {b} Which one would make a better poster?",
         "Assistant: The first, {ca}, is striking at a glance, while the second, {cb}, rewards a closer look. "
         "For a poster I would choose the first and use the second inside a leaflet."),
        ("Human: My friend sent me {a} and I took {b} Do they have anything in common?",
         "Assistant: More than it seems: both are about what people notice around them. One is {ca}; the other is "
         "{cb}. Together they could start a small photo series."),
    )
    _FOLLOW_UPS = (
        ("Human: Nice! Can you show me one more picture that would fit with them?",
         "Assistant: Here is one that fits the theme: {c}"),
        ("Human: Could you find another image in the same spirit?",
         "Assistant: Of course. This one continues the story: {c} It adds a new angle to the set."),
    )
    _TEXT_FOLLOW_UPS = (
        ("Human: Thanks! Which one would you print and frame?",
         "Assistant: The first: it holds up at a large size and suits most rooms."),
        ("Human: Good idea. What title would you give the pair?", "Assistant: \"Two Views\" keeps it simple."),
    )
    _CLOSERS = (
        ("Human: And what would you show at the very end?", "Assistant: I would end with {c} It leaves people "
                                                            "with something to think about."),
    )

    async def complete(self, prompt: str, captions: Sequence[str], seed: int,
                       constraint: Constraint | None = None) -> Completion:
        """The composer writes Appendix A's format by construction; a constraint changes nothing."""
        rng = random.Random(seed)
        tags = [image_tag(i, caption) for i, caption in enumerate(captions)]
        human, assistant = rng.choice(self._OPENERS)
        lines = [human.format(a=tags[0], b=tags[1]), assistant.format(ca=captions[0], cb=captions[1])]
        for index in range(2, len(captions)):
            human, assistant = rng.choice(self._FOLLOW_UPS if index == 2 else self._CLOSERS)
            lines += [human, assistant.format(c=tags[index])]
        if len(captions) == 2:  # at least two exchanges, as the released data's filters require
            lines += list(rng.choice(self._TEXT_FOLLOW_UPS))
        text = "\n\n".join(lines)
        return Completion(text, prompt_tokens=len(prompt) // 4, completion_tokens=len(text) // 4, model=self.name)

    async def close(self) -> None:
        return None


def build_backend(name: str, **settings) -> ChatBackend:
    if name == "offline":
        return OfflineComposer()
    if name == "openai":
        return OpenAIChatBackend(**settings)
    if name == "local":
        from synth.generation.local_backend import LocalChatBackend

        return LocalChatBackend(**settings)
    if name == "world":
        from synth.world.composer import WorldComposer

        return WorldComposer(**settings)
    raise ValueError(f"generate.backend must be 'openai', 'local', 'offline' or 'world', got {name!r}")
