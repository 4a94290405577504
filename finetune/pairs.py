"""Records for preference tuning and RL: preference pairs (DPO, ORPO, SimPO), unpaired completions with a label
(KTO) and prompts alone (GRPO), detected per record; their tokenization, and one batch for chosen + rejected.

Field names are TRL's, so its datasets load as they are:
    {"prompt": ..., "chosen": ..., "rejected": ...}      prompt, answers: strings or message lists
    {"chosen": [...], "rejected": [...]}                  "implicit prompt": whole conversations sharing a prefix
    {"prompt": ..., "completion": ..., "label": true}     KTO
    {"prompt": ..., "answer": "4", ...}                   GRPO; the other fields go to the reward functions
A string prompt is one user turn and a string answer one assistant turn, as in SFT's prompt/completion format, so
the chat template decides the tokens in both.

Each side is tokenized whole with `data.tokenize_messages`, the function SFT uses, and only the completion's
assistant turns (through their end-of-turn token) are trained: the log-probs DPO compares are of exactly the
tokens `generate` would write. Errors name file:line and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .data import (
    IGNORE,
    ROLES,
    DataError,
    DataReport,
    Example,
    Record,
    collate,
    detect_format,
    make_example,
    pack,
    tokenize_messages,
)

Messages = list[dict[str, str]]

METHOD_KIND = {"dpo": "pair", "orpo": "pair", "simpo": "pair", "kto": "unpaired", "grpo": "prompt"}
"""What records each method trains on (`detect_kind`'s names)."""

_KIND_HELP = {
    "pair": "`prompt`, `chosen` and `rejected` (a preference pair)",
    "unpaired": "`prompt`, `completion` and `label: true|false` (KTO)",
    "prompt": "`prompt` alone, plus any fields the reward functions read (GRPO)",
    "sft": "SFT data (`messages`, `prompt`+`completion`, ...)",
}


@dataclass
class Pair:
    prompt: Messages
    chosen: Messages
    """The preferred answer: one or more turns ending with an assistant turn."""
    rejected: Messages
    where: str


@dataclass
class Unpaired:
    prompt: Messages
    completion: Messages
    label: bool
    """True: a desirable answer; false: an undesirable one."""
    where: str


@dataclass
class PromptRecord:
    prompt: Messages
    fields: dict[str, Any] = field(default_factory=dict)
    """The record's other fields (`answer`, ...): what reward functions get as keyword lists."""
    where: str = ""


@dataclass
class PairExample:
    chosen: Example
    rejected: Example
    where: str


# -- detection and parsing -------------------------------------------------------------------------------------
def detect_kind(rec: Record) -> str:
    """`pair`, `unpaired`, `prompt` or `sft`, from the record's keys alone (so a file may mix nothing unexpected:
    `check_kind` names the first record that does not fit the method)."""
    keys = set(rec.data)
    if keys & {"chosen", "rejected"}:
        return "pair"
    if "label" in keys:
        return "unpaired"
    if "prompt" in keys and not keys & {"completion", "messages", "conversations"}:
        return "prompt"
    detect_format(rec)  # raises, naming the keys, when the record is nothing we know
    return "sft"


def parse_record(rec: Record, method: str, system_prompt: str | None = None) -> Pair | Unpaired | PromptRecord:
    """The record as what `method` trains on, or a DataError naming file:line, what it holds and what is needed."""
    want, kind = METHOD_KIND[method], detect_kind(rec)
    if kind != want:
        raise DataError(f"{rec.where}: method `{method}` trains on {_KIND_HELP[want]}, but this record holds "
                        f"{_KIND_HELP[kind]} (keys {sorted(rec.data)}). Convert the data, or pick the method that "
                        "fits it.")
    if want == "pair":
        return to_pair(rec, system_prompt)
    if want == "unpaired":
        return to_unpaired(rec, system_prompt)
    return to_prompt(rec, system_prompt)


def _messages(rec: Record, key: str, value: Any) -> Messages:
    """A string -> one turn; a list -> checked {role, content} turns."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{rec.where}: `{key}` must be a non-empty string or list of {{role, content}} messages.")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{rec.where}: `{key}[{i}]` must be an object with `role` (one of {list(ROLES)}) and "
                            f"string `content`, got {m!r:.80}.")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _prompt(rec: Record, value: Any, system_prompt: str | None) -> Messages:
    if value is None or (isinstance(value, str | list) and not value) or (isinstance(value, str) and not value.strip()):
        raise DataError(f"{rec.where}: `prompt` is missing or empty. Write the prompt, or remove the record.")
    msgs = [{"role": "user", "content": value}] if isinstance(value, str) else _messages(rec, "prompt", value)
    if system_prompt and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system_prompt})
    return msgs


def _answer(rec: Record, key: str, value: Any) -> Messages:
    """One side: a non-empty assistant answer, or turns ending with a non-empty assistant turn."""
    if value is None:
        raise DataError(f"{rec.where}: missing `{key}`. Add the {key} answer, or remove the record.")
    if (isinstance(value, str) and not value.strip()) or value == []:
        raise DataError(f"{rec.where}: `{key}` is empty. Write the {key} answer, or remove the record.")
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    msgs = _messages(rec, key, value)
    if msgs[-1]["role"] != "assistant" or not msgs[-1]["content"].strip():
        raise DataError(f"{rec.where}: `{key}` must end with a non-empty assistant turn (the answer that is trained), "
                        f"got a {msgs[-1]['role']} turn{' that is empty' if msgs[-1]['role'] == 'assistant' else ''}.")
    return msgs


def to_pair(rec: Record, system_prompt: str | None = None) -> Pair:
    """A preference pair; without `prompt`, chosen and rejected are whole conversations and the prompt is the
    turns they share (TRL's `extract_prompt`)."""
    d = rec.data
    for key in ("chosen", "rejected"):
        if d.get(key) is None:
            raise DataError(f"{rec.where}: missing `{key}`. A preference record needs `prompt`, `chosen` and "
                            f"`rejected`; add the {key} answer, or remove the record.")
    chosen, rejected = d["chosen"], d["rejected"]
    if "prompt" not in d:
        if not isinstance(chosen, list) or not isinstance(rejected, list):
            raise DataError(f"{rec.where}: no `prompt`, and `chosen` / `rejected` are not conversations, so the prompt "
                            "cannot be told apart from the answers. Add a `prompt` field, or give chosen and "
                            "rejected as whole conversations (message lists) that share the prompt turns.")
        c, r = _messages(rec, "chosen", chosen), _messages(rec, "rejected", rejected)
        n = 0
        while n < min(len(c), len(r)) and c[n] == r[n]:
            n += 1
        if n == 0:
            raise DataError(f"{rec.where}: `chosen` and `rejected` share no first turn, so there is no prompt to "
                            "extract. Add a `prompt` field, or start both conversations with the same turns.")
        prompt, chosen, rejected = c[:n], c[n:], r[n:]
        if not chosen and not rejected:
            raise DataError(f"{rec.where}: `chosen` and `rejected` are the same conversation, so there is no "
                            "preference to learn. Fix one of them, or remove the record.")
        if system_prompt and prompt[0]["role"] != "system":
            prompt.insert(0, {"role": "system", "content": system_prompt})
    else:
        prompt = _prompt(rec, d["prompt"], system_prompt)
    c, r = _answer(rec, "chosen", chosen), _answer(rec, "rejected", rejected)
    if [(m["role"], m["content"].strip()) for m in c] == [(m["role"], m["content"].strip()) for m in r]:
        raise DataError(f"{rec.where}: `chosen` and `rejected` are the same answer, so there is no preference to "
                        "learn. Fix one of them, or remove the record.")
    return Pair(prompt, c, r, rec.where)


def _label(rec: Record) -> bool:
    v = rec.data.get("label")
    if isinstance(v, bool):
        return v
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in ("true", "false", "1", "0"):  # CSV cells are strings
        return v.strip().lower() in ("true", "1")
    raise DataError(f"{rec.where}: `label` must be true (a desirable answer) or false (an undesirable one), got "
                    f"{v!r}.")


def to_unpaired(rec: Record, system_prompt: str | None = None) -> Unpaired:
    return Unpaired(_prompt(rec, rec.data.get("prompt"), system_prompt),
                    _answer(rec, "completion", rec.data.get("completion")), _label(rec), rec.where)


def to_prompt(rec: Record, system_prompt: str | None = None) -> PromptRecord:
    fields = {k: v for k, v in rec.data.items() if k != "prompt"}
    return PromptRecord(_prompt(rec, rec.data.get("prompt"), system_prompt), fields, rec.where)


def mismatched(items: list[Unpaired]) -> list[Unpaired]:
    """Each prompt with the previous record's completion (the first with the last), as TRL's KTO builds its KL
    batch: KTO's estimate of KL(policy || reference) averages log-ratios over such pairs, about which no label
    says anything."""
    n = len(items)
    return [Unpaired(items[i].prompt, items[i - 1].completion, items[i].label, items[i].where) for i in range(n)]


# -- tokens ------------------------------------------------------------------------------------------------------
def completion_ids(prompt: Messages, completion: Messages, tokenizer: Any, template: str) -> tuple[list[int],
                                                                                                   list[bool]]:
    """Ids of the whole conversation and which are trained: the completion's assistant turns through their
    end-of-turn token, never an assistant turn of the prompt (few-shot examples and earlier replies are context)."""
    ids, train = tokenize_messages(prompt + completion, tokenizer, template, train_on_prompt=False)
    k = sum(m["role"] == "assistant" for m in completion)
    runs = [j for j in range(len(train)) if train[j] and (j == 0 or not train[j - 1])]  # starts of trained runs
    start = runs[-k] if len(runs) >= k else 0
    return ids, [t and j >= start for j, t in enumerate(train)]


def _example(ids: list[int], train: list[bool], max_length: int, where: str) -> tuple[Example, int]:
    first = train.index(True) if True in train else len(train)
    if first >= max_length:
        raise DataError(f"{where}: the prompt is {first} tokens but data.max_length is {max_length}, so no token of "
                        f"the answer fits. Raise data.max_length above {first}, or shorten the prompt.")
    return make_example(ids, train, max_length, where)


def tokenize_pair(pair: Pair, tokenizer: Any, template: str, max_length: int) -> tuple[PairExample, int]:
    """Both sides as Examples, and how many tokens truncation cut (the answers' ends; the prompt is kept)."""
    c, cut_c = _example(*completion_ids(pair.prompt, pair.chosen, tokenizer, template), max_length, pair.where)
    r, cut_r = _example(*completion_ids(pair.prompt, pair.rejected, tokenizer, template), max_length, pair.where)
    return PairExample(c, r, pair.where), cut_c + cut_r


def tokenize_unpaired(item: Unpaired, tokenizer: Any, template: str, max_length: int) -> tuple[Example, int]:
    return _example(*completion_ids(item.prompt, item.completion, tokenizer, template), max_length, item.where)


def sampled_examples(completions: list[Any], max_length: int, where: str = "") -> list[Example]:
    """GRPO's sampled answers (`generate.Completion`s) as Examples: the prompt as the Generator read it, then the
    answer's tokens exactly as sampled, through the end-of-turn token when the answer ended there (a cut answer
    has none). Training scores the tokens the policy chose, as TRL does: re-tokenizing the decoded text could
    split it differently and train tokens nobody sampled."""
    return [_example(c.prompt_ids + c.token_ids, [False] * len(c.prompt_ids) + [True] * len(c.token_ids),
                     max_length, where)[0] for c in completions]


def check_prompt_length(item: PromptRecord, tokenizer: Any, template: str, max_length: int, max_new_tokens: int
                        ) -> int:
    """A GRPO prompt's token count (with the assistant header generation starts from), checked at load time so a
    long prompt fails in seconds, naming its record, instead of at the step that samples it."""
    text = tokenizer.apply_chat_template(item.prompt, chat_template=template, tokenize=False,
                                         add_generation_prompt=True)
    n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    if n + max_new_tokens > max_length:
        raise DataError(f"{item.where}: the prompt is {n} tokens and answers may take {max_new_tokens} "
                        f"(grpo.max_new_tokens), over data.max_length={max_length}. Raise data.max_length to at "
                        f"least {n + max_new_tokens}, lower grpo.max_new_tokens, or shorten the prompt.")
    return n

def build_pair_examples(records: list[Record], tokenizer: Any, template: str | None, max_length: int,
                        system_prompt: str | None = None, report: DataReport | None = None,
                        skip_bad: bool = False) -> list[PairExample]:
    """Every record as a tokenized pair, truncation counted in `report` (as SFT's `build_examples` does).
    `skip_bad` (data.on_bad_record=skip) drops bad records and lists them in the report instead of raising."""
    if not template:
        raise DataError("preference data needs a chat template; set data.chat_template (e.g. `chatml`).")
    report = report if report is not None else DataReport()
    out = []
    for rec in records:
        report.records += 1
        try:
            pair = parse_record(rec, "dpo", system_prompt)
            ex, cut = tokenize_pair(pair, tokenizer, template, max_length)  # type: ignore[arg-type]
        except DataError as e:
            if not skip_bad:
                raise
            report.skipped.append(str(e))
            continue
        if cut:
            report.truncated += 1
            report.tokens_cut += cut
        for side in (ex.chosen, ex.rejected):
            report.tokens += len(side.input_ids)
            report.target_tokens += side.n_targets
        out.append(ex)
    return out


# -- batches -----------------------------------------------------------------------------------------------------
@dataclass
class _Unit:
    """What packing places: a sequence alone, or a group's shared prompt followed by the rest of each member."""

    input_ids: list[int]
    targets: list[int]
    positions: list[int]
    branch: list[int]
    """0: the shared prompt, which every member attends to; b: the rest of the group's b-th member (1-based)."""
    owner: list[int]
    """The sequence index (in `seqs`) of each token; -1 on the shared prompt."""


def shared_length(seqs: list[Example]) -> int:
    """How many leading tokens every sequence of the group has in common and none trains on: forwarded once.
    Each member keeps at least the last untrained token, whose target is its own first answer token."""
    k = min(min(len(s.input_ids) - 1, next((j for j, t in enumerate(s.targets) if t != IGNORE), len(s.targets)))
            for s in seqs)
    n = 0
    while n < k and all(s.input_ids[n] == seqs[0].input_ids[n] for s in seqs):
        n += 1
    return n


def _units(seqs: list[Example], groups: list[list[int]], capacity: int) -> list[_Unit]:
    """One unit per group whose members share a prompt (and fit in `capacity` together, when packing), else one
    per sequence."""
    units = []
    for g in groups:
        members = [seqs[i] for i in g]
        k = shared_length(members) if len(g) > 1 else 0
        size = k + sum(len(m.input_ids) - k for m in members)
        if k == 0 or (capacity and size > capacity):
            units += [_Unit(m.input_ids, m.targets, list(range(len(m.input_ids))), [1] * len(m.input_ids),
                            [i] * len(m.input_ids)) for i, m in zip(g, members)]
            continue
        u = _Unit(members[0].input_ids[:k], [IGNORE] * k, list(range(k)), [0] * k, [-1] * k)
        for b, (i, m) in enumerate(zip(g, members), 1):
            rest = len(m.input_ids) - k
            u.input_ids += m.input_ids[k:]
            u.targets += m.targets[k:]
            u.positions += range(k, len(m.input_ids))
            u.branch += [b] * rest
            u.owner += [i] * rest
        units.append(u)
    return units


def _collate_shared(seqs: list[Example], groups: list[list[int]], pad_id: int, packed: bool,
                    capacity: int) -> dict[str, Any]:
    """Rows of units with explicit positions and a boolean (rows, 1, width, width) attention mask: a token attends
    to earlier tokens of its own unit that are either the shared prompt or its own sequence."""
    import torch

    units = _units(seqs, groups, capacity if packed else 0)
    rows = pack(units, capacity or max(len(u.input_ids) for u in units)) if packed else [[u] for u in units]
    width = max(sum(len(u.input_ids) for u in row) for row in rows)
    ids, tgt, pos, seg, br, own = [], [], [], [], [], []
    for row in rows:
        pad = width - sum(len(u.input_ids) for u in row)
        ids.append([t for u in row for t in u.input_ids] + [pad_id] * pad)
        tgt.append([t for u in row for t in u.targets] + [IGNORE] * pad)
        pos.append([p for u in row for p in u.positions] + list(range(pad)))
        seg.append([j for j, u in enumerate(row) for _ in u.input_ids] + [-1] * pad)
        br.append([b for u in row for b in u.branch] + [0] * pad)
        own.append([o for u in row for o in u.owner] + [-1] * pad)
    seg_t, br_t = torch.tensor(seg), torch.tensor(br)
    mask = ((seg_t[:, :, None] == seg_t[:, None, :])
            & ((br_t[:, None, :] == 0) | (br_t[:, :, None] == br_t[:, None, :]))
            & torch.ones(width, width, dtype=torch.bool).tril())
    targets = torch.tensor(tgt)
    return {"input_ids": torch.tensor(ids), "targets": targets, "position_ids": torch.tensor(pos),
            "attention_mask": mask[:, None], "sequence": torch.where(targets != IGNORE, torch.tensor(own), -1),
            "n_seqs": torch.tensor(len(seqs))}


def collate_sequences(seqs: list[Example], pad_id: int, packed: bool, capacity: int = 0,
                      groups: list[list[int]] | None = None) -> dict[str, Any]:
    """`data.collate`'s batch (right-padded rows, or packed rows of `capacity` tokens with positions restarting per
    sequence) plus `sequence`, per target position the index of its sequence in `seqs` (-1 where nothing is
    trained), and `n_seqs`: what `preference.sequence_logps` sums by.

    `groups` (lists of indices into `seqs`: a pair's two answers, GRPO's samples of one prompt) forwards the
    prompt each group shares once, with a 4D boolean attention mask that keeps every answer from seeing the
    others (`data.share_prompt`); the log-probs are those of each sequence forwarded alone."""
    import torch

    if groups is not None:
        return _collate_shared(seqs, groups, pad_id, packed, capacity)
    if packed:
        rows = pack(seqs, capacity or max(len(s.input_ids) for s in seqs))
        index = {id(s): i for i, s in enumerate(seqs)}
        owner = [[index[id(s)] for s in row for _ in s.input_ids] for row in rows]
        batch = collate(rows, True, pad_id)
    else:
        owner = [[i] * len(s.input_ids) for i, s in enumerate(seqs)]
        batch = collate(seqs, False, pad_id)
    width = batch["input_ids"].shape[1]
    seq = torch.tensor([o + [-1] * (width - len(o)) for o in owner])
    batch["sequence"] = torch.where(batch["targets"] != IGNORE, seq, -1)
    batch["n_seqs"] = torch.tensor(len(seqs))
    return batch


def collate_pairs(pairs: list[PairExample], pad_id: int, packed: bool, capacity: int = 0,
                  share: bool = False) -> dict[str, Any]:
    """Chosen and rejected of every pair in one batch for one forward: sequences 0..n-1 are the chosen answers,
    n..2n-1 the rejected ones, so `sums.chunk(2)` gives (chosen, rejected). `share`: their prompt once."""
    n = len(pairs)
    return collate_sequences([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id, packed, capacity,
                             [[i, n + i] for i in range(n)] if share else None)
