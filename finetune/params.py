"""What a generation asks for and gives back: `GenerationParams` in, `Completion` / `Chunk` out.

Apart from `generate.py` so that the engines (transformers' `Generator`, finetune/llamacpp.py) and the front ends
share one definition of each field and its checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .logits import GREEDY_BELOW, GeneratedLogprob  # noqa: F401  (GREEDY_BELOW: re-exported)

Messages = list[dict[str, str]]
Prompt = str | Messages


@dataclass
class GenerationParams:
    max_new_tokens: int = 256
    temperature: float = 0.7
    """0 (anything below GREEDY_BELOW) means greedy decoding."""
    top_p: float = 0.95
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    """Stop strings; generation ends at the first one and it is not part of the returned text."""
    seed: int | None = None
    use_adapter: bool = True
    """False answers with the base model alone (same weights in memory), for tuned-vs-base comparisons."""
    json_schema: dict | None = None
    """A JSON schema the answer must follow: decoding only allows tokens that keep the text valid JSON of this
    schema (lm-format-enforcer), so even a 135M model's answer parses. It can still be cut by `max_new_tokens`
    (finish_reason "length"), and lm-format-enforcer's number grammar lets an integer have an exponent (`3e2`) and
    any number of digits: validate the parsed answer. The OpenAI API's `response_format` and the extract chain
    both set this."""
    presence_penalty: float = 0.0
    """OpenAI's penalties (-2..2), over the generated tokens only: logit -= presence * (count > 0)
    + frequency * count (finetune/logits.py). Positive values discourage repeating what was already written."""
    frequency_penalty: float = 0.0
    logprobs: bool = False
    """Report each generated token's log-probability (from the raw logits) in `Completion.logprobs`."""
    top_logprobs: int = 0
    """With `logprobs`: also the 0..20 likeliest tokens at each step."""

    def __post_init__(self) -> None:
        self.stop = [s for s in self.stop if s]  # "" would match everywhere and end every answer at once
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.json_schema is not None and not isinstance(self.json_schema, dict):
            raise ValueError(f"json_schema must be a JSON schema dict, got {type(self.json_schema).__name__}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2] (OpenAI's range), got {getattr(self, name)}")
        if not 0 <= self.top_logprobs <= 20:
            raise ValueError(f"top_logprobs must be in [0, 20], got {self.top_logprobs}")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=True")


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    """"stop" (EOS or a stop string), "length" (max_new_tokens reached) or "cancelled"."""
    logprobs: list[GeneratedLogprob] | None = None
    """One entry per token of `text` when `GenerationParams.logprobs` asked for them, else None."""
    prompt_ids: list[int] = field(default_factory=list)
    """The prompt's token ids as the model read them (chat template applied, no padding)."""
    token_ids: list[int] = field(default_factory=list)
    """The answer's token ids as generated, through the end-of-turn token when it ended there (past a stop string,
    which cuts `text` only): what GRPO trains on. Both lists are empty from the llama.cpp engine."""


@dataclass
class Chunk:
    """One streamed piece: `text` is the new text only; the last chunk has `done=True` and the totals."""

    text: str
    done: bool = False
    completion: Completion | None = None
    logprobs: list[GeneratedLogprob] | None = None
    """With `GenerationParams.logprobs`: the answer's token logprobs, all on the chunk with the last text (or the
    done chunk): they are read from the logits `generate` returns at its end."""


@dataclass
class TokenLogprobs:
    """How likely a model finds each token of a text: the `logprobs` object of OpenAI's completions API, and what
    lm-evaluation-harness sums to score an answer. `tokens` joined give the text back; `text_offset` is where each
    starts in it."""

    ids: list[int]
    tokens: list[str]
    text_offset: list[int]
    token_logprobs: list[float | None]
    """log p(token | the tokens before it); None for the first token, which nothing predicts."""
    top_logprobs: list[dict[str, float] | None]
    """The `top_n` most likely tokens at each position (token text -> logprob); None for the first token."""
    next_id: int | None = None
    """The most likely token after the text (what greedy decoding writes next), its logprob and top alternatives."""
    next_logprob: float | None = None
    next_top: dict[str, float] = field(default_factory=dict)
    next_ends: bool = False
    """Whether that next token ends the answer (EOS or end of turn)."""
    next_token: str = ""
    """That token as `top_logprobs` keys name it (`token_key`)."""


class ContextError(ValueError):
    """A prompt, or prompt plus `max_new_tokens`, does not fit the model's context; `param` names the culprit."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param
