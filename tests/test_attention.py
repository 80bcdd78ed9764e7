"""The engine's forward passes run without cuDNN attention (a graph per input shape), with
the caller's other attention choices kept and every flag restored afterwards."""

import pytest
import torch
from tiny import CORPUS, REQUESTS, exact_config, make_gpt2, make_tokenizer

from memit_fast._attention import without_cudnn_attention
from memit_fast.arch import ModelAdapter
from memit_fast.editor import Editor
from memit_fast.evaluate import generate, score_continuations
from memit_fast.stats import collect_stats

CUDA = torch.backends.cuda
FLAGS = (
    ("cudnn", CUDA.cudnn_sdp_enabled, CUDA.enable_cudnn_sdp),
    ("flash", CUDA.flash_sdp_enabled, CUDA.enable_flash_sdp),
    ("efficient", CUDA.mem_efficient_sdp_enabled, CUDA.enable_mem_efficient_sdp),
    ("math", CUDA.math_sdp_enabled, CUDA.enable_math_sdp),
)
# The backend of other devices (XPU, PrivateUse1): torch has no public accessor for it.
if hasattr(torch._C, "_get_overrideable_sdp_enabled"):
    FLAGS += (
        (
            "overrideable",
            torch._C._get_overrideable_sdp_enabled,
            torch._C._set_sdp_use_overrideable,
        ),
    )


def flags() -> dict[str, bool]:
    return {name: get() for name, get, _ in FLAGS}


@pytest.fixture
def set_flags():
    """Sets torch's attention flags for a test and restores them after it."""
    before = flags()

    def apply(**on: bool) -> None:
        for name, _, enable in FLAGS:
            enable(on.get(name, True))

    yield apply
    for name, _, enable in FLAGS:
        enable(before[name])


@pytest.mark.parametrize(
    "caller",
    [
        {},  # torch's default: every backend enabled
        {"flash": False},
        {"math": False, "efficient": False},
        {"overrideable": False},
    ],
)
def test_only_cudnn_is_switched_off_and_everything_restored(set_flags, caller):
    set_flags(**caller)
    before = flags()
    assert before["cudnn"]
    with without_cudnn_attention():
        inside = flags()
    assert inside == {**before, "cudnn": False}
    assert flags() == before


def test_a_caller_without_cudnn_or_with_only_cudnn_is_left_alone(set_flags):
    set_flags(cudnn=False, flash=False)
    before = flags()
    with without_cudnn_attention():
        assert flags() == before
    # cuDNN alone among the CUDA backends: nothing else to use
    set_flags(flash=False, efficient=False, math=False)
    before = flags()
    with without_cudnn_attention():
        assert flags() == before
    assert flags() == before


def test_an_error_inside_restores_the_flags(set_flags):
    set_flags()
    with pytest.raises(KeyError), without_cudnn_attention():
        raise KeyError("x")
    assert flags()["cudnn"]


def _record_cudnn(model) -> list[bool]:
    """cuDNN attention's flag at each forward of the model's first block."""
    seen: list[bool] = []
    model.transformer.h[0].register_forward_pre_hook(
        lambda *_: seen.append(CUDA.cudnn_sdp_enabled())
    )
    return seen


def test_statistics_edit_and_evaluation_forwards_run_without_cudnn(set_flags):
    set_flags()
    model, tok = make_gpt2(), make_tokenizer()
    seen = _record_cudnn(model)
    collect_stats(model, tok, ModelAdapter(model), [1], CORPUS, samples=4, max_length=16)
    assert seen and not any(seen)
    seen.clear()
    result = Editor(model, tok, exact_config(steps=2), corpus=CORPUS).apply(REQUESTS[:1])
    assert seen and not any(seen)  # the statistics, targets and keys of the edit
    seen.clear()
    score_continuations(model, tok, ["The capital of"], [" France"])
    generate(model, tok, ["The capital of"], max_length=8)
    assert seen and not any(seen)
    assert CUDA.cudnn_sdp_enabled()  # restored after each
    result.revert()
