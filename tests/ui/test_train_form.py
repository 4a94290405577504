"""The Train tab's form <-> YAML mapping, its validation (the CLI's own messages), what a browser may point the
server at, uploads, and the data report / masked-token preview."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tunesmith.finetune import ConfigError, load_config
from tunesmith.ui.pool import ModelPool
from tunesmith.ui.train_form import (
    MAX_DATA_BYTES,
    apply_form,
    base_choices,
    check,
    check_sources,
    copy_uploads,
    error_field,
    error_markdown,
    form_values,
    inspect_data,
    load_shipped,
    methods,
    offered,
    parse_yaml,
    preview_html,
    shipped_configs,
    store_data,
    to_yaml,
)

ROOT = Path(__file__).parents[2]
FIXTURES = ROOT / "tests" / "fixtures"


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    return tmp_path / "runs"


@pytest.mark.parametrize("name", shipped_configs())
def test_form_then_yaml_then_form_changes_nothing(name, runs, tmp_path):
    raw = load_shipped(name)
    values = form_values(raw, runs)
    again = apply_form(raw, values, runs)
    # the only change: the run goes to this server's runs folder, under the config's own name
    assert again == {**raw, "output_dir": str(runs / Path(raw["output_dir"]).name)}
    assert parse_yaml(to_yaml(again), tmp_path) == again
    assert form_values(again, runs) == values


def test_form_edits_land_on_their_keys_and_other_keys_stay(runs):
    raw = {"base_model": "embedded", "data": {"train": ["examples/data/train.jsonl"], "system_prompt": "Be terse."},
           "train": {"grad_accum": 4, "lr": 5e-4}}
    values = {**form_values(raw, runs), "adapter": "DoRA", "train.lr": 1e-3, "train.max_steps": 10.0,
              "lora.target_modules": "q_proj, v_proj", "data.packing": False, "name": "mine"}
    out = apply_form(raw, values, runs)
    assert out["train"]["grad_accum"] == 4 and out["data"]["system_prompt"] == "Be terse."  # untouched
    assert out["train"]["lr"] == 1e-3 and out["train"]["max_steps"] == 10  # an int, as the validator wants
    assert out["lora"]["use_dora"] is True and "finetuning_type" not in out  # lora: the default, not written
    assert out["lora"]["target_modules"] == ["q_proj", "v_proj"] and out["data"]["packing"] is False
    assert out["output_dir"] == str(runs / "mine")
    back = form_values(out, runs)
    assert back["adapter"] == "DoRA" and back["lora.target_modules"] == "q_proj, v_proj" and back["name"] == "mine"
    full = apply_form(out, {"adapter": "Full fine-tuning"}, runs)
    assert full["finetuning_type"] == "full" and full["lora"]["use_dora"] is False
    assert apply_form(out, {"lora.target_modules": " auto "}, runs)["lora"]["target_modules"] == "auto"


def test_bad_values_get_the_clis_message_next_to_their_field(runs, tmp_path):
    raw = apply_form(load_shipped("quickstart"), {"train.lr": 2.0}, runs)
    cfg, message = check(raw, tmp_path)
    (tmp_path / "cli").mkdir()
    (tmp_path / "cli" / "train.yaml").write_text(to_yaml(raw))
    with pytest.raises(ConfigError) as cli:  # what `tunesmith train train.yaml` prints after "error: "
        load_config(tmp_path / "cli" / "train.yaml")
    assert cfg is None and message == str(cli.value).replace(f"{tmp_path / 'cli'}/", "")
    assert message == "train.yaml: `train.lr` must be in (0, 1], got 2.0"
    assert error_field(message) == "train.lr" and error_markdown(message).startswith("⚠️ **Learning rate**:")
    _, message = check(apply_form(raw, {"train.lr": 1e-4, "lora.r": 0}, runs), tmp_path)
    assert "`lora.r` must be >= 1, got 0" in message and "LoRA rank" in error_markdown(message)
    _, message = check({**raw, "train": {**raw["train"], "lr": 1e-4, "learning_rate": 1}}, tmp_path)
    assert "unknown key `train.learning_rate`" in message and "Did you mean `train.lr`?" in message
    _, message = check(apply_form(raw, {"train.lr": 1e-4, "adapter": "QLoRA (4-bit base, CUDA)"}, runs) |
                       {"finetuning_type": "full"}, tmp_path)
    assert error_field(message) == "adapter"
    cfg, message = check(apply_form(raw, {"train.lr": 1e-4}, runs), tmp_path)
    assert cfg is not None and message == "" and cfg.train.lr == 1e-4


def test_a_yaml_syntax_error_names_the_line(tmp_path):
    with pytest.raises(ConfigError, match=r"^loaded.yaml line 4: not valid YAML"):
        parse_yaml("base_model: embedded\ntrain:\n  lr: 1e-4\n   epochs: 2\n", tmp_path)
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        parse_yaml("- a\n- b\n", tmp_path)


def test_only_offered_models_files_and_plain_names_are_accepted(tiny_model_dir, runs, tmp_path):
    pool = ModelPool(runs, default=str(tiny_model_dir))
    assert [v for _, v in base_choices(pool)] == ["embedded", str(tiny_model_dir)]
    ok = {"base_model": str(tiny_model_dir), "output_dir": str(runs / "r1"),
          "data": {"train": ["examples/data/train.jsonl", str(tmp_path / "up" / "mine.jsonl")]}}
    (tmp_path / "up").mkdir()
    (tmp_path / "up" / "mine.jsonl").write_text('{"text": "hi"}\n')
    assert check_sources(ok, pool, tmp_path / "up") == ""
    assert "not one this server offers" in check_sources({**ok, "base_model": "/etc"}, pool, tmp_path / "up")
    bad_data = {**ok, "data": {"train": ["/etc/passwd"]}}
    assert "not an uploaded or example file" in check_sources(bad_data, pool, tmp_path / "up")
    assert "run name '..'" in check_sources({**ok, "output_dir": str(runs / "..")}, pool, tmp_path / "up")
    assert "cannot run a model's own Python code" in check_sources({**ok, "trust_remote_code": True}, pool, tmp_path / "up")
    assert "cannot be named from the browser" in check_sources(
        {**ok, "data": {"train": [], "chat_template": "/etc/x.jinja"}}, pool, None)
    grpo = {**ok, "data": {"train": []}, "method": "grpo", "grpo": {"rewards": ["json", {"name": "os:system"}]}}
    assert "`os:system` is Python code on the server" in check_sources(grpo, pool, None)
    cut, notes = offered({**ok, "base_model": "org/elsewhere", "data": {"train": ["examples/data/train.jsonl",
                                                                             "benchmarks/x.jsonl"]}}, pool, None)
    assert cut["base_model"] == "embedded" and cut["data"]["train"] == ["examples/data/train.jsonl"]
    assert notes == ["base_model `org/elsewhere` is not offered here: `embedded` instead",
                     "`data.train`: benchmarks/x.jsonl is not an example or uploaded file here: upload it"]
    # a merged run is a base model one can continue from
    (runs / "done" / "adapter").mkdir(parents=True)
    (runs / "done" / "adapter" / "adapter_config.json").write_text("{}")
    (runs / "done" / "config.yaml").write_text("base_model: embedded\n")
    (runs / "done" / "merged").mkdir()
    (runs / "done" / "merged" / "config.json").write_text("{}")
    assert ("done (merged: continue from it)", str(runs / "done" / "merged")) in base_choices(pool)


def test_uploads_are_checked_and_copied_into_the_run_at_start(tmp_path):
    session, out = tmp_path / "session", tmp_path / "runs" / "r1"
    session.mkdir()
    (tmp_path / "data.jsonl").write_text('{"text": "hello"}\n')
    (tmp_path / "evil.py").write_text("import os\n")
    (tmp_path / "big.jsonl").write_bytes(b"a" * (MAX_DATA_BYTES + 1))
    (tmp_path / "bin.csv").write_bytes(b"\x00\x01\x02")
    report = store_data([str(tmp_path / f) for f in ("data.jsonl", "evil.py", "big.jsonl", "bin.csv")], session)
    assert report[0].startswith("data.jsonl: uploaded")
    assert "refused, training data is" in report[1] and "over the 52.4 MB limit" in report[2]
    assert "not UTF-8 text" in report[3]
    assert sorted(p.name for p in session.iterdir()) == ["data.jsonl"]
    raw = {"data": {"train": [str(session / "data.jsonl"), "examples/data/train.jsonl"]}}
    moved = copy_uploads(raw, session, out)
    assert moved["data"]["train"] == [str(out / "data" / "data.jsonl"), "examples/data/train.jsonl"]
    assert (out / "data" / "data.jsonl").read_text() == '{"text": "hello"}\n'


def test_data_report_and_masked_preview(tiny_model_dir, tmp_path):
    raw = {"base_model": str(tiny_model_dir), "data": {"train": [str(FIXTURES / "messages.jsonl")],
                                                       "max_length": 64}}
    cfg, message = check(raw, tmp_path)
    assert cfg is not None, message
    view = inspect_data(cfg)
    n = sum(1 for line in (FIXTURES / "messages.jsonl").read_text().splitlines() if line.strip())
    assert "`messages.jsonl`: format **messages**" in view.report and f"{n} records ->" in view.report
    assert len(view.examples) == n
    html = preview_html(view, 0)
    assert '<span class="trained"' in html and '<span class="context"' in html
    assert "tokens," in html and "trained on" in html
    assert preview_html(view, 99) == preview_html(view, n - 1)  # clamped to the last record
    first = json.loads((FIXTURES / "messages.jsonl").read_text().splitlines()[0])
    reply = next(m["content"] for m in first["messages"] if m["role"] == "assistant")
    trained = "".join(part.split(">", 1)[1] for part in html.split('<span class="trained"')[1:]).split("</span>")
    assert reply.split()[0] in "".join(trained)  # the assistant's reply is what is trained on


def test_preference_pairs_preview_both_sides_with_their_masks(tiny_model_dir, tmp_path):
    if "dpo" not in methods():
        pytest.skip("this config schema has no `method`")
    cfg, message = check({"base_model": str(tiny_model_dir), "method": "dpo",
                          "data": {"train": ["examples/data/pairs_train.jsonl"]}}, tmp_path)
    assert cfg is not None, message
    view = inspect_data(cfg)
    n = sum(1 for line in Path("examples/data/pairs_train.jsonl").read_text().splitlines() if line.strip())
    assert "records for method **dpo**" in view.report and f"{n} records ->" in view.report
    assert len(view.examples) == n and [t for t, _ in view.examples[0]] == ["chosen", "rejected"]
    html = preview_html(view, 0)
    first = json.loads(Path("examples/data/pairs_train.jsonl").read_text().splitlines()[0])
    assert html.index("<b>chosen</b>") < html.index("<b>rejected</b>")
    trained = [p.split(">", 1)[1].split("</span>")[0] for p in html.split('<span class="trained"')[1:]]
    assert first["chosen"] in "".join(trained) and first["rejected"] in "".join(trained)


def test_shipped_yaml_round_trips_through_the_yaml_text(runs, tmp_path):
    raw = load_shipped("quickstart")
    text = to_yaml(apply_form(raw, form_values(raw, runs), runs))
    assert yaml.safe_load(text)["data"]["train"] == ["examples/data/train.jsonl"]
    cfg, message = check(parse_yaml(text, tmp_path), tmp_path)
    assert cfg is not None and message == "" and cfg.output_dir == str(runs / "quickstart")
