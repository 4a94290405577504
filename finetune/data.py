"""Load, check, format, tokenize, mask and pack training data.

Pure functions, so the label masks can be tested exactly. Every record keeps where it came from (file:line), and
every error names that place and the fix. Nothing is dropped or cut without being counted in the report.
"""

from __future__ import annotations

import csv
import json
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""ChatML, the template SmolLM2 and Qwen use; also what `data.chat_template: chatml` selects."""

IGNORE = -100
ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class DataError(ValueError):
    """A record is unusable; the message names file, line (or row) and field, and the fix."""


@dataclass
class Record:
    where: str
    """`file:line` for JSONL/CSV, `file[index]` for JSON arrays, Parquet and datasets folders."""
    data: dict[str, Any]


@dataclass
class Example:
    """One tokenized example. `targets[j]` is the token to predict after `input_ids[j]` (IGNORE where not trained);
    shifting inside the example means packing never asks one example to predict the next one's first token."""

    input_ids: list[int]
    targets: list[int]
    where: str = ""

    @property
    def n_targets(self) -> int:
        return sum(t != IGNORE for t in self.targets)


@dataclass
class DataReport:
    records: int = 0
    skipped: list[str] = field(default_factory=list)
    truncated: int = 0
    tokens_cut: int = 0
    no_targets: int = 0
    tokens: int = 0
    target_tokens: int = 0
    packing: str = ""
    """How the training examples were packed (rows, width, fill), when they were."""

    def lines(self) -> list[str]:
        out = [f"{self.records} records -> {self.tokens:,} tokens ({self.target_tokens:,} trained on)"]
        if self.packing:
            out.append(self.packing)
        if self.truncated:
            out.append(f"{self.truncated} records longer than data.max_length were truncated "
                       f"({self.tokens_cut:,} tokens cut): raise data.max_length to keep them whole")
        if self.no_targets:
            out.append(f"{self.no_targets} records had no assistant tokens left after truncation and were left out")
        if self.skipped:
            out.append(f"{len(self.skipped)} bad records skipped (data.on_bad_record=skip), first: {self.skipped[0]}")
        return out


# -- reading files ---------------------------------------------------------------------------------------------
def read_records(path: str | Path) -> Iterator[Record]:
    """The records of a JSONL/JSON/CSV/Parquet file or a datasets folder, each with where it came from, so every
    later error can name `file:line`; unreadable lines raise DataError naming the line and the fix."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: data file not found. Check data.train / data.validation in your config.")
    if p.is_dir():
        yield from _read_datasets_folder(p)
        return
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        yield from _read_jsonl(p)
    elif suffix == ".json":
        yield from _read_json(p)
    elif suffix == ".csv":
        yield from _read_csv(p)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(p).to_pylist()):
            yield Record(f"{p}[{i}]", row)
    else:
        raise DataError(f"{p}: unsupported file type '{suffix}'. Use .jsonl, .json, .csv, .parquet or a datasets folder.")


def _read_text(p: Path) -> str:
    raw = p.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{p}:{line}: not valid UTF-8 (byte {e.start}). Re-save the file as UTF-8.") from None


def _read_jsonl(p: Path) -> Iterator[Record]:
    for n, line in enumerate(_read_text(p).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{n}: invalid JSON ({e.msg} at column {e.colno}). Each line must be one JSON object.") from None
        if not isinstance(obj, dict):
            raise DataError(f"{p}:{n}: each line must be a JSON object, got {type(obj).__name__}.")
        yield Record(f"{p}:{n}", obj)


def _read_json(p: Path) -> Iterator[Record]:
    try:
        obj = json.loads(_read_text(p))
    except json.JSONDecodeError as e:
        raise DataError(f"{p}:{e.lineno}: invalid JSON ({e.msg}). A .json file must hold a list of objects.") from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        raise DataError(f"{p}: a .json file must hold a list of records (or {{\"data\": [...]}}).")
    for i, r in enumerate(obj):
        if not isinstance(r, dict):
            raise DataError(f"{p}[{i}]: each record must be an object, got {type(r).__name__}.")
        yield Record(f"{p}[{i}]", r)


def _read_csv(p: Path) -> Iterator[Record]:
    reader = csv.DictReader(_read_text(p).splitlines())
    for row in reader:
        yield Record(f"{p}:{reader.line_num}", {k: v for k, v in row.items() if k is not None})


def _read_datasets_folder(p: Path) -> Iterator[Record]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as e:  # noqa: BLE001 - datasets raises many types for a wrong folder
        raise DataError(f"{p}: not a `datasets.save_to_disk` folder ({e}).") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    for i, row in enumerate(ds):
        yield Record(f"{p}[{i}]", dict(row))


# -- formats -> messages or text -------------------------------------------------------------------------------
def detect_format(rec: Record) -> str:
    keys = set(rec.data)
    if "messages" in keys or "conversations" in keys:
        return "messages"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "prompt" in keys and "completion" in keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    raise DataError(
        f"{rec.where}: cannot tell the format from keys {sorted(keys)}. Expected `messages`, "
        "`instruction`+`output` (alpaca), `prompt`+`completion`, or `text`; or set data.format."
    )


def _str_field(rec: Record, key: str, allow_empty: bool = False) -> str:
    if key not in rec.data or rec.data[key] is None:
        raise DataError(f"{rec.where}: missing field `{key}`.")
    v = rec.data[key]
    if not isinstance(v, str):
        raise DataError(f"{rec.where}: field `{key}` must be a string, got {type(v).__name__}.")
    if not allow_empty and not v.strip():
        raise DataError(f"{rec.where}: field `{key}` is empty. Fill it in or remove the record.")
    return v


def to_messages(rec: Record, fmt: str, system_prompt: str | None = None) -> list[dict[str, str]] | str:
    """Normalise a record to chat messages (or a plain string for `text`)."""
    if fmt == "text":
        return _str_field(rec, "text")
    if fmt == "alpaca":
        inp = rec.data.get("input") or ""
        if not isinstance(inp, str):
            raise DataError(f"{rec.where}: field `input` must be a string, got {type(inp).__name__}.")
        user = _str_field(rec, "instruction") + (f"\n\n{inp}" if inp.strip() else "")
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": _str_field(rec, "output")}]
        if isinstance(rec.data.get("system"), str) and rec.data["system"].strip():
            msgs.insert(0, {"role": "system", "content": rec.data["system"]})
    elif fmt == "prompt_completion":
        msgs = [{"role": "user", "content": _str_field(rec, "prompt")},
                {"role": "assistant", "content": _str_field(rec, "completion")}]
    elif fmt == "messages":
        msgs = _check_messages(rec)
    else:
        raise DataError(f"{rec.where}: unknown data.format `{fmt}`.")
    if system_prompt and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system_prompt})
    return msgs


def _check_messages(rec: Record) -> list[dict[str, str]]:
    key = "messages" if "messages" in rec.data else "conversations"
    raw = rec.data.get(key)
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{rec.where}: field `{key}` must be a non-empty list of {{role, content}} objects.")
    msgs = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise DataError(f"{rec.where}: `{key}[{i}]` must be an object with `role` and `content`.")
        role = m.get("role", _SHAREGPT_ROLES.get(str(m.get("from")), m.get("from")))
        content = m.get("content", m.get("value"))
        if role not in ROLES:
            raise DataError(f"{rec.where}: `{key}[{i}].role` is {role!r}; expected one of {list(ROLES)}.")
        if not isinstance(content, str):
            raise DataError(f"{rec.where}: `{key}[{i}].content` must be a string, got {type(content).__name__}.")
        if role == "assistant" and not content.strip():
            raise DataError(f"{rec.where}: `{key}[{i}]` is an empty assistant turn. Remove it or write the answer.")
        msgs.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{rec.where}: no assistant turn, so nothing to learn. Add an assistant message.")
    if msgs[0]["role"] == "assistant":  # chat templates cannot render the empty prompt before it
        raise DataError(f"{rec.where}: `{key}[0]` is an assistant turn, so it answers no prompt. Put a user (or "
                        "system) message before it, or give the record as plain `text`.")
    return msgs


# -- templates, tokens and masks -------------------------------------------------------------------------------
def resolve_chat_template(tokenizer: Any, setting: str | None) -> str | None:
    if setting is None:
        return tokenizer.chat_template
    if setting == "chatml":
        return CHATML_TEMPLATE
    if setting.endswith(".jinja") or setting.endswith(".j2"):
        p = Path(setting)
        if not p.exists():
            raise DataError(f"data.chat_template: file {p} not found.")
        return p.read_text()
    return setting


def chat_segments(messages: list[dict[str, str]], tokenizer: Any, template: str) -> list[tuple[str, bool]]:
    """Split the rendered conversation into (text, is_assistant_reply) pieces.

    Rendering growing prefixes works with any template (no `{% generation %}` markers needed) and proves the
    template is prefix-stable, i.e. that what we train on is exactly what `generate` will see.
    """

    def render(msgs: list[dict[str, str]], gen: bool) -> str:
        return tokenizer.apply_chat_template(msgs, chat_template=template, tokenize=False, add_generation_prompt=gen)

    segs: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render(messages[:i], True)
        full = render(messages[: i + 1], False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise DataError(
                "chat template is not prefix-stable for this conversation (rendering turn by turn does not give the "
                "same text), so assistant tokens cannot be located. Set data.chat_template (e.g. `chatml`)."
            )
        segs += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    rest = render(messages, False)[len(done):]
    if rest:
        segs.append((rest, False))
    return [s for s in segs if s[0]]


def tokenize_messages(messages: list[dict[str, str]], tokenizer: Any, template: str, train_on_prompt: bool
                      ) -> tuple[list[int], list[bool]]:
    """Token ids of the whole rendered conversation and, per token, whether it is trained on.

    The conversation is tokenized once, whole, because those are the ids the model sees at inference. Tokenizing
    each turn on its own and concatenating gives other ids at turn boundaries with SentencePiece-style (Metaspace)
    tokenizers, which put "▁" in front of every piece of text: a reply alone starts "▁Paris", inside the
    conversation "assistant\\nParis" it is "Pa" "ris". The strings match, so `chat_segments` cannot see this.

    What is trained is decided by characters: a token is trained when its character span overlaps an assistant
    reply (a token straddling the boundary counts as reply), through the reply's last end-of-turn token (EOS) but
    not the template's text after it (ChatML's "\\n"). A token with no characters of its own (offset (s, s): a
    prepended "▁", or a special token some tokenizers report as (0, 0)) goes with the next token that has some.
    `train_on_prompt` trains the prompt too, still not the text after each reply's EOS.

    Needs a fast tokenizer for the character offsets. Without one this raises instead of falling back to
    per-turn tokenization, which would silently train on ids the model never sees.
    """
    segs = chat_segments(messages, tokenizer, template)
    text = "".join(t for t, _ in segs)
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:  # transformers' slow (Python / SentencePiece) tokenizers
        enc = {}
    if "offset_mapping" not in enc:
        raise DataError(f"the tokenizer ({type(tokenizer).__name__}) gives no character offsets, so assistant tokens "
                        "cannot be located. Use a fast tokenizer: a model folder with tokenizer.json, loaded with "
                        "AutoTokenizer (use_fast=True).")
    ids: list[int] = list(enc["input_ids"])
    owner = _reply_of_tokens([tuple(o) for o in enc["offset_mapping"]], segs)
    last_eos = {r: j for j, (tid, r) in enumerate(zip(ids, owner)) if r >= 0 and tid == tokenizer.eos_token_id}
    train = [(r >= 0 or train_on_prompt) and j <= last_eos.get(r, j) for j, r in enumerate(owner)]
    return ids, train


def _reply_of_tokens(offsets: list[tuple[int, int]], segs: list[tuple[str, bool]]) -> list[int]:
    """Per token, the index of the assistant reply its characters overlap (the first, if several), or -1.
    Zero-width tokens take the value of the next token with characters (of the previous one at the very end)."""
    spans, pos = [], 0
    for seg_text, is_reply in segs:
        if is_reply:
            spans.append((pos, pos + len(seg_text)))
        pos += len(seg_text)
    owner: list[int | None] = [next((r for r, (a, b) in enumerate(spans) if s < b and a < e), -1) if s < e else None
                               for s, e in offsets]
    for j in reversed(range(len(owner) - 1)):
        if owner[j] is None:
            owner[j] = owner[j + 1]
    for j in range(1, len(owner)):
        if owner[j] is None:
            owner[j] = owner[j - 1]
    return [-1 if r is None else r for r in owner]


def tokenize_text(text: str, tokenizer: Any) -> tuple[list[int], list[bool]]:
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids = ids + [tokenizer.eos_token_id]
    return ids, [True] * len(ids)


def make_example(ids: list[int], train: list[bool], max_length: int, where: str = "") -> tuple[Example, int]:
    """Truncate to max_length and shift: returns the example and how many tokens were cut."""
    cut = max(0, len(ids) - max_length)
    ids, train = ids[:max_length], train[:max_length]
    targets = [ids[j + 1] if train[j + 1] else IGNORE for j in range(len(ids) - 1)] + [IGNORE]
    return Example(ids, targets, where), cut


def build_examples(records: list[Record], tokenizer: Any, cfg: Any, report: DataReport) -> list[Example]:
    """cfg is a DataConfig. Bad records raise (or are skipped and counted with data.on_bad_record=skip)."""
    template = resolve_chat_template(tokenizer, cfg.chat_template)
    out: list[Example] = []
    fmt = cfg.format
    for rec in records:
        report.records += 1
        try:
            f = detect_format(rec) if fmt == "auto" else fmt
            conv = to_messages(rec, f, cfg.system_prompt)
            if isinstance(conv, str):
                ids, train = tokenize_text(conv, tokenizer)
            else:
                if not template:
                    raise DataError(f"{rec.where}: the tokenizer has no chat template; set data.chat_template "
                                    "(e.g. `chatml`) or use the `text` format.")
                try:
                    ids, train = tokenize_messages(conv, tokenizer, template, cfg.train_on_prompt)
                except DataError as e:
                    raise DataError(f"{rec.where}: {e}") from None
        except DataError as e:
            if cfg.on_bad_record == "skip":
                report.skipped.append(str(e))
                continue
            raise
        ex, cut = make_example(ids, train, cfg.max_length, rec.where)
        if cut:
            report.truncated += 1
            report.tokens_cut += cut
        if ex.n_targets == 0:
            report.no_targets += 1
            continue
        report.tokens += len(ex.input_ids)
        report.target_tokens += ex.n_targets
        out.append(ex)
    return out


def prompts_and_answers(records: list[Record], cfg: Any) -> tuple[list[list[dict[str, str]]], list[str]]:
    """Each chat record split at its last assistant turn: (turns before it, its text). Eval asks the first and
    compares with the second; `text` records have no answer and are left out."""
    prompts, answers = [], []
    for rec in records:
        conv = to_messages(rec, detect_format(rec) if cfg.format == "auto" else cfg.format, cfg.system_prompt)
        if isinstance(conv, str):
            continue
        last = max(i for i, m in enumerate(conv) if m["role"] == "assistant")
        prompts.append(conv[:last])
        answers.append(conv[last]["content"])
    return prompts, answers


def load_records(paths: list[str]) -> list[Record]:
    recs = [r for p in paths for r in read_records(p)]
    if not recs:
        raise DataError(f"{', '.join(paths)}: no records found. Check the files are not empty.")
    return recs


def split_validation(records: list[Record], size: float, seed: int) -> tuple[list[Record], list[Record]]:
    n = int(size) if size >= 1 else int(round(len(records) * size))
    if n <= 0:
        return records, []
    if n >= len(records):
        raise DataError(f"data.val_set_size={size} would leave no training records (only {len(records)}).")
    idx = list(range(len(records)))
    random.Random(seed).shuffle(idx)
    held = set(idx[:n])
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


# -- batching --------------------------------------------------------------------------------------------------
class _Tokens(Protocol):
    input_ids: list[int]


_T = TypeVar("_T", bound=_Tokens)


def pack(examples: Sequence[_T], capacity: int) -> list[list[_T]]:
    """First-fit-decreasing bin packing into rows of `capacity` tokens: little padding, deterministic."""
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i))
    bins: list[list[_T]] = []
    space: list[int] = []
    for i in order:
        n = len(examples[i].input_ids)
        j = next((b for b, s in enumerate(space) if s >= n), None)
        if j is None:
            bins.append([examples[i]])
            space.append(capacity - n)
        else:
            bins[j].append(examples[i])
            space[j] -= n
    return bins


def collate(group: list[Example] | list[list[Example]], packed: bool, pad_id: int, width: int = 0, rows: int = 0,
            multiple: int = 1) -> dict[str, Any]:
    """Unpacked: right-padded rows with an attention mask. Packed: each row is several examples back to back with
    position_ids restarting per example and no attention_mask, which makes transformers build a block-diagonal
    causal mask (no attention across examples); rows are padded with a pad-only "example" that nothing attends to.

    `width` / `rows` (packed only) / `multiple`: pad to at least that many positions / rows, and the width to a
    multiple, so a compiled model sees few shapes (compiling.bucket); padding has no targets and changes no loss."""
    import torch

    # packed groups are bins (lists of examples), unpacked ones plain examples
    bins = cast("list[list[Example]]", group) if packed else [[ex] for ex in cast("list[Example]", group)]
    if packed:
        bins = bins + [[]] * (rows - len(bins))  # pad-only rows: one pad "example" each
    width = max(width, *(sum(len(ex.input_ids) for ex in row) for row in bins))
    width = -(-width // multiple) * multiple
    ids, tgt, pos, mask = [], [], [], []
    for row in bins:
        n = sum(len(ex.input_ids) for ex in row)
        ids.append([t for ex in row for t in ex.input_ids] + [pad_id] * (width - n))
        tgt.append([t for ex in row for t in ex.targets] + [IGNORE] * (width - n))
        pos.append([p for ex in row for p in range(len(ex.input_ids))] + list(range(width - n)))
        mask.append([1] * n + [0] * (width - n))
    out = {"input_ids": torch.tensor(ids), "targets": torch.tensor(tgt)}
    if packed:
        out["position_ids"] = torch.tensor(pos)
    else:
        out["attention_mask"] = torch.tensor(mask)
    return out


def examples_in(batch: list[Any]) -> list[Example]:
    """The examples of a micro-batch, packed (list of rows) or not (list of examples)."""
    return [ex for item in batch for ex in (item if isinstance(item, list) else [item])]


ROW_MULTIPLE = 32
"""`data.row_width=auto` picks widths that are multiples of this: aligned matmuls, few distinct compiled shapes."""
ATTENTION_SPAN = 0.7
"""Per token, a packed row W wide costs about (1 + W / (ATTENTION_SPAN * hidden_size)) times what its linear layers
alone cost: attention's FLOPs per token grow with W x hidden, the linear layers' with hidden^2. Fitted on the
embedded SmolLM2-135M (hidden 576), compiled, bf16, 2-core CPU, quickstart data in rows 64 to 256 wide (within
~5% of each measured width; benchmarks/README.md): attention there runs ~5x below the linear layers' FLOP rate."""


def packed_shape(examples: Sequence[Example], micro_batch_size: int, max_length: int,
                 row_width: int | str = "auto", hidden_size: int = 0) -> tuple[int, int]:
    """(row width, rows per micro-batch) for packed batches (`data.row_width`).

    A packed row's attention costs width^2 whatever it holds (the block-diagonal mask is computed whole), so short
    examples in wide rows pay for attention they never use; narrow rows, though, pack worse (examples over half a
    row get one each). `auto` packs a sample at a few widths, from the longest example up to max_length, and keeps
    the cheapest by the ATTENTION_SPAN cost model (without `hidden_size`: the least padding). More rows per
    micro-batch keep its micro_batch_size * max_length tokens, so updates and the learning-rate schedule barely
    move. Examples longer than a forced width are refused here, naming them, rather than overflowing their row."""
    longest = max(examples, key=lambda ex: len(ex.input_ids))
    n = len(longest.input_ids)
    if row_width == "auto":
        sample = list(examples[:: max(1, len(examples) // 1000)])  # packing 1,000 takes ~0.1 s a width
        span = ATTENTION_SPAN * hidden_size if hidden_size else math.inf
        widths, w = [max_length], -(-n // ROW_MULTIPLE) * ROW_MULTIPLE
        while w < max_length:
            widths.append(w)
            w = -(-int(w * 1.25) // ROW_MULTIPLE) * ROW_MULTIPLE
        width = min(widths, key=lambda c: (len(pack(sample, c)) * c * (1 + c / span), -c))
    else:
        width = int(row_width)
        if n > width:
            raise DataError(f"data.row_width={width}: {longest.where or 'an example'} is {n} tokens, longer than "
                            f"a row. Raise data.row_width to at least {n}, or set it to auto.")
    return width, max(1, round(micro_batch_size * max_length / width))


def micro_batches(examples: list[Example], micro_batch_size: int, width: int, packing: bool,
                  seed: int | None = None) -> list[list[Any]]:
    """Unpacked: lists of examples. Packed: lists of rows, each row a list of examples filling `width` tokens
    (`packed_shape` picks it).

    Rows (not one long row per micro-batch) keep attention cost at width^2 per row.
    With a seed (training) the examples are shuffled first, so a file sorted by label or topic gives neither
    one-label micro-batches (unpacked) nor one-label rows: packing sorts by length, and file order would decide
    which equal-length examples share a row. (On unsorted data the two orders are the same random procedure; on a
    label-sorted copy of the example data file order, what TRL's packer does, scored no better: benchmarks/README.md.)
    Packed rows are shuffled again after packing, which sorts them by length, so micro-batches mix long and short.
    Without a seed (evaluation) the order is kept."""
    if seed is not None:
        examples = list(examples)
        random.Random(seed).shuffle(examples)
    if not packing:
        return [examples[i: i + micro_batch_size] for i in range(0, len(examples), micro_batch_size)]
    rows = pack(examples, width)
    if seed is not None:
        random.Random(seed).shuffle(rows)
    return [rows[i: i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)]


def format_preview(ex: Example, tokenizer: Any, color: bool = True) -> str:
    """Show exactly what is trained on: trained tokens green (or inside «»), everything else dim (or plain).

    A token counts as trained when the model is asked to predict it, i.e. when the previous position targets it.
    Text is decoded as growing prefixes, not token by token: SentencePiece-style decoders drop the "▁" (space) that
    starts the first token decoded, so "▁is" alone would print as "is" and words would run together.
    """
    trained = [False] + [t != IGNORE for t in ex.targets[:-1]]
    ends = [j for j in range(1, len(trained)) if trained[j] != trained[j - 1]] + [len(trained)]
    out, start, shown = [], 0, ""
    for end in ends:
        text = tokenizer.decode(ex.input_ids[:end])
        # not a prefix: e.g. a byte-level token that ends inside a multi-byte character; decode the run alone
        piece = text[len(shown):] if text.startswith(shown) else tokenizer.decode(ex.input_ids[start:end])
        if color:
            out.append(f"\033[1;32m{piece}\033[0m" if trained[start] else f"\033[2m{piece}\033[0m")
        else:
            out.append(f"«{piece}»" if trained[start] else piece)
        start, shown = end, text
    n = sum(trained)
    return "".join(out) + f"\n-- {len(ex.input_ids)} tokens, {n} trained on ({ex.where})"
