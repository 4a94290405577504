"""Logit-level pieces of OpenAI's sampling options that transformers' `generate` does not have: presence and
frequency penalties, and per-token log-probabilities.

Kept apart from generate.py so the generation loop stays one readable function; `Generator._run` only asks
`generate_kwargs` what to add to `model.generate` and `completion_logprobs` what to report.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

GREEDY_BELOW = 1e-4
"""Temperatures under this decode greedily: dividing logits by ~1e-246 overflows to inf, and the sampler's
probabilities to NaN; at 1e-4 sampling already picks the top token whenever it leads by 0.01 logits."""


@dataclass
class GeneratedLogprob:
    """One generated token: its text, its log-probability under the model, and the `top` likeliest alternatives.

    Log-probabilities come from the model's raw logits (log_softmax over the whole vocabulary), before penalties,
    temperature, top-p or a JSON-schema mask: what the model thinks, not what the sampler was allowed to pick, as
    in OpenAI's API. So a token forced by a schema may have a low logprob, and greedy decoding picks the top one."""

    token: str
    logprob: float
    top: list[tuple[str, float, bytes]]
    """(token text, logprob, bytes) of the likeliest tokens at this step, likeliest first; empty unless asked for."""
    bytes: bytes = b""
    """The token's own bytes: a token holding part of a UTF-8 character reads as U+FFFD in `token`; clients join
    the bytes of consecutive tokens to get the character back."""


class PresenceFrequencyPenalty(LogitsProcessor):
    """OpenAI's penalties: `logit[t] -= presence * (count[t] > 0) + frequency * count[t]`, counting the tokens
    generated so far only (not the prompt's, unlike transformers' multiplicative `repetition_penalty`).

    It runs after the built-in processors (a JSON-schema mask stays -inf) and before temperature and top-p, since
    transformers appends sampling warpers after custom processors: the penalty shifts logits, as OpenAI's does."""

    def __init__(self, presence: float, frequency: float, prompt_len: int) -> None:
        self.presence, self.frequency, self.prompt_len = presence, frequency, prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        new = input_ids[:, self.prompt_len:]  # left padding gives every row the same prompt length
        if new.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, new, torch.ones_like(new, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


def generate_kwargs(p: Any, prompt_len: int) -> dict[str, Any]:
    """What `model.generate` needs for `p`'s penalties and logprobs (empty when neither is asked for)."""
    kw: dict[str, Any] = {}
    if p.presence_penalty or p.frequency_penalty:
        kw["logits_processor"] = LogitsProcessorList(
            [PresenceFrequencyPenalty(p.presence_penalty, p.frequency_penalty, prompt_len)])
    if p.logprobs:
        kw.update(output_logits=True, return_dict_in_generate=True)  # raw logits, one (batch, vocab) per step
    return kw


def row_processors(p: Any, prompt_len: int, device: torch.device, allowed: Any = None) -> LogitsProcessorList:
    """One answer's own logits processors for continuous batching (finetune/continuous.py), in `generate`'s order:
    repetition penalty, the JSON schema's `allowed` tokens (a `prefix_allowed_tokens_fn`), OpenAI's penalties,
    then sampling (`RowSampler`, one row); empty means greedy."""
    from transformers import PrefixConstrainedLogitsProcessor, RepetitionPenaltyLogitsProcessor

    out = LogitsProcessorList()
    if p.repetition_penalty != 1.0:
        out.append(RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
    if allowed is not None:
        out.append(PrefixConstrainedLogitsProcessor(allowed, 1))
    out.extend(generate_kwargs(p, prompt_len).get("logits_processor", []))
    if p.temperature >= GREEDY_BELOW:
        out.append(RowSampler(1, p.temperature, p.top_p, p.top_k, p.seed, device))
    return out


def completion_logprobs(tokenizer: Any, raw_logits: Sequence[torch.Tensor], row: int, ids: Sequence[int], text: str,
                        top: int) -> list[GeneratedLogprob]:
    """Per-token logprobs of `ids` (row `row` of the batch) for the tokens that make up `text`.

    The end-of-turn token and a stop string's tokens are not part of the answer text, so they are left out: the
    entries cover the shortest prefix of `ids` that decodes to at least `text`."""
    keep = len(ids)
    while keep > 0 and len(tokenizer.decode(ids[: keep - 1], skip_special_tokens=True)) >= len(text):
        keep -= 1
    out = []
    for j, tok in enumerate(ids[:keep]):
        lp = torch.log_softmax(raw_logits[j][row].float(), dim=-1)
        alts = []
        if top:
            values, idx = lp.topk(top)
            for v, t in zip(values.tolist(), idx.tolist()):
                alt_text, alt_bytes = _token_text(tokenizer, t)
                alts.append((alt_text, v, alt_bytes))
        token_text, token_bytes = _token_text(tokenizer, tok)
        out.append(GeneratedLogprob(token_text, float(lp[tok]), alts, token_bytes))
    return out


def _token_text(tokenizer: Any, token_id: int) -> tuple[str, bytes]:
    """(text, bytes) of one token. Byte-level BPE (GPT-2, SmolLM, Qwen, Llama 3) spells a token's bytes as
    printable characters; those are mapped back when the token is only part of a character."""
    text = tokenizer.decode([token_id])
    if "\ufffd" not in text:
        return text, text.encode("utf-8")
    piece = tokenizer.convert_ids_to_tokens(token_id)
    table = _byte_decoder()
    if isinstance(piece, str) and piece and all(c in table for c in piece):
        return text, bytes(table[c] for c in piece)
    if isinstance(piece, str) and piece.startswith("<0x") and piece.endswith(">"):  # SentencePiece byte fallback
        return text, bytes([int(piece[3:-1], 16)])
    return text, text.encode("utf-8")


@functools.cache
def _byte_decoder() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


class RowSampler(LogitsProcessor):
    """Sampling with a random generator of each row's own, as the last logits processor: it draws the next token
    and leaves only that one finite, so `generate` runs in greedy mode and takes it.

    transformers' own sampling draws from torch's process-wide RNG, so a seeded request gave other text whenever
    another request sampled at the same time (each draw advances the shared state). Here a seed gives each row a
    generator of its own: the same seeded request gives the same text alone, batched or beside other requests.
    Without a seed each row's generator is seeded from torch's global RNG. Temperature, top-k and top-p are
    transformers' own warpers, in the order its sampling applies them."""

    def __init__(self, rows: int, temperature: float, top_p: float, top_k: int, seed: int | None,
                 device: torch.device) -> None:
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        warpers: list[LogitsProcessor] = [TemperatureLogitsWarper(float(temperature))]  # JSON may send 1
        if top_k:
            warpers.append(TopKLogitsWarper(int(top_k)))
        if top_p < 1.0:
            warpers.append(TopPLogitsWarper(float(top_p)))
        self.warpers = LogitsProcessorList(warpers)
        self.generators = []
        for _ in range(rows):
            g = torch.Generator(device=device)
            # unseeded: drawn from torch's global RNG, so `torch.manual_seed` still makes a whole run repeatable
            g.manual_seed(seed % 2**64 if seed is not None else int(torch.randint(2**62, (1,))))
            self.generators.append(g)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self.warpers(input_ids, scores.float()), dim=-1)
        picked = torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(self.generators)])
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, picked[:, None], 0.0)


def token_key(text: str, raw: bytes) -> str:
    """A token as OpenAI's completions API names it in `top_logprobs`: its text, or `bytes:\\xe2\\x80` when it is
    only part of a UTF-8 character (all such tokens would otherwise read U+FFFD and collide)."""
    return text if "\ufffd" not in text else "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
