"""What a generation run costs: tokens always, dollars only where the model's price is known.

A free local model must never be reported as costing money, so a price is
looked up by model name in a table (built in, extended in YAML under
``generate.prices``) and an unknown model gets tokens and no dollar figure.
Prompt tokens are counted with the model's tokenizer where one is available
(``generate.tokenizer``, or ``tiktoken`` for OpenAI models when it is installed
and has its encodings cached), otherwise estimated at four characters a token,
and the estimate says which.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Price:
    """US dollars per million tokens."""

    prompt: float
    completion: float

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.prompt + completion_tokens * self.completion) / 1e6


#: OpenAI list prices in USD per million tokens, as published in 2024. Prices change: check
#: yours and override them (or add other models) under ``generate.prices`` in the run config.
#: Section 4.1 of the paper used GPT-4 (8k context): 30 / 60.
DEFAULT_PRICES: dict[str, Price] = {
    "gpt-4": Price(30.0, 60.0),
    "gpt-4-32k": Price(60.0, 120.0),
    "gpt-4-turbo": Price(10.0, 30.0),
    "gpt-4o": Price(2.5, 10.0),
    "gpt-4o-mini": Price(0.15, 0.6),
    "gpt-3.5-turbo": Price(0.5, 1.5),
}


def price_table(extra: Mapping[str, Any] | None = None) -> dict[str, Price]:
    """The built-in table with the user's entries (``{model: {prompt: x, completion: y}}``) over it."""
    table = dict(DEFAULT_PRICES)
    for model, value in (extra or {}).items():
        try:
            table[model] = value if isinstance(value, Price) else Price(float(value["prompt"]),
                                                                      float(value["completion"]))
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"generate.prices.{model} must be {{prompt: USD per million tokens, completion: USD "
                             f"per million tokens}}, got {value!r}") from None
    return table


def price_for(model: str, table: Mapping[str, Price]) -> Price | None:
    """The model's price: an exact entry, else the longest entry it extends with a ``-suffix``
    (``gpt-4-0613`` is priced as ``gpt-4``; ``gpt-4o`` is not); None for an unknown model."""
    if model in table:
        return table[model]
    matches = [name for name in table if model.startswith(name + "-")]
    return table[max(matches, key=len)] if matches else None


class TokenCounter:
    """Counts prompt tokens as exactly as the environment allows; ``method`` says how."""

    def __init__(self, count: Callable[[str], int], method: str) -> None:
        self.count, self.method = count, method

    @classmethod
    def for_model(cls, model: str, tokenizer: Any = None) -> "TokenCounter":
        """A transformers tokenizer (object, hub id or directory) when given; tiktoken for a model it
        knows; else the four-characters-a-token estimate."""
        if tokenizer is not None:
            if isinstance(tokenizer, str):
                from transformers import AutoTokenizer

                name = tokenizer
                tokenizer = AutoTokenizer.from_pretrained(tokenizer)
            else:
                name = type(tokenizer).__name__
            return cls(lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"]),
                       f"counted with the tokenizer {name}")
        try:
            import tiktoken

            encoding = tiktoken.encoding_for_model(model)
            return cls(lambda text: len(encoding.encode(text)), f"counted with tiktoken ({encoding.name})")
        # not installed; a model tiktoken does not know; encodings not cached and not downloadable
        # offline (requests' errors are OSErrors)
        except (ImportError, KeyError, ValueError, OSError):
            return cls(lambda text: -(-len(text) // 4), "estimated at 4 characters per token")


@dataclass
class Estimate:
    requests: int
    prompt_tokens: int
    completion_tokens: int  # expected: requests x expected completion tokens
    max_completion_tokens: int | None  # requests x max_tokens, the most the run can produce
    method: str
    price: Price | None

    @property
    def cost(self) -> float | None:
        return None if self.price is None else self.price.cost(self.prompt_tokens, self.completion_tokens)

    @property
    def max_cost(self) -> float | None:
        if self.price is None or self.max_completion_tokens is None:
            return None
        return self.price.cost(self.prompt_tokens, self.max_completion_tokens)

    def describe(self, model: str, section: str = "generate") -> str:
        text = (f"{self.requests} request(s) to {model}: ~{self.prompt_tokens:,} prompt tokens ({self.method}) and "
                f"~{self.completion_tokens:,} completion tokens expected")
        if self.price is None:
            return text + f"; no price is known for {model!r}, so no dollar figure (add one under {section}.prices)"
        text += f"; estimated ${self.cost:,.2f}"
        if self.max_cost is not None:
            text += f" (at most ${self.max_cost:,.2f} if every reply reaches max_tokens)"
        return text


def estimate(prompts: Sequence[str], counter: TokenCounter, expected_completion_tokens: int,
             max_tokens: int | None, price: Price | None) -> Estimate:
    return Estimate(len(prompts), sum(counter.count(prompt) for prompt in prompts),
                    len(prompts) * expected_completion_tokens,
                    len(prompts) * max_tokens if max_tokens else None, counter.method, price)
