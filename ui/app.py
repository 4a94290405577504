"""The Gradio web app: chat with a tuned model, compare it with another run or its base side by side, and ask
questions over uploaded documents (`ui/documents_tab.py`). No model code lives here: models come from the pool
(`ui/pool.py`), text from `Generator.stream`, document answers from `chains/` (through `ui/documents.py`).

Every session's chat travels with its own events (histories are inputs and outputs, never globals), so two users
never see each other's messages. The one piece of server-side state per session is its turn in flight
(`Turns`), so a second Send while a reply streams is refused instead of lost, and Stop reaches the running reply.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from tunesmith.finetune import Completion, GenerationParams, ModelLoadError, fit_context, merge_streams

from .documents import MAX_FILE_BYTES, DocAnswer, ask_documents
from .pool import ModelPool, UnknownModelError
from .train_form import MAX_DATA_BYTES

log = logging.getLogger("tunesmith.ui")

NONE = "(none)"
"""The comparison dropdown's 'no second model' entry."""
GENERATE = "generate"
"""Concurrency group of everything that runs a model: the UI's chat, the `chat` API and document answers."""
DEFAULTS = GenerationParams()
"""The one set of sampling defaults (GenerationParams' fields): the sliders and the `chat` API start from it."""
SAVED_KEY = "tunesmith-chat"
"""Browser storage key of the chat panes, so a reload keeps the conversation."""

Messages = list[dict[str, Any]]

CSS = """
#chat-a, #chat-b {min-height: 420px}
#status, #doc-status {font-size: 0.85em; opacity: 0.8}
footer {display: none !important}
/* the chat's edit box is as wide as a message may be and grows with its text, instead of clipping it */
#chat-a .edit-textarea, #chat-b .edit-textarea {width: min(40rem, 75vw) !important; field-sizing: content;
  min-height: 4em; max-height: 60vh; overflow-y: auto}
/* narrow screens: the two panes stack instead of squeezing side by side */
@media (max-width: 900px) {
  #chat-row {flex-direction: column !important}
  #chat-row > * {width: 100% !important; min-width: 100% !important}
}
"""


@dataclass
class _Turn:
    cancel: threading.Event = field(default_factory=threading.Event)
    armed_at: float = field(default_factory=time.monotonic)
    claimed: bool = False
    cleared: bool = False


class Turns:
    """At most one reply in flight per browser session, from Send until its generation step ends.

    `arm` (the fast step that shows the message) takes the session's one slot or refuses; the generation step
    `claim`s it, so a chain whose Send was refused runs nothing, and `release`s it when done. Stop sets the
    armed turn's cancel event, so it reaches the running reply whatever else the user clicked meanwhile. A turn
    armed but never claimed (the queue turned the generation step away) is given up after `stale_s` seconds.
    Sessions are keyed by gradio's `request.session_hash`, which is None for a request without a session: such
    requests share one slot.
    """

    def __init__(self, stale_s: float = 600.0) -> None:
        self._lock = threading.Lock()
        self._turns: dict[str | None, _Turn] = {}
        self.stale_s = stale_s

    def arm(self, session: str | None) -> bool:
        with self._lock:
            old = self._turns.get(session)
            if old is not None and (old.claimed or time.monotonic() - old.armed_at < self.stale_s):
                return False
            self._turns[session] = _Turn()
            return True

    def claim(self, session: str | None) -> _Turn | None:
        with self._lock:
            turn = self._turns.get(session)
            if turn is None or turn.claimed:
                return None
            turn.claimed = True
            return turn

    def release(self, session: str | None, turn: _Turn) -> None:
        turn.cancel.set()  # an error or a closed page: stop whatever still runs
        with self._lock:
            if self._turns.get(session) is turn:
                del self._turns[session]

    def busy(self, session: str | None) -> bool:
        with self._lock:
            return session in self._turns

    def stop(self, session: str | None, clear: bool = False) -> bool:
        with self._lock:
            turn = self._turns.get(session)
        if turn is None:
            return False
        turn.cleared = turn.cleared or clear
        turn.cancel.set()
        return True


def user_error(message: str) -> gr.Error:
    """A mistake an API caller can fix: sent back to them, logged as one line (a traceback would bury the log)."""
    log.warning("chat API: %s", message)
    return gr.Error(message, print_exception=False)


def build_app(pool: ModelPool, concurrency: int = 16,
              ask: Callable[..., DocAnswer] = ask_documents) -> gr.Blocks:
    """The app; launch it with `launch(app, ...)`. `ask` answers over a document folder (the `chains/` RAG)."""
    from .documents_tab import documents_tab
    from .train_tab import train_tab

    turns = Turns()

    def choices(with_none: bool = False) -> list[str]:
        return ([NONE] if with_none else []) + pool.names()

    def refuse() -> None:
        """A toast, not an exception: an error would stop the chain before its last step re-enables Send."""
        gr.Warning("A reply is still being written: wait for it or press Stop. Your message stays in the box.")

    # -- event handlers (closures over the pool; all per-session data comes in as arguments) ------------------
    def start(message: str, a: Messages, b: Messages, model_b: str, request: gr.Request) -> tuple[Any, ...]:
        """Fast step before generation: take the session's turn, show the user's message at once."""
        if not turns.arm(request.session_hash):
            refuse()  # the text stays in the box, the running reply runs on; this chain's respond finds no turn
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        if not message.strip():
            return message, a, b, gr.skip()
        b = _sync_compare(a, b, model_b)
        a = [*a, {"role": "user", "content": message}]
        if model_b != NONE:
            b = [*b, {"role": "user", "content": message}]
        return "", a, b, gr.Button(interactive=False)

    def respond(a: Messages, b: Messages, model_a: str, model_b: str, system: str, temperature: float,
                top_p: float, top_k: float, max_new_tokens: float, repetition_penalty: float,
                request: gr.Request) -> Iterator[tuple[Any, ...]]:
        """The generation step: claim the session's turn, stream the reply, release the turn however it ends."""
        turn = turns.claim(request.session_hash)
        if turn is None:  # this chain's Send was refused: the session's running reply owns the turn
            yield gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return
        try:
            params = _params(temperature, top_p, top_k, max_new_tokens, repetition_penalty)
            yield from reply(turn, a, b, model_a, model_b, system, params)
        except Exception as e:  # not the user's doing: the traceback goes to the log, the chain still ends cleanly
            log.exception("chat: generation failed")
            gr.Warning(f"Generation failed ({type(e).__name__}: {e}). The log has the details.")
            yield gr.skip(), gr.skip(), f"generation failed: {type(e).__name__}", gr.skip(), gr.skip()
        finally:
            turns.release(request.session_hash, turn)

    def reply(turn: _Turn, a: Messages, b: Messages, model_a: str, model_b: str, system: str,
              params: GenerationParams) -> Iterator[tuple[Any, ...]]:
        """Stream the reply of one model, or of two side by side, into the chat panes."""
        if not a or a[-1]["role"] != "user":  # an empty Send: nothing to answer
            yield gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return
        if turn.cancel.is_set():  # Stop or Clear while the reply waited for a free slot
            yield ([], [], "", gr.skip(), gr.skip()) if turn.cleared else (a, b, "stopped before it started",
                                                                           gr.skip(), gr.skip())
            return
        compare = model_b != NONE
        panes = [(a, model_a)] + ([(b, model_b)] if compare else [])
        try:  # check every pane before streaming any, so a refusal leaves no half-started turn behind
            ready = []
            for hist, name in panes:
                gen, choice = pool.get(name)
                fit_context(gen, _for_model(system, hist), params.max_new_tokens, params.max_new_tokens)
                ready.append((hist, gen, choice))
        except (ModelLoadError, ValueError) as e:  # ValueError: over the context, said so (never cut)
            # take the failed turn back out of the history and give the text back, so the next message works
            message = _pool_message(e)
            log.warning("chat: %s", message)
            gr.Warning(message)
            yield a[:-1], (b[:-1] if compare and b and b[-1]["role"] == "user" else b), message, _text(a[-1]), \
                gr.skip()
            return
        streams, names = [], []
        for hist, gen, choice in ready:
            streams.append(gen.stream(_for_model(system, hist), choice.params(params), cancel=turn.cancel))
            names.append(choice.name)
            hist.append({"role": "assistant", "content": "", "metadata": {"title": choice.name}})
        shown = time.monotonic()
        first: list[float | None] = [None] * len(panes)
        done: list[Completion | None] = [None] * len(panes)
        took = [0.0] * len(panes)
        for i, chunk in merge_streams(streams):
            hist = panes[i][0]
            hist[-1] = {**hist[-1], "content": _text(hist[-1]) + chunk.text}
            now = time.monotonic()
            if first[i] is None and (chunk.text or chunk.done):
                first[i] = now  # generation time counts from here: waiting for the model is not its speed
            if chunk.done:
                done[i], took[i] = chunk.completion, now - (first[i] or now)
            # every update re-sends and re-renders the whole chat: ~20 a second look smooth and cost little
            if not turn.cleared and (chunk.done or now - shown >= 0.05):
                shown = now
                # the finished chat is saved in the same update that says so: a reload right after keeps it
                finished = all(d is not None for d in done)
                yield a, b, _status(names, done, took), gr.skip(), (_saved(a, b) if finished else gr.skip())
        if turn.cleared:  # Clear was pressed mid-reply: the last word is an empty chat
            yield [], [], "", gr.skip(), gr.skip()

    def finish(a: Messages, b: Messages, request: gr.Request) -> tuple[Any, Any]:
        """The chain's last step: Send works again (unless a newer turn runs), the chat is saved in the browser."""
        return gr.Button(interactive=not turns.busy(request.session_hash)), _saved(a, b)

    def stop(request: gr.Request) -> None:
        turns.stop(request.session_hash)

    def clear(request: gr.Request) -> tuple[Messages, Messages, str, dict[str, Messages]]:
        turns.stop(request.session_hash, clear=True)
        return [], [], "", _saved([], [])

    def truncate(a: Messages, b: Messages, index: int, keep_user: bool) -> tuple[Messages, Messages, str]:
        """Cut both panes at the user message `index` (or the one before it); return its text too."""
        i = _user_index(a, index)
        if i is None:
            return a, b, ""
        text = _text(a[i])
        cut = i + 1 if keep_user else i
        return a[:cut], (b[:cut] if len(b) > i else b), text

    def retry(data: gr.RetryData, a: Messages, b: Messages, request: gr.Request) -> tuple[Messages, Messages]:
        if not turns.arm(request.session_hash):
            refuse()
            return gr.skip(), gr.skip()
        a, b, _ = truncate(a, b, _index(data.index), keep_user=True)
        return a, b

    def undo(data: gr.UndoData, a: Messages, b: Messages, request: gr.Request) -> tuple[Any, ...]:
        if turns.busy(request.session_hash):
            refuse()
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        a, b, text = truncate(a, b, _index(data.index), keep_user=False)
        return a, b, text, _saved(a, b)

    def edit(data: gr.EditData, a: Messages, b: Messages, request: gr.Request) -> tuple[Messages, Messages]:
        if not turns.arm(request.session_hash):
            refuse()
            return gr.skip(), gr.skip()
        a, b, _ = truncate(a, b, _index(data.index), keep_user=False)
        new = {"role": "user", "content": str(data.value)}
        return [*a, new], ([*b, new] if len(b) == len(a) else b)

    def chat_api(message: str, model: str | None = None, system: str = "", history: list[dict[str, str]] | None = None,
                 max_new_tokens: int = DEFAULTS.max_new_tokens, temperature: float = DEFAULTS.temperature,
                 top_p: float = DEFAULTS.top_p, repetition_penalty: float = DEFAULTS.repetition_penalty,
                 seed: int | None = None) -> Iterator[str]:
        """One streamed reply (the text so far, growing) to `message` after `history`, for `gradio_client`.

        `model` None means the default one: a default named here would be shown on the login page to anyone."""
        msgs = _for_model(system, [*(history or []), {"role": "user", "content": message}])
        try:
            gen, choice = pool.get(model)
            params = _params(temperature, top_p, DEFAULTS.top_k, max_new_tokens, repetition_penalty, seed)
            fit_context(gen, msgs, params.max_new_tokens, params.max_new_tokens)
        except (ModelLoadError, ValueError) as e:
            raise user_error(str(e)) from e
        text = ""
        for chunk in gen.stream(msgs, choice.params(params)):
            text += chunk.text
            yield text

    def trained_prompt(name: str) -> Any:
        """The picked run's trained system prompt (empty when it has none), loading the run if needed."""
        try:
            gen, _ = pool.get(name)
        except ModelLoadError as e:
            gr.Warning(_pool_message(e))
            log.warning("model switch: %s", e)
            return gr.skip()
        return gen.system_prompt or ""

    def restore(saved: dict[str, Messages] | None, name: str) -> tuple[Any, Any, Any]:
        """Page load: the chat this browser had before a reload, and the run's trained system prompt."""
        saved = saved if isinstance(saved, dict) else {}
        return _plain(saved.get("a")), _plain(saved.get("b")), trained_prompt(name)

    def refresh(a: str, b: str, d: str) -> tuple[Any, ...]:
        """New runs show up; a picked run that vanished from disk falls back to the default, and we say so."""
        names, notes = choices(), []

        def keep(value: str, fallback: str) -> str:
            if value in names or value == NONE:
                return value
            notes.append(f"{value} is no longer in {pool.runs_dir} (deleted?): switched to {fallback}.")
            return fallback

        va, vb, vd = keep(a, pool.default), keep(b, NONE), keep(d, pool.default)
        if notes:
            gr.Warning(" ".join(dict.fromkeys(notes)))
        status = " ".join(dict.fromkeys(notes)) or f"{len(names)} models to pick from."
        return (gr.Dropdown(choices=names, value=va), gr.Dropdown(choices=[NONE, *names], value=vb),
                gr.Dropdown(choices=names, value=vd), status)

    # -- layout --------------------------------------------------------------------------------------------
    with gr.Blocks(title="tunesmith") as app:
        saved = gr.BrowserState({"a": [], "b": []}, storage_key=SAVED_KEY)
        gr.Markdown("### tunesmith: chat with your fine-tuned model")
        with gr.Tab("Chat"):
            with gr.Row(equal_height=True):
                model_a = gr.Dropdown(choices(), value=pool.default, label="Model", elem_id="model-a", scale=3)
                model_b = gr.Dropdown(choices(True), value=NONE, label="Compare with (same prompt, side by side)",
                                      elem_id="model-b", scale=3)
                refresh_btn = gr.Button("Refresh runs", size="sm", scale=1, elem_id="refresh")
            with gr.Row(elem_id="chat-row"):
                # each reply carries the model that wrote it (its title), so switching models never relabels history
                chat_a = gr.Chatbot(label="Chat", elem_id="chat-a", editable="user", height=460,
                                    buttons=["copy", "copy_all"], feedback_options=None)
                chat_b = gr.Chatbot(label="Comparison", elem_id="chat-b", editable="user", height=460,
                                    buttons=["copy", "copy_all"], feedback_options=None, visible=False)
            with gr.Row():
                msg = gr.Textbox(placeholder="Message (Enter sends, Shift+Enter for a new line)", show_label=False,
                                 lines=1, max_lines=8, scale=8, elem_id="msg", autofocus=True)
                send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                stop_btn = gr.Button("Stop", variant="stop", scale=1, elem_id="stop")
                clear_btn = gr.Button("Clear", scale=1, elem_id="clear")
            status = gr.Markdown(elem_id="status")
            with gr.Accordion("System prompt and sampling", open=False, elem_id="settings"):
                system = gr.Textbox(label="System prompt (pre-filled with the run's trained one)", lines=2,
                                    placeholder="e.g. You are a concise assistant.", elem_id="system")
                sampling = sampling_sliders("")
        doc_model = documents_tab(pool, ask, choices, concurrency)
        runs_changed = train_tab(pool)  # Train and Runs tabs; training runs in child processes (ui/jobs.py)

        # -- wiring --------------------------------------------------------------------------------------------
        gen_inputs = [chat_a, chat_b, model_a, model_b, system, *sampling]
        gen_outputs = [chat_a, chat_b, status, msg, saved]
        gen_kw: dict[str, Any] = dict(concurrency_limit=concurrency, concurrency_id=GENERATE,
                                      show_progress="hidden", api_visibility="private")
        fast: dict[str, Any] = dict(concurrency_limit=None, show_progress="hidden", api_visibility="private")
        done_kw: dict[str, Any] = dict(fn=finish, inputs=[chat_a, chat_b], outputs=[send, saved], **fast)
        for trigger in (msg.submit, send.click):
            trigger(start, [msg, chat_a, chat_b, model_b], [msg, chat_a, chat_b, send], **fast).then(
                respond, gen_inputs, gen_outputs, **gen_kw).then(**done_kw)
        stop_btn.click(stop, None, None, queue=False, api_visibility="private")
        clear_btn.click(clear, None, [chat_a, chat_b, status, saved], queue=False, api_visibility="private")
        for pane in (chat_a, chat_b):
            pane.retry(retry, [chat_a, chat_b], [chat_a, chat_b], **fast).then(
                respond, gen_inputs, gen_outputs, **gen_kw).then(**done_kw)
            pane.undo(undo, [chat_a, chat_b], [chat_a, chat_b, msg, saved], **fast)
            pane.edit(edit, [chat_a, chat_b], [chat_a, chat_b], **fast).then(
                respond, gen_inputs, gen_outputs, **gen_kw).then(**done_kw)
        model_a.change(trained_prompt, model_a, system, **fast)
        model_b.change(lambda m: gr.Chatbot(visible=m != NONE), model_b, chat_b, **fast)
        app.load(restore, [saved, model_a], [chat_a, chat_b, system], **fast)
        for trigger in (refresh_btn.click, runs_changed.change):  # a run that finished is chattable at once
            trigger(refresh, [model_a, model_b, doc_model], [model_a, model_b, doc_model, status], **fast)
        gr.api(chat_api, api_name="chat", concurrency_limit=concurrency, concurrency_id=GENERATE)
    return app


def sampling_sliders(prefix: str) -> list[gr.Slider]:
    """Temperature, top-p, top-k, max new tokens, repetition penalty; each starts at GenerationParams' default."""
    with gr.Row():
        return [
            gr.Slider(0, 2, value=DEFAULTS.temperature, step=0.05, label="Temperature (0 = greedy)",
                      elem_id=f"{prefix}temperature"),
            gr.Slider(0.05, 1, value=DEFAULTS.top_p, step=0.05, label="Top-p", elem_id=f"{prefix}top-p"),
            gr.Slider(0, 200, value=DEFAULTS.top_k, step=1, label="Top-k (0 = off)", elem_id=f"{prefix}top-k"),
            gr.Slider(16, 2048, value=DEFAULTS.max_new_tokens, step=16, label="Max new tokens",
                      elem_id=f"{prefix}max-new"),
            gr.Slider(1.0, 2.0, value=DEFAULTS.repetition_penalty, step=0.05, label="Repetition penalty",
                      elem_id=f"{prefix}rep"),
        ]


def launch(app: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, auth: tuple[str, str] | None = None,
           share: bool = False, concurrency: int = 16, max_queue: int = 64, block: bool = True) -> gr.Blocks:
    """Queue with `concurrency` generations at once (`max_queue` more may wait), then serve the app."""
    if share and not auth:
        raise ValueError("A public share link without a login lets anyone use this model: add --auth USER:PASSWORD.")
    app.queue(default_concurrency_limit=concurrency, max_size=max_queue)
    # quiet: Gradio's own banner tells people to edit launch(); ours names the command-line flags instead
    app.launch(server_name=host, server_port=port, auth=auth, share=share, prevent_thread_lock=True,
               max_file_size=max(MAX_FILE_BYTES, MAX_DATA_BYTES), show_error=True, ssr_mode=False, quiet=True,
               theme=gr.themes.Soft(), css=CSS)
    print(f"tunesmith UI on {app.local_url}", flush=True)
    if share:
        print(f"public link (login required): {app.share_url}", flush=True)
    elif block:
        print("for a public link add --share --auth USER:PASSWORD; Ctrl+C stops", flush=True)
    if block:
        app.block_thread()
    return app


# -- pure helpers --------------------------------------------------------------------------------------------
def _pool_message(e: Exception) -> str:
    """A model error as the user should read it: an unknown name means the lists are stale."""
    if isinstance(e, UnknownModelError) and "Refresh runs" not in str(e):
        return f"{e} Press Refresh runs to update the lists."
    return str(e)


def _text(message: dict[str, Any]) -> str:
    """Gradio 6 hands messages back with content as a list of parts; the model wants one string."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return "" if content is None else str(content)


def _saved(a: Messages, b: Messages) -> dict[str, Messages]:
    """Both panes as the browser keeps them across a reload."""
    return {"a": _plain(a), "b": _plain(b)}


def _plain(history: Any) -> Messages:
    """A chat as Gradio hands it back (content as parts, empty keys) -> plain messages it accepts as a value again;
    each reply keeps its title (the model that wrote it). Anything malformed, e.g. from old browser storage, is
    dropped."""
    out: Messages = []
    for m in history if isinstance(history, list) else []:
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            continue
        msg: dict[str, Any] = {"role": m["role"], "content": _text(m)}
        if isinstance(m.get("metadata"), dict) and m["metadata"].get("title"):
            msg["metadata"] = {"title": str(m["metadata"]["title"])}
        out.append(msg)
    return out


def _for_model(system: str, history: Messages) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system.strip()}] if system and system.strip() else []
    return msgs + [{"role": m["role"], "content": _text(m)} for m in history if m.get("role") in ("user", "assistant")]


def _params(temperature: float, top_p: float, top_k: float, max_new_tokens: float, repetition_penalty: float,
            seed: int | None = None) -> GenerationParams:
    return GenerationParams(max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_p=float(top_p),
                            top_k=int(top_k), repetition_penalty=float(repetition_penalty), seed=seed)


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
    """Per pane: tokens and seconds from its first token to its last (time waiting for the model not counted)."""
    parts = []
    for name, c, seconds in zip(names, done, took):
        if c is None:
            parts.append(f"**{name}**: generating…")
        else:
            parts.append(f"**{name}**: {c.completion_tokens} tokens in {seconds:.1f} s, {c.finish_reason}")
    return " · ".join(parts)
