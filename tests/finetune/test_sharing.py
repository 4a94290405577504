"""One Generator shared by concurrent requests: seeds repeat, tuned and base run at once, the tokenizer holds up,
and the CPU threads of concurrent calls add up to the budget."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tunesmith.finetune.generate import GenerationParams
from tunesmith.finetune.sharing import AdapterSwitch, _RWLock, cpu_share

MSG = [{"role": "user", "content": "hello there"}]


def _sampled(seed: int | None, tokens: int = 16) -> GenerationParams:
    return GenerationParams(max_new_tokens=tokens, temperature=1.0, top_p=0.95, seed=seed)


def test_seeded_request_repeats_beside_other_sampling_requests(tiny_gen):
    alone = tiny_gen.generate(MSG, _sampled(7)).text
    assert tiny_gen.generate(MSG, _sampled(7)).text == alone
    assert tiny_gen.generate(MSG, _sampled(8)).text != alone  # the seed decides, not a fixed draw

    def noise() -> None:
        for _ in range(4):
            tiny_gen.generate([{"role": "user", "content": "something else entirely"}], _sampled(None, 24))

    with ThreadPoolExecutor(3) as pool:
        busy = [pool.submit(noise) for _ in range(2)]
        beside = [pool.submit(tiny_gen.generate, MSG, _sampled(7)) for _ in range(3)]
        results = [f.result().text for f in beside]
        [f.result() for f in busy]
    assert results == [alone] * 3


def test_seeded_rows_of_a_batch_each_repeat_the_single_answer(tiny_gen):
    alone = tiny_gen.generate(MSG, _sampled(11)).text
    rows = tiny_gen.batch([MSG, MSG, [{"role": "user", "content": "a longer, different question here"}]],
                          _sampled(11))
    assert rows[0].text == rows[1].text == alone  # each row has its own generator: batching changes nothing


def test_unseeded_rows_differ(tiny_gen):
    rows = tiny_gen.batch([MSG] * 4, _sampled(None, 24))
    assert len({r.text for r in rows}) > 1


def test_lora_run_switches_per_call_and_base_equals_disable_adapter(tiny_gen):
    assert tiny_gen._adapter.per_call  # plain LoRA: base mode needs no lock
    greedy = GenerationParams(max_new_tokens=12, temperature=0, use_adapter=False)
    base = tiny_gen.generate(MSG, greedy)
    enc = tiny_gen._encode([MSG])
    with tiny_gen.model.disable_adapter(), torch.inference_mode():
        ref = tiny_gen.model.generate(**enc, max_new_tokens=base.completion_tokens, do_sample=False,
                                      pad_token_id=tiny_gen.tokenizer.pad_token_id,
                                      eos_token_id=tiny_gen._eos_ids())
    ref_text = tiny_gen.tokenizer.decode(ref[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert base.text == ref_text
    assert tiny_gen.generate(MSG, GenerationParams(max_new_tokens=12, temperature=0)).text != base.text


def test_tuned_answers_while_a_base_answer_is_streaming(tiny_gen):
    """The old exclusive base mode made the tuned request wait for the whole base answer."""
    tuned_ref = tiny_gen.generate(MSG, GenerationParams(max_new_tokens=6, temperature=0)).text
    stream = tiny_gen.stream(MSG, GenerationParams(max_new_tokens=400, temperature=0, use_adapter=False))
    first = next(stream)  # the base answer is under way
    assert not first.done
    tuned = tiny_gen.generate(MSG, GenerationParams(max_new_tokens=6, temperature=0))
    rest = list(stream)
    assert tuned.text == tuned_ref  # the base rows of the other thread did not leak into this one
    assert rest and not rest[0].done, "the base stream had ended before the tuned answer came back"
    assert rest[-1].completion.completion_tokens > 6


def test_dora_falls_back_to_the_lock(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, target_modules="all-linear", use_dora=True, task_type="CAUSAL_LM"))
    from peft.tuners.tuners_utils import BaseTunerLayer

    switch = AdapterSwitch(model)
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    assert switch.has_adapter and not switch.per_call and layers
    with switch.use(adapter=False):
        assert all(m.disable_adapters for m in layers)
    assert not any(m.disable_adapters for m in layers)


def test_dora_run_base_answers_wait_for_the_batch_step(tiny_model_dir, tmp_path):
    """A run that switches its adapter off for everyone (DoRA: no per-call switch): the continuous batch holds the
    switch's shared side around each step, so a base answer never runs while tuned rows decode (they would decode,
    and fill the prefix cache, without the adapter)."""
    import yaml
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.finetune.generate import load_generator

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, target_modules="all-linear", use_dora=True, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    run = tmp_path / "dora-run"
    model.save_pretrained(str(run / "adapter"))
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(run / "tokenizer")
    (run / "config.yaml").write_text(yaml.safe_dump({"base_model": str(tiny_model_dir), "output_dir": str(run)}))
    gen = load_generator(run, dtype=torch.float32)
    assert not gen._adapter.per_call and gen.continuous_batching
    tuned, base = (GenerationParams(max_new_tokens=n, temperature=0, use_adapter=a) for n, a in ((150, True),
                                                                                                  (40, False)))
    tuned_alone, base_alone = gen.generate(MSG, tuned).text, gen.generate(MSG, base).text
    gen.clear_prefix_cache()
    assert tuned_alone != base_alone
    for _ in range(3):
        stream = gen.stream(MSG, tuned)
        next(stream)  # the tuned answer is under way in the batch
        assert gen.generate(MSG, base).text == base_alone
        assert list(stream)[-1].completion.text == tuned_alone


def test_waiting_writer_goes_before_new_readers():
    lock, order = _RWLock(), []
    lock.acquire(exclusive=False)  # a reader holds it
    writer = threading.Thread(target=lambda: (lock.acquire(True), order.append("writer"), lock.release(True)))
    writer.start()
    time.sleep(0.1)  # the writer now waits
    reader = threading.Thread(target=lambda: (lock.acquire(False), order.append("reader"), lock.release(False)))
    reader.start()
    time.sleep(0.1)
    assert order == []  # the new reader queued behind the waiting writer
    lock.release(exclusive=False)
    writer.join(5), reader.join(5)
    assert order == ["writer", "reader"]


def test_tokenizer_survives_concurrent_batches_and_counts(tiny_gen):
    """Padding by the tokenizer reconfigured its Rust object while other threads encoded: 'Already borrowed'."""
    prompts = [[{"role": "user", "content": "word " * n}] for n in range(1, 40)]

    def batches() -> None:
        for i in range(0, len(prompts), 3):
            tiny_gen._encode(prompts[i: i + 3])

    def counts() -> None:
        for p in prompts:
            tiny_gen.count_tokens(tiny_gen.render(p))

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(batches if i % 2 else counts) for i in range(12)]
        [f.result() for f in futures]
    enc = tiny_gen._encode([MSG, prompts[10]])
    assert enc["attention_mask"][0, 0] == 0 and enc["attention_mask"][0, -1] == 1  # left-padded
    assert enc["attention_mask"][0].sum() == tiny_gen.count_tokens(tiny_gen.render(MSG))


def test_concurrent_calls_share_the_cpu_threads():
    total = torch.get_num_threads()
    seen: list[int] = []
    inside = threading.Barrier(2)

    def call() -> None:
        with cpu_share() as share:
            inside.wait(5)
            seen.append(share.update())  # both calls are running now
            inside.wait(5)

    threads = [threading.Thread(target=call) for _ in range(2)]
    [t.start() for t in threads]
    [t.join(10) for t in threads]
    assert sum(seen) <= max(total, 2) and min(seen) >= 1
    with cpu_share() as alone:
        assert alone.threads == total == torch.get_num_threads()


def _streamed(tok, ids: list[int]) -> str:
    """What `Generator.stream` shows of `ids` as they arrive one at a time."""
    from tunesmith.finetune.generate import TextStream

    text = TextStream(tok)
    for k in range(1, len(ids) + 1):
        text.update(ids[:k])
    return text.text


def test_bytes_that_never_make_a_character_still_stream(tiny_gen):
    """A model writing stray UTF-8 pieces (the tiny random one does) used to stream nothing until the end."""
    tok = tiny_gen.tokenizer
    a = tok.encode("a", add_special_tokens=False)
    stray = next(i for i in range(len(tok)) if tok.decode([i]) == "\ufffd" and tok.decode([i, i]) == "\ufffd\ufffd")
    assert _streamed(tok, a + [stray] * 10) == "a" + "\ufffd" * 7  # the last 3 could still be half a character
    euro = tok.encode("€", add_special_tokens=False)
    assert len(euro) > 1  # byte-level pieces of one 3-byte character
    assert _streamed(tok, a * 4 + euro[:-1]) == "aaaa"  # never half a character, never a character taken back
    assert _streamed(tok, a + euro) == "a€"
    params = GenerationParams(max_new_tokens=60, temperature=0)
    chunks = list(tiny_gen.stream([{"role": "user", "content": "ü"}], params))
    assert "".join(c.text for c in chunks) == chunks[-1].completion.text


@pytest.mark.parametrize("kind", ["bpe", "metaspace"])
def test_streamed_text_is_the_whole_decode_and_costs_linear_time(kind):
    """Decoding a few tokens at a time gives what decoding everything gives (spaces that depend on the previous
    piece included), and the tokens decoded over an answer grow linearly with it, not quadratically."""
    from tunesmith.finetune.generate import TextStream
    from tunesmith.finetune.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer(kind=kind)
    texts = ["def add(a, b):\n    return a + b\n", "naïve café — 東京 🙂 ok", "  two  spaces\tand tabs ü€ end"]
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        stream = TextStream(tok)
        for k in range(1, len(ids) + 1):
            got = stream.update(ids[:k])
            whole = tok.decode(ids[:k], skip_special_tokens=True)
            if not whole.endswith("\ufffd"):
                assert got == whole, (kind, text, k)
        assert stream.text == tok.decode(ids, skip_special_tokens=True)

    decoded = []

    class Counting:
        def decode(self, ids, **kw):
            decoded.append(len(ids))
            return tok.decode(ids, **kw)

    ids = tok.encode(" ".join(texts) * 40, add_special_tokens=False)
    assert len(ids) > 1000
    assert _streamed(Counting(), ids) == tok.decode(ids, skip_special_tokens=True)
    assert sum(decoded) < 8 * len(ids)  # decoding everything each time: len(ids)**2 / 2


def test_a_vanishing_temperature_decodes_greedily(tiny_gen):
    """Hypothesis sent temperature 2.3e-246 to the API: the logits overflowed and sampling raised (a 500)."""
    greedy = tiny_gen.generate(MSG, GenerationParams(max_new_tokens=8, temperature=0)).text
    assert tiny_gen.generate(MSG, GenerationParams(max_new_tokens=8, temperature=2.2565441121788957e-246)).text == greedy


def test_process_exits_cleanly_while_a_model_thread_still_runs_torch(tmp_path):
    """A daemon thread inside a torch op at interpreter exit aborts the process (exit 134, "terminate called without
    an active exception"): the process waits for model threads at exit instead, and their work completes."""
    import subprocess
    import sys

    done = tmp_path / "done"
    code = f"""
import time, torch
from tunesmith.finetune.sharing import model_thread
def work():
    a = torch.randn(256, 256)
    end = time.monotonic() + 0.5
    while time.monotonic() < end:
        a @ a
    open({str(done)!r}, "w").write("ok")
model_thread(work, "tunesmith-test")
time.sleep(0.1)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-1000:]
    assert done.read_text() == "ok"
