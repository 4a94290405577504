"""Upload a run to the Hugging Face Hub: the adapter with its tokenizer and a generated model card at the repo root
(loads with peft), optionally the merged model (`merged/`) and the exported GGUF files with their Modelfile
(`gguf/`). Offline it fails in a second with what to do instead, like hub model ids do in finetune/model.py.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ExportError


def _check_online(repo: str, run: Path) -> None:
    from .model import _offline_kw

    if os.environ.get("HF_HUB_OFFLINE") or _offline_kw(repo):
        raise ExportError(
            f"pushing {run} to {repo} needs huggingface.co, which this machine cannot reach"
            f"{' (HF_HUB_OFFLINE is set)' if os.environ.get('HF_HUB_OFFLINE') else ''}. Everything to upload is already "
            f"in {run} (adapter/, README.md, gguf/): copy the folder to a machine online and run `tunesmith push "
            f"{run.name} --repo {repo}` there, or `hf upload {repo} {run}`."
        )


def push_run(run: str | os.PathLike[str], repo: str, merged: bool = False, gguf: bool = False,
             private: bool = False) -> str:
    """Upload `run` to `repo` (user/name); returns the repo URL. The card is rewritten first, so it has the latest
    eval and export numbers."""
    from .card import write_model_card
    from .model import is_run_dir

    run = Path(run).expanduser().resolve()
    if not is_run_dir(run):
        raise ExportError(f"{run} is not a finished run (no adapter/ or model/): train it first, then push it.")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ExportError(f"--repo {repo!r}: give it as user/name (or org/name).")
    ggufs = sorted((run / "gguf").glob("*.gguf")) if gguf else []
    if gguf and not ggufs:
        raise ExportError(f"--gguf: {run}/gguf has no .gguf file; export one first with `tunesmith export {run}`.")
    _check_online(repo, run)
    from huggingface_hub import HfApi, get_token

    if not (os.environ.get("HF_TOKEN") or get_token()):
        raise ExportError("no Hugging Face token: log in with `hf auth login` or set HF_TOKEN, then push again.")
    card = write_model_card(run)
    api = HfApi()
    url = str(api.create_repo(repo, private=private, exist_ok=True))
    weights = run / "adapter" if (run / "adapter").exists() else run / "model"
    api.upload_folder(repo_id=repo, folder_path=str(weights), commit_message="tunesmith: weights")
    if (run / "tokenizer").exists():
        api.upload_folder(repo_id=repo, folder_path=str(run / "tokenizer"), commit_message="tunesmith: tokenizer")
    for extra in (card, run / "loss.png", run / "config.yaml", run / "eval.json"):
        if extra.exists():
            api.upload_file(path_or_fileobj=str(extra), path_in_repo=extra.name, repo_id=repo)
    if merged:
        if not (run / "merged" / "config.json").exists():
            from .merge import merge_run

            merge_run(run)
        api.upload_folder(repo_id=repo, folder_path=str(run / "merged"), path_in_repo="merged")
    for f in ggufs + ([run / "gguf" / "Modelfile"] if ggufs and (run / "gguf" / "Modelfile").exists() else []):
        api.upload_file(path_or_fileobj=str(f), path_in_repo=f"gguf/{f.name}", repo_id=repo)
    return url
