"""Edit requests: the type, its validation, and loaders for the common data sets.

Formats read (see :func:`load_requests`, which detects them):

- CounterFact / multi-CounterFact, full format (``requested_rewrite`` with a ``{}``
  template, ``paraphrase_prompts``, ``neighborhood_prompts``, ``generation_prompts``);
  :func:`load_counterfact`.
- CounterFact, reduced format as redistributed by EasyEdit and later work (``prompt``
  already contains the subject; ``target_new``, ``ground_truth``, ``rephrase_prompt``,
  ``locality_prompt``, ``locality_ground_truth``); :func:`load_counterfact`.
- zsRE in the MEND/MEMIT split (``src``, ``subject``, ``answers``, ``rephrase``, ``loc``,
  ``loc_ans``, ``alt``); :func:`load_zsre`.
- plain JSON lists or JSONL files of ``{"prompt", "subject", "target"}`` (optionally with the
  other :class:`EditRequest` fields); what :func:`save_requests` writes.

Targets are stored as the file gives them (``"English"``); MEMIT's leading space is added
where they are tokenized (the engine, :mod:`memit_fast.evaluate`).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "EditRequest",
    "EditRequestError",
    "detect_format",
    "load_counterfact",
    "load_requests",
    "load_zsre",
    "normalize_requests",
    "read_records",
    "save_requests",
]


log = logging.getLogger(__name__)


class EditRequestError(ValueError):
    """One or more requests are malformed. ``problems`` lists every problem found, each
    naming the request index and the field."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        head = f"{len(self.problems)} problem(s) in the edit requests:"
        super().__init__("\n".join([head] + [f"  - {p}" for p in self.problems]))


_TUPLE_FIELDS = (
    "paraphrase_prompts",
    "neighborhood_prompts",
    "neighborhood_targets",
    "generation_prompts",
)


@dataclass(frozen=True)
class EditRequest:
    """One fact to write: ``prompt.replace("{}", subject)`` should continue with ``target``.

    Attributes:
        prompt: the prompt template with exactly one ``{}`` where the subject goes.
        subject: the subject string.
        target: the new object (the engine adds MEMIT's leading space when tokenizing).
        target_true: the old object, if known (for evaluation).
        paraphrase_prompts: full prompts (subject included) that ask the same fact.
        neighborhood_prompts: full prompts about other subjects that must not change.
        neighborhood_targets: the expected answers of the neighborhood prompts (if they
            differ from ``target_true``): empty, or one per neighborhood prompt.
        generation_prompts: prompts for generation-based metrics.
        case_id: an identifier carried through to results.
        extra: anything else the source record carried (``format``, relation ids, …);
            not compared, not written by :meth:`to_dict`.

    Construction validates the fields (lists are accepted and stored as tuples) and raises
    :class:`EditRequestError` naming each bad field.
    """

    prompt: str
    subject: str
    target: str
    target_true: str | None = None
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood_prompts: tuple[str, ...] = ()
    neighborhood_targets: tuple[str, ...] = ()
    generation_prompts: tuple[str, ...] = ()
    case_id: Any = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        for name in _TUPLE_FIELDS:
            v = getattr(self, name)
            if isinstance(v, list):
                object.__setattr__(self, name, tuple(v))
        problems = self.validate()
        if problems:
            raise EditRequestError(problems)

    def validate(self, label: str = "EditRequest") -> list[str]:
        """Every problem with this request's fields, each starting with ``label``."""
        return _check_fields(
            label,
            {
                "prompt": self.prompt,
                "subject": self.subject,
                "target": self.target,
                "target_true": self.target_true,
                **{k: getattr(self, k) for k in _TUPLE_FIELDS},
            },
        )

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.replace("{}", self.subject)

    def to_dict(self) -> dict[str, Any]:
        d = {"prompt": self.prompt, "subject": self.subject, "target": self.target}
        if self.target_true is not None:
            d["target_true"] = self.target_true
        for k in _TUPLE_FIELDS:
            v = getattr(self, k)
            if v:
                d[k] = list(v)
        if self.case_id is not None:
            d["case_id"] = self.case_id
        return d


def _check_fields(label: str, vals: Mapping[str, Any]) -> list[str]:
    """Problems with already-extracted field values (``None`` = missing)."""
    problems: list[str] = []
    ok = {}
    for name in ("prompt", "subject", "target"):
        v = vals.get(name)
        if v is None:
            problems.append(f"{label}: field '{name}' is missing")
        elif not isinstance(v, str):
            problems.append(f"{label}: field '{name}' must be a string, got {type(v).__name__}")
        else:
            ok[name] = v
    if "prompt" in ok:
        c = ok["prompt"].count("{}")
        if c != 1:
            where = f" where the subject {ok['subject']!r} goes" if "subject" in ok else ""
            problems.append(
                f"{label}: field 'prompt' {ok['prompt']!r} must contain '{{}}' exactly "
                f"once{where} (found {c})"
            )
    if "subject" in ok and not ok["subject"].strip():
        problems.append(f"{label}: field 'subject' is empty")
    if "target" in ok and not ok["target"].strip():
        problems.append(f"{label}: field 'target' is empty")
    tt = vals.get("target_true")
    if tt is not None:
        if not isinstance(tt, str):
            problems.append(
                f"{label}: field 'target_true' must be a string, got {type(tt).__name__}"
            )
        elif not tt.strip():
            problems.append(f"{label}: field 'target_true' is empty")
    lens = {}
    for name in _TUPLE_FIELDS:
        v = vals.get(name, ())
        if v is None:
            v = ()
        if isinstance(v, (str, bytes, Mapping)) or not isinstance(v, Sequence):
            problems.append(
                f"{label}: field '{name}' must be a list of strings, got {type(v).__name__}"
            )
            continue
        bad = [j for j, s in enumerate(v) if not isinstance(s, str) or not s.strip()]
        if bad:
            j = bad[0]
            what = "empty" if isinstance(v[j], str) else f"a {type(v[j]).__name__}"
            problems.append(f"{label}: field '{name}' item {j} is {what}, expected a string")
        lens[name] = len(v)
    nt, np_ = lens.get("neighborhood_targets"), lens.get("neighborhood_prompts")
    if nt and np_ is not None and nt != np_:
        problems.append(
            f"{label}: field 'neighborhood_targets' has {nt} items but "
            f"'neighborhood_prompts' has {np_}; give one target per prompt or none"
        )
    return problems


_STR_FIELDS = ("prompt", "subject", "target")
_ALIASES = {"target_new": "target", "ground_truth": "target_true"}


def _field_value(rec: Mapping, name: str):
    if name in rec:
        return rec[name]
    for alias, canon in _ALIASES.items():
        if canon == name and alias in rec:
            v = rec[alias]
            if isinstance(v, Mapping) and "str" in v:  # CounterFact {"str": ..., "id": ...}
                return v["str"]
            return v
    return None


def _coerce(i: int, rec: Any, problems: list[str], label: str | None = None) -> EditRequest | None:
    label = label or f"request {i}"
    if isinstance(rec, EditRequest):
        return rec  # validated at construction
    if not isinstance(rec, Mapping):
        problems.append(f"{label}: expected a mapping or EditRequest, got {type(rec).__name__}")
        return None
    vals = {name: _field_value(rec, name) for name in (*_STR_FIELDS, "target_true")}
    for name in _TUPLE_FIELDS:
        vals[name] = rec.get(name, ()) or ()
    found = _check_fields(label, vals)
    if found:
        problems.extend(found)
        return None
    extra = rec.get("extra")
    return EditRequest(
        prompt=vals["prompt"],
        subject=vals["subject"],
        target=vals["target"],
        target_true=vals["target_true"],
        **{k: tuple(vals[k]) for k in _TUPLE_FIELDS},
        case_id=rec.get("case_id"),
        extra=dict(extra) if isinstance(extra, Mapping) else {},
    )


def normalize_requests(
    requests: Iterable[Any], *, with_indices: bool = False
) -> list[EditRequest] | tuple[list[EditRequest], list[int]]:
    """Validate and convert requests (dicts with ``prompt``/``subject``/``target`` — or
    ``target_new`` — or :class:`EditRequest`). Exact duplicates are merged; the same prompt
    and subject with different targets is a conflict. Raises :class:`EditRequestError`
    listing every problem. With ``with_indices``, also returns the input position of each
    request kept (for messages that name the caller's index)."""
    if isinstance(requests, (Mapping, EditRequest, str, bytes)):
        raise EditRequestError(["requests: expected a list of requests, got a single one"])
    problems: list[str] = []
    out: list[EditRequest] = []
    sources: list[int] = []
    seen: dict[tuple[str, str], tuple[int, str]] = {}
    for i, rec in enumerate(requests):
        r = _coerce(i, rec, problems)
        if r is None:
            continue
        key = (r.prompt, r.subject)
        if key in seen:
            j, tgt = seen[key]
            if tgt.strip() != r.target.strip():
                problems.append(
                    f"requests {j} and {i}: same prompt {r.prompt!r} and subject "
                    f"{r.subject!r} with different targets {tgt!r} and {r.target!r}"
                )
            continue  # duplicate: merged into the first
        seen[key] = (i, r.target)
        out.append(r)
        sources.append(i)
    if problems:
        raise EditRequestError(problems)
    if not out:
        raise EditRequestError(["requests: the list is empty"])
    return (out, sources) if with_indices else out


# ---------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------


def read_records(path: str | os.PathLike) -> list[Any]:
    """The records of a JSON list file or a JSONL file (one JSON value per line)."""
    path = os.fspath(path)
    name = os.path.basename(path)
    try:  # utf-8-sig: a byte order mark (as some editors write) is not part of the data
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise EditRequestError(
            [f"{name}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8"]
        ) from None
    stripped = text.lstrip()
    if not stripped:
        raise EditRequestError([f"{name}: the file is empty"])
    if stripped[0] == "[":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise EditRequestError([f"{name}: not valid JSON ({e})"]) from None
        return data
    records = []
    # JSONL lines end at "\n" only: str.splitlines() would also split at U+2028, U+2029,
    # U+0085 and other separators, which JSON strings may hold raw (save_requests writes
    # them so, with ensure_ascii=False).
    for lineno, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if lineno == 1 and stripped[0] == "{":
                # one JSON object spread over several lines: not a list of records
                try:
                    json.loads(text)
                except json.JSONDecodeError:
                    pass
                else:
                    raise EditRequestError(
                        [f"{name}: expected a JSON list of records or JSONL, got one object"]
                    ) from None
            raise EditRequestError([f"{name} line {lineno}: not valid JSON ({e})"]) from None
    return records


def _take(records: Any, n: int | None, name: str) -> list[Any]:
    if not isinstance(records, list):
        raise EditRequestError(
            [f"{name}: expected a list of records, got {type(records).__name__}"]
        )
    if n is not None:
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        records = records[:n]
    return records


def _get_str(rec: Mapping, key: str, label: str, problems: list[str], *, str_key: bool = False):
    """``rec[key]`` as a non-empty string (``{"str": ...}`` unwrapped when ``str_key``)."""
    if key not in rec:
        problems.append(f"{label}: field '{key}' is missing")
        return None
    v = rec[key]
    if str_key and isinstance(v, Mapping):
        if "str" not in v:
            problems.append(f"{label}: field '{key}' has no 'str'")
            return None
        key, v = f"{key}.str", v["str"]
    if not isinstance(v, str):
        problems.append(f"{label}: field '{key}' must be a string, got {type(v).__name__}")
        return None
    if not v.strip():
        problems.append(f"{label}: field '{key}' is empty")
        return None
    return v


def _get_str_list(
    rec: Mapping, key: str, label: str, problems: list[str], *, required: bool = False
) -> list[str] | None:
    """``rec[key]`` as a list of strings; a single string counts as a list of one."""
    if key not in rec or rec[key] is None:
        if required:
            problems.append(f"{label}: field '{key}' is missing")
            return None
        return []
    v = rec[key]
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list):
        problems.append(
            f"{label}: field '{key}' must be a string or a list of strings, got {type(v).__name__}"
        )
        return None
    for j, s in enumerate(v):
        if not isinstance(s, str):
            problems.append(
                f"{label}: field '{key}' item {j} must be a string, got {type(s).__name__}"
            )
            return None
        if not s.strip():
            problems.append(f"{label}: field '{key}' item {j} is empty")
            return None
    return list(v)


def _template(text: str, subject: str, field_name: str, label: str, problems: list[str]):
    """``text`` with (the first occurrence of) ``subject`` replaced by ``{}``."""
    if "{}" in text:
        problems.append(
            f"{label}: field '{field_name}' {text!r} already contains '{{}}'; this format "
            "expects the subject written out"
        )
        return None
    if subject not in text:
        problems.append(
            f"{label}: subject {subject!r} does not occur in field '{field_name}' {text!r}; "
            "fix the subject or the prompt so the subject appears verbatim"
        )
        return None
    return text.replace(subject, "{}", 1)


def _build(label: str, problems: list[str], **kw) -> EditRequest | None:
    """An EditRequest from loader-extracted fields, or ``None`` with problems appended."""
    found = _check_fields(label, kw)
    if found:
        problems.extend(found)
        return None
    return EditRequest(**kw)


def _counterfact_full(i: int, rec: Mapping, name: str, problems: list[str]):
    label = f"{name} record {i}"
    rr = rec.get("requested_rewrite")
    if not isinstance(rr, Mapping):
        what = "missing" if rr is None else f"a {type(rr).__name__}, expected an object"
        problems.append(f"{label}: field 'requested_rewrite' is {what}")
        return None
    n0 = len(problems)
    rlabel = f"{label}: requested_rewrite"
    sub = []
    prompt = _get_str(rr, "prompt", rlabel, sub)
    subject = _get_str(rr, "subject", rlabel, sub)
    target = _get_str(rr, "target_new", rlabel, sub, str_key=True)
    target_true = None
    if "target_true" in rr:
        target_true = _get_str(rr, "target_true", rlabel, sub, str_key=True)
    # "label: requested_rewrite: field 'x'" -> "label: field 'requested_rewrite.x'"
    problems.extend(
        p.replace(f"{rlabel}: field '", f"{label}: field 'requested_rewrite.") for p in sub
    )
    para = _get_str_list(rec, "paraphrase_prompts", label, problems)
    neigh_raw = rec.get("neighborhood_prompts") or []
    neigh, neigh_t = [], []
    if not isinstance(neigh_raw, list):
        problems.append(
            f"{label}: field 'neighborhood_prompts' must be a list, got {type(neigh_raw).__name__}"
        )
    else:
        for j, x in enumerate(neigh_raw):
            if isinstance(x, str):
                neigh.append(x)
            elif isinstance(x, Mapping) and isinstance(x.get("prompt"), str):
                # variant with explicit targets: {"prompt": ..., "target": ...}
                neigh.append(x["prompt"])
                if isinstance(x.get("target"), str):
                    neigh_t.append(x["target"])
            else:
                problems.append(
                    f"{label}: field 'neighborhood_prompts' item {j} must be a string, "
                    f"got {type(x).__name__}"
                )
        if neigh_t and len(neigh_t) != len(neigh):
            problems.append(
                f"{label}: field 'neighborhood_prompts' gives targets for only some prompts"
            )
    gen = _get_str_list(rec, "generation_prompts", label, problems)
    attr = _get_str_list(rec, "attribute_prompts", label, problems)
    if len(problems) > n0:
        return None
    extra = {"format": "counterfact"}
    for k in ("relation_id",):
        if k in rr:
            extra[k] = rr[k]
    for k in ("target_new", "target_true"):
        if isinstance(rr.get(k), Mapping) and "id" in rr[k]:
            extra[f"{k}_id"] = rr[k]["id"]
    if "pararel_idx" in rec:
        extra["pararel_idx"] = rec["pararel_idx"]
    if attr:
        extra["attribute_prompts"] = attr
    return _build(
        label,
        problems,
        prompt=prompt,
        subject=subject,
        target=target,
        target_true=target_true,
        paraphrase_prompts=tuple(para),
        neighborhood_prompts=tuple(neigh),
        neighborhood_targets=tuple(neigh_t),
        generation_prompts=tuple(gen),
        case_id=rec.get("case_id", i),
        extra=extra,
    )


def _counterfact_reduced(i: int, rec: Mapping, name: str, problems: list[str]):
    label = f"{name} record {i}"
    n0 = len(problems)
    prompt = _get_str(rec, "prompt", label, problems)
    subject = _get_str(rec, "subject", label, problems)
    target = _get_str(rec, "target_new", label, problems, str_key=True)
    target_true = None
    if "ground_truth" in rec:
        target_true = _get_str(rec, "ground_truth", label, problems, str_key=True)
    para = _get_str_list(rec, "rephrase_prompt", label, problems)
    loc = _get_str_list(rec, "locality_prompt", label, problems)
    loc_t = _get_str_list(rec, "locality_ground_truth", label, problems)
    if loc is not None and loc_t is not None and len(loc) != len(loc_t):
        problems.append(
            f"{label}: field 'locality_ground_truth' has {len(loc_t)} items but "
            f"'locality_prompt' has {len(loc)}"
        )
    template = None
    if prompt is not None and subject is not None:
        template = _template(prompt, subject, "prompt", label, problems)
    if len(problems) > n0:
        return None
    return _build(
        label,
        problems,
        prompt=template,
        subject=subject,
        target=target,
        target_true=target_true,
        paraphrase_prompts=tuple(para),
        neighborhood_prompts=tuple(loc),
        neighborhood_targets=tuple(loc_t),
        case_id=rec.get("case_id", i),
        extra={"format": "counterfact_reduced"},
    )


def _zsre(i: int, rec: Mapping, name: str, problems: list[str], target: str, loc_q: bool):
    label = f"{name} record {i}"
    n0 = len(problems)
    src = _get_str(rec, "src", label, problems)
    subject = _get_str(rec, "subject", label, problems)
    answers = rec.get("answers")
    answer = None
    if answers is None:
        problems.append(f"{label}: field 'answers' is missing")
    elif not isinstance(answers, list) or not answers:
        problems.append(f"{label}: field 'answers' must be a non-empty list of strings")
    elif not all(isinstance(a, str) for a in answers):
        problems.append(f"{label}: field 'answers' must be a list of strings")
    elif not answers[0].strip():
        problems.append(f"{label}: field 'answers' item 0 is empty")
    else:
        answer = answers[0]
    alt = None
    if target == "alt" or "alt" in rec:
        alt = _get_str(rec, "alt", label, problems) if target == "alt" else rec.get("alt")
    para = _get_str_list(rec, "rephrase", label, problems)
    loc = _get_str_list(rec, "loc", label, problems)
    loc_ans = _get_str_list(rec, "loc_ans", label, problems)
    if loc is not None and loc_ans is not None and len(loc) != len(loc_ans):
        problems.append(
            f"{label}: field 'loc_ans' has {len(loc_ans)} items but 'loc' has {len(loc)}"
        )
    template = None
    if src is not None and subject is not None:
        template = _template(src, subject, "src", label, problems)
    if len(problems) > n0:
        return None
    tgt = answer if target == "answers" else alt
    other = alt if target == "answers" else answer
    extra = {"format": "zsre", "target_field": target, "answers": list(answers)}
    if isinstance(other, str):
        extra["alt" if target == "answers" else "answer"] = other
    for k in ("pred", "cond"):
        if k in rec:
            extra[k] = rec[k]
    return _build(
        label,
        problems,
        prompt=template,
        subject=subject,
        target=tgt,
        target_true=None,
        paraphrase_prompts=tuple(para),
        neighborhood_prompts=tuple(p + "?" if loc_q else p for p in loc),
        neighborhood_targets=tuple(loc_ans),
        case_id=rec.get("case_id", i),
        extra=extra,
    )


def _plain(i: int, rec: Mapping, name: str, problems: list[str]):
    r = _coerce(i, rec, problems, label=f"{name} record {i}")
    if r is None:
        return None
    if r.case_id is None:
        r = EditRequest(**{**r.to_dict(), "case_id": i}, extra=r.extra)
    return r


def _record_format(r: Any) -> str | None:
    """The format one record's keys point to (``None`` for a record that is no object)."""
    if not isinstance(r, Mapping):
        return None
    if "requested_rewrite" in r:
        return "counterfact"
    if "src" in r and ("loc" in r or "answers" in r):
        return "zsre"
    prompt = r.get("prompt")
    if ("rephrase_prompt" in r or "locality_prompt" in r or "ground_truth" in r) and not (
        isinstance(prompt, str) and "{}" in prompt
    ):
        return "counterfact_reduced"
    return "requests"


def detect_format(records: Sequence[Any]) -> str:
    """``"counterfact"`` (full), ``"counterfact_reduced"``, ``"zsre"`` or ``"requests"``
    (plain): the format the keys of most records point to (ties: the earliest record's),
    so that one malformed record is reported as that record's error instead of changing
    how the whole file is read."""
    votes = Counter(f for f in map(_record_format, records) if f is not None)
    if not votes:
        return "requests"
    return votes.most_common(1)[0][0]


def _load(records, fmt: str, name: str, errors: str = "raise", **kw) -> list[EditRequest]:
    if errors not in ("raise", "skip"):
        raise ValueError(f"errors must be 'raise' or 'skip', got {errors!r}")
    problems: list[str] = []
    out = []
    for i, rec in enumerate(records):
        if fmt != "requests" and not isinstance(rec, Mapping):
            problems.append(f"{name} record {i}: expected an object, got {type(rec).__name__}")
            continue
        if fmt == "counterfact":
            r = _counterfact_full(i, rec, name, problems)
        elif fmt == "counterfact_reduced":
            r = _counterfact_reduced(i, rec, name, problems)
        elif fmt == "zsre":
            r = _zsre(i, rec, name, problems, **kw)
        else:
            r = _plain(i, rec, name, problems)
        if r is not None:
            out.append(r)
    if problems and errors == "raise":
        raise EditRequestError(problems)
    if problems:
        log.warning("%s: skipped malformed records:\n  %s", name, "\n  ".join(problems))
    if not out:
        raise EditRequestError([f"{name}: no records"])
    return out


def load_counterfact(
    path: str | os.PathLike, n: int | None = None, errors: str = "raise"
) -> list[EditRequest]:
    """CounterFact or multi-CounterFact records as :class:`EditRequest`, the first ``n``.

    Full format (``requested_rewrite``): the template, subject, ``target_new.str`` and
    ``target_true.str`` are taken as they are; ``paraphrase_prompts``,
    ``neighborhood_prompts`` (answered by ``target_true``: ``neighborhood_targets`` stays
    empty, unless every item is a ``{"prompt", "target"}`` object) and
    ``generation_prompts`` carry over; ``attribute_prompts`` and ids go to ``extra``.

    Reduced format (``prompt`` with the subject written out): the template is the prompt
    with the subject replaced by ``{}``; ``ground_truth`` is ``target_true``;
    ``rephrase_prompt`` gives the paraphrases; ``locality_prompt`` the neighborhood with
    ``neighborhood_targets = locality_ground_truth``.

    In both, ``case_id`` is the record's, else its index in the file.

    Raises :class:`EditRequestError` listing every malformed record by index and field;
    with ``errors="skip"`` such records are left out instead (and logged as a warning).
    """
    name = os.path.basename(os.fspath(path))
    records = _take(read_records(path), n, name)
    fmt = detect_format(records)
    if fmt not in ("counterfact", "counterfact_reduced"):
        votes = Counter(map(_record_format, records))
        full = votes["counterfact"] > votes["counterfact_reduced"]
        fmt = "counterfact" if full else "counterfact_reduced"
    return _load(records, fmt, name, errors)


def load_zsre(
    path: str | os.PathLike,
    n: int | None = None,
    target: str = "answers",
    loc_question_mark: bool | None = None,
    errors: str = "raise",
) -> list[EditRequest]:
    """zsRE records (MEND/MEMIT split) as :class:`EditRequest`, the first ``n``.

    ``prompt`` is ``src`` with the subject replaced by ``{}`` (an error names the record if
    the subject is not in ``src``); ``paraphrase_prompts = (rephrase,)``;
    ``neighborhood_prompts = (loc,)`` answered by ``neighborhood_targets = (loc_ans,)``.

    Args:
        target: ``"answers"`` edits towards ``answers[0]`` as the MEMIT code does;
            ``"alt"`` towards ``alt`` as EasyEdit does. ``target_true`` stays ``None``
            (zsRE's metrics are accuracies, not comparisons).
        loc_question_mark: append ``"?"`` to ``loc`` as the MEMIT code does
            (``"nq question: who … ridge?"``). ``None``: yes for ``target="answers"``,
            no (EasyEdit uses ``loc`` as it is) for ``target="alt"``.
        errors: ``"raise"`` (:class:`EditRequestError` naming every bad record) or
            ``"skip"`` (leave them out, log a warning). The shared ``zsre-1k.json`` has two
            records with an empty ``alt``.
    """
    if target not in ("answers", "alt"):
        raise ValueError(f"target must be 'answers' (MEMIT) or 'alt' (EasyEdit), got {target!r}")
    if loc_question_mark is None:
        loc_question_mark = target == "answers"
    name = os.path.basename(os.fspath(path))
    records = _take(read_records(path), n, name)
    return _load(records, "zsre", name, errors, target=target, loc_q=loc_question_mark)


_FORMATS = ("counterfact", "counterfact_reduced", "zsre", "requests")


def load_requests(
    path: str | os.PathLike,
    n: int | None = None,
    format: str | None = None,
    errors: str = "raise",
) -> list[EditRequest]:
    """Requests from a JSON list or JSONL file in any supported format, the first ``n``.

    ``format`` (``"counterfact"``, ``"counterfact_reduced"``, ``"zsre"``, ``"requests"``)
    overrides detection (:func:`detect_format`). zsRE loads with MEMIT's conventions
    (:func:`load_zsre` for EasyEdit's). Each request's ``extra["format"]`` names the source
    format. Unlike :func:`normalize_requests`, duplicates are kept: a data set may ask the
    same fact twice. ``errors="skip"`` leaves malformed records out (logged) instead of
    raising :class:`EditRequestError`.
    """
    if format is not None and format not in _FORMATS:
        raise ValueError(
            f"load_requests: format {format!r} is unknown; use one of {', '.join(_FORMATS)} "
            "or None (detect)"
        )
    name = os.path.basename(os.fspath(path))
    records = _take(read_records(path), n, name)
    fmt = format or detect_format(records)
    if fmt == "zsre":
        return _load(records, "zsre", name, errors, target="answers", loc_q=True)
    out = _load(records, fmt, name, errors)
    if fmt == "requests":
        for r in out:
            r.extra.setdefault("format", "requests")
    return out


def save_requests(requests: Iterable[EditRequest], path: str | os.PathLike) -> None:
    """Write requests as plain records (:meth:`EditRequest.to_dict`): JSONL if the path
    ends in ``.jsonl``, else a JSON list. :func:`load_requests` reads them back equal, except
    that a request without a ``case_id`` gets its position in the file (as every plain
    record does) and ``extra`` is not written (it is not compared)."""
    path = os.fspath(path)
    recs = [r.to_dict() for r in requests]
    with open(path, "w", encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            for d in recs:
                f.write(json.dumps(d, ensure_ascii=False) + "\n")
        else:
            json.dump(recs, f, ensure_ascii=False, indent=1)
            f.write("\n")
