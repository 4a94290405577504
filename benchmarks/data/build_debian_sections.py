"""Build the Debian-sections classification set from the Debian bookworm package index apt keeps on this machine.

    .venv/bin/python benchmarks/data/build_debian_sections.py            # writes benchmarks/data/debian_sections/
    .venv/bin/python benchmarks/data/build_debian_sections.py --packages Packages.lz4 --out /tmp/ds

Why this data: tunesmith's "domain accuracy" evidence needs a labelled classification set that is public, real, not
the shipped stdlib Q&A, and available offline. Debian's `Packages` index is all four: every package has a
`Section` chosen by its maintainer and a one-line synopsis (`Description:`) written by a human. The index apt
downloads holds the synopsis only (long descriptions live in the separate `Translation-en` files, which this machine
does not have), so each record is "package name: synopsis", about the size of a short catalogue entry.

Deterministic (seed 0): the same index gives byte-identical files. Each section gets 60 held-out records and a
training pool of 150; `train_20` is a subset of `train_50`, which is a subset of `train_150`, so results at the
three sizes differ only by the added examples.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

APT_LISTS = Path("/var/lib/apt/lists")
PACKAGES = APT_LISTS / "deb.debian.org_debian_dists_bookworm_main_binary-amd64_Packages.lz4"
INRELEASE = APT_LISTS / "deb.debian.org_debian_dists_bookworm_InRelease"
OUT = Path(__file__).parent / "debian_sections"

SECTIONS = ("admin", "editors", "games", "graphics", "mail", "math", "net", "science", "sound", "web")
"""Sections about what the software is for, not how it is packaged (libs, devel, python, doc ...), each with
enough distinct packages after de-duplication for 60 test + 150 training records."""
SEED = 0
N_TEST = 60
TRAIN_SIZES = (20, 50, 150)
VAL_FROM, N_VAL = 50, 10
"""val.jsonl: N_VAL packages per section taken after the first VAL_FROM of the training pool."""
QUESTION = "Which Debian section does this package belong to? Answer with one of: {labels}."

_SKIP_SUFFIX = re.compile(r"-(dev|doc|docs|dbg|dbgsym|data|common|l10n|examples)$")
"""Support packages: their synopsis describes the packaging ("development files for ..."), not the software."""
_SKIP_SYNOPSIS = re.compile(r"transitional|dummy package|metapackage|meta-package", re.IGNORECASE)
"""Empty shells that only exist to pull in other packages."""
NEAR_DUPLICATE = 0.6
"""Word-set Jaccard similarity of two synopses from which the later one is dropped. Catches templated families
("Puppet module for Chrony" / "Puppet module for HAProxy", "Kazakh dictionary for hunspell" / "Arabic ...") and
near-copies ("GTK+ client for the Music Player Daemon (MPD)" twice) that would put a training record's twin in the
test set. At 0.5 it also drops real variety in short synopses ("3D chess game" / "3D billiards game")."""


@dataclass(frozen=True)
class Package:
    """The fields of one binary package's stanza that the set uses."""

    name: str
    source: str
    section: str
    synopsis: str


def read_index(path: Path) -> str:
    """The text of a `Packages` file, lz4-compressed (as apt stores it) or plain."""
    if not path.is_file():
        sys.exit(f"error: {path} not found. It is apt's copy of the Debian bookworm main amd64 package index; on a "
                 "Debian bookworm machine run `apt-get update` to get it, or pass another copy with --packages.")
    data = path.read_bytes()
    if path.suffix != ".lz4":
        return data.decode("utf-8")
    try:
        import lz4.frame
    except ImportError:
        lz4_cli = shutil.which("lz4")
        if lz4_cli is None:
            sys.exit(f"error: {path} is lz4-compressed and neither the `lz4` Python package nor the `lz4` command "
                     "is available: `.venv/bin/pip install lz4` (or `apt-get install lz4`).")
        return subprocess.run([lz4_cli, "-dc", str(path)], check=True, capture_output=True).stdout.decode("utf-8")
    return lz4.frame.decompress(data).decode("utf-8")


def index_date(path: Path) -> str:
    """The `Date:` of the suite's InRelease file: when Debian published the index we read."""
    if not path.is_file():
        return "unknown (InRelease file not found)"
    m = re.search(r"^Date: (.+)$", path.read_text(encoding="utf-8", errors="replace"), re.MULTILINE)
    return m.group(1) if m else "unknown"


def parse_stanzas(text: str) -> list[dict[str, str]]:
    """One dict per package stanza; continuation lines (leading space) are joined to their field."""
    stanzas = []
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = None
        for line in block.splitlines():
            if line.startswith((" ", "\t")) and key:
                fields[key] += "\n" + line
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if "Package" in fields:
            stanzas.append(fields)
    return stanzas


def candidates(stanzas: list[dict[str, str]], sections: tuple[str, ...]) -> list[Package]:
    """One package per source package in `sections`, skipping support and transitional packages.

    Binaries of one source share their upstream and usually their wording, so keeping two would put near-copies on
    both sides of the train/test split. The representative is the binary named like its source, else the shortest
    name (the "main" program rather than a plugin)."""
    by_source: dict[str, list[Package]] = {}
    for s in stanzas:
        section = s.get("Section", "").split("/")[-1]
        synopsis = s.get("Description", "").split("\n")[0].strip()
        name = s["Package"]
        if section not in sections or not synopsis or _SKIP_SUFFIX.search(name) or _SKIP_SYNOPSIS.search(synopsis):
            continue
        source = s.get("Source", name).split()[0]  # "Source: foo (1.2-3)" when versions differ
        by_source.setdefault(source, []).append(Package(name, source, section, synopsis))
    chosen = []
    for source, pkgs in sorted(by_source.items()):
        chosen.append(min(pkgs, key=lambda p: (p.name != source, len(p.name), p.name)))
    return chosen


def _words(text: str) -> frozenset[str]:
    return frozenset(re.findall(r"[a-z0-9]+", text.lower()))


def drop_near_duplicates(pkgs: list[Package], threshold: float = NEAR_DUPLICATE) -> list[Package]:
    """Keep a package only if its synopsis shares less than `threshold` (Jaccard, word sets) with every kept one.

    Greedy in name order, over all sections together: a near-copy under another label is a contradiction, not
    variety."""
    kept: list[Package] = []
    kept_words: list[frozenset[str]] = []
    for p in sorted(pkgs, key=lambda p: p.name):
        w = _words(p.synopsis)
        if any(len(w & k) >= threshold * len(w | k) for k in kept_words):
            continue
        kept.append(p)
        kept_words.append(w)
    return kept


def split(pkgs: list[Package], seed: int = SEED) -> dict[str, list[Package]]:
    """`test` (N_TEST per section) and nested `train_<n>` pools, each file in one fixed random order.

    One shuffle per section decides everything: its first N_TEST packages are the test set, the next ones fill the
    training pools in order, so train_20 is the start of train_50, which is the start of train_150. `val` is the
    N_VAL packages after train_50's: held out from train_20 and train_50 (for picking settings, e.g. `tunesmith
    sweep`, without looking at `test`), but inside train_150."""
    rng = random.Random(seed)
    need = N_TEST + max(TRAIN_SIZES)
    per_section: dict[str, list[Package]] = {}
    for p in sorted(pkgs, key=lambda p: p.name):
        per_section.setdefault(p.section, []).append(p)
    parts: dict[str, list[Package]] = {"test": []} | {f"train_{n}": [] for n in TRAIN_SIZES} | {"val": []}
    for section in sorted(per_section):
        group = per_section[section]
        if len(group) < need:
            sys.exit(f"error: section {section!r} has {len(group)} usable packages, {need} are needed; "
                     "pick another section in SECTIONS.")
        rng.shuffle(group)
        parts["test"] += group[:N_TEST]
        for n in TRAIN_SIZES:
            parts[f"train_{n}"] += group[N_TEST:N_TEST + n]
        parts["val"] += group[N_TEST + VAL_FROM:N_TEST + VAL_FROM + N_VAL]
    order = {p.name: rng.random() for p in pkgs}  # one order shared by all files: classes interleaved
    return {k: sorted(v, key=lambda p: order[p.name]) for k, v in parts.items()}


def to_record(p: Package, labels: tuple[str, ...]) -> dict[str, list[dict[str, str]]]:
    """A chat record: the question with the label list, then the package; the answer is the section."""
    question = QUESTION.format(labels=", ".join(labels))
    return {"messages": [{"role": "user", "content": f"{question}\n\n{p.name}: {p.synopsis}"},
                         {"role": "assistant", "content": p.section}]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--packages", type=Path, default=PACKAGES, help="Packages index (.lz4 or plain)")
    ap.add_argument("--inrelease", type=Path, default=INRELEASE, help="InRelease file, for the index date")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)

    text = read_index(args.packages)
    pkgs = drop_near_duplicates(candidates(parse_stanzas(text), SECTIONS))
    parts = split(pkgs)
    args.out.mkdir(parents=True, exist_ok=True)
    for part, members in parts.items():
        with open(args.out / f"{part}.jsonl", "w", encoding="utf-8") as f:
            for p in members:
                f.write(json.dumps(to_record(p, SECTIONS), ensure_ascii=False) + "\n")
    manifest = {
        "source": args.packages.name,
        "index_date": index_date(args.inrelease),
        "index_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "seed": SEED,
        "labels": list(SECTIONS),
        "usable_per_section": dict(sorted(Counter(p.section for p in pkgs).items())),
        "records": {part: len(members) for part, members in parts.items()},
    }
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
