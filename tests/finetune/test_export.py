"""GGUF export: the real gguf writer, read back by transformers and gguf.GGUFReader, on a tiny Llama with a real BPE
tokenizer; the Ollama Go template rendered by a small reference renderer and compared with Jinja; bad input."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunesmith.finetune import export as export_mod
from tunesmith.finetune.errors import ExportError
from tunesmith.finetune.export import MIN_AGREEMENT, export_gguf, probe_ids
from tunesmith.finetune.model import load_run
from tunesmith.finetune.modelfile import go_template, template_shape


def _merged(run: Path):
    loaded = load_run(run, dtype=torch.float32, device="cpu")
    return loaded.model.merge_and_unload().eval(), loaded.tokenizer


def _top1_agreement(run: Path, gguf: Path) -> float:
    """Measured here, independently of the export's own check: merged model vs the file as transformers reads it."""
    model, tok = _merged(run)
    back = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    ids = torch.tensor([probe_ids(tok, None)])
    with torch.no_grad():
        a, b = model(input_ids=ids).logits[0], back(input_ids=ids).logits[0]
    return float((a.argmax(-1) == b.argmax(-1)).float().mean())


@pytest.fixture(scope="module")
def f16(tiny_run_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("gguf") / "tiny-f16.gguf"
    return export_gguf(tiny_run_dir, "f16", out, llamacpp_check=False)


def test_f16_metadata_is_what_llamacpp_reads(f16, tiny_run_dir):
    tok = AutoTokenizer.from_pretrained(tiny_run_dir / "tokenizer")
    r = GGUFReader(f16.path)
    meta = {k: r.fields[k].contents() for k in ("general.architecture", "tokenizer.ggml.model", "tokenizer.ggml.pre",
                                                 "tokenizer.ggml.eos_token_id", "tokenizer.chat_template",
                                                 "llama.context_length", "llama.attention.head_count_kv")}
    assert meta == {"general.architecture": "llama", "tokenizer.ggml.model": "gpt2",
                    "tokenizer.ggml.pre": "gpt-2",  # a plain GPT-2 ByteLevel split with a vocabulary llama.cpp has
                    "tokenizer.ggml.eos_token_id": tok.convert_tokens_to_ids("<|im_end|>"),  # never seen
                    "tokenizer.chat_template": (tiny_run_dir / "chat_template.jinja").read_text(),
                    "llama.context_length": 1024, "llama.attention.head_count_kv": 2}
    types = {t.name: t.tensor_type for t in r.tensors}
    assert types["blk.0.attn_q.weight"] == GGMLQuantizationType.F16
    assert types["blk.0.attn_norm.weight"] == GGMLQuantizationType.F32
    assert "output.weight" not in types  # tied head: llama.cpp reuses token_embd
    assert len(r.fields["tokenizer.ggml.merges"].data) > 100


def test_f16_reads_back_with_the_same_tokens_and_top1(f16, tiny_run_dir):
    assert f16.agreement == 1.0 and f16.positions > 30
    assert _top1_agreement(tiny_run_dir, Path(f16.path)) == 1.0
    back = AutoTokenizer.from_pretrained(str(Path(f16.path).parent), gguf_file=Path(f16.path).name)
    tok = AutoTokenizer.from_pretrained(tiny_run_dir / "tokenizer")
    text = "def add(a, b):\n    return a + b  <|im_end|> Paris 1000"
    assert back(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]


def test_q8_0_is_smaller_and_agrees_above_its_threshold(tiny_run_dir, tmp_path, f16):
    res = export_gguf(tiny_run_dir, "q8_0", tmp_path / "q8.gguf", llamacpp_check=False)
    r = GGUFReader(res.path)
    assert {t.name: t.tensor_type for t in r.tensors}["blk.1.ffn_down.weight"] == GGMLQuantizationType.Q8_0
    assert res.size_bytes < 0.6 * f16.size_bytes
    assert _top1_agreement(tiny_run_dir, Path(res.path)) >= MIN_AGREEMENT["q8_0"]


def test_a_failed_check_deletes_the_file_and_says_what_differs(tiny_run_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(export_mod, "_PERMUTED", set())  # forget the q/k RoPE permutation: llama.cpp layout is wrong
    with pytest.raises(ExportError, match=r"top token at only \d+% .*Deleted"):
        export_gguf(tiny_run_dir, "f16", tmp_path / "bad.gguf", llamacpp_check=False)
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary folder is left


def test_export_writes_modelfile_and_model_card(f16, tiny_run_dir):
    text = Path(f16.modelfile).read_text()
    assert "FROM ./tiny-f16.gguf" in text and 'PARAMETER stop "<|im_end|>"' in text and "ollama create" in text
    assert f16.model_card == str(tiny_run_dir / "README.md")
    card = Path(f16.model_card).read_text()
    assert card.startswith("---\nbase_model:") and "## GGUF" in card and ".gguf" in card


def test_unfinished_run_is_refused(tmp_path):
    (tmp_path / "config.yaml").write_text("base_model: embedded\n")
    with pytest.raises(ExportError, match="not a finished run.*--resume"):
        export_gguf(tmp_path)


def test_unsupported_architecture_is_named(tmp_path):
    from tunesmith.finetune.tiny import build_tiny_model

    folder = build_tiny_model(tmp_path / "g", family="phi3")
    with pytest.raises(ExportError, match="`phi3` model; GGUF export supports llama, mistral, qwen2, qwen3"):
        export_gguf(folder, out=tmp_path / "x.gguf")


@pytest.mark.parametrize("out, msg", [("/proc/tunesmith/x.gguf", "cannot create /proc/tunesmith"),
                                      ("model.bin", "must end in .gguf")])
def test_bad_out_is_refused_before_work(tiny_run_dir, out, msg, monkeypatch):
    monkeypatch.setattr(export_mod, "_load_merged", lambda _s: pytest.fail("loaded the model before checking --out"))
    with pytest.raises(ExportError, match=re.escape(msg)):
        export_gguf(tiny_run_dir, out=out)


def test_unknown_quant_is_refused(tiny_run_dir):
    with pytest.raises(ExportError, match="q4_0"):
        export_gguf(tiny_run_dir, quant="q2_k")


# -- Ollama's Go template ---------------------------------------------------------------------------------------

def render_go(template: str, messages: list[dict[str, str]]) -> str:
    """A reference renderer for the Go text/template subset a Modelfile TEMPLATE uses: `if`/`else if`/`else`/`end`
    on `eq .Role "x"` and `eq (index .Messages 0).Role "x"`, `range .Messages`, `.Content`. Anything else fails."""
    parts = re.split(r"(\{\{.*?\}\})", template)

    def parse(i: int) -> tuple[list, int, str]:
        nodes: list = []
        while i < len(parts):
            p = parts[i]
            i += 1
            if not p.startswith("{{"):
                nodes.append(("text", p))
                continue
            act = p[2:-2].strip()
            if act in ("end", "else") or act.startswith("else if "):
                return nodes, i - 1, act
            if act == ".Content":
                nodes.append(("content",))
            elif act == "range .Messages":
                body, i, _ = parse(i)
                nodes.append(("range", body))
                i += 1
            elif act.startswith("if "):
                branches, cond = [], act[3:]
                while True:
                    body, i, term = parse(i)
                    branches.append((cond, body))
                    i += 1
                    if term == "end":
                        break
                    cond = term[8:] if term.startswith("else if ") else "true"
                nodes.append(("if", branches))
            else:
                raise AssertionError(f"unsupported action {p}")
        return nodes, i, ""

    def test(cond: str, msg: dict | None) -> bool:
        if cond == "true":
            return True
        m = re.fullmatch(r'eq (\.Role|\(index \.Messages 0\)\.Role) "(\w+)"', cond)
        assert m, f"unsupported condition {cond}"
        return (msg if m[1] == ".Role" else messages[0])["role"] == m[2]

    def run(nodes: list, msg: dict | None) -> str:
        out = []
        for n in nodes:
            if n[0] == "text":
                out.append(n[1])
            elif n[0] == "content":
                out.append(msg["content"])
            elif n[0] == "range":
                out += [run(n[1], m) for m in messages]
            else:
                out.append(next((run(body, msg) for cond, body in n[1] if test(cond, msg)), ""))
        return "".join(out)

    return run(parse(0)[0], None)


SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
           "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>'"
           " + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
           "{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + "
          "m['content'] + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant"
          "<|end_header_id|>\n\n' }}{% endif %}")
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Which module defines `dumps`?"},
     {"role": "assistant", "content": "json"}, {"role": "user", "content": "And loads?\nThanks."}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
]


@pytest.mark.parametrize("template", ["chatml", SMOLLM2, LLAMA3], ids=["chatml", "smollm2", "llama3"])
def test_go_template_renders_like_jinja(template):
    from tunesmith.finetune.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    if template != "chatml":
        tok.chat_template = template
    go = go_template(tok)
    for conv in CONVERSATIONS:
        assert render_go(go, conv) == tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)


def test_default_system_prompt_is_kept_only_without_a_system_message():
    from tunesmith.finetune.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    tok.chat_template = SMOLLM2
    shape = template_shape(tok)
    assert "named SmolLM" in shape.no_system and shape.header == ""


def test_untranslatable_template_is_refused():
    from tunesmith.finetune.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()  # numbers the turns: no fixed per-role prefix can do that
    tok.chat_template = ("{% for m in messages %}[{{ loop.index }}] {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(ValueError, match="cannot reproduce|appended"):
        go_template(tok)


# -- command line and hub push -----------------------------------------------------------------------------------

def test_cli_export_prints_the_checks_and_the_ollama_command(tiny_run_dir, tmp_path, capsys):
    from tunesmith.cli import main

    assert main(["export", str(tiny_run_dir), "--quant", "q8_0", "--out", str(tmp_path), "--no-llamacpp-check"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'tiny-run-q8_0.gguf'}" in out and "top-1 token agrees at" in out
    assert f"ollama create tiny-run-q8_0 -f {tmp_path / 'Modelfile'}" in out


def test_cli_export_of_an_unfinished_run_is_one_line(tmp_path, capsys):
    from tunesmith.cli import main

    (tmp_path / "config.yaml").write_text("base_model: embedded\n")
    assert main(["export", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path} is not a finished run")


def test_push_offline_fails_fast_naming_the_fix(tiny_run_dir, monkeypatch):
    from tunesmith.finetune import push_run

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ExportError, match=r"needs huggingface.co.*HF_HUB_OFFLINE.*tunesmith push tiny-run --repo me/x"):
        push_run(tiny_run_dir, "me/x")
    with pytest.raises(ExportError, match="user/name"):
        push_run(tiny_run_dir, "no-slash")


def test_engine_flag_reaches_load_generator(monkeypatch, tmp_path):
    from tunesmith.cli import parse_args
    from tunesmith.ui import pool as pool_mod

    for cmd in ("chat", "serve", "ui"):
        assert parse_args([cmd, "--engine", "llama.cpp"]).engine == "llama.cpp"
        assert parse_args([cmd]).engine == "transformers"
    asked = []
    monkeypatch.setattr(pool_mod, "load_generator", lambda source, **kw: asked.append(kw) or object())
    pool_mod.ModelPool(tmp_path, default="embedded", engine="llama.cpp").get(None)
    assert asked == [{"engine": "llama.cpp"}]


def test_unknown_engine_is_refused():
    from tunesmith.finetune import load_generator

    with pytest.raises(ValueError, match="engine='vllm': pick one of transformers, llama.cpp"):
        load_generator("embedded", engine="vllm")


def test_modelfile_has_system_prompt_and_skips_an_untranslatable_template(tmp_path):
    from tunesmith.finetune.modelfile import write_modelfile
    from tunesmith.finetune.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    meta = {"eos": tok.eos_token_id, "eot": tok.eos_token_id}
    text = Path(write_modelfile(tmp_path / "m.gguf", tok, meta, "Answer in one word.")).read_text()
    go = re.search(r'TEMPLATE """(.*?)"""', text, re.S)[1]
    conv = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Capital of France?"}]
    assert render_go(go, conv) == tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert 'SYSTEM """Answer in one word."""' in text and 'PARAMETER stop "<|im_start|>user"' in text
    tok.chat_template = "{% for m in messages %}[{{ loop.index }}] {{ m['content'] }}\n{% endfor %}"
    text = Path(write_modelfile(tmp_path / "m.gguf", tok, meta, None)).read_text()
    assert "TEMPLATE" not in text.replace("# no TEMPLATE", "") and "# no TEMPLATE:" in text


def test_context_length_is_read_from_the_header(f16, tmp_path):
    from tunesmith.finetune.llamacpp import gguf_context_length
    from tunesmith.finetune.model import ModelLoadError

    assert gguf_context_length(f16.path) == GGUFReader(f16.path).fields["llama.context_length"].contents() == 1024
    (tmp_path / "x.gguf").write_bytes(b"not a gguf")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        gguf_context_length(tmp_path / "x.gguf")


def test_qwen2_exports_unpermuted_with_biases_and_qwen_split(tmp_path):
    """Qwen2: llama.cpp's `qwen2` architecture, q/k/v biases, no q/k permutation (NEOX RoPE on both sides), and
    transformers' Qwen regex pre-tokenizer named "qwen2" even for a vocabulary llama.cpp has never seen."""
    from tunesmith.finetune.tiny import build_tiny_model

    folder = build_tiny_model(tmp_path / "q", family="qwen2")
    res = export_gguf(folder, "f16", tmp_path / "q.gguf", llamacpp_check=False)
    r = GGUFReader(res.path)
    assert r.fields["general.architecture"].contents() == "qwen2" and res.pre_tokenizer == "qwen2"
    assert "blk.0.attn_q.bias" in {t.name for t in r.tensors} and res.agreement == 1.0
