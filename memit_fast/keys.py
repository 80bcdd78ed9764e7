"""Tokenization at the subject, partial forward passes, and key / hidden-state extraction.

The *key* of block ``l`` is the input of its MLP output projection at one token; the hidden
state is the block's output. MEMIT reads both at the last token of the subject.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from memit_fast.arch import ModelAdapter, block_output


class StopForward(Exception):
    """Raised from a hook to end a forward pass early (caught by :func:`forward_until`)."""


# ----------------------------------------------------------------------------- tokenization


@dataclass(frozen=True)
class Encoded:
    """Token ids of ``prefix + prompt.replace('{}', subject)`` and the index of the subject's
    last token."""

    ids: tuple[int, ...]
    subject_last: int


class SubjectNotFoundError(ValueError):
    pass


def _fast(tokenizer) -> bool:
    return bool(getattr(tokenizer, "is_fast", False))


def encode_with_subject(tokenizer, prefix: str, prompt: str, subject: str) -> Encoded:
    """Tokenize ``prefix + prompt`` with ``subject`` in place of ``{}``.

    The subject's last token follows MEMIT's rule: the length of the tokenized text up to the
    end of the subject, minus one. Where that tokenization is not a prefix of the whole
    text's (a token merges the subject's end with what follows), the rule would point at a
    token of other text; fast tokenizers then take the last token whose character span
    overlaps the subject's (found with the tokenizer's offsets), slow ones raise
    :class:`SubjectNotFoundError`.

    A fast tokenizer whose text tokens all have non-empty spans gets the rule's token from
    the offsets of one tokenization: the rule's tokens then cover the text up to the
    subject's end, and the last of them is the last one overlapping the subject. A token
    whose span was trimmed away (spaces alone, under ``trim_offsets``) takes the rule's
    second tokenization.
    """
    pos = prompt.index("{}")
    text = prefix + prompt.replace("{}", subject)
    start = len(prefix) + pos
    end = start + len(subject)
    fast = _fast(tokenizer)
    trimmed, overlapping = True, []  # (a slow tokenizer has no offsets)
    if fast:
        enc = tokenizer(
            text,
            add_special_tokens=True,
            return_offsets_mapping=True,
            return_special_tokens_mask=True,
        )
        ids = _strip_tail(list(enc["input_ids"]), appended_tail(tokenizer))
        spans = enc["offset_mapping"][: len(ids)]
        overlapping = [i for i, (a, b) in enumerate(spans) if b > a and a < end and b > start]
        special = enc["special_tokens_mask"][: len(ids)]
        trimmed = not all(b > a or sp for (a, b), sp in zip(spans, special))
    else:
        ids = encode_prompt(tokenizer, text)
    if trimmed:
        upto = encode_prompt(tokenizer, text[:end])
        last = len(upto) - 1
        if last >= 0 and ids[: last + 1] == upto:
            return Encoded(tuple(ids), last)
        if not fast:
            raise SubjectNotFoundError(
                f"tokenization of {text!r} merges the subject {subject!r} with what follows "
                "and this tokenizer gives no offsets to resolve it"
            )
    if not overlapping:
        raise SubjectNotFoundError(
            f"no token of {text!r} covers the subject {subject!r} (characters {start}-{end})"
        )
    return Encoded(tuple(ids), overlapping[-1])


# Per tokenizer, the tokens it appends to every text (see appended_tail).
_TAILS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def appended_tail(tokenizer) -> tuple[int, ...]:
    """The special tokens ``tokenizer`` appends to every text: an EOS for tokenizers made
    with ``add_eos_token=True``, none for most causal-LM tokenizers. Found once per
    tokenizer on a probe: what follows the text's own tokens when it is encoded with its
    special tokens (what precedes them, a BOS, stays)."""
    # The switches that change what a tokenizer appends (Llama's add_eos_token rebuilds its
    # post-processor): a cached answer holds only while they do.
    state = (getattr(tokenizer, "add_eos_token", None), getattr(tokenizer, "add_bos_token", None))
    try:
        cached_state, tail = _TAILS[tokenizer]
        if cached_state == state:
            return tail
    except (KeyError, TypeError):
        pass
    probe = "The cat sat"
    full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    bare = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    tail = None
    if bare:
        for i in range(len(full) - len(bare) + 1):
            if full[i : i + len(bare)] == bare:
                tail = tuple(full[i + len(bare) :])
                break
    if tail is None:  # the text's tokens differ with specials: at least an EOS goes
        eos = getattr(tokenizer, "eos_token_id", None)
        tail = (eos,) if eos is not None and full and full[-1] == eos else ()
    try:
        _TAILS[tokenizer] = (state, tail)
    except TypeError:  # not weakly referenceable: probed again next time
        pass
    return tail


def _strip_tail(ids: list[int], tail: tuple[int, ...]) -> list[int]:
    """``ids`` without ``tail`` at its end (a prompt must end at its text, where the target
    follows, not at an end-of-sequence token)."""
    if tail and len(ids) > len(tail) and tuple(ids[-len(tail) :]) == tail:
        return ids[: -len(tail)]
    return ids


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a prompt: ``tokenizer(text)`` with the special tokens it adds in front
    (a BOS) and without those it appends (an EOS)."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    return _strip_tail(ids, appended_tail(tokenizer))


def with_leading_space(target: str) -> str:
    """MEMIT's convention: a target gets a leading space if it lacks one."""
    return target if target.startswith(" ") else " " + target


def encode_target(tokenizer, context: str, target: str) -> tuple[int, ...]:
    """Token ids of ``target`` (with MEMIT's leading space) as it continues ``context``
    (:func:`continuation_ids`)."""
    return continuation_ids(tokenizer, context, with_leading_space(target))


def continuation_ids(tokenizer, context: str, continuation: str) -> tuple[int, ...]:
    """Token ids of ``continuation`` (taken verbatim) after ``context``: the tokens of
    ``context + continuation`` after those of ``context``. Where the tokens of ``context``
    are not a prefix of them (a token straddles the boundary), the tokens that start at or
    after the end of ``context`` (by the tokenizer's offsets) if none straddles, else the
    continuation tokenized on its own. The editor's targets and the evaluation's scored
    continuations both come from here.
    """
    full = encode_prompt(tokenizer, context + continuation)
    head = encode_prompt(tokenizer, context)
    if full[: len(head)] == head and len(full) > len(head):
        return tuple(full[len(head) :])
    if _fast(tokenizer):
        enc = tokenizer(
            context + continuation,
            add_special_tokens=True,
            return_offsets_mapping=True,
            return_special_tokens_mask=True,
        )
        n = len(context)
        out = []
        clean = True
        for tid, (a, b), special in zip(
            enc["input_ids"], enc["offset_mapping"], enc["special_tokens_mask"]
        ):
            if special:
                continue
            if a >= n:
                out.append(tid)
            elif b > n:
                clean = False
        if clean and out:
            return tuple(out)
    return tuple(tokenizer(continuation, add_special_tokens=False)["input_ids"])


def pad_id(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        v = getattr(tokenizer, name, None)
        if v is not None:
            return int(v)
    return 0


def pad_right(
    seqs: Sequence[Sequence[int]], pad: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids (B, S)`` and ``attention_mask (B, S)`` with padding on the right. Built
    from one padded list and the lengths: a few tensor operations whatever ``B``, not a
    few per row (the target phase pads about 1,800 rows per chunk of 64 requests)."""
    lens = [len(s) for s in seqs]
    S = max(lens)
    ids = torch.tensor([[*s, *[pad] * (S - n)] for s, n in zip(seqs, lens)], dtype=torch.long)
    mask = (torch.arange(S)[None, :] < torch.tensor(lens)[:, None]).long()
    return ids.to(device), mask.to(device)


# ----------------------------------------------------------------------------- forward passes


def input_device(model) -> torch.device:
    """Where the model's inputs go: the device of its input embeddings (the first piece of
    a ``device_map`` split), else of its first parameter."""
    try:
        emb = model.get_input_embeddings()
        if emb is not None:
            return emb.weight.device
    except (AttributeError, NotImplementedError):
        pass
    return next(model.parameters()).device


@contextlib.contextmanager
def eval_mode(model):
    """``model.eval()`` inside; after, every submodule's own ``training`` flag as it was
    (``model.train(was_training)`` would also switch on the parts the caller froze)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, was in modes:
            m.training = was


@contextlib.contextmanager
def hooks(handles: list):
    try:
        yield handles
    finally:
        for h in handles:
            h.remove()


def forward_until(model, input_ids, attention_mask) -> None:
    """Run ``model`` and swallow :class:`StopForward` raised by a hook."""
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except StopForward:
        pass


class BlockRunner:
    """Runs blocks ``start …`` of a model on given hidden states, with the exact arguments the
    model passed to each block in a captured full forward (attention masks, rotary
    embeddings, position ids: whatever the architecture uses).

    ``capture`` runs the model once; afterwards ``run(hidden)`` recomputes blocks
    ``start … end-1`` from a modified input of block ``start``.
    """

    def __init__(self, adapter: ModelAdapter, start: int, end: int | None = None):
        self.adapter = adapter
        self.start = start
        self.end = adapter.n_layers if end is None else end
        self.calls: dict[int, tuple[tuple, dict, bool]] = {}

    def capture_hooks(self) -> list:
        """Forward pre-hooks that record the arguments of blocks ``start … end-1``."""
        handles = []
        for i in range(self.start, self.end):

            def pre(mod, args, kwargs, i=i):
                if args:
                    self.calls[i] = (tuple(args[1:]), dict(kwargs), True)
                else:
                    kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                    self.calls[i] = ((), kw, False)

            handles.append(self.adapter.block(i).register_forward_pre_hook(pre, with_kwargs=True))
        return handles

    def run(self, hidden: torch.Tensor) -> torch.Tensor:
        for i in range(self.start, self.end):
            args, kwargs, positional = self.calls[i]
            block = self.adapter.block(i)
            if positional:
                out = block(hidden, *args, **kwargs)
            else:
                out = block(*args, hidden_states=hidden, **kwargs)
            hidden = block_output(out)
        return hidden


@torch.no_grad()
def mlp_output_gain(model, adapter: ModelAdapter, layer: int, ids: Sequence[int]) -> float | None:
    """How block ``layer``'s output moves with its MLP projection's output: ``g`` where adding
    ``d`` to the projection's output adds ``g d`` to the block's output. 1 for the usual
    ``h + mlp(x)``; Granite's ``residual_multiplier`` and MiniCPM 3's depth scale multiply
    the MLP's output before the residual sum. ``None`` where no one factor holds: a norm
    after the MLP (Gemma 2/3, OLMo 2) or after the residual sum (post-norm OPT).

    Measured on the token sequence ``ids``: the block runs twice on its captured input, once
    with a random ``d`` (the size of the block's output) added to the projection's output; a
    block that is linear in it gives ``g`` to rounding."""
    dev = input_device(model)
    runner = BlockRunner(adapter, layer, layer + 1)
    got: dict[str, torch.Tensor] = {}

    def grab(mod, args, kwargs):
        got["h"] = args[0] if args else kwargs["hidden_states"]
        raise StopForward

    ids_t = torch.tensor([list(ids)], dtype=torch.long, device=dev)
    handles = runner.capture_hooks()
    handles.append(adapter.block(layer).register_forward_pre_hook(grab, with_kwargs=True))
    with hooks(handles):
        forward_until(model, ids_t, torch.ones_like(ids_t))
    base = runner.run(got["h"])
    gen = torch.Generator().manual_seed(0)
    scale = float(base.float().std()) or 1.0
    d = (torch.randn(base.shape, generator=gen, dtype=torch.float32) * scale).to(base.device)

    def add(mod, args, out):
        return out + d.reshape(out.shape).to(out.device, out.dtype)

    with hooks([adapter.mlp_out(layer).register_forward_hook(add)]):
        moved = runner.run(got["h"])
    dd = d.double().reshape(-1)
    dh = (moved.double() - base.double()).reshape(-1).to(dd.device)
    g = float(dh @ dd / (dd @ dd))
    err = float((dh - g * dd).norm() / dh.norm().clamp_min(1e-300))
    tol = 1e-3 if base.dtype in (torch.float32, torch.float64) else 5e-2
    return g if err <= tol and 1e-3 <= g <= 1e3 else None


# ----------------------------------------------------------------------------- keys and hidden


def keys_and_hidden(
    model,
    adapter: ModelAdapter,
    seqs: Sequence[Sequence[int]],
    positions: Sequence[int],
    key_layer: int,
    hidden_layer: int,
    pad: int,
    hidden_rows: Sequence[int] | None = None,
    batch_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Keys of block ``key_layer`` and outputs of block ``hidden_layer`` at one position per
    sequence. The forward stops after the deeper of the two blocks.

    Returns:
        ``keys (len(seqs), dk)`` fp32 and ``hidden (len(hidden_rows), dh)`` fp32 (or ``None``
        when ``hidden_rows`` is ``None``), row ``j`` of ``hidden`` for sequence
        ``hidden_rows[j]``, on the devices of the respective modules.
    """
    dev = input_device(model)
    # The hook of the deeper block ends the forward (the key's when they are the same block:
    # the projection's input comes before the block's output).
    key_stops = hidden_rows is None or key_layer > hidden_layer
    keys_out: list[torch.Tensor] = []
    hid_out: list[torch.Tensor] = []
    want_hidden = set(hidden_rows) if hidden_rows is not None else set()
    if any(not 0 <= r < len(seqs) for r in want_hidden):
        raise ValueError(f"hidden_rows {list(hidden_rows)} out of range for {len(seqs)} sequences")
    key_dev = adapter.mlp_out(key_layer).weight.device
    hid_dev = next(adapter.block(hidden_layer).parameters()).device
    for b0 in range(0, len(seqs), batch_size):
        idx = list(range(b0, min(len(seqs), b0 + batch_size)))
        ids, mask = pad_right([seqs[i] for i in idx], pad, dev)
        # Indices built before the forward, on the devices of the layers that read them (a
        # copy from the host inside a hook would stall the queue in mid-forward).
        pos_list = [positions[i] for i in idx]
        hrows = [j for j, i in enumerate(idx) if i in want_hidden]
        key_pos = torch.tensor(pos_list, dtype=torch.long).to(key_dev, non_blocking=True)
        hid_rows = torch.tensor(hrows, dtype=torch.long).to(hid_dev, non_blocking=True)
        hid_pos = torch.tensor([pos_list[j] for j in hrows], dtype=torch.long).to(
            hid_dev, non_blocking=True
        )
        got: dict[str, torch.Tensor] = {}
        nb = len(pos_list)

        def key_hook(mod, args, key_pos=key_pos, got=got, b=nb):
            x = args[0]
            if x.dim() == 2:  # OPT's MLP takes the batch's tokens flattened
                x = x.view(b, -1, x.shape[-1])
            rows = torch.arange(x.shape[0], device=x.device)
            got["k"] = x[rows, key_pos.to(x.device)].float()
            if key_stops:
                raise StopForward

        def hid_hook(mod, args, out, got=got, hid_rows=hid_rows, hid_pos=hid_pos):
            h = block_output(out)
            got["h"] = h[hid_rows.to(h.device), hid_pos.to(h.device)].float()
            if not key_stops:
                raise StopForward

        handles = [adapter.mlp_out(key_layer).register_forward_pre_hook(key_hook)]
        if hidden_rows is not None:
            handles.append(adapter.block(hidden_layer).register_forward_hook(hid_hook))
        with hooks(handles), torch.no_grad():
            forward_until(model, ids, mask)
        keys_out.append(got["k"])
        if hidden_rows is not None:
            hid_out.append(got["h"])
    keys = torch.cat(keys_out)
    if hidden_rows is None:
        return keys, None
    hidden = torch.cat(hid_out)  # one row per sequence of want_hidden, in sequence order
    order = sorted(want_hidden)
    if list(hidden_rows) != order:
        where = {r: j for j, r in enumerate(order)}
        sel = torch.tensor([where[r] for r in hidden_rows], dtype=torch.long)
        hidden = hidden[sel.to(hidden.device)]
    return keys, hidden
