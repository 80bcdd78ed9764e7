"""The engine run with the *structure* of the published MEMIT code, for side-by-side timing.

This exists only so that every benchmark result can carry the ratio "fast / published
structure" measured in the same process, on the same model, requests, tokenization,
configuration, context templates, statistics corpus and evaluation. It computes the same
function as :meth:`memit_fast.Editor.apply` (checked in ``tests/test_published_mode.py``);
what differs is how the work is laid out, as in the published code (kmeng01/memit):

- statistics: one corpus pass *per edited layer*, keys accumulated as ``mom2 += X^T X`` in
  fp32 (``layer_stats``). ``stats_structure="stop"`` ends each pass inside its layer, as
  the published ``Trace(..., stop=True)`` does; ``"full"`` runs the whole model (head
  included) every pass.
- target vectors: one request at a time (``compute_z``); every step runs the *whole* model
  on the request's prompts, with the delta added through a forward hook on block ``L``,
  the head at every position, ``torch.optim.Adam`` on a ``(dh,)`` parameter and a
  ``loss.item()`` host sync per step (the early-stop test).
- keys and hidden states: per layer, whole-model forwards of every request's prompts
  (``compute_ks`` and ``get_module_input_output_at_words``, no early stop), in batches of
  ``key_batch_size`` prompts.
- the solve: a float64 LU solve (``torch.linalg.solve``) of ``lambda C + K K^T`` per layer.
- the update: the dense ``(dh, dk)`` float64 ``R U^T`` materialized, then added.

Everything else (``Editor.prepare``, the config, ``EditResult`` and revert) is the engine's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from memit_fast.arch import block_output, replace_block_output
from memit_fast.data import normalize_requests
from memit_fast.editor import (
    EditFailedError,
    Editor,
    EditResult,
    _average_keys,
    _clock,
)
from memit_fast.keys import (
    StopForward,
    eval_mode,
    forward_until,
    hooks,
    input_device,
    pad_id,
    pad_right,
)
from memit_fast.stats import LayerStats, read_corpus
from memit_fast.targets import PreparedRequest, TargetResult, TargetSettings

STATS_STRUCTURES = ("stop", "full")


@contextlib.contextmanager
def _frozen(model):
    """``requires_grad=False`` on every parameter (as the published code sets it), restored
    afterwards."""
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _tokenize_corpus(tokenizer, source, samples: int, max_length: int) -> list[list[int]]:
    """The texts ``collect_stats`` reads, tokenized the same way (truncated, specials on)."""
    out: list[list[int]] = []
    for text in read_corpus(source):
        if len(out) >= samples:
            break
        ids = tokenizer(text, add_special_tokens=True, truncation=True, max_length=max_length)[
            "input_ids"
        ]
        if ids:
            out.append(list(ids))
    return out


def layer_pass(
    model,
    adapter,
    layer: int,
    texts: Sequence[Sequence[int]],
    *,
    pad: int,
    batch_size: int,
    stop: bool,
) -> LayerStats:
    """One corpus pass for one layer, as the published ``layer_stats``: every non-padding
    token's key ``x`` adds ``x x^T`` to an fp32 accumulator (``mom2 += X^T X``).

    ``texts`` are token ids; batches of ``batch_size`` in the given order, padded on the
    right. ``stop``: end the forward inside block ``layer`` (the published code's
    ``Trace(stop=True)``); otherwise the whole model runs, head included.
    """
    dk, _ = adapter.dims()
    dev = adapter.weight(layer).device
    acc = torch.zeros(dk, dk, dtype=torch.float32, device=dev)
    count = 0
    state: dict[str, torch.Tensor] = {}

    def hook(mod, args):
        x = args[0]
        m = state["mask"].to(x.device).bool()
        feats = x[m].to(torch.float32)  # (tokens, dk): flatten_masked_batch
        acc.addmm_(feats.T, feats)
        if stop:
            raise StopForward

    dev_in = input_device(model)
    with hooks([adapter.mlp_out(layer).register_forward_pre_hook(hook)]), torch.no_grad():
        for b in range(0, len(texts), batch_size):
            ids, mask = pad_right(texts[b : b + batch_size], pad, dev_in)
            state["mask"] = mask
            if stop:
                forward_until(model, ids, mask)
            else:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            count += int(mask.sum())
    if count == 0:
        raise ValueError("the statistics corpus produced no tokens")
    return LayerStats(mom2=acc / count, count=count)


def per_layer_stats(
    editor: Editor,
    layers: Sequence[int],
    *,
    stop: bool = True,
    texts: Sequence[Sequence[int]] | None = None,
) -> dict[int, LayerStats]:
    """Statistics for ``layers``, one corpus pass per layer, over the editor's corpus and
    the config's sample count, length and batch size (the texts ``collect_stats`` reads).
    Texts are sorted by length in groups as ``collect_stats`` does, so the batches match."""
    c = editor.config
    ad = editor.adapter
    if texts is None:
        max_len = editor.stats_length()
        texts = _tokenize_corpus(editor.tokenizer, editor._stats_source(), c.stats_samples, max_len)
    texts = _grouped_order(texts, c.stats_batch_size)
    pad = pad_id(editor.tokenizer)
    with eval_mode(editor.model):
        return {
            l: layer_pass(
                editor.model,
                ad,
                l,
                texts,
                pad=pad,
                batch_size=c.stats_batch_size,
                stop=stop,
            )
            for l in layers
        }


def _grouped_order(texts: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """``collect_stats``'s batching: groups of ``16 * batch_size`` texts, each sorted by
    length, so both structures see identical batches."""
    out: list[list[int]] = []
    g = batch_size * 16
    for i in range(0, len(texts), g):
        out.extend(sorted((list(t) for t in texts[i : i + g]), key=len))
    return out


def target_one(
    model,
    adapter,
    p: PreparedRequest,
    s: TargetSettings,
    *,
    pad: int,
) -> dict[str, Any]:
    """One request's target vector, as the published ``compute_z``: the whole model each
    step, the delta added at every prompt's last subject token by a forward hook on block
    ``s.layer``, ``torch.optim.Adam``, ``loss.item()`` every step (``s.sync_every`` and
    ``s.reuse_prefix`` are the batched engine's, unused here)."""
    tgt = list(p.target_ids)
    seqs = [list(e.ids) + tgt[:-1] for e in p.rewrites] + [list(p.kl.ids)]
    looks = [e.subject_last for e in p.rewrites] + [p.kl.subject_last]
    n_rw = len(p.rewrites)
    dev = input_device(model)
    ids, mask = pad_right(seqs, pad, dev)
    block = adapter.block(s.layer)
    dh = adapter.dims()[1]
    delta = torch.zeros(dh, dtype=torch.float32, device=adapter.weight(s.layer).device)
    delta.requires_grad_(True)
    state: dict[str, torch.Tensor] = {}
    rows = torch.arange(len(seqs), device=dev)
    cols = torch.tensor(looks, device=dev)

    def edit_output(mod, args, out):
        h = block_output(out)
        if "h0" not in state:
            state["h0"] = h[0, looks[0]].detach().float().clone()
        r, c = rows.to(h.device), cols.to(h.device)
        edited = (h[r, c].float() + delta.to(h.device)).to(h.dtype)
        return replace_block_output(out, h.index_put((r, c), edited))

    # Loss positions: logits at position len(prompt)-1+j predict target token j.
    t_rows, t_cols, t_tok = [], [], []
    for i, e in enumerate(p.rewrites):
        for j, tok in enumerate(tgt):
            t_rows.append(i)
            t_cols.append(len(e.ids) - 1 + j)
            t_tok.append(tok)
    opt = torch.optim.Adam([delta], lr=s.lr)
    kl_init = None
    taken = 0
    figures: dict[str, float] = {}
    with hooks([block.register_forward_hook(edit_output)]), _frozen(model):
        for it in range(s.steps):
            opt.zero_grad()
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            log_probs = torch.log_softmax(logits.float(), dim=2)  # every position, every row
            lp = log_probs[t_rows, t_cols, t_tok].reshape(n_rw, len(tgt))
            nll = -(lp.sum(dim=1) / len(tgt)).mean()
            kl_lp = log_probs[n_rw, p.kl.subject_last]
            if kl_init is None:
                kl_init = kl_lp.detach().clone()
            kl = F.kl_div(kl_lp, kl_init, log_target=True, reduction="sum")
            h0 = state["h0"]
            wd = s.weight_decay * delta.norm() / h0.norm() ** 2
            loss = nll + s.kl_factor * kl + wd
            figures = {"loss": loss.item(), "nll": nll.item(), "kl": kl.item()}  # host syncs
            if figures["loss"] < s.early_stop_loss or it == s.steps - 1:
                break
            loss.backward()
            opt.step()
            taken += 1
            with torch.no_grad():
                max_norm = s.clamp_norm_factor * h0.norm()
                if delta.norm() > max_norm:
                    delta.mul_(max_norm / delta.norm())
    h0 = state["h0"].to(delta.device)
    return {"z": h0 + delta.detach(), "h": h0, "steps": taken, **figures}


def keys_and_hidden_full(
    model,
    adapter,
    seqs: Sequence[Sequence[int]],
    positions: Sequence[int],
    *,
    layer: int,
    hidden_layer: int | None,
    pad: int,
    batch_size: int,
) -> torch.Tensor:
    """Keys of block ``layer`` (``hidden_layer is None``) or outputs of block
    ``hidden_layer`` at one position per sequence, whole-model forwards in batches
    (``get_reprs_at_idxs``). Returns ``(len(seqs), d)`` fp32."""
    dev = input_device(model)
    out: list[torch.Tensor] = []
    for b in range(0, len(seqs), batch_size):
        ids, mask = pad_right(seqs[b : b + batch_size], pad, dev)
        pos = torch.tensor(positions[b : b + batch_size], dtype=torch.long)
        got: dict[str, torch.Tensor] = {}
        if hidden_layer is None:

            def grab(mod, args, pos=pos, got=got):
                x = args[0]
                got["x"] = x[torch.arange(x.shape[0], device=x.device), pos.to(x.device)]

            handle = adapter.mlp_out(layer).register_forward_pre_hook(grab)
        else:

            def grab(mod, args, o, pos=pos, got=got):
                h = block_output(o)
                got["x"] = h[torch.arange(h.shape[0], device=h.device), pos.to(h.device)]

            handle = adapter.block(hidden_layer).register_forward_hook(grab)
        with hooks([handle]), torch.no_grad():
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        out.append(got["x"].float())
    return torch.cat(out)


class PublishedStructureEditor:
    """``Editor.apply`` laid out as the published code (see the module docstring).

    Args:
        editor: the engine's :class:`~memit_fast.Editor` whose model, tokenizer, config,
            corpus and tokenization are used (its in-memory statistics are not: this mode
            computes its own, one pass per layer).
        stats_structure: ``"stop"`` (each per-layer pass ends inside its layer, as the
            published code) or ``"full"`` (the whole model every pass).
        key_batch_size: prompts per whole-model forward for keys and hidden states.
    """

    def __init__(self, editor: Editor, stats_structure: str = "stop", key_batch_size: int = 512):
        if stats_structure not in STATS_STRUCTURES:
            raise ValueError(f"stats_structure must be one of {STATS_STRUCTURES}")
        self.editor = editor
        self.stats_structure = stats_structure
        self.key_batch_size = key_batch_size

    def apply(self, requests: Iterable[Any], stats: dict[int, LayerStats] | None = None):
        """Edit the model in place; returns an :class:`~memit_fast.editor.EditResult` with
        the same timings keys as the engine's. ``stats``: skip the corpus passes."""
        ed = self.editor
        c = ed.config
        ad = ed.adapter
        model = ed.model
        layers = c.layers
        L = layers[-1]
        pad = pad_id(ed.tokenizer)
        timings: dict[str, float] = {}
        t0 = _clock()
        reqs = normalize_requests(requests)
        with eval_mode(model):
            tick = _clock()
            templates = ed.context_templates()
            timings["context_templates"] = _clock() - tick
            prepared = ed.prepare(reqs, templates)
            timings["validate"] = _clock() - t0 - timings["context_templates"]

            tick = _clock()
            if stats is None:
                stats = per_layer_stats(ed, layers, stop=self.stats_structure == "stop")
            timings["statistics"] = _clock() - tick

            tick = _clock()
            settings = TargetSettings.from_config(c, L)
            per = [target_one(model, ad, p, settings, pad=pad) for p in prepared]
            tr = TargetResult(
                z=torch.stack([r["z"] for r in per]),
                h=torch.stack([r["h"] for r in per]),
                loss=torch.tensor([r["loss"] for r in per]),
                nll=torch.tensor([r["nll"] for r in per]),
                kl=torch.tensor([r["kl"] for r in per]),
                steps=torch.tensor([r["steps"] for r in per], dtype=torch.long),
            )
            timings["targets"] = _clock() - tick

            n, T = len(prepared), len(templates)
            seqs = [list(e.ids) for p in prepared for e in p.rewrites]
            pos = [e.subject_last for p in prepared for e in p.rewrites]
            bare = [list(p.rewrites[0].ids) for p in prepared]
            bare_pos = [p.rewrites[0].subject_last for p in prepared]
            originals: dict[int, torch.Tensor] = {}
            factors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
            for k in ("keys", "solve", "update"):
                timings[k] = 0.0
            kb = self.key_batch_size
            try:
                for j, l in enumerate(layers):
                    tick = _clock()
                    k_all = keys_and_hidden_full(
                        model, ad, seqs, pos, layer=l, hidden_layer=None, pad=pad, batch_size=kb
                    )
                    K = _average_keys(k_all, n, T)  # (dk, n)
                    H = keys_and_hidden_full(
                        model, ad, bare, bare_pos, layer=l, hidden_layer=L, pad=pad, batch_size=kb
                    )
                    timings["keys"] += _clock() - tick
                    tick = _clock()
                    C = stats[l].mom2
                    Kd = K.to(C.device, torch.float64)
                    Rd = ((tr.z.to(H.device) - H).T / (len(layers) - j)).to(C.device)
                    U = torch.linalg.solve(c.mom2_update_weight * C.double() + Kd @ Kd.T, Kd)
                    timings["solve"] += _clock() - tick
                    if not torch.isfinite(U).all():
                        raise EditFailedError(f"layer {l}: the update is not finite")
                    tick = _clock()
                    W = ad.weight(l)
                    upd = Rd.double() @ U.T  # (dh, dk) dense, float64
                    with torch.no_grad():
                        if l not in originals:
                            originals[l] = W.detach().clone()
                        upd = upd.T if ad.transposed else upd
                        W.copy_((W.double() + upd.to(W.device)).to(W.dtype))
                    timings["update"] += _clock() - tick
                    factors[l] = (Rd.float(), U.float())
            except BaseException:
                with torch.no_grad():
                    for l, w0 in originals.items():
                        ad.weight(l).copy_(w0)
                raise
        timings["total"] = _clock() - t0
        return EditResult(
            config=c.replace(context_templates=tuple(templates)),
            requests=list(reqs),
            layers=tuple(layers),
            factors=factors,
            targets=tr,
            timings=timings,
            weight_names={l: ad.weight_name(l) for l in layers},
            transposed=ad.transposed,
            _originals=originals,
            _adapter=ad,
        )
