"""Prompt tokenization: the special tokens a tokenizer adds in front stay, those it appends
(an EOS) go, and the subject's last token is found, for fast and slow tokenizers."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizer

from memit_fast.keys import appended_tail, encode_prompt, encode_with_subject


class WordTokenizer(PreTrainedTokenizer):
    """A slow word-level tokenizer that adds its special tokens through
    ``build_inputs_with_special_tokens`` and keeps the default special-tokens mask, as
    many remote-code tokenizers do: a BOS in front, an EOS at the end with ``eos=True``."""

    def __init__(self, eos: bool = False, **kw):
        self.vocab = {"<s>": 0, "</s>": 1, "<unk>": 2}
        for w in "The the capital of France is Paris Rome a b c cat sat".split():
            self.vocab.setdefault(w, len(self.vocab))
        self.inv = {i: w for w, i in self.vocab.items()}
        self.add_eos_token = eos
        super().__init__(bos_token="<s>", eos_token="</s>", unk_token="<unk>", **kw)

    @property
    def vocab_size(self):
        return len(self.vocab)

    def get_vocab(self):
        return dict(self.vocab)

    def _tokenize(self, text):
        return text.split()

    def _convert_token_to_id(self, t):
        return self.vocab.get(t, 2)

    def _convert_id_to_token(self, i):
        return self.inv[i]

    def build_inputs_with_special_tokens(self, a, b=None):
        return [0] + a + ([] if b is None else b) + ([1] if self.add_eos_token else [])


@pytest.mark.parametrize("eos", [False, True])
def test_slow_tokenizer_keeps_its_bos_and_drops_an_appended_eos(eos):
    tok = WordTokenizer(eos=eos)
    assert appended_tail(tok) == ((1,) if eos else ())
    ids = encode_prompt(tok, "The capital of France is")
    assert ids == [0, 3, 5, 6, 7, 8]
    e = encode_with_subject(tok, "", "The capital of {} is", "France")
    assert e.ids == (0, 3, 5, 6, 7, 8) and e.subject_last == 4


def test_an_unknown_subject_token_is_still_the_subject():
    """``<unk>`` is a special token, but one the text produced: the subject ending in it is
    read there, not one token earlier."""
    tok = WordTokenizer(eos=True)
    e = encode_with_subject(tok, "", "The capital of {} is", "Zanzibar")
    assert tok.convert_ids_to_tokens([e.ids[e.subject_last]]) == ["<unk>"]
    assert e.subject_last == 4


def test_switching_add_eos_token_is_seen():
    """The answer is cached per tokenizer, but not across a change of ``add_eos_token``."""
    tok = WordTokenizer(eos=False)
    assert appended_tail(tok) == ()
    tok.add_eos_token = True
    assert encode_prompt(tok, "The capital of France is") == [0, 3, 5, 6, 7, 8]
