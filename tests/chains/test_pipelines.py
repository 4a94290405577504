"""Pipeline logic with a scripted chat model (exact prompts and parsing), plus batching on the real tiny model."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from tunesmith.chains import (
    OutputParseError,
    PromptVariableError,
    classify_chain,
    extract_chain,
    few_shot_chain,
    parse_label,
    prompt_chain,
    summarize_chain,
)
from tunesmith.chains.extract import first_json_object, structured_runnable

LABELS = ["positive", "negative", "neutral"]


@pytest.mark.parametrize(("reply", "want"), [
    ("positive", "positive"),
    ("Label: Negative.", "negative"),
    ("**neutral**", "neutral"),
    ("I think this is positive, not negative", "positive"),
    ("neutrel", "neutral"),
    ('"NEGATIVE"\n\nBecause the text complains.', "negative"),
    ("no idea", None),
])
def test_parse_label(reply: str, want: str | None) -> None:
    assert parse_label(reply, LABELS) == want


def test_parse_label_prefers_the_longer_label_at_the_same_place() -> None:
    assert parse_label("not spam", ["spam", "not spam"]) == "not spam"
    assert parse_label("It is spam.", ["spam", "not spam"]) == "spam"


def test_classify_prompt_lists_labels_and_examples(scripted) -> None:
    model = scripted(["Answer: negative"])
    chain = classify_chain(model, LABELS, examples=[("I love it", "positive")], instructions="Be strict.")
    assert chain.invoke("The food was cold.") == "negative"
    assert chain.invoke({"text": "Meh."}) == "negative"
    sent = model.seen[0]
    assert "positive, negative, neutral" in sent[0].content and "Be strict." in sent[0].content
    assert [m.content for m in sent[1:]] == ["I love it", "positive", "The food was cold."]


def test_classify_unparseable_reply_uses_fallback_or_raises(scripted) -> None:
    assert classify_chain(scripted(["banana"]), LABELS, fallback="neutral").invoke("x") == "neutral"
    with pytest.raises(OutputParseError, match="names none of the labels"):
        classify_chain(scripted(["banana"]), LABELS).invoke("x")


class Person(BaseModel):
    name: str
    age: int


def test_extract_parses_json_inside_prose_and_fences(scripted) -> None:
    chain = extract_chain(scripted(['Sure! ```json\n{"name": "Ada", "age": 36}\n```']), Person)
    assert chain.invoke("Ada Lovelace, 36, wrote the first program.") == Person(name="Ada", age=36)


def test_extract_retries_with_the_error_fed_back(scripted) -> None:
    model = scripted(['{"name": "Ada", "age": "thirty-six"}', '{"name": "Ada", "age": 36}'])
    assert extract_chain(model, Person).invoke("Ada, 36") == Person(name="Ada", age=36)
    retry = model.seen[1]
    assert retry[-2].content == '{"name": "Ada", "age": "thirty-six"}'  # its own bad reply...
    assert "age" in retry[-1].content and "could not be used" in retry[-1].content  # ...and what was wrong
    assert '"age"' in model.seen[0][0].content  # the JSON schema is in the system message


def test_extract_gives_up_after_max_retries(scripted) -> None:
    model = scripted(["no json here"])
    with pytest.raises(OutputParseError, match=r"no valid Person after 2 tries.*no JSON object"):
        extract_chain(model, Person, max_retries=1).invoke("Ada")
    assert len(model.seen) == 2


def test_structured_output_accepts_json_schema_dicts(scripted) -> None:
    schema = {"title": "City", "type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    out = structured_runnable(scripted(['{"name": "Paris"}']), schema).invoke("Capital of France?")
    assert out == {"name": "Paris"}
    assert first_json_object('x {"a": [1, {"b": 2}]} y {"c": 3}') == {"a": [1, {"b": 2}]}


def test_few_shot_sends_examples_as_turns(scripted) -> None:
    model = scripted(["Add dark mode"])
    chain = few_shot_chain(model, [{"input": "i fixed a bug", "output": "Fix bug"}], instructions="Write a title.")
    assert chain.invoke("we added a dark mode") == "Add dark mode"
    assert [m.content for m in model.seen[0]] == ["Write a title.", "i fixed a bug", "Fix bug", "we added a dark mode"]


def test_unfilled_prompt_variable_names_it_and_the_fix(scripted) -> None:
    chain = prompt_chain(scripted(["ok"]), "Translate into {language}: {input}")
    assert chain.invoke({"input": "hi", "language": "French"}) == "ok"
    with pytest.raises(PromptVariableError, match=r"prompt `prompt` uses \{language\}.*--var language="):
        chain.invoke("hi")


def test_summarize_short_text_is_one_call(scripted) -> None:
    model = scripted(["short summary"])
    assert summarize_chain(model, chunk_size=500).invoke("A short text.") == "short summary"
    assert len(model.seen) == 1


def test_summarize_long_text_maps_then_reduces(scripted) -> None:
    model = scripted(["part summary"])
    text = "\n\n".join(f"Paragraph {i}. " + "words " * 60 for i in range(6))
    out = summarize_chain(model, chunk_size=400, chunk_overlap=0, max_words=30).invoke(text)
    assert out == "part summary"
    *maps, final = model.seen
    assert len(maps) >= 3 and all("Summarize this part" in m[0].content for m in maps)
    assert "at most 30 words" in final[0].content and "part summary" in final[0].content


def test_summarize_map_step_is_one_batch_on_the_tuned_model(tiny_chat, monkeypatch) -> None:
    gen = tiny_chat.generator
    sizes: list[int] = []
    real = gen.batch
    monkeypatch.setattr(gen, "batch", lambda ps, *a, **kw: sizes.append(len(ps)) or real(ps, *a, **kw))
    text = "\n\n".join(f"Paragraph {i}. " + "words " * 40 for i in range(4))
    summary = summarize_chain(tiny_chat.model_copy(update={"max_tokens": 6}), chunk_size=300, chunk_overlap=0,
                              max_rounds=1).invoke(text)
    assert isinstance(summary, str)
    assert sizes == [4], "the 4 parts should be summarised in one padded batch"
