"""The schema rejects unknown keys and wrong types naming file and key; every shipped YAML loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunesmith.finetune.config import ConfigError, load_config

ROOT = Path(__file__).parents[2]


def test_defaults_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("base_model: embedded\ntrain:\n  lr: 1e-4\ndata:\n  train: a.jsonl\n")
    cfg = load_config(p, ["train.lr=3e-4", "data.packing=false", "lora.target_modules=[q_proj, v_proj]"])
    assert cfg.train.lr == 3e-4 and cfg.data.packing is False
    assert cfg.data.train == ["a.jsonl"]  # a single string becomes a list
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert load_config(p).lora.target_modules == "auto"


@pytest.mark.parametrize("yaml_text,match", [
    ("train:\n  learning_rate: 1e-4\n", r"c.yaml: unknown key `train.learning_rate`. Did you mean `train.lr`"),
    ("trian:\n  lr: 1\n", r"unknown key `trian`. Did you mean `train`"),
    ("train:\n  micro_batch_size: eight\n", r"c.yaml: `train.micro_batch_size` must be an integer, got 'eight'"),
    ("data:\n  packing: maybe\n", r"`data.packing` must be true or false"),
    ("train:\n  scheduler: wavy\n", r"`train.scheduler` must be one of \['cosine', 'linear', 'constant'\]"),
    ("train: 3\n", r"`train` must be a mapping"),
    ("train:\n  lr: 5\n", r"`train.lr` must be in \(0, 1\]"),
    ("train:\n  lr: .nan\n", r"`train.lr` must be a finite number"),
    ("base_model: [1, 2\n", r"c.yaml line \d+: not valid YAML"),
    ("data:\n  row_width: wide\n", r"`data.row_width` must be one of \['auto'\] or an integer, got 'wide'"),
    ("data:\n  max_length: 256\n  row_width: 512\n", r"`data.row_width` must be `auto` or 8..data.max_length \(256\)"),
])
def test_bad_configs_name_file_and_key(tmp_path, yaml_text, match):
    p = tmp_path / "c.yaml"
    p.write_text(yaml_text)
    with pytest.raises(ConfigError, match=match):
        load_config(p)


def test_bad_override_names_command_line(tmp_path):
    with pytest.raises(ConfigError, match="unknown key `train.lrr`"):
        load_config(None, ["train.lrr=1"])
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config(None, ["train.lr"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_every_shipped_training_yaml_loads():
    files = [f for f in (ROOT / "configs").glob("*.yaml")]
    assert files, "no configs shipped"
    for f in files:
        cfg = load_config(f)
        for path in cfg.data.train:
            assert (ROOT / path).exists(), f"{f}: data file {path} missing"


def test_every_accelerate_yaml_parses():
    import yaml

    files = list((ROOT / "configs" / "accelerate").glob("*.yaml"))
    assert len(files) >= 5
    for f in files:
        cfg = yaml.safe_load(f.read_text())
        assert cfg["distributed_type"] in {"NO", "MULTI_GPU", "MULTI_CPU", "FSDP", "DEEPSPEED"}, f
