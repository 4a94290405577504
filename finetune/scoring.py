"""Log-likelihood of candidate answers after a prompt: label scoring for eval, the classify chain and the
trainer's eval accuracy. The prompt runs once and its KV cache is shared by all candidates."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from .loss import _causal  # the one 'causal LM under the PEFT wrapper' helper

if TYPE_CHECKING:
    from .params import Prompt


def candidate_ids(tokenizer: Any, prompt: Prompt, candidates: Sequence[str]) -> tuple[list[int], list[list[int]],
                                                                                   list[list[bool]]]:
    """(shared prompt ids, per candidate: continuation ids, which of them are scored).

    A chat prompt is tokenized with each candidate as the assistant reply by the same function training uses, so
    the scored tokens are exactly the trained ones (reply + end-of-turn). The shared prefix is what all candidates'
    token sequences have in common before their first scored token; a token straddling the boundary is fed but
    not scored. A plain-text prompt scores the candidate text plus EOS."""
    from .data import tokenize_messages

    seqs: list[tuple[list[int], list[bool]]] = []
    for cand in candidates:
        if isinstance(prompt, str):
            text = prompt + cand + (tokenizer.eos_token or "")
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            seqs.append((list(enc["input_ids"]), [e > len(prompt) for _, e in enc["offset_mapping"]]))
        else:
            if not tokenizer.chat_template:
                raise ValueError("the tokenizer has no chat template; pass plain string prompts to score labels")
            msgs = list(prompt) + [{"role": "assistant", "content": cand}]
            ids, train = tokenize_messages(msgs, tokenizer, tokenizer.chat_template, train_on_prompt=False)
            # only the candidate (the last reply) is scored; few-shot example replies in the prompt are context
            start = len(train)
            while start > 0 and not train[start - 1]:
                start -= 1
            while start > 0 and train[start - 1]:
                start -= 1
            seqs.append((ids, [t and j >= start for j, t in enumerate(train)]))
    firsts = [tr.index(True) if True in tr else len(tr) for _, tr in seqs]
    n = min(firsts)
    while n > 0 and any(ids[:n] != seqs[0][0][:n] for ids, _ in seqs):
        n -= 1
    if n == 0:
        raise ValueError("cannot score candidates: they share no prompt tokens (an empty prompt?)")
    return seqs[0][0][:n], [ids[n:] for ids, _ in seqs], [tr[n:] for _, tr in seqs]


def score_candidates(model: Any, tokenizer: Any, prompts: Sequence[Prompt], candidates: Sequence[str],
                     max_rows: int = 64) -> torch.Tensor:
    """(len(prompts), len(candidates)) summed log-probs; see `Generator.score`. Also used by the trainer's eval.

    Prompts are left-padded and run once per batch; their KV cache is repeated for the candidates, which run
    right-padded with explicit positions (so padding never shifts a position)."""
    k = len(candidates)
    if k == 0:
        raise ValueError("no candidates to score")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = torch.empty(len(prompts), k, dtype=torch.float64)
    per = max(1, max_rows // k)
    for start in range(0, len(prompts), per):
        chunk = [candidate_ids(tokenizer, p, candidates) for p in prompts[start: start + per]]
        r = len(chunk)
        plen = max(len(c[0]) for c in chunk)
        p_ids = torch.full((r, plen), pad, dtype=torch.long)
        p_mask = torch.zeros((r, plen), dtype=torch.long)
        for i, (ids, _, _) in enumerate(chunk):
            p_ids[i, plen - len(ids):] = torch.tensor(ids)
            p_mask[i, plen - len(ids):] = 1
        p_pos = (p_mask.cumsum(1) - 1).clamp(min=0)
        res = model(input_ids=p_ids.to(device), attention_mask=p_mask.to(device), position_ids=p_pos.to(device),
                    use_cache=True)
        last = torch.log_softmax(res.logits[:, -1].float(), -1).repeat_interleave(k, 0)  # (r*k, V)
        cache = res.cache if hasattr(res, "cache") else res.past_key_values  # renamed in transformers 5.x
        cache.batch_repeat_interleave(k)
        clen = max(len(c) for _, conts, _ in chunk for c in conts)
        c_ids = torch.full((r * k, clen), pad, dtype=torch.long)
        c_mask = torch.zeros((r * k, clen), dtype=torch.long)
        scored = torch.zeros((r * k, clen), dtype=torch.bool)
        for i, (_, conts, marks) in enumerate(chunk):
            for j, (ids, mk) in enumerate(zip(conts, marks)):
                c_ids[i * k + j, : len(ids)] = torch.tensor(ids)
                c_mask[i * k + j, : len(ids)] = 1
                scored[i * k + j, : len(mk)] = torch.tensor(mk)
        c_pos = p_mask.sum(1).repeat_interleave(k)[:, None] + torch.arange(clen)[None]
        mask = torch.cat([p_mask.repeat_interleave(k, 0), c_mask], 1)
        logits = model(input_ids=c_ids.to(device), attention_mask=mask.to(device), position_ids=c_pos.to(device),
                       use_cache=True, **{_cache_kw(model): cache}).logits.float()
        # token t of the continuation is predicted by the prompt's last position (t = 0) or continuation t - 1
        logp = torch.cat([last[:, None], torch.log_softmax(logits[:, :-1], -1)], 1)
        tok_lp = logp.gather(-1, c_ids.to(device)[..., None])[..., 0].cpu().double()
        out[start: start + r] = (tok_lp * scored).sum(1).view(r, k)
    return out


def _cache_kw(model: Any) -> str:
    """`cache` in transformers >= 5.2x, `past_key_values` before (and deprecated after)."""
    import inspect

    return "cache" if "cache" in inspect.signature(_causal(model).forward).parameters else "past_key_values"
