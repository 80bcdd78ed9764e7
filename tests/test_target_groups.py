"""How the target phase batches a chunk's sequences with prefix reuse (``_groups``): every
request in exactly one rewriting group, the KL group over all, and on an accelerator no
group under the minimum size (a small last group is merged into the one before)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from memit_fast.targets import _groups


def fake_request(suffix: int, rewrites: int):
    """A prepared request whose rewriting sequences have ``suffix`` step tokens."""
    enc = SimpleNamespace(ids=list(range(10 + suffix)), subject_last=10)
    return SimpleNamespace(rewrites=[enc] * rewrites, target_ids=[1])


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize(
    "suffixes",
    [
        [3] * 5,
        [3] * 200 + [40] * 10,  # accelerator: two groups, the last too small -> one group
        [3] * 300 + [40] * 300,  # accelerator: two groups of enough rows each
        [3] * 300 + [40] * 300 + [90] * 5,
        list(range(1, 60)) * 7,
    ],
    ids=["same", "small-tail", "two", "three-small-tail", "spread"],
)
def test_groups_partition_the_requests(device, suffixes):
    prepared = [fake_request(s, rewrites=2) for s in suffixes]
    groups = _groups(prepared, split=True, dev=torch.device(device))
    rewrite_groups = [g for g, rw, kl in groups if rw]
    kl_groups = [g for g, rw, kl in groups if kl]
    assert all(not kl for _, rw, kl in groups if rw)
    assert kl_groups == [list(range(len(prepared)))]
    flat = sorted(i for g in rewrite_groups for i in g)
    assert flat == list(range(len(prepared)))
    if device == "cuda" and len(rewrite_groups) > 1:
        assert all(2 * len(g) >= 256 for g in rewrite_groups)


def test_accelerator_merges_a_small_last_group():
    prepared = [fake_request(3, 2)] * 200 + [fake_request(40, 2)] * 10
    groups = _groups(prepared, split=True, dev=torch.device("cuda"))
    assert len(groups) == 2  # one rewriting group (merged) + the KL group
    cpu = _groups(prepared, split=True, dev=torch.device("cpu"))
    assert len(cpu) == 3  # two suffix lengths + the KL group
