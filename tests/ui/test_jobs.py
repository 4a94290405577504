"""The web app's job manager: one child process at a time, a FIFO queue, Stop (SIGTERM -> checkpoint), Resume, and a
crashing child reported with its log. A stand-in child keeps the queue tests fast; one real `tunesmith train` on the
tiny model proves stop -> checkpoint -> resume -> finished run."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from tunesmith.finetune import read_metrics
from tunesmith.ui.jobs import Job, JobManager, log_tail, progress

ROOT = Path(__file__).parents[2]

FAKE = """
import pathlib, signal, sys, time
mode, out = sys.argv[2], pathlib.Path(sys.argv[3])
if mode == "fail":
    print("error: data/x.jsonl:3: missing field `output`.", flush=True)
    sys.exit(2)
if mode == "ok":
    sys.exit(0)
def bye(*_):
    print("stopped at step 3; checkpoint saved.", flush=True)
    (out / "checkpoint").write_text("3")
    sys.exit(143)
signal.signal(signal.SIGTERM, bye)
(out / "ready").write_text("1")
while True:
    time.sleep(0.05)
"""


@pytest.fixture
def fake(tmp_path: Path):
    script = tmp_path / "fake_cli.py"
    script.write_text(FAKE)
    manager = JobManager(command=[sys.executable, str(script)])
    yield manager
    manager.close(timeout=10)


def _submit(manager: JobManager, tmp_path: Path, name: str, mode: str) -> Job:
    out = tmp_path / "runs" / name
    return manager.submit("train", name, ["train", mode, str(out)], out)


def _until(cond, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_one_job_at_a_time_in_submission_order(fake, tmp_path):
    a = _submit(fake, tmp_path, "a", "sleep")
    b = _submit(fake, tmp_path, "b", "ok")
    c = _submit(fake, tmp_path, "c", "ok")
    assert a.state == "running" and (b.state, c.state) == ("queued", "queued")
    assert (fake.place(a), fake.place(b), fake.place(c)) == (None, 1, 2)
    assert fake.current() is a
    _until(lambda: (a.out / "ready").exists(), what="the first child")
    assert b.proc is None  # the second waits: never two children at once
    fake.stop(a)
    assert fake.wait(c, 30) == "finished"
    assert a.state == "stopped" and b.state == "finished"
    assert a.ended <= b.started and b.ended <= c.started  # FIFO, one after the other
    assert fake.finished == 2


def test_stop_sends_sigterm_and_the_child_checkpoints(fake, tmp_path):
    job = _submit(fake, tmp_path, "run", "sleep")
    _until(lambda: (job.out / "ready").exists(), what="the child")
    assert "checkpoint is being saved" in fake.stop(job)
    assert fake.wait(job, 30) == "stopped" and job.returncode == 143
    assert (job.out / "checkpoint").read_text() == "3"
    assert "checkpoint saved" in log_tail(job)


def test_a_queued_job_is_cancelled_and_the_same_run_cannot_run_twice(fake, tmp_path):
    a = _submit(fake, tmp_path, "a", "sleep")
    b = _submit(fake, tmp_path, "b", "ok")
    with pytest.raises(ValueError, match="still running"):
        _submit(fake, tmp_path, "a", "ok")
    assert "taken out of the queue" in fake.stop(b)
    assert b.state == "cancelled" and fake.place(b) is None
    fake.stop(a)
    fake.wait(a, 30)
    assert b.proc is None  # never started


def test_a_crashing_child_is_reported_with_its_log(fake, tmp_path):
    job = _submit(fake, tmp_path, "bad", "fail")
    assert fake.wait(job, 30) == "failed"
    assert job.returncode == 2
    assert "exit code 2" in job.error and "missing field `output`" in job.error
    nxt = _submit(fake, tmp_path, "next", "ok")  # the queue goes on after a failure
    assert fake.wait(nxt, 30) == "finished"


def test_resume_queues_the_job_again_with_resume(fake, tmp_path):
    job = _submit(fake, tmp_path, "run", "sleep")
    _until(lambda: (job.out / "ready").exists(), what="the child")
    with pytest.raises(ValueError, match="only a stopped or failed"):
        fake.resume(job)
    fake.stop(job)
    fake.wait(job, 30)
    (job.out / "ready").unlink()
    fake.resume(job)
    assert job.command[-1] == "--resume" and job.state == "running"
    _until(lambda: (job.out / "ready").exists(), what="the resumed child")
    assert "--resume" in job.log.read_text()  # each attempt's command line heads its part of the log
    fake.stop(job)
    assert fake.wait(job, 30) == "stopped"


def test_metrics_are_read_while_being_written(tmp_path):
    rows = [{"step": 1, "loss": 3.0, "tokens_per_s": 100.0, "elapsed_s": 1.0},
            {"step": 2, "loss": 2.5, "tokens_per_s": 110.0, "elapsed_s": 2.0},
            {"step": 3, "loss": 2.0, "tokens_per_s": 120.0, "elapsed_s": 3.0, "eval_loss": 2.2}]
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo')
    (out / "train.log").write_text("loading\ntrain:   3%|3  | 3/100 [00:03<01:37,  1.0it/s]\rtrain:   3%| 3/100 [")
    job = Job(1, "train", "run", [], out, state="running")
    assert len(read_metrics(out / "metrics.jsonl")) == 3
    p = progress(job)
    assert (p.step, p.total, p.loss, p.eval_loss, p.tokens_per_s) == (3, 100, 2.0, 2.2, 120.0)
    assert p.eta_s == pytest.approx(97.0)
    assert p.losses == [(1, 3.0), (2, 2.5), (3, 2.0)] and p.eval_losses == [(3, 2.2)]
    assert "step 3/100" in p.line() and "ETA 1m37s" in p.line()


def _train_config(tmp_path: Path, model: Path, steps: int) -> Path:
    import yaml

    cfg = {"base_model": str(model), "output_dir": str(tmp_path / "runs" / "tiny"), "seed": 0,
           "data": {"train": [str(ROOT / "tests/fixtures/messages.jsonl"), str(ROOT / "tests/fixtures/alpaca.json")],
                    "val_set_size": 0, "max_length": 64},
           "lora": {"r": 4}, "train": {"max_steps": steps, "micro_batch_size": 1, "precision": "fp32",
                                      "save_every": 0, "eval_every": 0, "lr": 1e-2}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_real_training_stops_with_a_checkpoint_and_resumes_to_the_end(tiny_model_dir, tmp_path):
    cfg = _train_config(tmp_path, tiny_model_dir, steps=150)
    out = tmp_path / "runs" / "tiny"
    manager = JobManager(env={"OMP_NUM_THREADS": "1"})
    try:
        job = manager.submit("train", "tiny", ["train", str(cfg)], out)
        _until(lambda: len(read_metrics(out / "metrics.jsonl")) >= 3 or job.state != "running", timeout=180,
               what="the first steps")
        assert job.state == "running", job.error
        manager.stop(job)
        assert manager.wait(job, 120) == "stopped", job.error
        assert job.returncode == 143 and "checkpoint saved" in log_tail(job)
        assert list((out / "checkpoints").glob("step-*/state.pt")) and not (out / "adapter").exists()
        stopped_at = progress(job).step
        assert 3 <= stopped_at < 150
        manager.resume(job)
        assert manager.wait(job, 300) == "finished", job.error
        assert (out / "adapter").is_dir() and (out / "summary.json").exists()
        p = progress(job)
        assert (p.step, p.total) == (150, 150) and len(p.losses) == 150
        assert f"resumed from {out / 'checkpoints' / f'step-{stopped_at}'}" in job.log.read_text()
        assert manager.finished == 1
    finally:
        manager.close()


def test_real_training_with_a_bad_config_fails_with_the_cli_message(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("base_model: embedded\ndata:\n  train: [nowhere.jsonl]\ntrain:\n  lr: 2\n")
    manager = JobManager()
    try:
        job = manager.submit("train", "bad", ["train", str(cfg)], tmp_path / "runs" / "bad")
        assert manager.wait(job, 120) == "failed"
        assert job.returncode == 2 and "`train.lr` must be in (0, 1], got 2.0" in job.error
    finally:
        manager.close()
