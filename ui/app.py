"""The Gradio web app: chat with a tuned model, compare it with another run or its base side by side, and ask
questions over uploaded documents. No model code lives here: models come from the pool (`ui/pool.py`), text from
`Generator.stream`, document answers from `chains/` (through `ui/documents.py`).

Every session's state travels with its own events (chat histories are inputs and outputs, never globals), so
two users never see each other's messages. The one piece of server-side state per session is the cancel event
of its generation in flight, keyed by Gradio's session hash, so Stop stops that session's model and no other.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import gradio as gr
from tunesmith.finetune.generate import Completion, GenerationParams
from tunesmith.finetune.model import ModelLoadError

from .documents import (
    ALLOWED_SUFFIXES,
    MAX_FILE_BYTES,
    DocAnswer,
    ask_documents,
    list_documents,
    new_session_folder,
    remove_session_folder,
    store_uploads,
)
from .pool import ModelPool, fit_context
from .streaming import merge_streams

NONE = "(none)"
"""The comparison dropdown's 'no second model' entry."""
GENERATE = "generate"
"""Concurrency group of everything that runs a model: the UI's chat, the `chat` API and document answers."""

Messages = list[dict[str, Any]]

CSS = """
#chat-a, #chat-b {min-height: 420px}
#status {font-size: 0.85em; opacity: 0.8}
footer {display: none !important}
"""


def build_app(pool: ModelPool, concurrency: int = 4,
              ask: Callable[..., DocAnswer] = ask_documents) -> gr.Blocks:
    """The app; launch it with `launch(app, ...)`. `ask` answers over a document folder (the `chains/` RAG)."""
    cancels: dict[str, threading.Event] = {}

    def choices(with_none: bool = False) -> list[str]:
        return ([NONE] if with_none else []) + pool.names()

    # -- event handlers (closures over the pool; all per-session data comes in as arguments) ------------------
    def start(message: str, a: Messages, b: Messages, model_b: str, request: gr.Request) -> tuple[str, Messages, Messages]:
        """Fast step before generation: show the user's message at once and arm a fresh Stop for this session."""
        cancels[request.session_hash] = threading.Event()
        if not message.strip():
            return message, a, b
        b = _sync_compare(a, b, model_b)
        a = [*a, {"role": "user", "content": message}]
        if model_b != NONE:
            b = [*b, {"role": "user", "content": message}]
        return "", a, b

    def respond(a: Messages, b: Messages, model_a: str, model_b: str, system: str, temperature: float,
                top_p: float, max_new_tokens: float, repetition_penalty: float,
                request: gr.Request) -> Iterator[tuple[Messages, Messages, str]]:
        """Stream the reply of one model, or of two side by side, into the chat panes."""
        cancel = cancels.setdefault(request.session_hash, threading.Event())
        panes = [(a, model_a)] + ([(b, model_b)] if model_b != NONE else [])
        if cancel.is_set() or not a or a[-1]["role"] != "user":
            yield a, b, "stopped before it started" if cancel.is_set() else ""
            return
        params = _params(temperature, top_p, max_new_tokens, repetition_penalty)
        streams, names = [], []
        for hist, name in panes:
            try:
                gen, choice = pool.get(name)
                fit_context(gen, _for_model(system, hist), params.max_new_tokens, params.max_new_tokens)
            except (ModelLoadError, ValueError) as e:  # ValueError: over the context, said so (never cut)
                raise gr.Error(str(e)) from e
            streams.append(gen.stream(_for_model(system, hist), choice.params(params), cancel=cancel))
            names.append(choice.name)
            hist.append({"role": "assistant", "content": ""})
        t0 = shown = time.monotonic()
        done: list[Completion | None] = [None] * len(panes)
        took = [0.0] * len(panes)
        try:
            for i, chunk in merge_streams(streams):
                hist = panes[i][0]
                hist[-1] = {"role": "assistant", "content": _text(hist[-1]) + chunk.text}
                if chunk.done:
                    done[i], took[i] = chunk.completion, time.monotonic() - t0
                # every update re-sends and re-renders the whole chat: ~20 a second look smooth and cost little
                if chunk.done or time.monotonic() - shown >= 0.05:
                    shown = time.monotonic()
                    yield a, b, _status(names, done, took)
        finally:
            cancel.set()  # an error or a closed page: stop whatever still runs
            if cancels.get(request.session_hash) is cancel:
                cancels.pop(request.session_hash, None)

    def stop(request: gr.Request) -> None:
        ev = cancels.get(request.session_hash)
        if ev is not None:
            ev.set()

    def truncate(a: Messages, b: Messages, index: int, keep_user: bool) -> tuple[Messages, Messages, str]:
        """Cut both panes at the user message `index` (or the one before it); return its text too."""
        i = _user_index(a, index)
        if i is None:
            return a, b, ""
        text = _text(a[i])
        cut = i + 1 if keep_user else i
        return a[:cut], (b[:cut] if len(b) > i else b), text

    def retry(data: gr.RetryData, a: Messages, b: Messages, request: gr.Request) -> tuple[Messages, Messages]:
        cancels[request.session_hash] = threading.Event()
        a, b, _ = truncate(a, b, _index(data.index), keep_user=True)
        return a, b

    def undo(data: gr.UndoData, a: Messages, b: Messages) -> tuple[Messages, Messages, str]:
        return truncate(a, b, _index(data.index), keep_user=False)

    def edit(data: gr.EditData, a: Messages, b: Messages, request: gr.Request) -> tuple[Messages, Messages]:
        cancels[request.session_hash] = threading.Event()
        a, b, _ = truncate(a, b, _index(data.index), keep_user=False)
        new = {"role": "user", "content": str(data.value)}
        return [*a, new], ([*b, new] if len(b) == len(a) else b)

    def chat_api(message: str, model: str | None = None, system: str = "", history: list[dict[str, str]] | None = None,
                 max_new_tokens: int = 256, temperature: float = 0.7, top_p: float = 0.95,
                 repetition_penalty: float = 1.0, seed: int | None = None) -> Iterator[str]:
        """One streamed reply (the text so far, growing) to `message` after `history`, for `gradio_client`.

        `model` None means the default one: a default named here would be shown on the login page to anyone."""
        msgs = _for_model(system, [*(history or []), {"role": "user", "content": message}])
        try:
            gen, choice = pool.get(model)
            params = _params(temperature, top_p, max_new_tokens, repetition_penalty, seed)
            fit_context(gen, msgs, params.max_new_tokens, params.max_new_tokens)
        except (ModelLoadError, ValueError) as e:
            raise gr.Error(str(e)) from e
        text = ""
        for chunk in gen.stream(msgs, choice.params(params)):
            text += chunk.text
            yield text

    def upload(files: list[str] | None, folder: str | None) -> tuple[str, str, None]:
        folder = folder or new_session_folder()
        report = store_uploads(list(files or []), folder)
        docs = list_documents(folder)
        summary = "\n".join(f"- {line}" for line in report)
        summary += f"\n\n**{len(docs)} document(s) in this session:** {', '.join(docs) or 'none'}"
        return folder, summary, None

    def ask_docs(question: str, hist: Messages, folder: str | None, model: str, temperature: float, top_p: float,
                 max_new_tokens: float, repetition_penalty: float) -> tuple[str, Messages, str]:
        if not question.strip():
            return question, hist, ""
        if not list_documents(folder):
            raise gr.Error("Upload at least one text document first (the file box above).")
        try:
            gen, choice = pool.get(model)
            params = choice.params(_params(temperature, top_p, max_new_tokens, repetition_penalty))
            res = ask(gen, folder, question, params)
        except (ModelLoadError, RuntimeError, ValueError) as e:
            raise gr.Error(str(e)) from e
        hist = [*hist, {"role": "user", "content": question}, {"role": "assistant", "content": res.answer}]
        sources = "\n".join(f"{i}. {s}" for i, s in enumerate(res.sources, 1)) or "no sources returned"
        return "", hist, f"**Sources**\n\n{sources}"

    def refresh() -> tuple[Any, Any, Any]:
        return (gr.Dropdown(choices=choices()), gr.Dropdown(choices=choices(True)), gr.Dropdown(choices=choices()))

    # -- layout --------------------------------------------------------------------------------------------
    with gr.Blocks(title="tunesmith") as app:
        gr.Markdown("### tunesmith: chat with your fine-tuned model")
        with gr.Tab("Chat"):
            with gr.Row(equal_height=True):
                model_a = gr.Dropdown(choices(), value=pool.default, label="Model", elem_id="model-a", scale=3)
                model_b = gr.Dropdown(choices(True), value=NONE, label="Compare with (same prompt, side by side)",
                                      elem_id="model-b", scale=3)
                refresh_btn = gr.Button("Refresh runs", size="sm", scale=1)
            with gr.Row():
                chat_a = gr.Chatbot(label=pool.default, elem_id="chat-a", editable="user", height=460,
                                    buttons=["copy", "copy_all"], feedback_options=None)
                chat_b = gr.Chatbot(label="comparison", elem_id="chat-b", editable="user", height=460,
                                    buttons=["copy", "copy_all"], feedback_options=None, visible=False)
            with gr.Row():
                msg = gr.Textbox(placeholder="Message (Enter sends, Shift+Enter for a new line)", show_label=False,
                                 lines=1, max_lines=8, scale=8, elem_id="msg", autofocus=True)
                send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                stop_btn = gr.Button("Stop", variant="stop", scale=1, elem_id="stop")
                clear = gr.Button("Clear", scale=1)
            status = gr.Markdown(elem_id="status")
            with gr.Accordion("System prompt and sampling", open=False, elem_id="settings"):
                system = gr.Textbox(label="System prompt", placeholder="e.g. You are a concise assistant.", lines=2)
                with gr.Row():
                    temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="Temperature (0 = greedy)",
                                              elem_id="temperature")
                    top_p = gr.Slider(0.05, 1, value=0.95, step=0.05, label="Top-p")
                    max_new = gr.Slider(16, 2048, value=256, step=16, label="Max new tokens", elem_id="max-new")
                    rep = gr.Slider(1.0, 2.0, value=1.1, step=0.05, label="Repetition penalty")
        with gr.Tab("Documents"):
            folder = gr.State(None, delete_callback=remove_session_folder)
            gr.Markdown(f"Upload text files ({', '.join(ALLOWED_SUFFIXES)}; up to {MAX_FILE_BYTES // 2**20} MB each). "
                        "They are indexed for this session only, read as text, and never executed.")
            files = gr.File(file_count="multiple", file_types=list(ALLOWED_SUFFIXES), label="Documents",
                            elem_id="doc-files")
            upload_report = gr.Markdown()
            doc_model = gr.Dropdown(choices(), value=pool.default, label="Model", elem_id="doc-model")
            doc_chat = gr.Chatbot(label="Answers from your documents", elem_id="doc-chat", height=360,
                                  feedback_options=None)
            with gr.Row():
                doc_msg = gr.Textbox(placeholder="Ask about the documents", show_label=False, scale=8,
                                     elem_id="doc-msg")
                doc_send = gr.Button("Ask", variant="primary", scale=1)
            sources = gr.Markdown(elem_id="doc-sources")

        # -- wiring --------------------------------------------------------------------------------------------
        gen_inputs = [chat_a, chat_b, model_a, model_b, system, temperature, top_p, max_new, rep]
        gen_kw: dict[str, Any] = dict(concurrency_limit=concurrency, concurrency_id=GENERATE,
                                      show_progress="hidden", api_visibility="private")
        fast: dict[str, Any] = dict(concurrency_limit=None, show_progress="hidden", api_visibility="private")
        for trigger in (msg.submit, send.click):
            trigger(start, [msg, chat_a, chat_b, model_b], [msg, chat_a, chat_b], **fast).then(
                respond, gen_inputs, [chat_a, chat_b, status], **gen_kw)
        stop_btn.click(stop, None, None, queue=False, api_visibility="private")
        clear.click(lambda: ([], [], ""), None, [chat_a, chat_b, status], **fast)
        for pane in (chat_a, chat_b):
            pane.retry(retry, [chat_a, chat_b], [chat_a, chat_b], **fast).then(
                respond, gen_inputs, [chat_a, chat_b, status], **gen_kw)
            pane.undo(undo, [chat_a, chat_b], [chat_a, chat_b, msg], **fast)
            pane.edit(edit, [chat_a, chat_b], [chat_a, chat_b], **fast).then(
                respond, gen_inputs, [chat_a, chat_b, status], **gen_kw)
        model_a.change(lambda m: gr.Chatbot(label=m), model_a, chat_a, **fast)
        model_b.change(lambda m: gr.Chatbot(label=m, visible=m != NONE), model_b, chat_b, **fast)
        refresh_btn.click(refresh, None, [model_a, model_b, doc_model], **fast)
        files.upload(upload, [files, folder], [folder, upload_report, files], **fast)
        for trigger in (doc_msg.submit, doc_send.click):
            trigger(ask_docs, [doc_msg, doc_chat, folder, doc_model, temperature, top_p, max_new, rep],
                    [doc_msg, doc_chat, sources], concurrency_limit=concurrency, concurrency_id=GENERATE,
                    api_visibility="private")
        gr.api(chat_api, api_name="chat", concurrency_limit=concurrency, concurrency_id=GENERATE)
    return app


def launch(app: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, auth: tuple[str, str] | None = None,
           share: bool = False, concurrency: int = 4, max_queue: int = 64, block: bool = True) -> gr.Blocks:
    """Queue with `concurrency` generations at once (`max_queue` more may wait), then serve the app."""
    app.queue(default_concurrency_limit=concurrency, max_size=max_queue)
    app.launch(server_name=host, server_port=port, auth=auth, share=share, prevent_thread_lock=not block,
               max_file_size=MAX_FILE_BYTES, show_error=True, ssr_mode=False, quiet=not block,
               theme=gr.themes.Soft(), css=CSS)
    return app


# -- pure helpers --------------------------------------------------------------------------------------------
def _text(message: dict[str, Any]) -> str:
    """Gradio 6 hands messages back with content as a list of parts; the model wants one string."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return "" if content is None else str(content)


def _for_model(system: str, history: Messages) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system.strip()}] if system and system.strip() else []
    return msgs + [{"role": m["role"], "content": _text(m)} for m in history if m.get("role") in ("user", "assistant")]


def _params(temperature: float, top_p: float, max_new_tokens: float, repetition_penalty: float,
            seed: int | None = None) -> GenerationParams:
    return GenerationParams(max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_p=float(top_p),
                            repetition_penalty=float(repetition_penalty), seed=seed)


def _sync_compare(a: Messages, b: Messages, model_b: str) -> Messages:
    """A comparison switched on mid-conversation continues from the main pane's conversation."""
    if model_b == NONE:
        return []
    return b if len(b) == len(a) else [dict(m) for m in a]


def _index(index: int | tuple[int, int] | list[int]) -> int:
    return int(index[0]) if isinstance(index, (tuple, list)) else int(index)


def _user_index(history: Messages, index: int) -> int | None:
    i = min(index, len(history) - 1)
    while i >= 0 and history[i].get("role") != "user":
        i -= 1
    return i if i >= 0 else None


def _status(names: list[str], done: list[Completion | None], took: list[float]) -> str:
    parts = []
    for name, c, seconds in zip(names, done, took):
        if c is None:
            parts.append(f"**{name}**: generating…")
        else:
            parts.append(f"**{name}**: {c.completion_tokens} tokens in {seconds:.1f} s, {c.finish_reason}")
    return " · ".join(parts)
