"""Exact label masks per format, bad records named by file and line, packing without cross-contamination."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunesmith.finetune.config import DataConfig
from tunesmith.finetune.data import (
    CHATML_TEMPLATE,
    IGNORE,
    DataError,
    DataReport,
    Example,
    build_examples,
    chat_segments,
    collate,
    format_preview,
    load_records,
    make_example,
    micro_batches,
    pack,
    packed_shape,
    read_records,
    tokenize_messages,
)
from tunesmith.finetune.tiny import build_tiny_tokenizer

FIX = Path(__file__).parent.parent / "fixtures"


def _trained_text(tok, ex) -> list[str]:
    """Decode each maximal run of trained-on tokens."""
    trained = [False] + [t != IGNORE for t in ex.targets[:-1]]
    runs, cur = [], []
    for tid, flag in zip(ex.input_ids, trained):
        if flag:
            cur.append(tid)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


def _build(tok, path, **kw):
    cfg = DataConfig(**kw)
    return build_examples(load_records([str(path)]), tok, cfg, DataReport())


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_messages_mask_is_exactly_the_assistant_replies_with_eos(tok):
    ex = _build(tok, FIX / "messages.jsonl")
    assert _trained_text(tok, ex[0]) == ["Paris.<|im_end|>", "Berlin.<|im_end|>"]
    assert _trained_text(tok, ex[1]) == ["four<|im_end|>"]
    # targets are the next token inside the example: the last position never predicts anything
    assert ex[0].targets[-1] == IGNORE
    for j, t in enumerate(ex[0].targets[:-1]):
        assert t == IGNORE or t == ex[0].input_ids[j + 1]


def test_train_on_prompt_trains_everything_but_the_first_token(tok):
    ex = _build(tok, FIX / "messages.jsonl", train_on_prompt=True)[1]
    assert sum(t != IGNORE for t in ex.targets) == len(ex.input_ids) - 1 - 1  # last newline after EOS is not trained


def test_alpaca_json_and_prompt_completion_csv(tok):
    al = _build(tok, FIX / "alpaca.json")
    assert _trained_text(tok, al[0]) == ["5<|im_end|>"]
    assert "Add the numbers.\n\n2 and 3" in tok.decode(al[0].input_ids)
    assert "\n\n" not in tok.decode(al[1].input_ids).split("Say hello.")[1].split("<|im_end|>")[0]
    pc = _build(tok, FIX / "prompt_completion.csv")
    assert [_trained_text(tok, e) for e in pc] == [["2<|im_end|>"], ["Rome<|im_end|>"]]


def test_text_format_trains_on_all_and_appends_eos(tok):
    ex = _build(tok, FIX / "text.jsonl")[0]
    assert ex.input_ids[-1] == tok.eos_token_id
    assert ex.targets[-2] == tok.eos_token_id  # EOS is a label
    assert sum(t != IGNORE for t in ex.targets) == len(ex.input_ids) - 1


def test_eos_stays_a_label_when_pad_equals_eos(tiny_pad_eos_dir):
    tok = AutoTokenizer.from_pretrained(tiny_pad_eos_dir)
    assert tok.pad_token_id == tok.eos_token_id
    ex = _build(tok, FIX / "messages.jsonl")[1]
    assert tok.eos_token_id in [t for t in ex.targets if t != IGNORE]
    batch = collate([ex, _build(tok, FIX / "messages.jsonl")[0]], packed=False, pad_id=tok.pad_token_id)
    # padding is masked by position, not by token id: the EOS label survives collation
    assert (batch["targets"][0] == tok.eos_token_id).sum() == 1
    assert (batch["attention_mask"][0] == 0).any()


def test_bad_record_names_file_line_and_fix(tok):
    with pytest.raises(DataError, match=r"bad.jsonl:2: no assistant turn.*Add an assistant message"):
        _build(tok, FIX / "bad.jsonl")
    report = DataReport()
    ex = build_examples(load_records([str(FIX / "bad.jsonl")]), tok, DataConfig(on_bad_record="skip"), report)
    assert len(ex) == 2 and len(report.skipped) == 1 and "bad.jsonl:2" in report.skipped[0]
    assert any("1 bad records skipped" in line for line in report.lines())


@pytest.mark.parametrize("content,match", [
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": 3}]}\n', r":1: `messages\[1\].content` must be a string"),
    ('{"messages": [{"role": "robot", "content": "x"}]}\n', r":1: `messages\[0\].role` is 'robot'"),
    ('{"messages": [{"role": "user"\n', r":1: invalid JSON"),
    ('{"foo": 1}\n', r":1: cannot tell the format from keys \['foo'\]"),
    ('{"instruction": "", "output": "x"}\n', r":1: field `instruction` is empty"),
    ('[1, 2]\n', r":1: each line must be a JSON object"),
])
def test_bad_jsonl_records(tok, tmp_path, content, match):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "fine"}\n' * 0 + content)
    with pytest.raises(DataError, match=match):
        _build(tok, p)


def test_non_utf8_names_the_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: not valid UTF-8"):
        list(read_records(p))


def test_truncation_is_counted_not_silent(tok):
    report = DataReport()
    build_examples(load_records([str(FIX / "messages.jsonl")]), tok, DataConfig(max_length=40), report)
    assert report.truncated >= 1 and report.tokens_cut > 0
    assert any("truncated" in line for line in report.lines())


def test_parquet_and_datasets_folder(tok, tmp_path):
    import datasets

    rows = [json.loads(line) for line in (FIX / "text.jsonl").read_text().splitlines()]
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "t.parquet"))
    ds.save_to_disk(str(tmp_path / "folder"))
    a = _build(tok, tmp_path / "t.parquet")
    b = _build(tok, tmp_path / "folder")
    c = _build(tok, FIX / "text.jsonl")
    assert [e.input_ids for e in a] == [e.input_ids for e in b] == [e.input_ids for e in c]


def test_chat_template_setting_and_mismatch(tok, tmp_path):
    ex = build_examples(load_records([str(FIX / "messages.jsonl")]), tok, DataConfig(chat_template="chatml"),
                        DataReport())
    assert _trained_text(tok, ex[1]) == ["four<|im_end|>"]
    # a template that re-renders earlier turns differently is caught, not trained on wrong masks
    bad = "{% for m in messages %}{{ m['content'] ~ (messages|length|string) }}{% endfor %}"
    with pytest.raises(DataError, match="messages.jsonl:1: chat template is not prefix-stable"):
        build_examples(load_records([str(FIX / "messages.jsonl")]), tok, DataConfig(chat_template=bad), DataReport())


def test_packing_has_no_cross_contamination(tiny_model_dir, tok):
    ex = _build(tok, FIX / "messages.jsonl") + _build(tok, FIX / "alpaca.json")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()

    def loss(batch):
        kw = {k: v for k, v in batch.items() if k != "targets"}
        logits = model(**kw, use_cache=False).logits
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(),
                                                 ignore_index=IGNORE, reduction="sum")

    with torch.no_grad():
        separate = sum(loss(collate([e], False, tok.pad_token_id)) for e in ex)
        rows = pack(ex, 64)
        assert len(rows) < len(ex)  # something really was packed together
        packed = loss(collate(rows, True, tok.pad_token_id))
        # and per-token logits equal: the second example in a row sees nothing of the first
        row = [ex[1], ex[3]]
        both = model(**{k: v for k, v in collate([row], True, 0).items() if k != "targets"}, use_cache=False).logits
        alone = model(input_ids=torch.tensor([ex[3].input_ids])).logits
    torch.testing.assert_close(packed, separate, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(both[0, len(ex[1].input_ids):], alone[0], rtol=1e-4, atol=1e-4)


def test_micro_batches_cover_every_example_once(tok):
    ex = _build(tok, FIX / "messages.jsonl") * 5
    for packing in (True, False):
        mbs = micro_batches(ex, 2, 64, packing)
        flat = [e for mb in mbs for item in mb for e in (item if isinstance(item, list) else [item])]
        assert sorted(id(e) for e in flat) == sorted(id(e) for e in ex)


def test_training_order_is_shuffled_before_and_after_packing():
    # a file sorted by label: 24 examples of label 0, then 24 of label 1, ... (token ids = the label)
    ex = [Example([label] * (5 + i % 2), [label] * (5 + i % 2), f"f.jsonl:{24 * label + i + 1}")
          for label in range(6) for i in range(24)]

    def labels(row: list[Example]) -> set[int]:
        return {e.input_ids[0] for e in row}

    in_file_order = pack(ex, 24)
    assert all(len(labels(r)) == 1 for r in in_file_order)  # packed in file order: one label per row
    assert [r for mb in micro_batches(ex, 2, 24, True) for r in mb] == in_file_order  # no seed (eval): kept

    rows = [r for mb in micro_batches(ex, 2, 24, True, seed=3) for r in mb]
    assert sorted(e.where for r in rows for e in r) == sorted(e.where for e in ex)
    assert sum(len(labels(r)) > 1 for r in rows) >= 0.8 * len(rows)  # training: rows mix labels
    lengths = [sum(len(e.input_ids) for e in r) for r in rows]
    assert lengths != sorted(lengths, reverse=True)  # and are not in packing's length order

    unpacked = micro_batches(ex, 4, 24, False, seed=3)
    assert sorted(e.where for mb in unpacked for e in mb) == sorted(e.where for e in ex)
    assert sum(len(labels(mb)) > 1 for mb in unpacked) >= 0.8 * len(unpacked)


def test_preview_marks_trained_tokens(tok):
    ex = _build(tok, FIX / "messages.jsonl")[1]
    out = format_preview(ex, tok, color=False)
    assert "«four<|im_end|>»" in out and "1 trained on" not in out and "trained on" in out


# -- masks from the whole conversation, tokenized once -----------------------------------------------------------
MULTI_TURN = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital of France."},
    {"role": "user", "content": "And of Germany?"},
    {"role": "assistant", "content": "Berlin is the capital of Germany."},
]
REPLIES = ["Paris is the capital of France.<|im_end|>", "Berlin is the capital of Germany.<|im_end|>"]


@pytest.fixture(scope="module")
def ms_tok():
    """SentencePiece-style (Metaspace) tiny tokenizer: "▁" prepended to every piece of text."""
    return build_tiny_tokenizer(kind="metaspace")


def _whole(tok, msgs=MULTI_TURN) -> list[int]:
    """What the model sees at inference: the full render tokenized in one go."""
    text = tok.apply_chat_template(msgs, chat_template=CHATML_TEMPLATE, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


def _masked(tok, msgs=MULTI_TURN, train_on_prompt=False) -> tuple[list[int], list[bool], Example]:
    ids, train = tokenize_messages(msgs, tok, CHATML_TEMPLATE, train_on_prompt)
    return ids, train, make_example(ids, train, len(ids), "conv")[0]


def test_metaspace_ids_are_the_whole_conversation_tokenized_once(ms_tok):
    ids, train, ex = _masked(ms_tok)
    assert ids == _whole(ms_tok)
    assert _trained_text(ms_tok, ex) == REPLIES
    # the old way, each segment tokenized on its own, gives other ids for the same text: alone, a reply starts
    # with a prepended "▁"; inside the conversation it follows "assistant\n" and gets none
    segs = chat_segments(MULTI_TURN, ms_tok, CHATML_TEMPLATE)
    assert segs[1] == ("Paris is the capital of France.<|im_end|>\n", True)
    per_segment = [ms_tok(text, add_special_tokens=False)["input_ids"] for text, _ in segs]
    assert [i for seg in per_segment for i in seg] != ids
    assert ms_tok.convert_ids_to_tokens(per_segment[1][0]).startswith("▁")
    assert not ms_tok.convert_ids_to_tokens(ids[train.index(True)]).startswith("▁")


def test_metaspace_train_on_prompt_skips_only_the_text_after_each_eos(ms_tok):
    ids, train, _ = _masked(ms_tok, train_on_prompt=True)
    assert ids == _whole(ms_tok)
    assert [ms_tok.convert_ids_to_tokens(i) for i, f in zip(ids, train) if not f] == ["▁", "\n"] * 2


def test_bytelevel_ids_are_the_whole_conversation_tokenized_once(tok):
    ids, _, ex = _masked(tok)
    assert ids == _whole(tok)
    assert _trained_text(tok, ex) == REPLIES


class _ZeroWidthSpecials:
    """A tokenizer that reports (0, 0) offsets for special tokens, as some do for added tokens."""

    def __init__(self, tok):
        self.tok = tok

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def __call__(self, text, **kw):
        enc = self.tok(text, **kw)
        special = set(self.tok.all_special_ids)
        enc["offset_mapping"] = [(0, 0) if i in special else o for i, o in zip(enc["input_ids"], enc["offset_mapping"])]
        return enc


def test_zero_width_tokens_go_with_the_next_token(ms_tok):
    # <|im_end|> at (0, 0) still ends its reply (trained), <|im_start|> at (0, 0) still starts a prompt (not trained)
    assert tokenize_messages(MULTI_TURN, _ZeroWidthSpecials(ms_tok), CHATML_TEMPLATE, False) == _masked(ms_tok)[:2]


def test_tokenizer_without_offsets_is_a_data_error():
    from transformers import CanineTokenizer  # a Python ("slow") tokenizer that needs no files

    with pytest.raises(DataError, match="no character offsets.*Use a fast tokenizer"):
        tokenize_messages(MULTI_TURN, CanineTokenizer(), CHATML_TEMPLATE, False)


def test_preview_shows_the_metaspace_trained_span_with_its_spaces(ms_tok):
    out = format_preview(_masked(ms_tok)[2], ms_tok, color=False)
    assert all(f"«{reply}»" in out for reply in REPLIES), out
    assert "What is the capital of France?<|im_end|>" in out  # prompt text keeps its spaces too


def test_packed_row_width_trades_attention_for_padding():
    # quickstart-like: nine in ten examples of 40-48 tokens, the rest 60-80
    lens = [40 + i % 9 if i % 10 else 60 + i % 22 for i in range(300)]
    ex = [Example([1] * n, [1] * n, f"f.jsonl:{i + 1}") for i, n in enumerate(lens)]
    assert packed_shape(ex, 4, 256, "auto", hidden_size=576) == (96, 11)  # 11 rows of 96 ~ the 4 x 256 tokens
    assert packed_shape(ex, 4, 256, "auto", hidden_size=8192) == (224, 5)  # a wide model: attention is cheap
    assert packed_shape(ex, 4, 256) == (224, 5)  # hidden size unknown: the least padding
    assert packed_shape(ex, 4, 90, "auto", hidden_size=576) == (90, 4)  # never wider than max_length
    assert packed_shape(ex, 4, 256, 200) == (200, 5)  # forced
    with pytest.raises(DataError, match=r"data.row_width=64: f.jsonl:21 is 80 tokens, longer than a row. Raise "
                                        r"data.row_width to at least 80, or set it to auto"):
        packed_shape(ex, 4, 256, 64)
    rows = [r for mb in micro_batches(ex, 11, 96, True, seed=0) for r in mb]
    assert all(sum(len(e.input_ids) for e in r) <= 96 for r in rows)
