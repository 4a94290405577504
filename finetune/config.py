"""The training config schema: one typed dataclass per section, validated in one place.

YAML files set fields, `section.key=value` arguments override them (`train.lr=1e-4`), unknown keys and wrong types
are rejected with the file and the key named. Names follow what axolotl / LLaMA-Factory users already type.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from tunesmith.resources import config_names, find_config, resolve_path

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is wrong; the message names the file, the key and the fix."""


TRACKERS = ("tensorboard", "mlflow", "wandb", "trackio", "aim", "comet_ml", "clearml", "dvclive", "swanlab")
"""What `train.report_to` takes: Accelerate's trackers (finetune/tracking.py keeps the first three offline)."""


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)
    """Training files or folders: .jsonl, .json, .csv, .parquet, or a `datasets.save_to_disk` folder."""
    validation: list[str] = field(default_factory=list)
    """Validation files; if empty, `val_set_size` of the training records are held out instead."""
    val_set_size: float = 0.05
    """Fraction (<1) or count (>=1) of training records held out for eval loss when no validation file is given."""
    format: Literal["auto", "messages", "alpaca", "prompt_completion", "text"] = "auto"
    """Record format; `auto` detects it from the keys of the first record."""
    chat_template: str | None = None
    """None = the tokenizer's template; `chatml`; a path to a .jinja file; or an inline Jinja string."""
    system_prompt: str | None = None
    """Added as a system turn to records that have none."""
    max_length: int = 512
    """Tokens per example; longer examples are truncated and counted in the report (never silently)."""
    train_on_prompt: bool = False
    """Also train on system/user tokens (default: loss only on assistant tokens, EOS included)."""
    packing: bool = True
    """Pack several examples into one row (attention kept inside each example): no compute wasted on padding."""
    row_width: Literal["auto"] | int = "auto"
    """Packed rows' width in tokens. Attention over a packed row costs width^2 whatever it holds, so short examples in
    wide rows pay for attention they never use, while narrow rows pack worse. `auto` picks the width (a multiple
    of 32 from the longest example up to max_length) that costs least by a model fitted on CPU measurements
    (`data.packed_shape`), with more rows per micro-batch so that it still holds ~micro_batch_size * max_length
    tokens. The quickstart data (examples of 39-81 tokens) gets rows of 96: 1.1-1.2x faster than rows of 256 on a
    2-core CPU, padding included (benchmarks/README.md); the classification set (~84 tokens each) keeps 256. An
    integer forces a width (`max_length` for the old rows)."""
    share_prompt: bool = True
    """Preference pairs and GRPO's samples: forward the prompt they share once, each answer attending to it and
    not to the others (a 4D attention mask). The same log-probs with fewer tokens: ~1.7x fewer on the example pairs.
    Used with the `sdpa` and `eager` attention kernels; others (flash-attention) forward each sequence whole."""
    on_bad_record: Literal["error", "skip"] = "error"
    """`error` stops at the first bad record naming file and line; `skip` drops bad ones and reports how many."""
    labels: str | bool | list[str] = "auto"
    """Classification: `auto` treats the answers as labels when the training replies are a small set of short
    values; `off`; or the list of labels. With labels, every eval also scores each label by log-likelihood and logs
    `eval_accuracy` (what `tunesmith sweep` can optimise), and `tunesmith eval` reports per-class metrics."""


@dataclass
class LoraSection:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    """LoRA dropout. 0 by default: on CPU, drawing dropout masks (bernoulli) took 22% of a training step."""
    target_modules: str | list[str] = "auto"
    """`auto` = every linear layer but the output head; or a list such as [q_proj, v_proj]."""
    use_dora: bool = False
    use_rslora: bool = False
    load_in_4bit: bool = False
    """QLoRA: 4-bit NF4 base weights. Needs CUDA and bitsandbytes."""


@dataclass
class TrainSection:
    epochs: float = 1.0
    max_steps: int = -1
    """Optimizer steps; -1 means `epochs` decides."""
    micro_batch_size: int = 8
    """Examples per forward pass (with packing: micro_batch_size * max_length tokens, in rows of data.row_width)."""
    grad_accum: int = 1
    lr: float = 2e-4
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = -1
    """-1 means use `warmup_ratio`."""
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """`auto`: bf16 where the CPU/GPU runs it fast, fp16 on GPUs without bf16 (T4, V100), else fp32. The frozen base
    is stored in this dtype, LoRA weights in fp32; fp16 adds dynamic loss scaling, and a run whose fp16 activations
    overflow stops with a message instead of diverging."""
    gradient_checkpointing: bool = False
    eval_every: int = 50
    """Steps between validation-loss evaluations (0 = only at the end)."""
    save_every: int = 100
    """Steps between resumable checkpoints (0 = only at the end)."""
    keep_checkpoints: int = 2
    log_every: int = 1
    loss_chunk_size: int = 1024
    """Tokens per chunk of the output-head + cross-entropy computation, so 49k-vocab logits are never all in memory
    (on a CPU at most as many as keep a chunk's logits in cache: 64 for a 49k vocabulary)."""
    fused_loss: bool = True
    """Output head + cross-entropy only at trained positions, in chunks (less memory and time). It is checked against
    the model's own loss before the first step; `false` trains through the model's own forward instead."""
    fused_lora: bool = True
    """Each LoRA linear layer as one op that adds the LoRA product inside the base matmul, forward and backward, and
    compiled, q/k/v and gate/up as one op each (finetune/fused_lora.py; fewer passes over memory, the same numbers
    up to bf16 rounding); `false` runs peft's layers as they are."""
    compile: Literal["auto", "on", "off"] = "auto"
    """torch.compile each decoder layer for training (finetune/compiling.py): on a 2-core CPU the quickstart trains
    ~1.5x faster in bf16 (AMX), 1.04-1.17x in fp32 (AVX2) at lower peak memory, after a 20-45 s first compile (seconds
    once cached in ~/.cache/tunesmith/inductor). `auto`: SFT in one
    CPU process on a model of 30M+ parameters, 20+ steps, without gradient checkpointing or a 4-bit base, with a C++
    compiler found. `on` also compiles elsewhere (GPUs, several processes: not measured yet)."""
    report_to: list[str] = field(default_factory=list)
    """Experiment trackers that also get every metrics.jsonl row, the resolved config and the loss curve, offline by
    default: `tensorboard` (RUN/tensorboard), `mlflow` (RUN/mlflow.db unless MLFLOW_TRACKING_URI is set), `wandb`
    (offline unless WANDB_MODE or WANDB_API_KEY is set), or another of Accelerate's trackers (`TRACKERS`)."""


@dataclass
class DpoSection:
    beta: float = 0.1
    """How far the policy may move from the reference: the implicit reward is beta * log(policy / reference)."""
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    """`sigmoid`: DPO; `ipo`: IPO's squared loss (length-normalised); `hinge`: SLiC."""
    label_smoothing: float = 0.0
    """Conservative DPO (sigmoid only): the share of pairs assumed mislabelled, in [0, 0.5)."""
    precompute_ref: bool = False
    """Reference log-probs computed once before the first step (saves a forward per step; required for
    finetuning_type=full, which has no adapter to switch off)."""


@dataclass
class OrpoSection:
    beta: float = 0.1
    """Weight of the odds-ratio term next to the chosen side's NLL (the paper's lambda); no reference model."""


@dataclass
class SimpoSection:
    beta: float = 2.0
    """Scale of the length-normalised reward; no reference model."""
    gamma: float = 1.0
    """Target reward margin between chosen and rejected."""


@dataclass
class KtoSection:
    beta: float = 0.1
    desirable_weight: float = 1.0
    """Loss weight of `label: true` records; keep w_d * n_desirable / (w_u * n_undesirable) in [1, 4/3]."""
    undesirable_weight: float = 1.0
    precompute_ref: bool = False
    """As dpo.precompute_ref (the KL estimate's reference is still computed per step)."""


@dataclass
class GrpoSection:
    num_generations: int = 8
    """Samples per prompt (a group); advantages compare samples of the same prompt. train.micro_batch_size counts
    prompts, so a micro-batch trains on micro_batch_size * num_generations completions."""
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    epsilon: float = 0.2
    """Clip range of the probability ratio (PPO's epsilon)."""
    epsilon_high: float | None = None
    """Upper clip (DAPO's clip-higher); None = epsilon."""
    beta: float = 0.0
    """Weight of the KL penalty to the reference (the adapter switched off); 0 = no reference forward."""
    scale_rewards: bool = True
    """Divide advantages by the group's std (GRPO); false keeps reward - group mean (Dr. GRPO)."""
    rewards: list[Any] = field(default_factory=list)
    """Built-in names (exact_match, regex, json, length), `module:function`, or {name, weight, arguments}."""


METHOD_SECTIONS = ("dpo", "orpo", "simpo", "kto", "grpo")


@dataclass
class Config:
    base_model: str = "embedded"
    """`embedded` (SmolLM2-135M-Instruct, offline), a local HF folder, a .gguf file, or a hub id."""
    output_dir: str = "runs/run"
    seed: int = 42
    trust_remote_code: bool = False
    finetuning_type: Literal["lora", "full"] = "lora"
    """`lora` trains adapters on a frozen base; `full` trains every weight (fp32 master weights, AdamW state of 8
    bytes per parameter: ~2.2 GB for the 135M embedded model) and writes the whole model to RUN/model."""
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    train: TrainSection = field(default_factory=TrainSection)
    method: Literal["sft", "dpo", "orpo", "simpo", "kto", "grpo"] = "sft"
    """`sft` trains on answers; `dpo`/`orpo`/`simpo` on preference pairs, `kto` on labelled answers, `grpo` on
    prompts with reward functions. Each method's keys are in its own section (`dpo.beta`, `grpo.rewards`, ...)."""
    dpo: DpoSection = field(default_factory=DpoSection)
    orpo: OrpoSection = field(default_factory=OrpoSection)
    simpo: SimpoSection = field(default_factory=SimpoSection)
    kto: KtoSection = field(default_factory=KtoSection)
    grpo: GrpoSection = field(default_factory=GrpoSection)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, where: str = "config") -> None:
        d, t, lo = self.data, self.train, self.lora

        def bad(key: str, msg: str) -> ConfigError:
            return ConfigError(f"{where}: `{key}` {msg}")

        if d.max_length < 8:
            raise bad("data.max_length", f"must be >= 8, got {d.max_length}")
        if isinstance(d.row_width, int) and not 8 <= d.row_width <= d.max_length:
            raise bad("data.row_width", f"must be `auto` or 8..data.max_length ({d.max_length}), got {d.row_width}")
        if d.val_set_size < 0:
            raise bad("data.val_set_size", "must be >= 0")
        if t.micro_batch_size < 1 or t.grad_accum < 1:
            raise bad("train.micro_batch_size/grad_accum", "must be >= 1")
        if t.lr <= 0 or t.lr > 1:
            raise bad("train.lr", f"must be in (0, 1], got {t.lr}")
        if t.epochs <= 0 and t.max_steps <= 0:
            raise bad("train.epochs", "and train.max_steps cannot both be <= 0")
        if not 0 <= t.warmup_ratio < 1:
            raise bad("train.warmup_ratio", "must be in [0, 1)")
        if lo.r < 1:
            raise bad("lora.r", f"must be >= 1, got {lo.r}")
        if not 0 <= lo.dropout < 1:
            raise bad("lora.dropout", "must be in [0, 1)")
        if self.finetuning_type == "full" and lo.load_in_4bit:
            raise bad("finetuning_type", "full cannot train 4-bit weights; set lora.load_in_4bit=false, or use "
                      "finetuning_type=lora (QLoRA)")
        if isinstance(d.labels, bool):  # YAML 1.1 reads a bare `off` / `on` as a boolean
            d.labels = "auto" if d.labels else "off"
        if isinstance(d.labels, str) and d.labels not in ("auto", "off"):
            raise bad("data.labels", f"must be `auto`, `off` or a list of labels, got {d.labels!r}")
        if isinstance(d.labels, list) and len(set(d.labels)) < 2:
            raise bad("data.labels", f"needs at least 2 distinct labels, got {d.labels}")
        if t.loss_chunk_size < 16:
            raise bad("train.loss_chunk_size", "must be >= 16")
        if isinstance(t.report_to, str):  # `report_to: tensorboard`, as HF TrainingArguments takes it
            t.report_to = [t.report_to]
        t.report_to = [n for n in dict.fromkeys(t.report_to) if n != "none"]
        if unknown := [n for n in t.report_to if n not in TRACKERS]:
            raise bad("train.report_to", f"names unknown tracker(s) {unknown}; use some of: {', '.join(TRACKERS)} "
                      "(or `none`)")
        self._validate_method(where, bad)

    def _validate_method(self, where: str, bad: typing.Callable[[str, str], ConfigError]) -> None:
        """The preference / RL sections: only the chosen method's may be set, and its values must make sense."""
        for name in METHOD_SECTIONS:
            section = getattr(self, name)
            if name != self.method and section != type(section)():
                raise bad(name, f"is set but method is `{self.method}`; set method: {name}, or remove the `{name}` "
                                "section")
        dpo, kto, g = self.dpo, self.kto, self.grpo
        if dpo.label_smoothing and dpo.loss_type != "sigmoid":
            raise bad("dpo.label_smoothing", f"applies to loss_type=sigmoid only, not {dpo.loss_type}; set it to 0")
        if not 0 <= dpo.label_smoothing < 0.5:
            raise bad("dpo.label_smoothing", f"must be in [0, 0.5), got {dpo.label_smoothing}")
        for key, value in (("dpo.beta", dpo.beta), ("orpo.beta", self.orpo.beta), ("simpo.beta", self.simpo.beta),
                           ("kto.beta", kto.beta)):
            if value <= 0:
                raise bad(key, f"must be > 0, got {value}")
        if self.finetuning_type == "full" and self.method in ("dpo", "kto") and not (
                dpo if self.method == "dpo" else kto).precompute_ref:
            raise bad(f"{self.method}.precompute_ref", "must be true with finetuning_type=full: the reference is the "
                      "model before training, and full fine-tuning has no adapter to switch off to get it back")
        if self.method != "grpo":
            return
        if g.num_generations < 2:
            raise bad("grpo.num_generations", f"must be >= 2 (advantages compare samples of one prompt), got "
                      f"{g.num_generations}")
        if g.max_new_tokens < 1 or g.temperature <= 0 or not 0 < g.top_p <= 1:
            raise bad("grpo.max_new_tokens/temperature/top_p", "must be >= 1, > 0 and in (0, 1]")
        if g.epsilon <= 0 or (g.epsilon_high is not None and g.epsilon_high < g.epsilon):
            raise bad("grpo.epsilon", "must be > 0, and grpo.epsilon_high (if set) >= grpo.epsilon")
        if g.beta < 0:
            raise bad("grpo.beta", f"must be >= 0, got {g.beta}")
        if g.beta > 0 and self.finetuning_type == "full":
            raise bad("grpo.beta", "> 0 needs the reference (the adapter switched off); use finetuning_type=lora, or "
                      "grpo.beta=0")
        if not g.rewards:
            raise bad("grpo.rewards", "is empty: list at least one reward, e.g. rewards: [{name: exact_match, "
                      "field: answer}] or `my_module:my_reward`")
        from .rewards import load_reward  # imports torch: only for GRPO configs

        for i, spec in enumerate(g.rewards):
            load_reward(spec, where=f"{where}: grpo.rewards[{i}]")


ALIASES = {
    "learning_rate": "train.lr", "num_epochs": "train.epochs", "num_train_epochs": "train.epochs",
    "gradient_accumulation_steps": "train.grad_accum", "per_device_train_batch_size": "train.micro_batch_size",
    "lr_scheduler": "train.scheduler", "lr_scheduler_type": "train.scheduler", "eval_steps": "train.eval_every",
    "save_steps": "train.save_every", "bf16": "train.precision", "sequence_len": "data.max_length",
    "cutoff_len": "data.max_length", "max_seq_length": "data.max_length", "sample_packing": "data.packing",
    "train_on_inputs": "data.train_on_prompt", "val_size": "data.val_set_size", "lora_r": "lora.r",
    "lora_rank": "lora.r", "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout",
    "lora_target_modules": "lora.target_modules", "lora_target": "lora.target_modules", "model_name_or_path": "base_model",
    "datasets": "data.train", "dataset": "data.train", "load_in_4bit": "lora.load_in_4bit",
    "stage": "finetuning_type", "adapter": "finetuning_type",
}
"""Names axolotl, LLaMA-Factory and HF TrainingArguments use, pointed at ours in the unknown-key message."""


def _suggest(key: str, options: list[str], prefix: str, aliases: dict[str, str]) -> str:
    if key in aliases:
        return f" Did you mean `{aliases[key]}`?"
    close = difflib.get_close_matches(key, options, n=1)
    return f" Did you mean `{prefix}{close[0]}`?" if close else f" Known keys: {', '.join(options)}."


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check (and gently convert: '1e-4' -> 1e-4, 3 -> 3.0) one value against its annotation."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, where)
            except ConfigError as e:
                errors.append(str(e))
        if len(errors) == 1:
            raise ConfigError(errors[0])
        kinds = " or ".join(e.split(" must be ", 1)[-1].split(", got ")[0] for e in errors)  # "one of ['auto'] or ..."
        raise ConfigError(f"{where}: `{key}` must be {kinds}, got {value!r}")
    if origin is Literal:
        if isinstance(value, bool) and {"on", "off"} <= set(args):  # YAML 1.1 reads a bare on / off as a boolean
            value = "on" if value else "off"
        if value not in args:
            raise ConfigError(f"{where}: `{key}` must be one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if isinstance(value, str) and args[0] is str:
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: `{key}` must be a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]", where) for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: `{key}` must be a mapping (name: value), got {value!r}")
        kt, vt = args or (Any, Any)
        return {_coerce(k, kt, f"{key} key", where): _coerce(v, vt, f"{key}.{k}", where) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: `{key}` must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{where}: `{key}` must be an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{where}: `{key}` must be an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{where}: `{key}` must be a number, got {value!r}")
        try:
            out = float(value)
        except ValueError:
            raise ConfigError(f"{where}: `{key}` must be a number, got {value!r}") from None
        if out != out or out in (float("inf"), float("-inf")):
            raise ConfigError(f"{where}: `{key}` must be a finite number, got {value!r}")
        return out
    if tp is str:
        if isinstance(value, bool):  # a label `yes` silently becoming "True" is worse than an error
            raise ConfigError(f"{where}: `{key}` must be a string, got {value!r}: YAML reads yes/no/on/off/true/false "
                              f"as booleans, so quote it ('{str(value).lower()}')")
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{where}: `{key}` must be a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{where}: `{key}` has an unsupported type {tp}")


def check_values(cls: type, raw: Any, where: str, prefix: str = "",
                 aliases: dict[str, str] | None = None) -> dict[str, Any]:
    """The keys a YAML mapping sets, each checked against `cls`'s annotations: the one place that rejects unknown
    keys (with a did-you-mean) and wrong types, naming `where` (the file) and the dotted key, for training and
    chain configs alike. Nested dataclass sections are built; keys `raw` leaves out are not filled in, so callers
    that keep "unset" apart from "default" (a chain's generation `params`) can."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: `{prefix.rstrip('.') or 'top level'}` must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    out: dict[str, Any] = {}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"{where}: unknown key `{full}`.{_suggest(str(key), names, prefix, aliases or {})}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            out[key] = build_section(tp, value or {}, where, f"{full}.", aliases)  # type: ignore[arg-type]
        else:
            out[key] = _coerce(value, tp, full, where)
    return out


def build_section(cls: type[T], raw: Any, where: str, prefix: str = "", aliases: dict[str, str] | None = None) -> T:
    """A typed config dataclass from a YAML mapping: `check_values`, then defaults for the keys left out.

    The object is made without calling `__init__`, so checks that span sections (`Config.validate`) run once, on
    the whole config, after every key is known. `aliases` maps other tools' key names to ours for the
    unknown-key message (training configs pass `ALIASES`)."""
    values = check_values(cls, raw, where, prefix, aliases)
    obj = cls.__new__(cls)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in values:
            value = values[f.name]
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        elif f.default is not dataclasses.MISSING:
            value = f.default
        else:
            options = typing.get_args(typing.get_type_hints(cls)[f.name])
            raise ConfigError(f"{where}: `{prefix}{f.name}` is required" + (f" (one of {list(options)})" if options
                                                                            else "") + ".")
        setattr(obj, f.name, value)
    return obj


def parse_override(arg: str) -> tuple[list[str], Any]:
    """`train.lr=1e-4` -> (['train', 'lr'], 1e-4); values are parsed as YAML so lists and booleans work."""
    if "=" not in arg:
        raise ConfigError(f"command line: override `{arg}` must look like section.key=value (e.g. train.lr=1e-4)")
    key, value = arg.split("=", 1)
    return key.strip().split("."), yaml.safe_load(value) if value.strip() else ""


def read_yaml(p: Path, error: type[Exception] = ConfigError) -> Any:
    """Parse a YAML file; a syntax error names the file and line (shared by training and chain configs)."""
    try:
        return yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise error(f"{p}{line}: not valid YAML ({getattr(e, 'problem', e)})") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    where = str(path) if path else "defaults"
    raw: dict[str, Any] = {}
    if path is not None:
        p = find_config(path)  # a YAML path, or a shipped config's name: `quickstart` (tunesmith/resources.py)
        if p is None:
            raise ConfigError(f"config file not found: {path}. Give a YAML path, or a shipped config's name: "
                              f"{', '.join(config_names())}.")
        where, raw = str(p), read_yaml(p)
    for ov in overrides or []:
        keys, value = parse_override(ov)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"command line: `{ov}`: `{k}` is not a section")
        node[keys[-1]] = value
        where = f"{where} (+ command-line overrides)" if "overrides" not in where else where
    cfg = build_section(Config, raw, where, aliases=ALIASES)
    # data files from the current folder, else the shipped ones (`examples/data/train.jsonl` of the quickstart)
    cfg.data.train = [resolve_path(f) for f in cfg.data.train]
    cfg.data.validation = [resolve_path(f) for f in cfg.data.validation]
    cfg.validate(where)
    return cfg


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections as dotted keys (`train.lr`), the names overrides and error messages use."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
