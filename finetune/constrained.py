"""JSON-schema constrained decoding for `Generator` (the OpenAI API's `response_format`, the extract chain).

Built on lm-format-enforcer's core `TokenEnforcer`, its documented extension point: the package's own
transformers integration fails to import on transformers 5 (noamgat/lm-format-enforcer PR #177)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


class JsonVocab:
    """lm-format-enforcer's view of one tokenizer's vocabulary: built once, on the first request with a schema
    (it decodes every token twice, seconds for a 150k vocabulary), then shared by all requests."""

    def __init__(self, tokenizer: Any, eos_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids  # the end of a chat turn (ChatML's <|im_end|>) too, not only the tokenizer's EOS
        self._data: Any = None
        self._lock = threading.Lock()

    def constraint(self, schema: dict) -> Callable[[int, Any], list[int]]:
        """`prefix_allowed_tokens_fn` for model.generate: at each step, only tokens that keep the answer a valid
        prefix of JSON matching `schema` (plus end-of-turn once the object is complete)."""
        from lmformatenforcer import (
            CharacterLevelParserConfig,
            JsonSchemaParser,
            TokenEnforcer,
            TokenEnforcerTokenizerData,
        )

        try:
            parser = JsonSchemaParser(schema)
        except Exception as e:  # pydantic's error for a malformed schema, or lm-format-enforcer's for an unsupported one
            raise ValueError(f"json_schema is not a usable JSON schema ({type(e).__name__}: {str(e)[:300]}). Give an "
                             "object schema such as a Pydantic model's model_json_schema().") from None
        with self._lock:
            if self._data is None:
                vocab = len(self.tokenizer)
                self._data = TokenEnforcerTokenizerData(_token_strings(self.tokenizer, vocab), self._decode_prefix,
                                                        self.eos_ids, use_bitmask=False, vocab_size=vocab)
        enforcer = TokenEnforcer(self._data, parser)
        # TokenEnforcer lets strings hold every single-character token, raw newlines and tabs included, which
        # strict JSON parsers reject (a random model writes them): narrow its alphabet after it has set it
        alphabet = "".join(c for c in self._data.tokenizer_alphabet if c >= " ")
        parser.config = CharacterLevelParserConfig(alphabet=alphabet)
        return lambda _row, ids: enforcer.get_allowed_tokens(ids.tolist()).allowed_tokens

    def _decode_prefix(self, ids: list[int]) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        return text.rstrip("\ufffd")  # half a UTF-8 character is no text yet


def _token_strings(tokenizer: Any, vocab_size: int) -> list[tuple[int, str, bool]]:
    """(id, text, starts a word) for the tokens JSON may be written with, as lm-format-enforcer's TokenEnforcer
    needs them.

    A token's text is decoded after a "0" token and the "0" cut off: decoding it alone drops the leading space of
    SentencePiece pieces; a token whose text is longer that way starts a new word. Left out: special tokens,
    pieces of a UTF-8 character (they decode to U+FFFD alone and to something else next to their neighbour, so the
    enforcer would check other text than the one written) and control characters and tabs, which JSON strings may
    not hold raw and lm-format-enforcer lets into strings (spaces and newlines still lay the JSON out)."""
    zero = tokenizer.encode("0", add_special_tokens=False)[-1]
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(vocab_size) if i not in special]
    after_zero = tokenizer.batch_decode([[zero, i] for i in ids])
    alone = tokenizer.batch_decode([[i] for i in ids])
    out = []
    for i, a, b in zip(ids, after_zero, alone):
        text = a[1:]
        if text and "\ufffd" not in text and all(c >= " " and c != "\x7f" or c in "\n\r" for c in text):
            out.append((i, text, len(text) > len(b)))
    return out
