"""One loaded model shared by concurrent requests: tuned and base answers side by side, and CPU threads that do not
fight each other.

Two problems of serving one model to many users on a CPU, solved here once for `Generator`:

- **Base answers from the same weights.** peft's `disable_adapter()` flips a flag on every LoRA layer, for every
  thread, so a base-model request needed the model alone: a tuned-vs-base comparison ran one pane after the other,
  and steady tuned traffic could starve base requests. For plain LoRA layers peft also has a per-call switch, the
  `adapter_names` forward argument of its mixed-batch inference (`"__base__"` = no adapter for that row). A forward
  pre-hook, registered once per LoRA layer through torch's public hook API, passes it when the *calling thread*
  asked for the base model, so tuned and base generations run at the same time without a lock. Adapters that peft
  cannot switch per call (DoRA, merged weights, `modules_to_save`, LoRA on raw parameters) fall back to
  `disable_adapter()` under a readers-writer lock that prefers the writer, so base requests cannot starve.
- **OpenMP teams per thread.** Every Python thread that runs torch ops gets its own OpenMP team of
  `torch.get_num_threads()` threads. Four concurrent generations on 2 cores are 8 threads, and libgomp's team
  threads spin while they wait for each other: on a loaded machine a spinning thread burns the time slice its
  descheduled partner needs (measured: a 24-token reply took 18 s beside a parallel job instead of 2 s).
  `cpu_share()` gives each running model call an equal share of the CPU budget, so the threads of all calls
  together never outnumber the cores; `tunesmith serve|ui` also set `OMP_WAIT_POLICY=PASSIVE` before torch loads,
  so a waiting team thread sleeps instead of spinning (benchmarks/api_latency.py).
- **No team on a long-lived thread.** A team outlives the call that made it, and a process holding more team
  threads than cores makes every barrier of every team wait slowly: `on_own_thread` runs each model call (and the
  model load) on a thread that ends with it.
"""

from __future__ import annotations

import atexit
import contextlib
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, cast

import torch

_local = threading.local()
_model_threads: weakref.WeakSet[threading.Thread] = weakref.WeakSet()
EXIT_WAIT_S = 10.0
"""How long a finishing process waits, in all, for model threads still running (`model_thread`)."""


def model_thread(target: Callable[[], None], name: str) -> threading.Thread:
    """Start `target` on a daemon thread that the process waits for (up to EXIT_WAIT_S) when it exits.

    Why: a daemon thread still inside a torch op when the interpreter exits aborts the whole process ("terminate
    called without an active exception", exit status 134, in 6 of 6 tries of a matmul loop), after its work was
    done and printed: `tunesmith chat --prompt` failed CI that way when the continuous batcher's thread was
    clearing its cache as the main thread returned. Daemon, so a stuck thread cannot keep the process alive."""
    t = threading.Thread(target=target, daemon=True, name=name)
    _model_threads.add(t)
    t.start()
    return t


@atexit.register
def _join_model_threads() -> None:
    deadline = time.monotonic() + EXIT_WAIT_S
    for t in list(_model_threads):
        t.join(max(0.0, deadline - time.monotonic()))


class _RWLock:
    """Many readers (tuned generations) or one writer (adapter switched off for everyone); a waiting writer goes
    first, so a stream of readers cannot starve it."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    def acquire(self, exclusive: bool) -> None:
        with self._cond:
            if exclusive:
                self._writers_waiting += 1
                try:
                    self._cond.wait_for(lambda: not self._writer and self._readers == 0)
                finally:
                    self._writers_waiting -= 1
                self._writer = True
            else:
                self._cond.wait_for(lambda: not self._writer and self._writers_waiting == 0)
                self._readers += 1

    def release(self, exclusive: bool) -> None:
        with self._cond:
            if exclusive:
                self._writer = False
            else:
                self._readers -= 1
            self._cond.notify_all()


def _base_rows_hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Pre-forward hook of a LoRA layer: rows of a thread in base mode skip the adapter (peft's `__base__`)."""
    if not getattr(_local, "base", False):
        return None
    x = args[0] if args else kwargs["x"]
    return args, {**kwargs, "adapter_names": ["__base__"] * x.shape[0]}


def _per_call_layers(model: torch.nn.Module) -> list[torch.nn.Module] | None:
    """The LoRA layers if peft can switch every adapter of `model` off per call, else None."""
    from peft.tuners.lora import Embedding, Linear
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import AuxiliaryTrainingWrapper

    layers: list[torch.nn.Module] = []
    for m in model.modules():
        if isinstance(m, AuxiliaryTrainingWrapper):  # modules_to_save / trainable tokens: no per-call switch
            return None
        if isinstance(m, BaseTunerLayer):
            if not (type(m) is Linear or type(m) is Embedding) or m.merged or any(m.use_dora.values()):
                return None
            layers.append(m)
    return layers or None


class AdapterSwitch:
    """`with switch.use(adapter=False):` runs the calling thread's model calls without the adapter."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self._disable_adapter: Callable[[], contextlib.AbstractContextManager[Any]] | None = getattr(
            model, "disable_adapter", None)  # peft's switch; None without an adapter
        self.has_adapter = self._disable_adapter is not None
        layers = _per_call_layers(model) if self.has_adapter else None
        self.per_call = layers is not None
        """True when base and tuned calls run concurrently; False when base mode takes the model alone."""
        for layer in layers or []:
            layer.register_forward_pre_hook(_base_rows_hook, with_kwargs=True)
        self._lock = _RWLock()

    @contextlib.contextmanager
    def use(self, adapter: bool) -> Iterator[None]:
        off = None if adapter else self._disable_adapter
        base = off is not None
        if self.per_call:
            before = getattr(_local, "base", False)
            _local.base = base
            try:
                yield
            finally:
                _local.base = before
            return
        self._lock.acquire(exclusive=base)
        try:
            with off() if off is not None else contextlib.nullcontext():
                yield
        finally:
            self._lock.release(exclusive=base)


_budget_lock = threading.Lock()
_budget: list[int] = []  # [cpu threads in all, model calls running]


class CpuShare:
    """The OpenMP team size of one running model call; `update()` follows the number of calls running."""

    def __init__(self, whole: bool = False) -> None:
        self.threads = 0
        self.whole = whole

    def update(self) -> int:
        """Resize this thread's team to `threads // calls running` (at least 1; all of them if `whole`). Cheap:
        `generate` calls it at every token, so a long answer shrinks its team when another request starts and
        grows it back after."""
        with _budget_lock:
            share = _budget[0] if self.whole else max(1, _budget[0] // max(1, _budget[1]))
        if share != self.threads:
            torch.set_num_threads(share)  # the calling thread's team only; calls in other threads keep theirs
            self.threads = share
        return share


@contextlib.contextmanager
def cpu_share(whole: bool = False) -> Iterator[CpuShare]:
    """Run the body (one model call) with an equal share of the CPU threads.

    The total is torch's thread count when the first call starts (the cores, or what OMP_NUM_THREADS /
    torch.set_num_threads asked for). `whole`: this call keeps all the threads and still counts as running, so
    the others take their share beside it: for continuous batching's loop, whose compiled step is specialized on
    its thread count (dynamo guards on it, as inductor's C++ sets its OpenMP team size at compile time), so a
    resized team recompiled it mid-answer."""
    with _budget_lock:
        if not _budget:
            _budget.extend([torch.get_num_threads(), 0])
        _budget[1] += 1
    before = torch.get_num_threads()
    share = CpuShare(whole)
    share.update()
    try:
        yield share
    finally:
        with _budget_lock:
            _budget[1] -= 1
        if share.threads != before:
            torch.set_num_threads(before)  # the calling thread may go on with other torch work


T = TypeVar("T")


def on_own_thread(fn: Callable[[], T], abort: threading.Event | None = None) -> T:
    """`fn()` run in a thread that ends with it; its result returned, its exception raised here.

    Why: libgomp keeps an OpenMP team alive for every thread that ever ran a parallel torch op, and once a process
    holds more team threads than cores it throttles the spin-wait at every barrier. A model loaded, or one answer
    generated, on the main thread leaves a team there for good, and every later generation on another thread (each
    streamed reply, each server request) decoded at ~60% speed: SmolLM2-135M int8, 2 cores, 17.3 tok/s streamed
    after one answer on the main thread vs 29.0 without it (benchmarks/README.md). A team of a thread that has
    ended is gone, so model work on short-lived threads never leaves one behind. Ctrl-C while waiting sets `abort`
    (a generation's cancel event), so the abandoned call stops at its next token."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # re-raised in the caller's thread
            box["error"] = e

    t = model_thread(run, "tunesmith-model-call")
    try:
        t.join()
    except BaseException:
        if abort is not None:
            abort.set()
        raise
    if "error" in box:
        raise box["error"]
    return cast(T, box["value"])
