"""Edit configuration: every knob of the algorithm (DESIGN §2), presets, JSON round trip."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from memit_fast.arch import text_config
from memit_fast.stats import _DTYPES as _STATS_DTYPES

DEFAULT_TEMPLATE_SEEDS = ("The", "Therefore", "Because", "I", "You")

SOLVERS = ("memit", "emmet", "alphaedit", "rome")
"""The per-layer update rules ``EditConfig.solver`` selects (see memit_fast/solvers.py)."""
SOLVE_ORDERS = ("auto", "keys", "update")
"""What MEMIT's solve is for (``EditConfig.solve_order``): the keys, or the update's columns."""
STATS_DTYPES = tuple(_STATS_DTYPES)
"""The accumulator dtypes of the key statistics (``EditConfig.stats_dtype``)."""

# Integer fields that must be >= 1.
_POSITIVE_INTS = (
    "steps",
    "context_template_length",
    "context_template_top_k",
    "stats_samples",
    "stats_batch_size",
    "target_chunk_size",
    "key_chunk_size",
    "sync_every",
)
# Float fields: (lower bound, whether it is strict); every one must also be finite.
# early_stop_loss has no bound: the loss is >= 0, so any value <= 0 means "never stop
# early" (the benchmarks pass -1.0).
_FLOAT_RANGES: dict[str, tuple[float | None, bool]] = {
    "lr": (0.0, True),
    "clamp_norm_factor": (0.0, True),
    "weight_decay": (0.0, False),
    "kl_factor": (0.0, False),
    "mom2_update_weight": (0.0, False),  # > 0 where the solver uses it (see below)
    "early_stop_loss": (None, False),
    "emmet_ridge": (0.0, False),
    "alphaedit_threshold": (0.0, True),
    "alphaedit_lambda": (0.0, True),
}


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _str_tuple(name: str, v: Any) -> tuple[str, ...]:
    """``v`` as a tuple of strings (a bare string is refused: it would become its letters)."""
    if isinstance(v, (str, bytes)) or not isinstance(v, Iterable):
        raise ValueError(f"EditConfig.{name} must be a sequence of strings, got {v!r}")
    t = tuple(v)
    bad = [s for s in t if not isinstance(s, str)]
    if bad:
        raise ValueError(f"EditConfig.{name} must hold strings, got {bad[0]!r} in {t!r}")
    return t


@dataclass(frozen=True)
class EditConfig:
    """All settings of one MEMIT edit.

    Every field is checked at construction: a value of the wrong type or out of its range
    (given below; every float must be finite, every count an int >= 1) raises ``ValueError``
    naming the field and the value.

    Algorithm (DESIGN §2):
        layers: the edited blocks ``l_1 < … < l_m``; target vectors live at ``layers[-1]``.
        steps, lr: Adam iterations (at most) and learning rate (> 0) for the target vectors.
        clamp_norm_factor: ``||delta_i|| <= clamp_norm_factor * ||h_i||`` after each step;
            > 0.
        weight_decay: weight of ``||delta|| / ||h||^2``; >= 0.
        kl_factor: weight of the KL term on the ``kl_prompt``; >= 0.
        mom2_update_weight: lambda, the weight of the key statistics in the solve; > 0 for
            "memit" and "emmet", >= 0 for the solvers that do not use it.
        early_stop_loss: a request stops optimizing when its loss drops below this (the loss
            is >= 0, so a value <= 0 runs every step).
        kl_prompt: the essence prompt, ``{}`` is the subject.
        context_templates: prefixes ending in ``{}`` (the first is ``"{}"``); ``None`` means
            generate them from the model with the seeds below (then stored in the result).

    Statistics:
        stats_samples: number of corpus texts; stats_max_length: tokens per text (``None``:
        the model's context length, for LongRoPE models their original context, 1024
        where the configuration names none; never beyond the context);
        stats_batch_size: texts per forward pass;
        stats_dtype: accumulator dtype, one of :data:`STATS_DTYPES`.

    Engine:
        target_chunk_size: requests optimized together (64: on an H200 a random llama-2-7b's
            target phase took 5.9 ms per request and step in chunks of 64 against 12.8 in
            chunks of 32, at about 360 MiB per request; on the 2-core CPU, SmolLM2, 103 ms
            either way; ``benchmarks/results/targets_chunk.csv``); a chunk that runs out of
            memory is halved; key_chunk_size: requests per key pass;
        sync_every: optimization steps between checks whether every request has stopped.

    Solver (the per-layer update; see :mod:`memit_fast.solvers` for the equations):
        solver: ``"memit"`` (DESIGN §2, the default), ``"emmet"`` (equality-constrained:
            the edited keys are written exactly), ``"alphaedit"`` (the update is projected
            onto the null space of the key statistics) or ``"rome"`` (rank one per request,
            one at a time; needs exactly one layer). All share the target vectors, keys and
            statistics: ``"rome"``'s target vectors are optimized once on the unedited model
            for the whole batch, not again after each earlier request's write as ROME's own
            one-request-at-a-time runs do (for one request the two are the same).
        emmet_ridge: EMMET's ridge on the ``n x n`` matrix ``K^T A^-1 K``, relative to its
            mean diagonal (``ridge * trace / n`` is added to the diagonal); >= 0.
        alphaedit_threshold: eigenvalues of the key statistics ``C`` (the raw second moment,
            not ``lambda C``) below this absolute value span AlphaEdit's null space; > 0.
        alphaedit_lambda: AlphaEdit's ridge ``lambda_a`` in ``(P K K^T P + lambda_a I)^-1``;
            > 0.
        solve_order: how ``"memit"`` solves ``dW = R U^T``, ``U = A^-1 K``: ``"keys"`` for the
            ``n`` columns of ``U`` (the published order), ``"update"`` for the ``dh`` columns
            of ``A^-1 K R^T = dW^T`` (``A`` is symmetric; the result's factors are then
            ``(I, dW^T)``), ``"auto"`` whichever has fewer right-hand sides. The same update
            to float64 accuracy either way.
    """

    layers: tuple[int, ...]
    steps: int = 25
    lr: float = 0.5
    clamp_norm_factor: float = 0.75
    weight_decay: float = 0.5
    kl_factor: float = 0.0625
    mom2_update_weight: float = 15000.0
    early_stop_loss: float = 5e-2
    kl_prompt: str = "{} is a"
    context_templates: tuple[str, ...] | None = None
    context_template_seeds: tuple[str, ...] = DEFAULT_TEMPLATE_SEEDS
    context_template_length: int = 10
    context_template_top_k: int = 5
    context_template_seed: int = 0
    stats_samples: int = 100_000
    stats_max_length: int | None = None
    stats_batch_size: int = 8
    stats_dtype: str = "float32"
    target_chunk_size: int = 64
    key_chunk_size: int = 128
    sync_every: int = 5
    solver: str = "memit"
    emmet_ridge: float = 1e-6
    alphaedit_threshold: float = 1e-2
    alphaedit_lambda: float = 1.0
    solve_order: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        # Every field is checked here, so that a bad value fails at construction with the
        # field's name instead of minutes later (or never, giving a meaningless edit).
        layers = self.layers
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
            raise ValueError(f"EditConfig.layers must be a sequence of ints, got {layers!r}")
        layers = tuple(layers)
        for x in layers:
            if not _is_int(x) or x < 0:
                raise ValueError(
                    f"EditConfig.layers must hold block indices (ints >= 0), got {x!r} in "
                    f"{layers!r}"
                )
        layers = tuple(int(x) for x in layers)
        object.__setattr__(self, "layers", layers)
        if not layers:
            raise ValueError("EditConfig.layers must name at least one layer")
        if list(layers) != sorted(set(layers)):
            raise ValueError(f"EditConfig.layers must be strictly increasing, got {layers}")
        if self.context_templates is not None:
            t = _str_tuple("context_templates", self.context_templates)
            object.__setattr__(self, "context_templates", t)
            if not t or t[0] != "{}":
                raise ValueError("context_templates must start with the bare template '{}'")
            for s in t:
                if s.count("{}") != 1 or not s.endswith("{}"):
                    raise ValueError(
                        f"context template {s!r} must end in '{{}}' and contain it once"
                    )
        seeds = _str_tuple("context_template_seeds", self.context_template_seeds)
        object.__setattr__(self, "context_template_seeds", seeds)
        if not isinstance(self.kl_prompt, str):
            raise ValueError(f"EditConfig.kl_prompt must be a string, got {self.kl_prompt!r}")
        if self.kl_prompt.count("{}") != 1:
            raise ValueError(f"kl_prompt {self.kl_prompt!r} must contain '{{}}' exactly once")
        for name in _POSITIVE_INTS:
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise ValueError(f"EditConfig.{name} must be an int >= 1, got {v!r}")
            object.__setattr__(self, name, int(v))
        if self.stats_max_length is not None:
            v = self.stats_max_length
            if not _is_int(v) or v < 1:
                raise ValueError(
                    f"EditConfig.stats_max_length must be None or an int >= 1, got {v!r}"
                )
            object.__setattr__(self, "stats_max_length", int(v))
        v = self.context_template_seed
        if not _is_int(v) or not -(2**63) <= v < 2**64:
            raise ValueError(
                f"EditConfig.context_template_seed must be an int in [-2**63, 2**64) (a torch "
                f"generator seed), got {v!r}"
            )
        object.__setattr__(self, "context_template_seed", int(v))
        if self.stats_dtype not in STATS_DTYPES:
            raise ValueError(
                f"EditConfig.stats_dtype {self.stats_dtype!r} is unknown; use one of "
                f"{', '.join(STATS_DTYPES)}"
            )
        for name, (low, strict) in _FLOAT_RANGES.items():
            v = getattr(self, name)
            try:
                f = float(v) if _is_real(v) else math.nan
            except OverflowError:  # an int beyond float range
                f = math.nan
            ok = math.isfinite(f) and (low is None or (f > low if strict else f >= low))
            if not ok:
                bound = "" if low is None else f" and {'>' if strict else '>='} {low:g}"
                raise ValueError(f"EditConfig.{name} must be finite{bound}, got {v!r}")
            object.__setattr__(self, name, f)
        if self.solver not in SOLVERS:
            raise ValueError(
                f"EditConfig.solver {self.solver!r} is unknown; use one of {', '.join(SOLVERS)}"
            )
        if self.solver == "rome" and len(layers) != 1:
            raise ValueError(
                f"EditConfig.solver 'rome' edits exactly one layer, but EditConfig.layers is "
                f"{layers}; give a single layer or another solver"
            )
        if self.solver in ("memit", "emmet") and self.mom2_update_weight == 0:
            raise ValueError(
                f"EditConfig.mom2_update_weight (lambda) must be > 0 for solver "
                f"{self.solver!r}, got 0.0 (lambda * C is what protects other knowledge)"
            )
        if self.solve_order not in SOLVE_ORDERS:
            raise ValueError(
                f"EditConfig.solve_order {self.solve_order!r} is unknown; use one of "
                f"{', '.join(SOLVE_ORDERS)}"
            )
        if not isinstance(self.extra, Mapping):
            raise ValueError(f"EditConfig.extra must be a dict, got {self.extra!r}")

    def replace(self, **changes) -> EditConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EditConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown EditConfig fields: {sorted(unknown)}")
        return cls(**d)  # __post_init__ turns the JSON lists into tuples

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    @classmethod
    def from_json(cls, s: str) -> EditConfig:
        return cls.from_dict(json.loads(s))


# Published settings (MEMIT paper / code) and a common community setting for Llama-2-7B.
PRESETS: dict[str, EditConfig] = {
    "gpt2-xl": EditConfig(
        layers=(13, 14, 15, 16, 17),
        steps=20,
        lr=0.5,
        clamp_norm_factor=0.75,
        weight_decay=0.5,
        kl_factor=0.0625,
        mom2_update_weight=20000.0,
        stats_max_length=1024,
    ),
    "gpt-j-6b": EditConfig(
        layers=(3, 4, 5, 6, 7, 8),
        steps=25,
        lr=0.5,
        clamp_norm_factor=0.75,
        weight_decay=0.5,
        kl_factor=0.0625,
        mom2_update_weight=15000.0,
        stats_max_length=2048,
    ),
    "llama-2-7b": EditConfig(
        layers=(4, 5, 6, 7, 8),
        steps=25,
        lr=0.5,
        clamp_norm_factor=4.0,
        weight_decay=1e-3,
        kl_factor=0.0625,
        mom2_update_weight=15000.0,
        stats_max_length=4096,
    ),
    # Measured on SmolLM2-135M-Instruct (30 layers, hidden 576, MLP 1536) with CounterFact
    # requests and WikiText-2 statistics: see benchmarks/tune_smollm2.py.
    "smollm2-135m": EditConfig(
        layers=(3, 4, 5, 6, 7),
        steps=25,
        lr=0.5,
        clamp_norm_factor=4.0,
        weight_decay=1e-3,
        kl_factor=0.0625,
        mom2_update_weight=15000.0,
        stats_samples=2000,
        stats_max_length=256,
    ),
}


def preset(name: str) -> EditConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"no preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None


def _cfg(model_config, *names, default=None):
    for n in names:
        v = getattr(model_config, n, None)
        if v is not None:
            return v
    return default


def preset_name_for(model) -> str | None:
    """The preset that matches ``model``'s architecture and size, if any."""
    cfg = text_config(model)
    mt = getattr(model.config, "model_type", None)
    n_layer = _cfg(cfg, "num_hidden_layers", "n_layer")
    hidden = _cfg(cfg, "hidden_size", "n_embd")
    if mt == "gpt2" and (n_layer, hidden) == (48, 1600):
        return "gpt2-xl"
    if mt == "gptj" and (n_layer, hidden) == (28, 4096):
        return "gpt-j-6b"
    if mt == "llama" and (n_layer, hidden) == (32, 4096):
        return "llama-2-7b"
    if mt == "llama" and (n_layer, hidden) == (30, 576):
        return "smollm2-135m"
    return None


def auto_config(model, **overrides) -> EditConfig:
    """The configuration memit_fast uses for ``model`` when none is given.

    A preset when the architecture and size match one; otherwise a depth-proportional layer
    choice (the published GPT-J range, 3–8 of 28 blocks, scaled to the model's depth, at most
    five layers) with GPT-J's other settings. Other models deserve a measured choice: pass
    ``layers=…`` (and the rest) as overrides.
    """
    name = preset_name_for(model)
    if name is not None:
        base = PRESETS[name]
    else:
        n = int(_cfg(text_config(model), "num_hidden_layers", "n_layer", default=1))
        lo = max(0, round(n * 3 / 28))
        hi = max(lo, min(n - 1, round(n * 8 / 28)))
        layers = tuple(range(lo, hi + 1))[-5:]
        base = PRESETS["gpt-j-6b"].replace(layers=layers, stats_max_length=None)
    return base.replace(**overrides) if overrides else base
