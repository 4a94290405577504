"""Each package has one public door: `chains/` and `ui/` import `tunesmith.finetune` (and `ui/` imports
`tunesmith.chains`) by its top-level names only, never a module inside it or a `_private` name."""

from __future__ import annotations

import ast
from pathlib import Path

import tunesmith.chains
import tunesmith.finetune

ROOT = Path(__file__).parents[1]
DOORS = {"tunesmith.finetune": set(tunesmith.finetune.__all__), "tunesmith.chains": set(tunesmith.chains.__all__)}


def violations(source: str, own: str, where: str = "<test>") -> list[str]:
    """Cross-package imports in `source` (a module of package `own`) that go around a package's door."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level >= 2:
            out.append(f"{where}:{node.lineno}: relative import across packages (from {'.' * node.level}...)")
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules, names = [node.module], [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            modules, names = [a.name for a in node.names], []
        else:
            continue
        for module in modules:
            for door, exported in DOORS.items():
                if door == own:
                    continue
                if module.startswith(door + "."):
                    out.append(f"{where}:{node.lineno}: imports {module}; use `from {door} import ...`")
                elif module == door:
                    out += [f"{where}:{node.lineno}: {n} is not exported by {door} (add it to its __all__)"
                            for n in names if n not in exported]
            if module.startswith("tunesmith.") and not module.startswith(own):
                out += [f"{where}:{node.lineno}: imports private {n} from {module}" for n in names if n.startswith("_")]
    return out


def test_chains_and_ui_use_only_the_public_doors() -> None:
    found = []
    for package in ("chains", "ui"):
        for path in sorted((ROOT / package).glob("*.py")):
            found += violations(path.read_text(), f"tunesmith.{package}", str(path.relative_to(ROOT)))
    assert not found, "\n".join(found)


def test_the_check_catches_each_way_around_the_door() -> None:
    code = ("from tunesmith.finetune.model import cache_dir\nimport tunesmith.finetune.generate\n"
            "from tunesmith.finetune import _build\nfrom tunesmith.chains import rag_chain, _private\n"
            "from ..finetune import x\nfrom tunesmith.finetune import GenerationParams\nfrom .pool import _SAFE\n")
    found = violations(code, "tunesmith.ui")
    assert [f.split(":")[1] for f in found] == ["1", "2", "3", "3", "4", "4", "5"], found
    assert violations("from tunesmith.chains.config import build_config\n", "tunesmith.chains") == []


def test_finetune_documents_every_exported_name() -> None:
    doc = tunesmith.finetune.__doc__ or ""
    assert not [n for n in tunesmith.finetune.__all__ if f"`{n}`" not in doc]
