"""The files tunesmith ships: training configs, chain configs, example data and documents.

In a checkout they sit at the repository root (configs/, examples/); a built wheel carries them as package data
(tunesmith/configs/, tunesmith/examples/; see pyproject.toml). Shipped configs name their files by relative path
(`data.train: [examples/data/train.jsonl]`, `docs_dir: examples/docs`), so every lookup of "a shipped file by name
or relative path" goes through here, and `tunesmith train quickstart` works from any folder, checkout or not.
Your own files win: a relative path is looked up in the current folder first, the shipped copy second.
"""

from __future__ import annotations

from pathlib import Path

SHIPPED_FOLDERS = ("configs", "examples")
"""The top-level folders whose files ship; other relative paths are never looked up in the package."""


def shipped_root() -> Path:
    """The folder holding the shipped configs/ and examples/.

    A real directory rather than an `importlib.resources` Traversable: datasets, FAISS and the YAML reader want files
    on disk, and pip always installs a wheel unpacked. An editable install has no copy inside the package, so the
    checkout root (recognised by its pyproject.toml) is the fallback.
    """
    package = Path(__file__).resolve().parent
    checkout = package.parent
    if not (package / "configs").is_dir() and (checkout / "pyproject.toml").is_file() and (checkout / "configs").is_dir():
        return checkout
    return package


def shipped_path(relative: str | Path) -> Path | None:
    """`examples/data/train.jsonl` -> the shipped file or folder of that path, or None if tunesmith ships none."""
    p = Path(relative)
    if p.is_absolute() or not p.parts or p.parts[0] not in SHIPPED_FOLDERS or ".." in p.parts:
        return None
    found = shipped_root() / p
    return found if found.exists() else None


def resolve_path(path: str) -> str:
    """A path from a config: as written when it exists from the current folder, else the shipped file of that
    relative path (absolute, so it also works from a run folder), else as written, for the caller's not-found error."""
    if Path(path).expanduser().exists():
        return path
    found = shipped_path(path)
    return str(found) if found is not None else path


def find_config(name: str | Path, folder: str = "configs") -> Path | None:
    """A config named by path or by name: `quickstart`, `quickstart.yaml` or `configs/quickstart.yaml`.

    The current folder is searched first (NAME, then FOLDER/NAME(.yaml)), the shipped configs second."""
    name = str(name)
    candidates = [Path(name).expanduser(), Path(folder) / name, Path(folder) / f"{name}.yaml"]
    for path in candidates:
        if path.is_file():
            return path
    for path in candidates:
        found = shipped_path(path)
        if found is not None and found.is_file():
            return found
    return None


def config_names(folder: str = "configs") -> list[str]:
    """The YAML configs one can name in FOLDER: the current folder's and the shipped ones, for `chain list` and
    not-found messages."""
    folders = [Path(folder), shipped_root() / folder]
    return sorted({f.stem for d in folders if d.is_dir() for f in d.glob("*.yaml")})
