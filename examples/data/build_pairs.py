"""Build preference pairs (DPO, ORPO, SimPO) and GRPO prompts from the standard-library Q&A. Run with Python 3.11.

    python examples/data/build_pairs.py [--out DIR]

Offline, deterministic (seed 0), a few seconds. Sources: this folder's `train.jsonl` / `test.jsonl` (built by
build_stdlib_qa.py from CPython's docstrings) and the constants of the same 47 modules, read with `import`; all
under the PSF License 2.0, as the records that derive from them.

Held out means held out from every training file, the SFT data included, so that "GRPO / DPO beats the SFT run it
starts from" is measured on questions neither run trained on:
- train files: questions of `train.jsonl` (what the SFT run saw) and half of the constant questions;
- test files: the questions of `test.jsonl` (held out from SFT) and the other half of the constants (new facts in
  the familiar "Which standard-library module defines `X`?" form). Every record says where it came from (`source`).

Pairs: `prompt` (system + user messages), `chosen` (the right answer), `rejected` (a plausible wrong one): for
"which module", a related module that does not have the name (`shutil` for `os.getcwd`); for "what does it do", the
docstring sentence of a sibling function of the same module. GRPO: the same prompts with `answer`, for the
`exact_match` reward.
"""

from __future__ import annotations

import argparse
import importlib
import json
import random
import re
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
SUFFIX = " Answer with the module name only."
"""Added to "which module" questions: the answer is then checkable by exact match, for the base model too."""

GROUPS = [
    ["os", "os.path", "shutil", "pathlib", "glob", "fnmatch", "tempfile"],
    ["json", "pickle", "csv", "sqlite3", "struct", "base64"],
    ["gzip", "zipfile", "tarfile", "hashlib"],
    ["math", "statistics", "random", "decimal", "fractions", "secrets"],
    ["itertools", "functools", "collections", "heapq", "bisect", "copy", "operator"],
    ["datetime", "time", "calendar"],
    ["string", "textwrap", "re", "difflib", "unicodedata"],
    ["subprocess", "threading", "queue", "socket", "urllib.parse", "uuid"],
    ["logging", "argparse", "inspect"],
]
"""Related modules: a wrong answer taken from the right answer's group is one a model could believe."""

ELSEWHERE = ["errno", "stat", "io", "signal", "select", "locale", "codecs", "zlib", "dis", "opcode", "token", "sys",
             "builtins", "types", "enum", "fcntl", "resource", "mmap", "ssl", "zipimport", "re._constants", "posixpath"]
"""Other stdlib modules that constants of ours come from (pathlib's ENOENT is errno's): such names are left out,
since the question would have two right answers."""

NAMED_LOWER = ("math", "string")
"""Modules whose lower-case constants are questions (`pi`, `ascii_letters`); elsewhere only UPPER_CASE names count,
since "Which module defines `name`?" (os.name) would be a riddle, not a fact."""

CONSTANTS_PER_MODULE = 8
"""socket alone has 342 constants: a cap keeps the new questions spread over the modules."""


def read_qa(path: Path) -> list[dict[str, Any]]:
    """(task, module, name, answer) of each record of a build_stdlib_qa.py file."""
    out = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        question, answer = rec["messages"][1]["content"], rec["messages"][2]["content"]
        if rec["task"] == "module":
            name = re.fullmatch(r"Which standard-library module defines `(.+)`\?", question).group(1)
            out.append({"task": "module", "module": answer, "name": name, "answer": answer})
        else:
            module, name = re.fullmatch(r"What does `(.+)\.([^.]+)` do\?", question).groups()
            out.append({"task": "explain", "module": module, "name": name, "answer": answer})
    return out


def constants(modules: list[str], taken: set[str], rng: random.Random) -> list[dict[str, Any]]:
    """Module-level int / float / str constants that exactly one of `modules` defines and no module of ELSEWHERE
    has, none of them already a question (`taken`); at most CONSTANTS_PER_MODULE per module, picked with `rng`."""
    def public_constants(m: str) -> set[str]:
        mod = importlib.import_module(m)
        return {n for n in dir(mod) if not n.startswith("_") and isinstance(getattr(mod, n), (int, float, str))
                and not isinstance(getattr(mod, n), bool) and len(n) > 1 and (n.isupper() or m in NAMED_LOWER)}

    owners: dict[str, list[str]] = {}
    for m in modules:
        for n in public_constants(m):
            owners.setdefault(n, []).append(m)
    elsewhere = set().union(*(dir(importlib.import_module(m)) for m in ELSEWHERE))
    out = []
    for m in modules:
        names = sorted(n for n, ms in owners.items() if ms == [m] and n not in elsewhere and n not in taken)
        out += [{"task": "module", "module": m, "name": n, "answer": m, "source": "constants"}
                for n in rng.sample(names, min(CONSTANTS_PER_MODULE, len(names)))]
    return out


def wrong_module(q: dict[str, Any], rng: random.Random) -> str:
    """A module of the right answer's group that does not have the name, so the rejected answer is surely wrong."""
    group = next(g for g in GROUPS if q["module"] in g)
    options = [m for m in group if m != q["module"] and not hasattr(importlib.import_module(m), q["name"])]
    return rng.choice(options)


def wrong_explanation(q: dict[str, Any], explains: list[dict[str, Any]], rng: random.Random) -> str | None:
    """The docstring sentence of another function of the same module (else of its group), a different sentence.
    `explains` is the pool to draw from: a train pair never rejects a sentence that a test pair chooses."""
    group = next(g for g in GROUPS if q["module"] in g)
    for pool in ([e for e in explains if e["module"] == q["module"]], [e for e in explains if e["module"] in group]):
        options = sorted({e["answer"] for e in pool if e["name"] != q["name"] and e["answer"] != q["answer"]})
        if options:
            return rng.choice(options)
    return None


def prompt(q: dict[str, Any], system: str) -> list[dict[str, str]]:
    user = (f"Which standard-library module defines `{q['name']}`?{SUFFIX}" if q["task"] == "module"
            else f"What does `{q['module']}.{q['name']}` do?")
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def pair(q: dict[str, Any], explains: list[dict[str, Any]], system: str, rng: random.Random) -> dict[str, Any] | None:
    rejected = wrong_module(q, rng) if q["task"] == "module" else wrong_explanation(q, explains, rng)
    if rejected is None:
        return None
    return {"prompt": prompt(q, system), "chosen": q["answer"], "rejected": rejected, "task": q["task"],
            "source": q["source"]}


def grpo(q: dict[str, Any], system: str) -> dict[str, Any]:
    return {"prompt": prompt(q, system), "answer": q["answer"], "source": q["source"]}


def build(out: Path) -> dict[str, int]:
    """Write the four files into `out`; returns their record counts."""
    import sys

    sys.path.insert(0, str(HERE))
    from build_stdlib_qa import MODULES, SYSTEM

    assert sorted(m for g in GROUPS for m in g) == sorted(MODULES), "every module in exactly one group"
    rng = random.Random(0)
    seen = [{**q, "source": "train.jsonl"} for q in read_qa(HERE / "train.jsonl")]
    held = [{**q, "source": "test.jsonl"} for q in read_qa(HERE / "test.jsonl")]
    seen_explains = [q for q in seen if q["task"] == "explain"]
    all_explains = seen_explains + [q for q in held if q["task"] == "explain"]
    new = constants(MODULES, {q["name"] for q in seen + held}, rng)
    rng.shuffle(new)
    new_train, new_test = new[: len(new) // 2], new[len(new) // 2:]

    seen_module = [q for q in seen if q["task"] == "module"]
    files = {
        "pairs_train.jsonl": [pair(q, seen_explains, SYSTEM, rng) for q in
                              rng.sample(seen_module, 200) + rng.sample(seen_explains, 120) + new_train],
        "pairs_test.jsonl": [pair(q, all_explains, SYSTEM, rng) for q in held + new_test],
        "grpo_train.jsonl": [grpo(q, SYSTEM) for q in rng.sample(seen_module, 300) + new_train],
        "grpo_test.jsonl": [grpo(q, SYSTEM) for q in [q for q in held if q["task"] == "module"] + new_test],
    }
    counts = {}
    for name, records in files.items():
        records = [r for r in records if r is not None]
        files[name] = records
        rng.shuffle(records)
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in records))
        counts[name] = len(records)
    for kind in ("pairs", "grpo"):  # held out: no test question is asked in a train file (nor in the SFT data)
        train = {json.dumps(r["prompt"]) for r in files[f"{kind}_train.jsonl"]}
        assert not train & {json.dumps(r["prompt"]) for r in files[f"{kind}_test.jsonl"]}
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=HERE, help="folder for the four .jsonl files (default: this one)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, n in build(args.out).items():
        print(name, n)


if __name__ == "__main__":
    main()
