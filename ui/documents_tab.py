"""The Documents tab: upload text files, ask questions over them, see the answer (streamed) and its sources.

The files themselves are handled by `ui/documents.py` (safe copies, one folder per session) and answered by the
`chains/` RAG through it; this file is only the tab's layout and events. Problems the user can fix (nothing
uploaded yet, a refused file) are said in words on the tab, never left as an error badge on a component.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import gradio as gr

from tunesmith.finetune import GenerationParams, ModelLoadError

from .app import GENERATE, Messages, Turns, _params, _pool_message, _text, _Turn, log, sampling_sliders
from .documents import (
    ALLOWED_SUFFIXES,
    MAX_FILE_BYTES,
    DocAnswer,
    list_documents,
    new_session_folder,
    remove_session_folder,
    store_uploads,
)
from .pool import ModelPool
from .streaming import run_with_tokens

QUOTE = "Quote the best sentence"
"""Extractive answers: the passage sentence the model finds most likely (most accurate with a small model)."""
WRITE = "Write an answer"
"""Generated answers: streamed, with the sampling settings of this tab."""
NO_DOCS = "Upload at least one text document first (the file box above), then ask again: your question is kept."


def documents_tab(pool: ModelPool, ask: Callable[..., DocAnswer], choices: Callable[[], list[str]],
                  concurrency: int) -> gr.Dropdown:
    """Lay out the tab and wire its events inside the current Blocks; return its model picker (Refresh updates it)."""
    turns = Turns()

    def upload(files: list[str] | None, folder: str | None) -> tuple[str, str, None, str]:
        folder = folder or new_session_folder()
        report = store_uploads(list(files or []), folder)
        docs = list_documents(folder)
        summary = "\n".join(f"- {line}" for line in report)
        summary += f"\n\n**{len(docs)} document(s) in this session:** {', '.join(docs) or 'none'}"
        return folder, summary, None, ""

    def start(question: str, hist: Messages, folder: str | None, request: gr.Request) -> tuple[Any, ...]:
        if not turns.arm(request.session_hash):  # a toast, not an error: an error would end the chain early
            gr.Warning("An answer is still being written: wait for it or press Stop. Your question stays in the box.")
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        if not question.strip():
            return question, hist, gr.skip(), gr.skip()
        if not list_documents(folder):
            return question, hist, NO_DOCS, gr.skip()
        return "", [*hist, {"role": "user", "content": question}], "", gr.Button(interactive=False)

    def respond(hist: Messages, folder: str | None, model: str, mode: str, temperature: float, top_p: float,
                top_k: float, max_new_tokens: float, repetition_penalty: float,
                request: gr.Request) -> Iterator[tuple[Any, ...]]:
        """The generation step: claim the session's turn, stream the answer, release the turn however it ends."""
        turn = turns.claim(request.session_hash)
        if turn is None:
            yield gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return
        try:
            params = _params(temperature, top_p, top_k, max_new_tokens, repetition_penalty)
            yield from answer(turn, hist, folder, model, mode != WRITE, params)
        finally:
            turns.release(request.session_hash, turn)

    def answer(turn: _Turn, hist: Messages, folder: str | None, model: str, extractive: bool,
               params: GenerationParams) -> Iterator[tuple[Any, ...]]:
        """One answer; a problem the user can fix takes the question back out and says what to do."""
        if not hist or hist[-1]["role"] != "user" or not list_documents(folder):
            yield gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return
        question = _text(hist[-1])
        try:
            gen, choice = pool.get(model)
        except ModelLoadError as e:
            yield hist[:-1], gr.skip(), _pool_message(e), question
            return
        hist = [*hist, {"role": "assistant", "content": "", "metadata": {"title": choice.name}}]
        yield hist, "", "finding the best sentence…" if extractive else "writing…", gr.skip()

        def work(on_token: Callable[[str], None]) -> DocAnswer:
            return ask(gen, folder, question, choice.params(params), extractive=extractive,
                       on_token=None if extractive else on_token)

        text = ""
        try:
            for kind, val in run_with_tokens(work, turn.cancel):
                if kind == "token":
                    text += val
                    hist[-1] = {**hist[-1], "content": text}
                    yield hist, gr.skip(), gr.skip(), gr.skip()
                elif kind == "cancelled":
                    yield ([], "", "", gr.skip()) if turn.cleared else (hist, "", "stopped", gr.skip())
                elif turn.cleared:
                    yield [], "", "", gr.skip()
                else:
                    hist[-1] = {**hist[-1], "content": val.answer}
                    lines = "\n".join(f"{i}. {s}" for i, s in enumerate(val.sources, 1)) or "no sources returned"
                    yield hist, f"**Sources**\n\n{lines}", "", gr.skip()
        except Exception as e:  # the chain's own errors say what to fix (e.g. an empty document)
            log.warning("documents: %s", e, exc_info=not isinstance(e, (ValueError, RuntimeError)))
            gr.Warning(str(e))
            yield hist[:-2], "", str(e), question

    def finish(request: gr.Request) -> Any:
        return gr.Button(interactive=not turns.busy(request.session_hash))

    def stop(request: gr.Request) -> None:
        turns.stop(request.session_hash)

    def clear(request: gr.Request) -> tuple[Messages, str, str]:
        turns.stop(request.session_hash, clear=True)
        return [], "", ""

    with gr.Tab("Documents"):
        folder = gr.State(None, delete_callback=remove_session_folder)
        gr.Markdown(f"Upload text files ({', '.join(ALLOWED_SUFFIXES)}; up to {MAX_FILE_BYTES // 2**20} MB each). "
                    "They are indexed for this session only, read as text, and never executed.")
        # no `file_types`: the browser would drop other files without a word; store_uploads says why it refuses
        files = gr.File(file_count="multiple", label="Documents", elem_id="doc-files")
        report = gr.Markdown(elem_id="doc-report")
        with gr.Row():
            model = gr.Dropdown(choices(), value=pool.default, label="Model", elem_id="doc-model", scale=3)
            mode = gr.Radio([QUOTE, WRITE], value=QUOTE, label="Answer", elem_id="doc-mode", scale=3,
                            info="Quoting is the most accurate with a small model; writing streams and uses the "
                                 "sampling settings below.")
        chat = gr.Chatbot(label="Answers from your documents", elem_id="doc-chat", height=360, feedback_options=None)
        with gr.Row():
            msg = gr.Textbox(placeholder="Ask about the documents", show_label=False, scale=8, elem_id="doc-msg")
            send = gr.Button("Ask", variant="primary", scale=1, elem_id="doc-send")
            stop_btn = gr.Button("Stop", variant="stop", scale=1, elem_id="doc-stop")
            clear_btn = gr.Button("Clear", scale=1, elem_id="doc-clear")
        status = gr.Markdown(elem_id="doc-status")
        sources = gr.Markdown(elem_id="doc-sources")
        with gr.Accordion("Sampling for written answers (this tab's own)", open=False, elem_id="doc-settings"):
            sampling = sampling_sliders("doc-")

    fast: dict[str, Any] = dict(concurrency_limit=None, show_progress="hidden", api_visibility="private")
    files.upload(upload, [files, folder], [folder, report, files, status], **fast)
    for trigger in (msg.submit, send.click):
        trigger(start, [msg, chat, folder], [msg, chat, status, send], **fast).then(
            respond, [chat, folder, model, mode, *sampling], [chat, sources, status, msg],
            concurrency_limit=concurrency, concurrency_id=GENERATE, show_progress="hidden",
            api_visibility="private").then(finish, None, send, **fast)
    stop_btn.click(stop, None, None, queue=False, api_visibility="private")
    clear_btn.click(clear, None, [chat, sources, status], queue=False, api_visibility="private")
    return model
