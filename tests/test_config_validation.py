"""EditConfig rejects every bad value at construction (ValueError naming the field and the
value) instead of failing minutes later or giving a meaningless edit; presets stay valid."""

import json
import math

import numpy as np
import pytest

import memit_fast
from memit_fast import EditConfig
from memit_fast.config import PRESETS, STATS_DTYPES
from memit_fast.stats import _DTYPES

NAN, INF = float("nan"), float("inf")

BAD = [
    # lambda: the solve needs lambda * C positive definite
    ("mom2_update_weight", 0.0),
    ("mom2_update_weight", -1.0),
    ("mom2_update_weight", NAN),
    ("mom2_update_weight", INF),
    ("lr", NAN),
    ("lr", 0.0),
    ("lr", -0.5),
    ("lr", INF),
    ("lr", "0.5"),
    ("lr", True),
    ("clamp_norm_factor", 0.0),  # ||delta|| <= 0: a zero change
    ("clamp_norm_factor", -1.0),
    ("clamp_norm_factor", NAN),
    ("weight_decay", -1.0),
    ("weight_decay", NAN),
    ("weight_decay", INF),
    ("weight_decay", 10**400),
    ("kl_factor", -0.1),
    ("kl_factor", NAN),
    ("early_stop_loss", NAN),
    ("early_stop_loss", INF),
    ("early_stop_loss", -INF),
    ("early_stop_loss", None),
    ("emmet_ridge", -1e-3),
    ("emmet_ridge", NAN),
    ("alphaedit_threshold", 0.0),
    ("alphaedit_lambda", INF),
    ("stats_dtype", "float16"),
    ("stats_dtype", "bfloat16"),
    ("stats_dtype", None),
    ("steps", 0),
    ("steps", 2.5),
    ("steps", True),
    ("steps", "3"),
    ("target_chunk_size", 1.5),
    ("target_chunk_size", 0),
    ("key_chunk_size", 0),
    ("key_chunk_size", -4),
    ("sync_every", 0),
    ("sync_every", 2.0),
    ("stats_batch_size", 0),
    ("stats_batch_size", 4.0),
    ("stats_samples", 0),
    ("stats_samples", 1e5),
    ("stats_max_length", 0),
    ("stats_max_length", 1.5),
    ("stats_max_length", "24"),
    ("context_template_length", 0),
    ("context_template_length", 2.5),
    ("context_template_top_k", 0),
    ("context_template_top_k", False),
    ("context_template_seed", 1.5),
    ("context_template_seed", 2**64),
    ("context_template_seed", None),
    ("layers", (1.5, 2)),
    ("layers", (True, 2)),
    ("layers", (-1, 2)),
    ("layers", ("1", "2")),
    ("layers", "12"),
    ("layers", 3),
    ("layers", ()),
    ("layers", (2, 1)),
    ("context_templates", "{}"),
    ("context_templates", ("{}", 3)),
    ("context_templates", ("The {}",)),
    ("context_template_seeds", "The"),
    ("context_template_seeds", ("The", None)),
    ("kl_prompt", None),
    ("kl_prompt", "no subject"),
    ("solver", "nope"),
    ("solve_order", "rhs"),
    ("extra", None),
]


def _id(case):
    field, value = case
    return f"{field}={value!r}"


@pytest.mark.parametrize("field,value", BAD, ids=[_id(c) for c in BAD])
def test_bad_value_is_rejected_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field) as info:
        EditConfig(**{"layers": (1, 2), field: value})
    if not isinstance(value, (tuple, list)) and field not in ("layers", "context_templates"):
        assert repr(value) in str(info.value)  # and the value
    # The same through replace() and the JSON path.
    with pytest.raises(ValueError, match=field):
        EditConfig(layers=(1, 2)).replace(**{field: value})
    d = EditConfig(layers=(1, 2)).to_dict()
    d[field] = list(value) if isinstance(value, tuple) else value
    with pytest.raises(ValueError, match=field):
        EditConfig.from_dict(d)


def test_the_repro_values_fail_before_any_work():
    """The values that used to fail after the target phase, or apply a meaningless edit."""
    for field, value in [
        ("mom2_update_weight", 0.0),
        ("lr", NAN),
        ("early_stop_loss", NAN),
        ("clamp_norm_factor", 0.0),
        ("weight_decay", -1.0),
        ("stats_dtype", "float16"),
        ("stats_batch_size", 0),
        ("steps", 2.5),
        ("target_chunk_size", 1.5),
    ]:
        with pytest.raises(ValueError, match=f"EditConfig.{field}"):
            EditConfig(layers=(1, 2), **{field: value})


def test_boundary_and_equivalent_values_are_accepted_and_normalized():
    cfg = EditConfig(
        layers=[np.int64(1), 2],
        steps=np.int32(3),
        lr=np.float32(0.25),
        weight_decay=0,
        kl_factor=0,
        emmet_ridge=0,
        early_stop_loss=-1.0,  # the loss is >= 0: every request runs every step
        mom2_update_weight=15000,
        stats_dtype="float64",
        stats_max_length=None,
        context_template_seed=-5,
        context_template_seeds=["The", "I"],
        context_templates=["{}", "Hello. {}"],
    )
    assert cfg.layers == (1, 2) and all(type(x) is int for x in cfg.layers)
    assert type(cfg.steps) is int and cfg.steps == 3
    assert type(cfg.lr) is float and cfg.lr == 0.25
    assert type(cfg.mom2_update_weight) is float and cfg.mom2_update_weight == 15000.0
    assert cfg.context_template_seeds == ("The", "I")
    assert cfg.context_templates == ("{}", "Hello. {}")
    json.dumps(cfg.to_dict(), allow_nan=False)  # numpy values would not serialize
    assert EditConfig.from_json(cfg.to_json()) == cfg
    assert EditConfig(layers=(0,), early_stop_loss=0.0).early_stop_loss == 0.0


def test_stats_dtypes_are_those_the_statistics_code_accepts():
    assert set(STATS_DTYPES) == set(_DTYPES)
    for d in STATS_DTYPES:
        assert EditConfig(layers=(1,), stats_dtype=d).stats_dtype == d


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_constructs_and_round_trips(name):
    cfg = memit_fast.preset(name)
    assert EditConfig(**{f: getattr(cfg, f) for f in cfg.to_dict()}) == cfg
    back = EditConfig.from_json(cfg.to_json())
    assert back == cfg
    assert EditConfig.from_dict(json.loads(json.dumps(cfg.to_dict(), allow_nan=False))) == cfg
    for v in cfg.to_dict().values():
        if isinstance(v, float):
            assert math.isfinite(v)


def test_lambda_zero_only_where_the_solver_ignores_it():
    """ROME and AlphaEdit do not use lambda: configs (and edits saved) with 0 stay valid."""
    for solver in ("rome", "alphaedit"):
        layers = (1,) if solver == "rome" else (1, 2)
        cfg = EditConfig(layers=layers, solver=solver, mom2_update_weight=0.0)
        assert EditConfig.from_json(cfg.to_json()) == cfg
    for solver in ("memit", "emmet"):
        with pytest.raises(ValueError, match="must be > 0 for solver"):
            EditConfig(layers=(1, 2), solver=solver, mom2_update_weight=0.0)
