"""Edit configuration: every knob of the algorithm (DESIGN §2), presets, JSON round trip."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from memit_fast.arch import text_config

DEFAULT_TEMPLATE_SEEDS = ("The", "Therefore", "Because", "I", "You")

SOLVERS = ("memit", "emmet", "alphaedit", "rome")
"""The per-layer update rules ``EditConfig.solver`` selects (see memit_fast/solvers.py)."""
SOLVE_ORDERS = ("auto", "keys", "update")
"""What MEMIT's solve is for (``EditConfig.solve_order``): the keys, or the update's columns."""


@dataclass(frozen=True)
class EditConfig:
    """All settings of one MEMIT edit.

    Algorithm (DESIGN §2):
        layers: the edited blocks ``l_1 < … < l_m``; target vectors live at ``layers[-1]``.
        steps, lr: Adam iterations (at most) and learning rate for the target vectors.
        clamp_norm_factor: ``||delta_i|| <= clamp_norm_factor * ||h_i||`` after each step.
        weight_decay: weight of ``||delta|| / ||h||^2``.
        kl_factor: weight of the KL term on the ``kl_prompt``.
        mom2_update_weight: lambda, the weight of the key statistics in the solve.
        early_stop_loss: a request stops optimizing when its loss drops below this.
        kl_prompt: the essence prompt, ``{}`` is the subject.
        context_templates: prefixes ending in ``{}`` (the first is ``"{}"``); ``None`` means
            generate them from the model with the seeds below (then stored in the result).

    Statistics:
        stats_samples: number of corpus texts; stats_max_length: tokens per text (``None``:
        the model's context length); stats_batch_size: texts per forward pass;
        stats_dtype: accumulator dtype.

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
            statistics.
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
        layers = tuple(int(x) for x in self.layers)
        object.__setattr__(self, "layers", layers)
        if not layers:
            raise ValueError("EditConfig.layers must name at least one layer")
        if list(layers) != sorted(set(layers)):
            raise ValueError(f"EditConfig.layers must be strictly increasing, got {layers}")
        if self.context_templates is not None:
            t = tuple(self.context_templates)
            object.__setattr__(self, "context_templates", t)
            if not t or t[0] != "{}":
                raise ValueError("context_templates must start with the bare template '{}'")
            for s in t:
                if s.count("{}") != 1 or not s.endswith("{}"):
                    raise ValueError(
                        f"context template {s!r} must end in '{{}}' and contain it once"
                    )
        object.__setattr__(self, "context_template_seeds", tuple(self.context_template_seeds))
        if self.kl_prompt.count("{}") != 1:
            raise ValueError(f"kl_prompt {self.kl_prompt!r} must contain '{{}}' exactly once")
        for name in ("steps", "target_chunk_size", "key_chunk_size", "sync_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"EditConfig.{name} must be >= 1")
        if self.mom2_update_weight < 0:
            raise ValueError("EditConfig.mom2_update_weight (lambda) must be >= 0")
        if self.solver not in SOLVERS:
            raise ValueError(
                f"EditConfig.solver {self.solver!r} is unknown; use one of {', '.join(SOLVERS)}"
            )
        if self.solver == "rome" and len(layers) != 1:
            raise ValueError(
                f"EditConfig.solver 'rome' edits exactly one layer, but EditConfig.layers is "
                f"{layers}; give a single layer or another solver"
            )
        if not (self.emmet_ridge >= 0 and math.isfinite(self.emmet_ridge)):
            raise ValueError(
                f"EditConfig.emmet_ridge must be finite and >= 0, got {self.emmet_ridge}"
            )
        if self.solve_order not in SOLVE_ORDERS:
            raise ValueError(
                f"EditConfig.solve_order {self.solve_order!r} is unknown; use one of "
                f"{', '.join(SOLVE_ORDERS)}"
            )
        for name in ("alphaedit_threshold", "alphaedit_lambda"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                raise ValueError(f"EditConfig.{name} must be finite and > 0, got {v}")

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
        d = dict(d)
        for k in ("layers", "context_templates", "context_template_seeds"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**d)

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
