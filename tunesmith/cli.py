"""`tunesmith` command line: parse, then call the Python API. No logic lives here."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from tunesmith import (
    COMPILE_DECODE_HELP,
    DECODE_WEIGHTS_HELP,
    PREFIX_CACHE_HELP,
    PREFIX_CACHE_MIB,
    MissingExtraError,
    extra_of,
    require_extra,
)


def _train(a: argparse.Namespace) -> int:
    from tunesmith.finetune import load_config, train

    cfg = load_config(a.config, a.overrides)
    if a.dry_run:
        from tunesmith.finetune import dry_run

        print(dry_run(cfg))
        return 0
    train(cfg, resume=a.resume)
    return 0


def _eval(a: argparse.Namespace) -> int:
    from tunesmith.finetune import evaluate_run, format_table, save_result

    labels = [x.strip() for x in a.labels.split(",") if x.strip()] if a.labels else None
    res = evaluate_run(a.run, a.data, max_new_tokens=a.max_new_tokens, limit=a.limit, compare_base=not a.no_base,
                       labels=labels, mode=a.mode, baseline=a.baseline, batch_size=a.batch_size)
    print(format_table(res))
    for path in save_result(res, a.run):
        print(f"wrote {path}")
    return 0


def _merge(a: argparse.Namespace) -> int:
    from tunesmith.finetune import merge_run

    res = merge_run(a.run, a.out)
    print(f"merged model written to {res['path']} (max |logit diff| vs base+adapter: {res['max_abs_logit_diff']:.2e})")
    return 0


def _export(a: argparse.Namespace) -> int:
    from tunesmith.finetune import export_gguf

    res = export_gguf(a.run, quant=a.quant, out=a.out, llamacpp_check=not a.no_llamacpp_check)
    print(f"wrote {res.path} ({res.size_bytes / 1e6:.1f} MB, {res.quant}, pre-tokenizer {res.pre_tokenizer})")
    print(f"  transformers reads it back: top-1 token agrees at {res.agreement:.0%} of {res.positions} probe positions "
          f"(max |logit diff| {res.max_abs_logit_diff:.3g})")
    if res.llamacpp:
        c = res.llamacpp
        print(f"  llama.cpp answers the probe {'as transformers does' if c['same_answer'] else 'differently'} "
              f"(finish: {c['finish_reason']}): {c['llamacpp_answer'][:70]!r}")
    for note in res.notes:
        print(f"  note: {note}")
    if res.modelfile:
        from pathlib import Path

        print(f"wrote {res.modelfile}; create the Ollama model with:\n  ollama create "
              f"{Path(res.path).stem.lower()} -f {res.modelfile}")
    if res.model_card:
        print(f"wrote {res.model_card} (model card)")
    return 0


def _push(a: argparse.Namespace) -> int:
    from tunesmith.finetune import push_run

    print(f"pushed to {push_run(a.run, a.repo, merged=a.merged, gguf=a.gguf, private=a.private)}")
    return 0


def _sweep(a: argparse.Namespace) -> int:
    from tunesmith.finetune import sweep

    sweep(a.config, a.trials, metric=a.metric, space=a.space, out=a.out, overrides=a.overrides, seed=a.seed)
    return 0


def _chat(a: argparse.Namespace) -> int:
    from tunesmith.finetune import GenerationParams, load_generator

    if a.base and a.engine == "llama.cpp":
        print("error: --base needs --engine transformers: the llama.cpp engine serves the merged model.", file=sys.stderr)
        return 2
    kw = {"decode_weights": a.decode_weights, "compile_decode": a.compile_decode,
          "prefix_cache_mib": a.prefix_cache_mib} if a.engine == "transformers" else {}
    gen = load_generator(a.run, engine=a.engine, **kw)
    params = GenerationParams(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p,
                              repetition_penalty=a.repetition_penalty, use_adapter=not a.base)
    history: list[dict[str, str]] = [{"role": "system", "content": a.system}] if a.system else []
    prompts = [a.prompt] if a.prompt else None
    if prompts is None:
        print(f"chatting with {gen.name}{' (base model)' if a.base else ''}. /reset clears, /exit quits.")
    while True:
        if prompts is not None:
            if not prompts:
                return 0
            msg = prompts.pop(0)
            print(f"> {msg}")
        else:
            try:
                msg = input("> ").strip()
            except (EOFError, KeyboardInterrupt):
                print()
                return 0
        if msg in ("/exit", "/quit"):
            return 0
        if msg == "/reset":
            history = history[:1] if a.system else []
            continue
        if not msg:
            continue
        history.append({"role": "user", "content": msg})
        reply = []
        try:
            for chunk in gen.stream(history, params):
                print(chunk.text, end="", flush=True)
                reply.append(chunk.text)
        except KeyboardInterrupt:
            print(" [stopped]", end="")
        print()
        history.append({"role": "assistant", "content": "".join(reply)})


def _preview(a: argparse.Namespace) -> int:
    from tunesmith.finetune import (
        DataReport,
        format_preview,
        load_config,
        load_records,
        load_tokenizer,
        preview_examples,
    )

    if a.source.endswith((".yaml", ".yml")):
        cfg = load_config(a.source, a.overrides)
        files = cfg.data.train
    else:
        cfg = load_config(None, [f"base_model={a.base_model}", *a.overrides])
        files = [a.source]
    tok = load_tokenizer(cfg.base_model)
    if cfg.data.chat_template:
        from tunesmith.finetune import resolve_chat_template

        tok.chat_template = resolve_chat_template(tok, cfg.data.chat_template)
    records = load_records(files)[a.start: a.start + a.n]
    report = DataReport()
    color = sys.stdout.isatty() and not a.no_color
    for parts in preview_examples(records, tok, cfg, report):  # preference pairs: chosen, then rejected
        for title, ex in parts:
            if title:
                print(f"== {title}")
            print(format_preview(ex, tok, color=color))
            print()
    for line in report.lines():
        print(line)
    if not color:
        print("legend: text inside «» is trained on (loss), the rest is context only")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tunesmith", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune (LoRA or full) as a YAML config says")
    t.add_argument("config", help="YAML config, e.g. configs/quickstart.yaml")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4 data.max_length=1024")
    t.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    t.add_argument("--dry-run", action="store_true", help="check config and data, print memory and time estimates")
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="tuned vs base on held-out data: accuracy/F1 for labels, else exact match, ROUGE-L")
    e.add_argument("run")
    e.add_argument("--data", required=True, help="held-out file (same formats as training)")
    e.add_argument("--labels", default=None, help="comma-separated label set (default: the run's, or detected)")
    e.add_argument("--mode", choices=["auto", "generate", "score"], default="auto",
                   help="score: pick the label with the highest log-likelihood; generate: greedy decoding; "
                        "auto: score when the answers are labels")
    e.add_argument("--baseline", choices=["tfidf"], default=None,
                   help="add TF-IDF + logistic regression trained on the run's training file")
    e.add_argument("--max-new-tokens", type=int, default=64)
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--limit", type=int, default=None, help="only the first N records")
    e.add_argument("--no-base", action="store_true", help="skip the base-model column")
    e.set_defaults(func=_eval)

    m = sub.add_parser("merge", help="merge the adapter into the base and verify the logits")
    m.add_argument("run")
    m.add_argument("--out", default=None, help="default: RUN/merged")
    m.set_defaults(func=_merge)

    x = sub.add_parser("export", help="write a verified GGUF for llama.cpp / Ollama, a Modelfile and a model card")
    x.add_argument("run", help="a finished run, a merged model folder, or `embedded`")
    x.add_argument("--format", choices=["gguf"], default="gguf")
    x.add_argument("--quant", choices=["f16", "bf16", "q8_0", "q4_0"], default="f16")
    x.add_argument("--out", default=None, help="a .gguf file or a folder (default: RUN/gguf/NAME-QUANT.gguf)")
    x.add_argument("--no-llamacpp-check", action="store_true",
                   help="skip llama.cpp's own check even when xllamacpp is installed")
    x.set_defaults(func=_export)

    ph = sub.add_parser("push", help="upload a run (adapter, model card; --merged, --gguf) to the Hugging Face Hub")
    ph.add_argument("run")
    ph.add_argument("--repo", required=True, help="user/name on the Hub")
    ph.add_argument("--merged", action="store_true", help="also the merged model (merged/)")
    ph.add_argument("--gguf", action="store_true", help="also RUN/gguf/*.gguf and the Modelfile (gguf/)")
    ph.add_argument("--private", action="store_true")
    ph.set_defaults(func=_push)

    w = sub.add_parser("sweep", help="hyperparameter search with Optuna: each trial a run, resumable")
    w.add_argument("config", help="YAML config every trial starts from")
    w.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=200")
    w.add_argument("--trials", type=int, required=True, help="trials in total; a rerun runs only the missing ones")
    w.add_argument("--metric", choices=["auto", "eval_loss", "eval_accuracy", "eval_preference_accuracy",
                                        "eval_reward_mean"], default="auto",
                   help="what to optimise (auto: eval_accuracy when the answers are labels, else eval_loss; "
                        "eval_preference_accuracy for dpo/orpo/simpo, eval_reward_mean for grpo)")
    w.add_argument("--space", default=None, help="search-space YAML (default: lr, epochs, LoRA rank; see README)")
    w.add_argument("--out", default=None, help="sweep folder (default: OUTPUT_DIR-sweep)")
    w.add_argument("--seed", type=int, default=None, help="sampler seed (default: the config's seed)")
    w.set_defaults(func=_sweep)

    c = sub.add_parser("chat", help="chat in the terminal with a run (or any model)")
    c.add_argument("run", nargs="?", default="embedded")
    c.add_argument("--prompt", default=None, help="ask one question and exit (no interactive loop)")
    c.add_argument("--system", default=None)
    c.add_argument("--base", action="store_true", help="answer with the base model (adapter off)")
    c.add_argument("--max-new-tokens", type=int, default=256)
    c.add_argument("--temperature", type=float, default=0.0)
    c.add_argument("--top-p", type=float, default=0.95)
    c.add_argument("--repetition-penalty", type=float, default=1.1)
    c.add_argument("--engine", choices=["transformers", "llama.cpp"], default="transformers",
                   help="llama.cpp: serve the run's GGUF (exported on first use) through the xllamacpp wheel")
    c.add_argument("--decode-weights", choices=["auto", "exact", "int8"], default="auto", help=DECODE_WEIGHTS_HELP)
    c.add_argument("--compile-decode", action="store_true", help=COMPILE_DECODE_HELP)
    c.add_argument("--prefix-cache-mib", type=int, default=PREFIX_CACHE_MIB, metavar="MIB", help=PREFIX_CACHE_HELP)
    c.set_defaults(func=_chat)

    d = sub.add_parser("data", help="inspect training data")
    dsub = d.add_subparsers(dest="data_command", required=True)
    pv = dsub.add_parser("preview", help="show records with the trained-on tokens marked")
    pv.add_argument("source", help="a data file, or a training YAML config (previews its data.train)")
    pv.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.train_on_prompt=true")
    pv.add_argument("--base-model", default="embedded", help="tokenizer to use when SOURCE is a data file")
    pv.add_argument("-n", type=int, default=2, help="how many records")
    pv.add_argument("--start", type=int, default=0)
    pv.add_argument("--no-color", action="store_true")
    pv.set_defaults(func=_preview)

    _add_front_ends(sub)
    return p


def _add_front_ends(sub: Any) -> None:
    from tunesmith.chains.cli import add_parser as add_chain
    from tunesmith.ui.cli import add_parser as add_ui

    add_chain(sub)
    add_ui(sub)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line; `key=value` overrides may also follow the options (`sweep CFG --trials 8
    train.lr=1e-4`), where plain argparse would stop at the option and refuse them."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(x.startswith("-") or "=" not in x for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*(args.overrides or []), *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    passive = getattr(args, "serving", False) and getattr(args, "engine", "transformers") == "transformers"
    if passive and not ({"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(os.environ)):
        # before torch loads: OpenMP threads that wait sleep instead of spinning. A server shares the machine, and
        # a spinning thread burns the time slice its descheduled partner needs (a 24-token reply took 18 s beside
        # a parallel job instead of 2 s; see finetune/sharing.py and benchmarks/api_latency.py). Not for llama.cpp:
        # its ggml threads share libgomp and decode at half speed when they sleep at every barrier (50 -> 22 tok/s)
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if not args.verbose:
        _quiet_libraries()
    try:
        if getattr(args, "extra", None):  # `ui`, `serve`, `chain`: their optional packages, before any model loads
            require_extra(args.extra, f"`tunesmith {args.command}`")
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # a user error: one clear line, not a traceback (use -v for the traceback)
        from tunesmith.chains import ChainError
        from tunesmith.finetune import USER_ERRORS

        missing = e.name if isinstance(e, ModuleNotFoundError) else None
        extra = extra_of(missing) if missing else None
        if extra:  # an optional package imported deep inside a command
            e = MissingExtraError(extra, [str(missing)], f"`tunesmith {args.command}`")
        if isinstance(e, (*USER_ERRORS, ChainError, MissingExtraError)) and not args.verbose:
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise


def _quiet_libraries() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


if __name__ == "__main__":
    sys.exit(main())

