"""The model card (README.md for the Hugging Face Hub) of a run, built from the files the run folder already has.

`tunesmith export` writes it into the run folder so it exists without a hub; `tunesmith push` uploads it. Every
number in it is read from a file (summary.json, eval.json, config.yaml), never re-measured, so the card says what
the run measured.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def model_card(run: Path, gguf: Any = None, repo: str | None = None) -> str:
    """Markdown with YAML front matter (base model, library, tags) as the Hub renders it."""
    cfg = yaml.safe_load((run / "config.yaml").read_text()) or {}
    summary, ev = _read_json(run / "summary.json"), _read_json(run / "eval.json")
    base = str(cfg.get("base_model", "unknown"))
    hub_base = "HuggingFaceTB/SmolLM2-135M-Instruct" if base in ("embedded", "smollm2-135m", "smollm2-135m-instruct") \
        else base
    front = {"base_model": hub_base, "library_name": "peft" if (run / "adapter").exists() else "transformers",
             "tags": ["tunesmith", "lora" if (run / "adapter").exists() else "full-finetune", "gguf" if gguf else None]}
    front["tags"] = [t for t in front["tags"] if t]
    name = repo or run.name
    out = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {name}", "",
           f"Fine-tuned from `{hub_base}` with tunesmith "
           f"({cfg.get('finetuning_type', 'lora')}).", ""]
    data = cfg.get("data") or {}
    out += ["## Training data", ""]
    out += [f"- files: {', '.join(map(str, data.get('train') or [])) or 'n/a'}"]
    out += [f"- {line}" for line in summary.get("data") or []]
    if data.get("system_prompt"):
        out.append(f"- system prompt: `{data['system_prompt']}`")
    out += ["", "## Training", ""]
    train = cfg.get("train") or {}
    lora = cfg.get("lora") or {}
    for key, val in (("steps", summary.get("steps")), ("final train loss", summary.get("final_loss")),
                     ("eval loss", summary.get("eval_loss")), ("eval perplexity", summary.get("eval_ppl")),
                     ("learning rate", train.get("lr")), ("epochs", train.get("epochs")),
                     ("LoRA rank / alpha", f"{lora.get('r')} / {lora.get('alpha')}" if lora else None),
                     ("train time (s)", summary.get("train_time_s"))):
        if val is not None:
            out.append(f"- {key}: {val}")
    if (run / "loss.png").exists():
        out += ["", "![loss curve](loss.png)"]
    if ev.get("models"):
        from .evaluate import format_table

        out += ["", "## Evaluation", "", "```", format_table(ev), "```"]
    if gguf is not None:
        out += ["", "## GGUF (llama.cpp, Ollama)", "",
                f"`{Path(gguf.path).name}` ({gguf.quant}, {gguf.size_bytes / 1e6:.1f} MB): read back by transformers, "
                f"its top-1 token matched the merged model at {gguf.agreement:.0%} of {gguf.positions} probe positions"
                + (f"; llama.cpp's greedy answer {'matched' if gguf.llamacpp['same_answer'] else 'differed from'} "
                   "transformers'." if gguf.llamacpp else "."),
                "", "```bash", "ollama create NAME -f Modelfile", "```"]
    out += ["", "## Use", "", "```python", "from tunesmith.finetune import load_generator",
            f'gen = load_generator("{run.name}")', 'print(gen.generate([{"role": "user", "content": "Hi"}]).text)',
            "```", ""]
    return "\n".join(out)


def write_model_card(run: str | Path, gguf: Any = None) -> Path:
    path = Path(run) / "README.md"
    path.write_text(model_card(Path(run), gguf))
    return path
