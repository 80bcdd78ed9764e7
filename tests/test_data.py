"""Loaders round-trip the shared data files; malformed records name the record and field."""

from __future__ import annotations

import json
import os

import pytest
from conftest import SHARED_DATA

from memit_fast.data import (
    EditRequest,
    EditRequestError,
    detect_format,
    load_counterfact,
    load_requests,
    load_zsre,
    normalize_requests,
    read_records,
    save_requests,
)

CF_FULL = os.path.join(SHARED_DATA, "counterfact", "counterfact-full-sample.json")
CF_VAL = os.path.join(SHARED_DATA, "counterfact", "counterfact-val.json")
ZSRE_1K = os.path.join(SHARED_DATA, "zsre", "zsre-1k.json")
ZSRE_SAMPLE = os.path.join(SHARED_DATA, "zsre", "zsre-sample.json")


def raw(path):
    with open(path) as f:
        return json.load(f)


def write(tmp_path, records, name="data.json"):
    p = tmp_path / name
    p.write_text(json.dumps(records))
    return str(p)


# ---- round trips of the shared files ---------------------------------------------------


def test_counterfact_full_round_trip(tmp_path):
    recs = raw(CF_FULL)
    reqs = load_counterfact(CF_FULL)
    assert len(reqs) == len(recs) == 5
    for r, d in zip(reqs, recs):
        rr = d["requested_rewrite"]
        assert r.prompt == rr["prompt"] and r.subject == rr["subject"]
        assert r.target == rr["target_new"]["str"]  # kept as given, no leading space
        assert r.target_true == rr["target_true"]["str"]
        assert list(r.paraphrase_prompts) == d["paraphrase_prompts"]
        assert list(r.neighborhood_prompts) == d["neighborhood_prompts"]
        assert r.neighborhood_targets == ()  # answered by target_true
        assert list(r.generation_prompts) == d["generation_prompts"]
        assert r.case_id == d["case_id"]
        assert r.extra["format"] == "counterfact"
        assert r.extra["relation_id"] == rr["relation_id"]
        assert r.extra["attribute_prompts"] == d["attribute_prompts"]
        assert r.text == rr["prompt"].replace("{}", rr["subject"])
    for ext in ("json", "jsonl"):
        p = tmp_path / f"out.{ext}"
        save_requests(reqs, p)
        assert load_requests(p) == reqs
    assert load_requests(CF_FULL) == reqs


def test_counterfact_reduced_round_trip(tmp_path):
    recs = raw(CF_VAL)
    reqs = load_counterfact(CF_VAL)
    assert len(reqs) == len(recs) == 1919
    for r, d in zip(reqs, recs):
        assert r.prompt.count("{}") == 1
        assert r.text == d["prompt"]
        assert r.subject == d["subject"]
        assert r.target == d["target_new"] and r.target_true == d["ground_truth"]
        assert r.paraphrase_prompts == (d["rephrase_prompt"],)
        assert r.neighborhood_prompts == (d["locality_prompt"],)
        assert r.neighborhood_targets == (d["locality_ground_truth"],)
        assert r.case_id == d["case_id"]
    assert reqs[0].prompt == "{}, by"
    p = tmp_path / "val.jsonl"
    save_requests(reqs, p)
    assert load_requests(p) == reqs
    assert load_counterfact(CF_VAL, n=200) == reqs[:200]
    assert load_requests(CF_VAL, n=7) == reqs[:7]


@pytest.mark.parametrize("path", [ZSRE_1K, ZSRE_SAMPLE])
def test_zsre_round_trip(path, tmp_path):
    recs = raw(path)
    reqs = load_zsre(path)
    assert len(reqs) == len(recs)
    for i, (r, d) in enumerate(zip(reqs, recs)):
        assert r.text == d["src"] and r.subject == d["subject"]
        assert r.target == d["answers"][0]
        assert r.target_true is None
        assert r.paraphrase_prompts == (d["rephrase"],)
        assert r.neighborhood_prompts == (d["loc"] + "?",)  # as the MEMIT code asks it
        assert r.neighborhood_targets == (d["loc_ans"],)
        assert r.case_id == i
        assert r.extra["answers"] == d["answers"] and r.extra["alt"] == d["alt"]
    if path == ZSRE_1K:  # two records have an empty alt: named, or skipped on request
        probs = problems_of(load_zsre, path, target="alt")
        assert probs == [
            "zsre-1k.json record 534: field 'alt' is empty",
            "zsre-1k.json record 723: field 'alt' is empty",
        ]
        alt = load_zsre(path, target="alt", errors="skip")
        assert len(alt) == len(recs) - 2
        recs = [d for d in recs if d["alt"].strip()]
    else:
        alt = load_zsre(path, target="alt")
    for r, d in zip(alt, recs):
        assert r.target == d["alt"]
        assert r.neighborhood_prompts == (d["loc"],)  # EasyEdit: loc as it is
    assert load_requests(path) == reqs
    save_requests(reqs, tmp_path / "z.json")
    assert load_requests(tmp_path / "z.json") == reqs


def test_detect_format():
    assert detect_format(raw(CF_FULL)) == "counterfact"
    assert detect_format(raw(CF_VAL)) == "counterfact_reduced"
    assert detect_format(raw(ZSRE_SAMPLE)) == "zsre"
    assert detect_format([{"prompt": "{} is", "subject": "a", "target": "b"}]) == "requests"
    assert detect_format([]) == "requests"


def test_detect_format_is_not_decided_by_a_broken_first_record(tmp_path):
    """The format is the one most records' keys point to: a broken first record is that
    record's error, not a reason to read every record as a plain request."""
    cases = [
        (raw(CF_VAL)[:30], "prompt", "counterfact_reduced", "field 'prompt' is missing"),
        (raw(CF_FULL), "requested_rewrite", "counterfact", "field 'requested_rewrite'"),
        (raw(ZSRE_SAMPLE), "src", "zsre", "field 'src' is missing"),
    ]
    for recs, key, fmt, problem in cases:
        del recs[0][key]
        assert detect_format(recs) == fmt, key
        path = write(tmp_path, recs, f"{fmt}.json")
        probs = problems_of(load_requests, path)
        assert len(probs) == 1 and probs[0].startswith(f"{fmt}.json record 0: "), probs
        assert problem in probs[0]
        kept = load_requests(path, errors="skip")
        assert len(kept) == len(recs) - 1
        assert all(r.extra["format"] == fmt for r in kept)
    # load_counterfact picks the variant by the same vote
    recs = raw(CF_FULL)
    recs[0] = {"case_id": 0}
    probs = problems_of(load_counterfact, write(tmp_path, recs, "cf.json"))
    assert probs == ["cf.json record 0: field 'requested_rewrite' is missing"]
    # a tie goes to the earliest record
    plain = {"prompt": "{} is", "subject": "a", "target": "b"}
    reduced = {"prompt": "a is", "subject": "a", "target_new": "b", "ground_truth": "c"}
    assert detect_format([plain, reduced]) == "requests"
    assert detect_format([reduced, plain]) == "counterfact_reduced"
    assert detect_format([1, "x", plain]) == "requests"


def test_jsonl_strings_may_hold_unicode_line_separators(tmp_path):
    """save_requests writes U+2028, U+2029, U+0085 raw (ensure_ascii=False); JSONL lines
    end at newlines only, so they load back."""
    reqs = [
        EditRequest("{} is\u2028a", "A\u2029B", "c\x85d", paraphrase_prompts=("A\x0bB\x1c is",)),
        EditRequest("{} was", "E", "f\u2028"),
    ]
    path = tmp_path / "seps.jsonl"
    save_requests(reqs, path)
    assert "\u2028" in path.read_text(encoding="utf-8")
    want = [r.to_dict() for r in reqs]
    assert [r.to_dict() for r in load_requests(path)] == [
        {**d, "case_id": i} for i, d in enumerate(want)
    ]
    # Windows line ends
    crlf = tmp_path / "crlf.jsonl"
    crlf.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    assert [r.to_dict() for r in load_requests(crlf)] == [
        {**d, "case_id": i} for i, d in enumerate(want)
    ]


def test_byte_order_mark_and_non_utf8(tmp_path):
    rec = {"prompt": "{} is", "subject": "A", "target": "B"}
    for name, body in (("bom.json", json.dumps([rec])), ("bom.jsonl", json.dumps(rec) + "\n")):
        p = tmp_path / name
        p.write_bytes(b"\xef\xbb\xbf" + body.encode())
        assert [r.target for r in load_requests(p)] == ["B"]
        assert read_records(p) == [rec]
    p = tmp_path / "latin1.json"
    p.write_bytes(b'[{"prompt": "{} est \xe9", "subject": "A", "target": "B"}]')
    probs = problems_of(load_requests, p)
    assert len(probs) == 1 and probs[0].startswith("latin1.json: not UTF-8 text")


def test_plain_requests_json_and_jsonl(tmp_path):
    recs = [
        {"prompt": "{} plays", "subject": "LeBron James", "target": "football"},
        {"prompt": "The capital of {} is", "subject": "France", "target_new": "Rome",
         "ground_truth": "Paris", "paraphrase_prompts": ["France's capital is"]},
    ]  # fmt: skip
    a = load_requests(write(tmp_path, recs))
    p = tmp_path / "r.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    b = load_requests(p)
    assert a == b
    assert a[1].target == "Rome" and a[1].target_true == "Paris"
    assert a[0].case_id == 0 and a[1].case_id == 1
    assert a[0].extra["format"] == "requests"
    # duplicates are kept by the loaders (each case is scored), merged by normalize
    dup = load_requests(write(tmp_path, [recs[0], recs[0]], "d.json"))
    assert len(dup) == 2
    assert len(normalize_requests([recs[0], recs[0]])) == 1


# ---- malformed records ------------------------------------------------------------------


def problems_of(fn, *args, **kw) -> list[str]:
    with pytest.raises(EditRequestError) as ei:
        fn(*args, **kw)
    return ei.value.problems


def test_plain_malformed_records_name_index_and_field(tmp_path):
    recs = [
        {"prompt": "{} is", "subject": "A", "target": "b"},  # fine
        {"prompt": "The capital of France is", "subject": "France", "target": "Paris"},
        {"prompt": "{} is", "subject": "A", "target": ""},
        {"prompt": "{} is", "subject": ["A"], "target": "b"},
        {"prompt": "{} is", "target": "b"},
        {"prompt": "{} is", "subject": "B", "target": "b", "paraphrase_prompts": "B is"},
        {"prompt": "{} is", "subject": "C", "target": "b", "neighborhood_prompts": ["x"],
         "neighborhood_targets": ["y", "z"]},
        "not an object",
    ]  # fmt: skip
    probs = problems_of(load_requests, write(tmp_path, recs, "bad.json"))
    text = "\n".join(probs)
    assert "record 0" not in text
    assert any(p.startswith("bad.json record 1: field 'prompt'") and "'{}'" in p for p in probs)
    assert "bad.json record 2: field 'target' is empty" in probs
    assert "bad.json record 3: field 'subject' must be a string, got list" in probs
    assert "bad.json record 4: field 'subject' is missing" in probs
    assert any(p.startswith("bad.json record 5: field 'paraphrase_prompts'") for p in probs)
    assert any(p.startswith("bad.json record 6: field 'neighborhood_targets'") for p in probs)
    assert any(p.startswith("bad.json record 7: expected a mapping") for p in probs)


def test_counterfact_full_malformed(tmp_path):
    recs = raw(CF_FULL)
    recs[0]["requested_rewrite"]["prompt"] = "The mother tongue of Danielle Darrieux is"
    recs[1]["requested_rewrite"]["target_new"]["str"] = " "
    recs[2]["requested_rewrite"]["subject"] = 7
    recs[3]["paraphrase_prompts"] = [1, 2]
    del recs[4]["requested_rewrite"]
    probs = problems_of(load_counterfact, write(tmp_path, recs, "cf.json"))
    assert any(
        p.startswith("cf.json record 0: field 'prompt'") and "exactly once" in p for p in probs
    )
    assert "cf.json record 1: field 'requested_rewrite.target_new.str' is empty" in probs
    assert "cf.json record 2: field 'requested_rewrite.subject' must be a string, got int" in probs
    assert "cf.json record 3: field 'paraphrase_prompts' item 0 must be a string, got int" in probs
    assert "cf.json record 4: field 'requested_rewrite' is missing" in probs


def test_counterfact_reduced_malformed(tmp_path):
    recs = raw(CF_VAL)[:6]
    recs[0]["subject"] = "BBC Two"  # not in "BBC One, by"
    recs[1]["target_new"] = ""
    recs[2]["prompt"] = 3
    recs[3]["locality_ground_truth"] = ["a", "b"]
    recs[4]["prompt"] = "{} " + recs[4]["prompt"]
    probs = problems_of(load_counterfact, write(tmp_path, recs, "val.json"))
    assert any(
        p.startswith("val.json record 0: subject 'BBC Two' does not occur in field 'prompt'")
        for p in probs
    )
    assert "val.json record 1: field 'target_new' is empty" in probs
    assert "val.json record 2: field 'prompt' must be a string, got int" in probs
    assert any(p.startswith("val.json record 3: field 'locality_ground_truth'") for p in probs)
    assert any(p.startswith("val.json record 4: field 'prompt'") for p in probs)
    assert len(probs) == 5  # record 5 is fine


def test_zsre_malformed(tmp_path):
    recs = raw(ZSRE_SAMPLE)
    recs[0]["subject"] = "Nobody Here"
    recs[1]["answers"] = []
    recs[2]["answers"] = "Paris"
    recs[3]["loc_ans"] = None
    del recs[4]["alt"]
    path = write(tmp_path, recs, "z.json")
    probs = problems_of(load_zsre, path)
    assert any(
        p.startswith("z.json record 0: subject 'Nobody Here' does not occur in field 'src'")
        for p in probs
    )
    assert "z.json record 1: field 'answers' must be a non-empty list of strings" in probs
    assert "z.json record 2: field 'answers' must be a non-empty list of strings" in probs
    assert any(p.startswith("z.json record 3: field 'loc_ans'") for p in probs) or len(probs) == 3
    assert not any("record 4" in p for p in probs)  # alt only needed for target="alt"
    alt = problems_of(load_zsre, path, target="alt")
    assert "z.json record 4: field 'alt' is missing" in alt
    with pytest.raises(ValueError, match="target"):
        load_zsre(path, target="pred")


def test_file_level_errors(tmp_path):
    p = tmp_path / "e.json"
    p.write_text("")
    assert problems_of(load_requests, p) == ["e.json: the file is empty"]
    p.write_text('{"prompt": "{} is",\n "subject": "a", "target": "b"}')
    assert "one object" in problems_of(load_requests, p)[0]
    p.write_text('{"prompt": "{} is", "subject": "a", "target": "b"}\n{oops\n')
    assert problems_of(load_requests, p)[0].startswith("e.json line 2: not valid JSON")
    p.write_text("[]")
    assert problems_of(load_requests, p) == ["e.json: no records"]
    p.write_text('{"a": 1}')
    assert read_records(p) == [{"a": 1}]  # JSONL of one line
    with pytest.raises(FileNotFoundError):
        load_requests(tmp_path / "missing.json")


# ---- the request type --------------------------------------------------------------------


def test_edit_request_validates_itself():
    r = EditRequest("{} is", "A", "b", paraphrase_prompts=["A is"], neighborhood_prompts=["x"])
    assert r.paraphrase_prompts == ("A is",) and hash(r) == hash(r)
    with pytest.raises(EditRequestError) as ei:
        EditRequest("no braces", "", "   ", target_true=5)
    probs = ei.value.problems
    assert any("field 'prompt'" in p for p in probs)
    assert "EditRequest: field 'subject' is empty" in probs
    assert "EditRequest: field 'target' is empty" in probs
    assert "EditRequest: field 'target_true' must be a string, got int" in probs
    with pytest.raises(EditRequestError, match="neighborhood_targets"):
        EditRequest("{} is", "A", "b", neighborhood_prompts=("x",), neighborhood_targets=("y", "z"))
    with pytest.raises(EditRequestError, match="generation_prompts"):
        EditRequest("{} is", "A", "b", generation_prompts="A is")


def test_normalize_requests_keeps_its_contract():
    reqs = normalize_requests(
        [
            {"prompt": "{} is", "subject": "A", "target_new": {"str": "b", "id": "Q1"}},
            EditRequest("{} was", "A", "c"),
            {"prompt": "{} is", "subject": "A", "target": "b"},  # duplicate, merged
        ]
    )
    assert [r.target for r in reqs] == ["b", "c"]
    with pytest.raises(EditRequestError) as ei:
        normalize_requests(
            [{"prompt": "{} is", "subject": "A", "target": "b"},
             {"prompt": "{} is", "subject": "A", "target": "c"},
             {"prompt": "is", "subject": "A", "target": "c"}]
        )  # fmt: skip
    assert any(p.startswith("requests 0 and 1: same prompt") for p in ei.value.problems)
    assert any(p.startswith("request 2: field 'prompt'") for p in ei.value.problems)
    with pytest.raises(EditRequestError, match="single one"):
        normalize_requests({"prompt": "{} is", "subject": "A", "target": "b"})
    with pytest.raises(EditRequestError, match="empty"):
        normalize_requests([])
