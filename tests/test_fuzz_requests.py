"""Fuzzing request lists: every list is either applied or rejected with EditRequestError
(no other exception), and a rejection leaves the weights bit-identical.

CI runs a small sample; the dedicated run is ``pytest -m slow tests/test_fuzz_requests.py``
(1,000 examples)."""

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from tiny import assert_bit_identical, make_gpt2, make_tokenizer, snapshot

from memit_fast import EditConfig, EditRequestError
from memit_fast.editor import Editor

_MODEL = make_gpt2()
_TOK = make_tokenizer()
_EDITOR = Editor(
    _MODEL,
    _TOK,
    EditConfig(layers=(1, 2), steps=2, context_templates=("{}",), mom2_update_weight=10.0),
    stats={1: torch.eye(256), 2: torch.eye(256)},
)
_SNAP = snapshot(_MODEL)
COUNTS = {"applied": 0, "rejected": 0}

text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",)), min_size=0, max_size=30
) | st.sampled_from(["", " ", "{}", "{", "}", "{0}", "{x}", "{}{}", "é字🙂", "a" * 400])
prompt = st.one_of(
    text,
    st.builds(lambda a, b: a + "{}" + b, text, text),
)
value = st.one_of(text, st.integers(), st.none(), st.lists(st.integers(), max_size=2), st.floats())
word = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc", "Z")), min_size=1, max_size=12
)
valid = st.fixed_dictionaries(
    {
        "prompt": st.builds(lambda a, b: a + "{}" + b, text, text),
        "subject": word,
        "target": word,
    }
)
request = st.one_of(
    valid,
    valid,
    st.fixed_dictionaries({"prompt": prompt, "subject": text, "target": text}),
    st.fixed_dictionaries(
        {"prompt": st.one_of(prompt, value), "subject": st.one_of(text, value)},
        optional={"target": st.one_of(text, value), "target_new": text},
    ),
    value,
)
requests = (
    st.lists(request, min_size=0, max_size=4)
    | st.lists(valid, min_size=1, max_size=4)
    | st.lists(
        st.just({"prompt": "{} plays", "subject": "Ann", "target": "golf"}), min_size=1, max_size=3
    )
)


def check(reqs):
    try:
        res = _EDITOR.apply(reqs)
    except EditRequestError:
        COUNTS["rejected"] += 1
        assert_bit_identical(_MODEL, _SNAP)
        return
    COUNTS["applied"] += 1
    res.revert()
    assert_bit_identical(_MODEL, _SNAP)


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(requests)
# Found by this test: a second apply/revert on one Editor compared results with ``==``.
@example([{"prompt": "{}", "subject": "0", "target": "0"}])
@example([{"prompt": "{} plays", "subject": "Ann", "target": "golf"}] * 2)
@example([""])
def test_fuzz_requests_ci_sample(reqs):
    check(reqs)


@pytest.mark.slow
@settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
@given(requests)
def test_fuzz_requests_1000(reqs):
    check(reqs)


def teardown_module(module):
    print(f"\nfuzzed request lists: {COUNTS['applied']} applied, {COUNTS['rejected']} rejected")
