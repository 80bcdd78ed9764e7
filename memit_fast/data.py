"""Edit requests: the type, its validation, and loaders for the common data sets."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


class EditRequestError(ValueError):
    """One or more requests are malformed. ``problems`` lists every problem found, each
    naming the request index and the field."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        head = f"{len(self.problems)} problem(s) in the edit requests:"
        super().__init__("\n".join([head] + [f"  - {p}" for p in self.problems]))


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
            differ from ``target_true``).
        generation_prompts: prompts for generation-based metrics.
        case_id: an identifier carried through to results.
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

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.replace("{}", self.subject)

    def to_dict(self) -> dict[str, Any]:
        d = {"prompt": self.prompt, "subject": self.subject, "target": self.target}
        if self.target_true is not None:
            d["target_true"] = self.target_true
        for k in (
            "paraphrase_prompts",
            "neighborhood_prompts",
            "neighborhood_targets",
            "generation_prompts",
        ):
            v = getattr(self, k)
            if v:
                d[k] = list(v)
        if self.case_id is not None:
            d["case_id"] = self.case_id
        return d


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


def _coerce(i: int, rec: Any, problems: list[str]) -> EditRequest | None:
    if isinstance(rec, EditRequest):
        rec = {
            "prompt": rec.prompt,
            "subject": rec.subject,
            "target": rec.target,
            "_req": rec,
        }
    if not isinstance(rec, Mapping):
        problems.append(
            f"request {i}: expected a mapping or EditRequest, got {type(rec).__name__}"
        )
        return None
    n_before = len(problems)
    vals = {}
    for name in _STR_FIELDS:
        v = _field_value(rec, name)
        if v is None:
            problems.append(f"request {i}: field '{name}' is missing")
            continue
        if not isinstance(v, str):
            problems.append(
                f"request {i}: field '{name}' must be a string, got {type(v).__name__}"
            )
            continue
        vals[name] = v
    if "prompt" in vals:
        c = vals["prompt"].count("{}")
        if c != 1:
            where = f"where the subject {vals['subject']!r} goes" if "subject" in vals else ""
            problems.append(
                f"request {i}: field 'prompt' {vals['prompt']!r} must contain '{{}}' exactly "
                f"once {where} (found {c})".rstrip()
            )
    if "subject" in vals and not vals["subject"].strip():
        problems.append(f"request {i}: field 'subject' is empty")
    if "target" in vals and not vals["target"].strip():
        problems.append(f"request {i}: field 'target' is empty")
    if len(problems) > n_before:
        return None
    if "_req" in rec:
        return rec["_req"]
    tt = _field_value(rec, "target_true")
    return EditRequest(
        prompt=vals["prompt"],
        subject=vals["subject"],
        target=vals["target"],
        target_true=tt if isinstance(tt, str) else None,
        paraphrase_prompts=tuple(rec.get("paraphrase_prompts", ()) or ()),
        neighborhood_prompts=tuple(rec.get("neighborhood_prompts", ()) or ()),
        neighborhood_targets=tuple(rec.get("neighborhood_targets", ()) or ()),
        generation_prompts=tuple(rec.get("generation_prompts", ()) or ()),
        case_id=rec.get("case_id"),
    )


def normalize_requests(requests: Iterable[Any]) -> list[EditRequest]:
    """Validate and convert requests (dicts with ``prompt``/``subject``/``target`` — or
    ``target_new`` — or :class:`EditRequest`). Exact duplicates are merged; the same prompt
    and subject with different targets is a conflict. Raises :class:`EditRequestError`
    listing every problem."""
    if isinstance(requests, (Mapping, EditRequest, str, bytes)):
        raise EditRequestError(["requests: expected a list of requests, got a single one"])
    problems: list[str] = []
    out: list[EditRequest] = []
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
    if problems:
        raise EditRequestError(problems)
    if not out:
        raise EditRequestError(["requests: the list is empty"])
    return out
