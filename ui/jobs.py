"""The web app's jobs: `tunesmith train` (and `eval`, `merge`) in child processes, one at a time per server.

Training never runs inside the UI's process: a crash, an OOM kill or a stuck CUDA context in a child leaves the app
up, and the child's own exit code and log say what happened. The manager lives in the server (one per `build_app`),
not in a browser session, so a page reload or a second browser sees the same jobs. Jobs wait in a FIFO queue while
one runs: two trainings at once would halve each other's speed and could run a small machine out of memory.

Stop is SIGTERM to the child's process group: the trainer finishes its step, saves a checkpoint and exits with 143
(finetune/trainer.py `_stop_on_signal`); Resume queues `tunesmith train CONFIG --resume`. Live progress is read
from the files the trainer writes anyway: `metrics.jsonl` (one row per step) and the child's log (the progress
bar's `step/total`), so the UI needs no channel into the child.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tunesmith.finetune import read_metrics

State = Literal["queued", "running", "stopping", "stopped", "finished", "failed", "cancelled"]
ACTIVE: tuple[State, ...] = ("queued", "running", "stopping")
CLI = [sys.executable, "-m", "tunesmith.cli"]
"""The command line a job runs (`tunesmith` of this interpreter), followed by the job's own arguments."""
STOPPED_CODES = (143, -signal.SIGTERM)
"""Exit codes of a child that stopped on SIGTERM: 143 after its checkpoint, -15 before training began."""
_BAR = re.compile(r"(\d+)/(\d+) \[")
"""tqdm's `step/total [elapsed<eta ...]` in the log: the total is known to the trainer only."""


@dataclass
class Job:
    """One child process's worth of work, kept after it ends so its result stays on screen."""

    id: int
    kind: Literal["train", "eval", "merge", "export"]
    name: str
    """The run's name (its folder name): what the UI shows."""
    args: list[str]
    """Arguments after `tunesmith`, e.g. ["train", "/path/config.yaml"]."""
    out: Path
    """The run folder: the child writes here, and the log goes here."""
    state: State = "queued"
    resume: bool = False
    returncode: int | None = None
    error: str = ""
    """For a failed job: its exit code and the end of its log, as the user should read it."""
    submitted: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    log_start: int = 0
    """Offset in the log where this attempt's output begins (a resumed run appends to the same log)."""
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def log(self) -> Path:
        return self.out / f"{self.kind}.log"

    @property
    def command(self) -> list[str]:
        return [*self.args, *(["--resume"] if self.resume else [])]

    @property
    def label(self) -> str:
        return f"#{self.id} {self.kind} {self.name}"


@dataclass
class Progress:
    """A training job's live numbers, read from its run folder."""

    step: int = 0
    total: int | None = None
    loss: float | None = None
    eval_loss: float | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)

    def line(self) -> str:
        parts = [f"step {self.step}/{self.total if self.total else '?'}"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.eval_loss is not None:
            parts.append(f"eval loss {self.eval_loss:.4f}")
        if self.tokens_per_s is not None:
            parts.append(f"{self.tokens_per_s:,.0f} tokens/s")
        if self.eta_s is not None:
            parts.append(f"ETA {_duration(self.eta_s)}")
        return " · ".join(parts)


class JobManager:
    """Runs jobs one at a time in child processes, in the order they were submitted; the rest wait.

    `command` is the program a job's arguments follow (tests pass a stand-in child); `env` is added to the
    children's environment. Thread-safe: every browser session's events call it."""

    def __init__(self, command: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        self.command = list(command or CLI)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
        self._lock = threading.RLock()
        self._jobs: list[Job] = []
        self._queue: deque[Job] = deque()
        self._running: Job | None = None
        self.finished = 0
        """How many jobs finished well so far: the UI refreshes its model lists when it changes."""
        atexit.register(self.close)  # a server that exits stops its child (which then saves a checkpoint)

    # -- submitting and controlling -----------------------------------------------------------------------------
    def submit(self, kind: Literal["train", "eval", "merge", "export"], name: str, args: list[str], out: Path,
               resume: bool = False) -> Job:
        """Queue a job; it starts at once when nothing runs. One active job per run folder."""
        out = Path(out)
        with self._lock:
            busy = [j for j in self._jobs if j.out == out and j.state in ACTIVE]
            if busy:
                raise ValueError(f"{busy[0].label} is still {busy[0].state} on {out.name}: stop it or wait for it.")
            job = Job(len(self._jobs) + 1, kind, name, list(args), out, resume=resume)
            self._jobs.append(job)
            self._queue.append(job)
            self._start_next()
        return job

    def stop(self, job: Job) -> str:
        """Queued: taken out of the queue. Running: SIGTERM (checkpoint, then exit). Stopping: SIGKILL."""
        with self._lock:
            if job.state == "queued":
                self._queue.remove(job)
                job.state = "cancelled"
                return f"{job.label} was taken out of the queue."
            if job.proc is None or job.state not in ("running", "stopping"):
                return f"{job.label} is not running ({job.state})."
            forced = job.state == "stopping"
            job.state = "stopping"
            _signal_group(job.proc, signal.SIGKILL if forced else signal.SIGTERM)
        if forced:
            return f"{job.label} killed (no new checkpoint: Resume continues from the last one)."
        return f"{job.label}: stopping after this step, a checkpoint is being saved (press Stop again to kill it)."

    def resume(self, job: Job) -> Job:
        """Queue a stopped, failed or cancelled training job again, continuing from its last checkpoint."""
        with self._lock:
            if job.kind != "train" or job.state in ACTIVE or job.state == "finished":
                raise ValueError(f"{job.label} is {job.state}: only a stopped or failed training job can be resumed.")
            others = [j for j in self._jobs if j.out == job.out and j.state in ACTIVE]
            if others:
                raise ValueError(f"{others[0].label} is {others[0].state} on {job.out.name}: wait for it first.")
            job.resume, job.state, job.error, job.returncode = True, "queued", "", None
            job.submitted, job.started, job.ended = time.time(), None, None
            self._queue.append(job)
            self._start_next()
        return job

    def close(self, timeout: float = 30.0) -> None:
        """Empty the queue and stop the running job (SIGTERM, then SIGKILL after `timeout` seconds)."""
        with self._lock:
            for queued in list(self._queue):
                queued.state = "cancelled"
            self._queue.clear()
            job = self._running
            if job is not None and job.proc is not None and job.proc.poll() is None:
                job.state = "stopping"
                _signal_group(job.proc, signal.SIGTERM)
        if job is not None and job.proc is not None:
            try:
                job.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(job.proc, signal.SIGKILL)
                job.proc.wait()

    # -- reading -------------------------------------------------------------------------------------------
    def jobs(self) -> list[Job]:
        with self._lock:
            return list(self._jobs)

    def get(self, job_id: int | str | None) -> Job | None:
        with self._lock:
            for job in self._jobs:
                if str(job.id) == str(job_id):
                    return job
        return None

    def current(self) -> Job | None:
        """What a fresh page shows: the running job, else the next queued one, else the last one submitted."""
        with self._lock:
            if self._running is not None:
                return self._running
            if self._queue:
                return self._queue[0]
            return self._jobs[-1] if self._jobs else None

    def place(self, job: Job) -> int | None:
        """1 for the next job to start, 2 after it...; None when the job is not queued."""
        with self._lock:
            return self._queue.index(job) + 1 if job in self._queue else None

    def wait(self, job: Job, timeout: float | None = None) -> State:
        """Block until `job` is no longer queued or running (tests, scripts)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while job.state in ACTIVE:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{job.label} is still {job.state} after {timeout} s")
            time.sleep(0.05)
        return job.state

    # -- the queue -----------------------------------------------------------------------------------------
    def _start_next(self) -> None:
        """Start the first queued job if none runs (called with the lock held)."""
        if self._running is not None or not self._queue:
            return
        job = self._queue.popleft()
        job.out.mkdir(parents=True, exist_ok=True)
        with open(job.log, "ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} tunesmith {' '.join(job.command)}\n".encode())
            log.flush()
            job.log_start = log.tell()
            try:
                # own session (process group): Stop reaches the trainer and anything it spawned, and a Ctrl+C in
                # the server's terminal does not hit the child twice
                job.proc = subprocess.Popen([*self.command, *job.command], stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=self.env, start_new_session=True)
            except OSError as e:
                job.state, job.error, job.ended = "failed", f"could not start {self.command[0]}: {e}", time.time()
                self._start_next()
                return
        job.state, job.started, self._running = "running", time.time(), job
        threading.Thread(target=self._reap, args=(job,), name=f"job-{job.id}", daemon=True).start()

    def _reap(self, job: Job) -> None:
        assert job.proc is not None
        rc = job.proc.wait()
        with self._lock:
            job.returncode, job.ended = rc, time.time()
            if rc == 0:
                job.state = "finished"
                self.finished += 1
            elif rc in STOPPED_CODES or (job.state == "stopping" and rc == -signal.SIGKILL):
                job.state = "stopped"
            else:
                job.state = "failed"
                job.error = f"exit code {rc}" + (" (killed: out of memory?)" if rc == -signal.SIGKILL else "") + \
                    f". End of the log:\n{log_tail(job, 20)}"
            self._running = None
            self._start_next()


# -- reading a job's files --------------------------------------------------------------------------------------
def log_tail(job: Job, lines: int = 30) -> str:
    """The last `lines` lines this attempt wrote, progress-bar redraws (`\\r`) collapsed to their latest state."""
    try:
        with open(job.log, "rb") as f:
            f.seek(max(job.log_start, f.seek(0, os.SEEK_END) - 64_000))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    shown = [line.rstrip().split("\r")[-1] for line in text.replace("\r\n", "\n").split("\n")]
    return "\n".join([s for s in shown if s.strip()][-lines:])


def progress(job: Job) -> Progress:
    """Step/total, losses, speed and ETA of a training job from its run folder (any state)."""
    rows = read_metrics(job.out / "metrics.jsonl")  # a half-written last row is skipped
    p = Progress()
    p.losses = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    p.eval_losses = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    if rows:
        p.step = max(r["step"] for r in rows)
    if p.losses:
        p.loss = p.losses[-1][1]
    if p.eval_losses:
        p.eval_loss = p.eval_losses[-1][1]
    timed = [r for r in rows if "elapsed_s" in r]
    if timed:
        p.tokens_per_s = timed[-1].get("tokens_per_s")
    bars = _BAR.findall(log_tail(job, 5))
    if bars:
        p.total = int(bars[-1][1])
        p.step = max(p.step, int(bars[-1][0]))
    summary = job.out / "summary.json"
    if job.state == "finished" and summary.exists():
        try:
            p.total = int(json.loads(summary.read_text())["steps"])
        except (ValueError, KeyError, TypeError):
            pass
    # this attempt's pace: rows since the last restart (elapsed_s starts again from 0 on resume)
    seg = timed[-1:]
    for r in reversed(timed[:-1]):
        if r["elapsed_s"] > seg[0]["elapsed_s"]:
            break
        seg.insert(0, r)
    if job.state == "running" and p.total and len(seg) >= 2 and seg[-1]["step"] > seg[0]["step"]:
        per_step = (seg[-1]["elapsed_s"] - seg[0]["elapsed_s"]) / (seg[-1]["step"] - seg[0]["step"])
        p.eta_s = max(0.0, per_step * (p.total - p.step))
    return p


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):  # already gone
        pass


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
