"""`tunesmith chain run NAME --input ...`, `chain eval NAME --data FILE` and `chain list`: parse, call, print."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .errors import ChainError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the `chain` subcommand on the main `tunesmith` parser."""
    c = subparsers.add_parser("chain", help="run a LangChain pipeline defined in configs/chains/*.yaml")
    c.set_defaults(extra="chains")  # checked by tunesmith.cli before running: pip install 'tunesmith[chains]'
    sub = c.add_subparsers(dest="chain_command", required=True)

    r = sub.add_parser("run", help="run a chain once and print its answer")
    r.add_argument("name", help="a file in configs/chains/ (e.g. rag_docs) or a path to a chain YAML")
    r.add_argument("--input", "-i", default=None, help="the main input: the question (rag) or the text")
    r.add_argument("--input-file", default=None, help="read the main input from this file (e.g. for summarize)")
    r.add_argument("--var", action="append", default=[], metavar="NAME=VALUE",
                   help="another prompt variable, repeatable: --var tone=formal")
    r.add_argument("--model", default=None, help="override the config's model (a run folder, `embedded`, ...)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, repeatable: --set params.temperature=0.7 --set k=5")
    r.add_argument("--json", action="store_true", help="print the result as JSON")
    r.set_defaults(func=_run)

    e = sub.add_parser("eval", help="accuracy of a classify, extract or rag chain on a JSONL file of cases")
    e.add_argument("name", help="a file in configs/chains/ (e.g. classify) or a path to a chain YAML")
    e.add_argument("--data", required=True, help='JSONL: {"input": ..., "expected": ...} per line (rag: + "source")')
    e.add_argument("--model", default=None, help="override the config's model (a run folder, `embedded`, ...)")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, repeatable: --set params.use_adapter=false (the run's base model)")
    e.add_argument("--misses", type=int, default=5, help="how many wrong cases to print (default 5)")
    e.add_argument("--json", action="store_true", help="print the result as JSON, every miss included")
    e.set_defaults(func=_eval)

    ls = sub.add_parser("list", help="list the chains in configs/chains/")
    ls.set_defaults(func=_list)


def _config(a: argparse.Namespace) -> Any:
    """The chain config with `--set` and `--model` applied."""
    from tunesmith.finetune import parse_override

    from .config import load_chain_config

    overrides: dict[str, Any] = {".".join(k): v for k, v in map(parse_override, a.set)}
    if a.model:
        overrides["model"] = a.model
    return load_chain_config(a.name, overrides)


def _run(a: argparse.Namespace) -> int:
    from .config import build_chain, main_input_key

    try:
        cfg = _config(a)
        text = Path(a.input_file).read_text(encoding="utf-8") if a.input_file else a.input
        inputs = {**({main_input_key(cfg): text} if text is not None else {}), **_vars(a.var)}
        if not inputs:
            raise ChainError(f"chain `{a.name}` needs an input: --input TEXT, --input-file PATH or --var NAME=VALUE")
        result = build_chain(cfg, where=a.name).invoke(inputs)
    except (ChainError, FileNotFoundError) as e:  # a user error: one line, as for the other subcommands
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(_jsonable(result), indent=2, ensure_ascii=False) if a.json else _show(result))
    return 0


def _eval(a: argparse.Namespace) -> int:
    from .config import build_chain
    from .evaluate import evaluate_chain, load_cases

    try:
        cfg = _config(a)
        cases = load_cases(a.data, cfg.kind)
        result = evaluate_chain(build_chain(cfg, where=a.name), cfg, cases, progress=sys.stderr.isatty())
    except (ChainError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps({"chain": a.name, "model": cfg.model, "data": a.data, "kind": result.kind,
                          "cases": result.cases, "points": result.points, "out_of": result.out_of,
                          "accuracy": result.accuracy, "misses": result.misses}, indent=2, ensure_ascii=False))
        return 0
    print(f"{a.name} on {a.data}, model {cfg.model}")
    print(result.summary())
    for miss in result.misses[: a.misses]:
        print(f"  miss: {miss['input'][:70]!r}: expected {miss['expected']!r}, got {miss['got']!r}")
    return 0


def _list(a: argparse.Namespace) -> int:
    import yaml

    from .config import CONFIG_DIRS

    seen = set()
    for folder in CONFIG_DIRS:
        for f in sorted(folder.glob("*.yaml")) if folder.is_dir() else []:
            if f.stem in seen:
                continue
            seen.add(f.stem)
            raw = yaml.safe_load(f.read_text()) or {}
            print(f"{f.stem:<16} {raw.get('kind', '?'):<10} {raw.get('description', '')}")
    if not seen:
        print(f"no chain configs in {CONFIG_DIRS[0]}/")
    return 0


def _vars(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        name, eq, value = pair.partition("=")
        if not eq or not name.strip():
            raise ChainError(f"--var {pair!r} must look like NAME=VALUE (e.g. --var tone=formal)")
        out[name.strip()] = value
    return out


def _show(result: Any) -> str:
    """An answer with its sources (rag), JSON (extract), or the text as it is."""
    if isinstance(result, dict) and "answer" in result:
        lines = [result["answer"], "", "Sources:"]
        lines += [f"  - {d.metadata.get('source')} (chunk {d.metadata.get('chunk')}, score {d.metadata.get('score')})"
                  for d in result.get("sources", [])]
        return "\n".join(lines)
    if hasattr(result, "model_dump_json"):
        return result.model_dump_json(indent=2)
    return str(result)


def _jsonable(result: Any) -> Any:
    if hasattr(result, "model_dump"):
        return result.model_dump()
    if hasattr(result, "page_content"):
        return {"source": result.metadata.get("source"), "text": result.page_content, "metadata": result.metadata}
    if isinstance(result, dict):
        return {k: _jsonable(v) for k, v in result.items()}
    if isinstance(result, list):
        return [_jsonable(v) for v in result]
    return result
