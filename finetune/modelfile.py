"""An Ollama `Modelfile` for an exported GGUF: the run's Jinja chat template translated to Ollama's Go template.

Jinja cannot be translated to Go templates in general, but chat templates are almost all "each message is a fixed
prefix, its content and a fixed suffix, per role", plus a fixed header and a generation prompt. So the structure is
read off renderings of sentinel conversations, written as a Go template, and kept only if the structure re-renders
several conversations exactly as the Jinja template does; otherwise the Modelfile goes without TEMPLATE (Ollama
then falls back to the template embedded in the GGUF) and says why.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_S, _U, _A = "SYSTEMSENTINEL", "USERSENTINEL", "ASSISTANTSENTINEL"


@dataclass(frozen=True)
class TemplateShape:
    """Per-role wrappers of a chat template, as read from sentinel renderings."""

    header: str
    """Text before the first message when it is a system message (a BOS token, say)."""
    no_system: str
    """Text before the first message when it is not a system message: the header plus any default system prompt
    the template injects (SmolLM2's "You are a helpful AI assistant named SmolLM...")."""
    wrap: dict[str, tuple[str, str]]
    """role -> (prefix, suffix) around the message content."""
    generation: str
    """The generation prompt (`add_generation_prompt=True`), written after the last message."""

    def render(self, messages: list[dict[str, str]]) -> str:
        """What the Go template writes for `messages`: the Python twin of `go_template`, checked against Jinja."""
        first = messages[0]["role"] if messages else ""
        out = [self.header if first == "system" else self.no_system]
        for m in messages:
            pre, suf = self.wrap[m["role"]]
            out.append(pre + m["content"] + suf)
        return "".join(out) + self.generation

    def go_template(self) -> str:
        branches = "".join(f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{pre}{{{{ .Content }}}}{suf}'
                           for i, (role, (pre, suf)) in enumerate(self.wrap.items()))
        start = self.header if self.header == self.no_system else (
            f'{{{{ if eq (index .Messages 0).Role "system" }}}}{self.header}{{{{ else }}}}{self.no_system}{{{{ end }}}}')
        return f"{start}{{{{ range .Messages }}}}{branches}{{{{ end }}}}{{{{ end }}}}{self.generation}"


def template_shape(tok: Any) -> TemplateShape:
    """Read the per-role structure off renderings of `tok`'s chat template; ValueError when it has none."""

    def render(msgs: list[dict[str, str]], gen: bool = False) -> str:
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    s, u, a = ({"role": "system", "content": _S}, {"role": "user", "content": _U},
               {"role": "assistant", "content": _A})
    r_s, r_su, r_sua = render([s]), render([s, u]), render([s, u, a])
    r_u, r_ug = render([u]), render([u], gen=True)
    if not (r_su.startswith(r_s) and r_sua.startswith(r_su) and r_ug.startswith(r_u) and r_u.endswith(
            r_su[len(r_s):])):
        raise ValueError("the template does not render each message as a block appended to the conversation")
    head_pre, sys_suf = r_s.split(_S)
    user_pre, user_suf = r_su[len(r_s):].split(_U)
    ast_pre, ast_suf = r_sua[len(r_su):].split(_A)
    no_system = r_u[: len(r_u) - len(r_su) + len(r_s)]
    bos = tok.bos_token or ""  # the only text before the first message that belongs to no message (Llama 3)
    shared = bos and head_pre.startswith(bos) and no_system.startswith(bos) and not user_pre.startswith(bos)
    header = bos if shared else ""
    return TemplateShape(header, no_system, {"system": (head_pre[len(header):], sys_suf), "user": (user_pre, user_suf),
                                             "assistant": (ast_pre, ast_suf)}, r_ug[len(r_u):])


CHECK_CONVERSATIONS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Which module defines dumps?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}],
    [{"role": "user", "content": "One line\nand another"}],
]


def go_template(tok: Any) -> str:
    """The Go template for `tok`'s chat template; ValueError naming the first conversation it renders differently."""
    shape = template_shape(tok)
    for conv in CHECK_CONVERSATIONS:
        want = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        if shape.render(conv) != want:
            raise ValueError(f"the template renders {[m['role'] for m in conv]} as {want[:120]!r}, which a per-role "
                             "prefix/suffix template cannot reproduce")
    literal = [shape.header, shape.no_system, shape.generation, *(x for w in shape.wrap.values() for x in w)]
    if any("{{" in t or '"""' in t for t in literal):
        raise ValueError('the template\'s text contains `{{` or `"""`, which a Modelfile TEMPLATE cannot hold')
    return shape.go_template()


def stop_strings(tok: Any, meta: dict[str, Any], shape: TemplateShape | None) -> list[str]:
    """Ollama `stop` parameters: the end-of-turn token(s) and the start of a user turn (a model that runs on past
    its EOS starts writing the user's next message: cut it there)."""
    ids = [meta[k] for k in ("eos", "eot") if meta.get(k) is not None]
    stops = [tok.convert_ids_to_tokens(i) for i in ids]
    if shape is not None and shape.wrap["user"][0].strip():
        stops.append(shape.wrap["user"][0].strip())
    return list(dict.fromkeys(s for s in stops if s))


def ollama_name(gguf: Path) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", gguf.stem.lower()).strip("-") or "tunesmith"


def write_modelfile(gguf: Path, tok: Any, meta: dict[str, Any], system: str | None) -> str:
    """Write `Modelfile` next to `gguf` and return its path; logs the `ollama create` command to run."""
    lines = [f"# Ollama Modelfile for {gguf.name}, written by `tunesmith export`. Create the model with:",
             f"#   ollama create {ollama_name(gguf)} -f {gguf.parent / 'Modelfile'}", f"FROM ./{gguf.name}"]
    shape = None
    try:
        text = go_template(tok)
        shape = template_shape(tok)
        lines.append(f'TEMPLATE """{text}"""')
    except ValueError as e:
        log.warning("Modelfile without TEMPLATE (Ollama uses the GGUF's own template): %s", e)
        lines.append(f"# no TEMPLATE: {e}; Ollama falls back to the chat template embedded in the GGUF")
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f'PARAMETER stop "{s}"' for s in stop_strings(tok, meta, shape)]
    path = gguf.parent / "Modelfile"
    path.write_text("\n".join(lines) + "\n")
    return str(path)
