"""Rebuild the example dataset from CPython's own docstrings (PSF License 2.0). Run with Python 3.11.

    python examples/data/build_stdlib_qa.py

Two kinds of chat records, in OpenAI `messages` format:
- "Which standard-library module defines `X`?" -> the module name (short: exact match is meaningful in eval);
- "What does `module.X` do?" -> the first sentence of X's docstring.
"""

from __future__ import annotations

import importlib
import inspect
import json
import random
import re
from pathlib import Path

MODULES = [
    "os", "os.path", "shutil", "json", "re", "math", "statistics", "random", "itertools", "functools",
    "collections", "datetime", "time", "pathlib", "subprocess", "string", "textwrap", "csv", "gzip",
    "zipfile", "tarfile", "hashlib", "base64", "urllib.parse", "socket", "threading", "queue", "heapq",
    "bisect", "copy", "pickle", "tempfile", "glob", "fnmatch", "operator", "struct", "uuid", "secrets",
    "logging", "argparse", "inspect", "sqlite3", "difflib", "calendar", "decimal", "fractions", "unicodedata",
]
SYSTEM = "You are a concise assistant for Python standard-library questions."


def first_sentence(doc: str) -> str | None:
    doc = inspect.cleandoc(doc).split("\n\n")[0].replace("\n", " ").strip()
    if not doc or "(" in doc[:1] or re.match(r"^[\w.]+\(", doc):  # skip signature-only docstrings
        return None
    m = re.match(r"(.+?[.!?])(\s|$)", doc)
    s = (m.group(1) if m else doc).strip()
    return s if 20 <= len(s) <= 220 else None


def main() -> None:
    rng = random.Random(0)
    records = []
    for mod_name in MODULES:
        mod = importlib.import_module(mod_name)
        public = getattr(mod, "__all__", None) or [n for n in dir(mod) if not n.startswith("_")]
        for name in sorted(set(public)):
            obj = getattr(mod, name, None)
            if not (inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.isclass(obj)):
                continue
            if getattr(obj, "__module__", mod_name) not in (mod_name, "_" + mod_name, "posixpath", None) and \
                    not str(getattr(obj, "__module__", "")).lstrip("_").startswith(mod_name.split(".")[0]):
                continue  # re-exported from elsewhere: the question would be ambiguous
            records.append({"messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"Which standard-library module defines `{name}`?"},
                {"role": "assistant", "content": mod_name},
            ], "task": "module"})
            doc = first_sentence(obj.__doc__ or "")
            if doc:
                records.append({"messages": [
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": f"What does `{mod_name}.{name}` do?"},
                    {"role": "assistant", "content": doc},
                ], "task": "explain"})
    # a name defined in two modules has two right answers: keep such questions out
    seen: dict[str, set[str]] = {}
    for r in records:
        if r["task"] == "module":
            seen.setdefault(r["messages"][1]["content"], set()).add(r["messages"][2]["content"])
    records = [r for r in records if r["task"] != "module" or len(seen[r["messages"][1]["content"]]) == 1]
    rng.shuffle(records)
    out = Path(__file__).parent
    n_test = 60
    for fname, part in (("test.jsonl", records[:n_test]), ("train.jsonl", records[n_test:])):
        with open(out / fname, "w") as f:
            for r in part:
                f.write(json.dumps(r) + "\n")
        print(fname, len(part))


if __name__ == "__main__":
    main()
