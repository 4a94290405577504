"""What a small model needs, on the tiny random run: labels by scoring, JSON by constrained decoding, RAG answers
that are a sentence of the retrieved passages, and `tunesmith chain eval` end to end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel

from tunesmith.chains import OutputParseError, classify_chain, extract_chain, load_chat_model, rag_chain
from tunesmith.chains.chat_model import to_chat
from tunesmith.chains.evaluate import load_cases, score_case
from tunesmith.chains.extract import MAX_STRING, decoding_schema
from tunesmith.chains.pipelines import classify_prompt
from tunesmith.chains.rag import split_sentences
from tunesmith.cli import main
from tunesmith.finetune.generate import GenerationParams

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "chains"
LABELS = ["bug", "feature", "question", "not sure"]


class Person(BaseModel):
    name: str
    age: int | None = None
    city: str | None = None


def test_classify_on_a_tuned_model_is_the_argmax_of_generator_score(tiny_gen) -> None:
    chat = load_chat_model(tiny_gen, max_tokens=1)  # 1 token: had it generated, no label could come out
    chain = classify_chain(chat, LABELS, examples=[("It crashes", "bug")])
    texts = ["The training crashes when I resume", "Please add a dark mode", "How do I resume?", "???"]
    prompt = classify_prompt(LABELS, examples=[("It crashes", "bug")])
    scores = tiny_gen.score([to_chat(prompt.invoke({"text": t}).to_messages()) for t in texts], LABELS)
    want = [LABELS[max(range(len(LABELS)), key=row.__getitem__)] for row in scores]
    assert [chain.invoke(t) for t in texts] == want
    base = tiny_gen.score([to_chat(prompt.invoke({"text": texts[0]}).to_messages())], LABELS, use_adapter=False)[0]
    base_chain = classify_chain(chat.model_copy(update={"use_adapter": False}), LABELS, examples=[("It crashes", "bug")])
    assert base_chain.invoke(texts[0]) == LABELS[max(range(len(LABELS)), key=base.__getitem__)]


def test_decoding_schema_requires_nullable_fields_and_bounds_strings() -> None:
    class Tagged(Person):
        tags: list[str] = []
        nick: str = "x"

    schema = decoding_schema(Tagged)
    assert schema["required"] == ["name", "age", "city"]  # nullable fields must be decided; defaults stay optional
    props = schema["properties"]
    assert props["name"]["maxLength"] == props["tags"]["items"]["maxLength"] == MAX_STRING
    assert {"type": "string", "maxLength": MAX_STRING} in props["city"]["anyOf"]
    assert "maxLength" not in Tagged.model_json_schema()["properties"]["name"]  # the caller's schema is not changed


class Card(BaseModel):
    name: str
    city: str | None = None
    member: bool
    tier: Literal["gold", "silver"]


def test_constrained_decoding_always_gives_schema_valid_json_on_a_random_model(tiny_gen) -> None:
    """The tiny model is random: unconstrained, it never writes JSON. Constrained, every reply parses (strict JSON:
    no raw control characters or tabs in strings) and validates, greedy or sampled. (Integers are left out: the
    enforcer's number grammar admits exponents and endless digits, see GenerationParams.json_schema.)"""
    schema = decoding_schema(Card)
    prompts = [[{"role": "user", "content": t}] for t in ["Ada, 36, London", "hello", "{\"name\": 1}", "a b c d e f"]]
    for temperature, seed in ((0.0, None), (1.0, 1), (1.0, 2), (1.0, 3)):
        params = GenerationParams(max_new_tokens=400, temperature=temperature, seed=seed, json_schema=schema)
        for c in tiny_gen.batch(prompts, params):
            assert c.finish_reason == "stop", c.text
            Card.model_validate(json.loads(c.text))


def test_extract_chain_on_a_tuned_model_validates_and_says_when_max_tokens_cut_it(tiny_gen) -> None:
    chain = extract_chain(load_chat_model(tiny_gen, max_tokens=400), Card, max_retries=0)
    for text in ["My name is Ada Lovelace, I am 36 and live in London.", "nothing here", "42"]:
        assert isinstance(chain.invoke(text), Card)
    short = extract_chain(load_chat_model(tiny_gen, max_tokens=3), Person, max_retries=0)
    with pytest.raises(OutputParseError, match=r"cut off at max_tokens=3: raise max_tokens"):
        short.invoke("Ada, 36")


def test_json_schema_param_is_checked(tiny_gen) -> None:
    with pytest.raises(ValueError, match="json_schema must be a JSON schema dict"):
        GenerationParams(json_schema="{}")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="json_schema is not a usable JSON schema"):
        tiny_gen.generate("x", GenerationParams(max_new_tokens=2, json_schema={"type": "no-such-type"}))


def test_split_sentences() -> None:
    text = ("# Resuming\n\nIf a run was interrupted, continue it with `tunesmith train CONFIG --resume`. Training\n"
            "restarts from the last checkpoint.\n\nWhich license? Tunesmith is Apache-2.0 licensed. No.\n")
    assert split_sentences(text) == [
        "If a run was interrupted, continue it with `tunesmith train CONFIG --resume`.",
        "Training restarts from the last checkpoint.",
        "Tunesmith is Apache-2.0 licensed.",
    ]


def test_extractive_rag_answer_is_a_retrieved_sentence_with_its_file(docs_dir: Path, tmp_path: Path, tiny_gen,
                                                                     minilm) -> None:
    qa = rag_chain(docs_dir, load_chat_model(tiny_gen), index_dir=tmp_path / "i", embeddings=minilm)
    for question in ["How do I resume an interrupted training run?", "Which license does tunesmith use?"]:
        out = qa.invoke(question)
        sentence, _, cited = out["answer"].rpartition(" [")
        retrieved = {(s, d.metadata["source"]) for d in out["sources"] for s in split_sentences(d.page_content)}
        assert (sentence, cited.rstrip("]")) in retrieved
        # the winner is the argmax of the model's P(question | sentence)
        cands = [s for s, _ in sorted(retrieved)]
        from tunesmith.chains.prompts import RAG_QUESTION

        scores = [r[0] for r in tiny_gen.score([[{"role": "user", "content": RAG_QUESTION.format(sentence=s)}]
                                                 for s in cands], [question])]
        assert sentence == cands[max(range(len(cands)), key=scores.__getitem__)]


def test_extractive_rag_refuses_a_prompt_it_would_not_use(docs_dir: Path, tmp_path: Path, tiny_gen, minilm) -> None:
    from tunesmith.chains import ChainConfigError

    kw = {"index_dir": tmp_path / "i", "embeddings": minilm, "prompt": "Be brief.\n{context}"}
    with pytest.raises(ChainConfigError, match="extractive: false"):
        rag_chain(docs_dir, load_chat_model(tiny_gen), **kw)
    qa = rag_chain(docs_dir, load_chat_model(tiny_gen, max_tokens=3), extractive=False, **kw)
    assert not qa.invoke("Which license?")["answer"].endswith("[faq.txt]")


@pytest.mark.parametrize(("kind", "got", "case", "want"), [
    ("classify", "bug", {"expected": "bug"}, (1, 1)),
    ("classify", "feature", {"expected": "bug"}, (0, 1)),
    ("extract", Person(name="Ada", age=54), {"expected": {"name": "Ada", "age": 36, "city": None}}, (2, 3)),
    ("extract", None, {"expected": {"name": "Ada", "age": 36}}, (0, 2)),
    ("rag", {"answer": "Use `--resume`. [training.md]"}, {"expected": "--RESUME", "source": "training.md"}, (1, 1)),
    ("rag", {"answer": "Use `--resume`."}, {"expected": "--resume", "source": "training.md"}, (0, 1)),
])
def test_eval_scores(kind: str, got, case: dict, want: tuple[int, int]) -> None:
    assert score_case(kind, got, case) == want


def test_shipped_eval_sets_are_big_enough_and_load() -> None:
    for name, kind in (("classify", "classify"), ("extract", "extract"), ("rag_docs", "rag")):
        assert len(load_cases(EXAMPLES / f"{name}_eval.jsonl", kind)) >= 30


def test_eval_data_mistakes_name_the_line(tmp_path: Path) -> None:
    from tunesmith.chains import ChainConfigError

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a", "expected": "bug"}\n{"input": "b"}\n')
    with pytest.raises(ChainConfigError, match=r"bad.jsonl:2: missing expected"):
        load_cases(bad, "classify")
    with pytest.raises(ChainConfigError, match="summarize chain's answers are free text"):
        load_cases(bad, "summarize")


@pytest.mark.parametrize("name", ["classify", "extract", "rag_docs"])
def test_cli_eval_runs_on_the_tiny_run(name: str, tiny_run_dir: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "cases.jsonl"
    data.write_text("".join((EXAMPLES / f"{name}_eval.jsonl").read_text().splitlines(keepends=True)[:2]))
    args = ["chain", "eval", name, "--data", str(data), "--model", str(tiny_run_dir),
            "--set", "params.max_new_tokens=200", "--json"]
    if name == "rag_docs":
        args += ["--set", f"index_dir={tmp_path / 'index'}"]  # not under the user's cache
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["cases"] == 2 and 0 <= out["accuracy"] <= 1 and out["out_of"] == (6 if name == "extract" else 2)


@pytest.mark.slow
def test_embedded_model_answers_the_issue_examples(docs_dir: Path, tmp_path: Path) -> None:
    """Issue 12: rag on the embedded model quotes `--resume` from training.md; extract fills the keys with values
    from the text (its age for Ada Lovelace is still invented: the tuned run in README fixes that)."""
    llm = load_chat_model("embedded")
    out = rag_chain(docs_dir, llm, index_dir=tmp_path / "idx").invoke("How do I resume an interrupted training run?")
    assert "--resume" in out["answer"] and out["answer"].endswith("[training.md]")
    person = extract_chain(llm, Person).invoke("My name is Ada Lovelace, I am 36 and live in London.")
    assert (person.name, person.city) == ("Ada Lovelace", "London")
