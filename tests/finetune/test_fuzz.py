"""Fuzzed bad input: the config loader and every data format either work or raise our one clear error type,
never a raw traceback from deep inside (KeyError, TypeError, AttributeError ...)."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from tunesmith.finetune.config import ConfigError, DataConfig, load_config
from tunesmith.finetune.data import DataError, DataReport, build_examples, load_records

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=20))
values = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=8), c,
                                                                                             max_size=3)), max_leaves=6)
KEYS = ["base_model", "output_dir", "seed", "data", "lora", "train", "data.max_length", "train.lr", "train.epochs",
        "lora.r", "lora.target_modules", "data.format", "train.precision", "data.packing", "bogus", "train.bogus"]


@SETTINGS
@given(st.dictionaries(st.sampled_from(KEYS), values, max_size=5))
def test_config_loader_only_raises_config_error(tmp_path_factory, raw):
    nested: dict = {}
    for k, v in raw.items():
        parts = k.split(".")
        node = nested
        for p in parts[:-1]:
            node = node.setdefault(p, {}) if isinstance(node.get(p, {}), dict) else {}
        node[parts[-1]] = v
    p = tmp_path_factory.mktemp("cfg") / "c.yaml"
    import yaml

    p.write_text(yaml.safe_dump(nested))
    try:
        load_config(p)
    except ConfigError as e:
        assert "c.yaml" in str(e)


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


record_values = st.one_of(st.text(max_size=30), st.integers(), st.none(), st.lists(st.text(max_size=5), max_size=2),
                          st.lists(st.dictionaries(st.sampled_from(["role", "content", "from", "value"]),
                                                   st.one_of(st.sampled_from(["user", "assistant", "system", "x"]),
                                                             st.text(max_size=10), st.integers()), max_size=3),
                                   max_size=4))
records = st.dictionaries(st.sampled_from(["messages", "instruction", "input", "output", "prompt", "completion",
                                           "text", "conversations", "system", "other"]), record_values, max_size=4)


@SETTINGS
@given(st.lists(records, min_size=1, max_size=4), st.sampled_from(["jsonl", "json", "csv"]))
def test_data_loaders_only_raise_data_error(tmp_path_factory, tok, recs, ext):
    p = tmp_path_factory.mktemp("d") / f"data.{ext}"
    if ext == "jsonl":
        p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    elif ext == "json":
        p.write_text(json.dumps(recs))
    else:
        import csv

        keys = sorted({k for r in recs for k in r})
        with open(p, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys or ["x"])
            w.writeheader()
            for r in recs:
                w.writerow({k: (v if isinstance(v, str) else json.dumps(v)) for k, v in r.items()})
    for mode in ("error", "skip"):
        report = DataReport()
        try:
            out = build_examples(load_records([str(p)]), tok, DataConfig(max_length=32, on_bad_record=mode), report)
        except DataError as e:
            assert str(p) in str(e) or "no records found" in str(e)
            assert mode == "error" or "no records" in str(e)
            continue
        assert len(out) + len(report.skipped) + report.no_targets == report.records  # nothing silently lost


@SETTINGS
@given(st.binary(max_size=200))
def test_random_bytes_in_jsonl(tmp_path_factory, tok, blob):
    p = tmp_path_factory.mktemp("b") / "data.jsonl"
    p.write_bytes(blob)
    try:
        build_examples(load_records([str(p)]), tok, DataConfig(max_length=32), DataReport())
    except DataError as e:
        assert "data.jsonl" in str(e)


def test_huge_record_is_truncated_and_counted(tok, tmp_path):
    p = tmp_path / "big.jsonl"
    p.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                          {"role": "assistant", "content": "word " * 20000}]}) + "\n")
    report = DataReport()
    out = build_examples(load_records([str(p)]), tok, DataConfig(max_length=64), report)
    assert len(out[0].input_ids) == 64 and report.truncated == 1 and report.tokens_cut > 10000
