"""Step 1 of MEMIT: a target vector ``z_i = h_i + delta_i`` per request, all requests of a
chunk optimized together.

For request ``i`` with rewriting prompts ``p`` (each context template applied to the prompt,
followed by the target tokens except the last, teacher forcing) and the KL prompt
``kl_prompt`` (``"{} is a"``), minimize

    nll_i(delta) = mean_p  -(sum_t log P(target_t | p, delta)) / len(target)
    kl_i(delta)  = KL(P_before(. | kl) || P_delta(. | kl))   at the last subject token
    loss_i       = nll_i + kl_factor * kl_i + weight_decay * ||delta|| / ||h_i||^2

where ``delta`` is added to block ``L``'s output at the last subject token of each prompt.
Adam (``lr``), at most ``steps`` iterations; request ``i`` stops once ``loss_i`` falls below
``early_stop_loss``; after each step ``||delta_i||`` is clamped to ``clamp * ||h_i||``.

The batch is one ``[n, dh]`` parameter with a hand-written Adam whose state is per row and
whose update is masked per row, so each request follows exactly the trajectory it would have
alone. Blocks ``0 … L`` do not depend on ``delta``: they run once per chunk, their output is
cached, and each step runs only the blocks after ``L`` (with the arguments the model passed
them, captured in that first pass) and the head at the positions the loss reads.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from memit_fast.arch import ModelAdapter, block_output
from memit_fast.keys import (
    BlockRunner,
    Encoded,
    forward_until,
    hooks,
    input_device,
    pad_right,
)

log = logging.getLogger(__name__)

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


@dataclass(frozen=True)
class PreparedRequest:
    """Tokenized form of one request.

    ``rewrites[t]``: the prompt under context template ``t`` (subject filled, no target);
    ``target_ids``: target tokens; ``kl``: the KL prompt.
    """

    rewrites: tuple[Encoded, ...]
    target_ids: tuple[int, ...]
    kl: Encoded


@dataclass
class TargetResult:
    """Per-request results of the optimization (rows follow the request order).

    z: ``(n, dh)`` fp32 target vectors; h: ``(n, dh)`` fp32 initial hidden states;
    loss, nll, kl: fp32 ``(n,)`` at the last evaluation; steps: ``(n,)`` int64 Adam steps
    applied; target_prob: ``exp(-nll)`` (mean per-token probability, geometric).
    """

    z: torch.Tensor
    h: torch.Tensor
    loss: torch.Tensor
    nll: torch.Tensor
    kl: torch.Tensor
    steps: torch.Tensor

    @property
    def target_prob(self) -> torch.Tensor:
        return torch.exp(-self.nll)

    @property
    def delta_norm(self) -> torch.Tensor:
        return (self.z - self.h).norm(dim=1)


@dataclass(frozen=True)
class TargetSettings:
    layer: int
    steps: int
    lr: float
    clamp_norm_factor: float
    weight_decay: float
    kl_factor: float
    early_stop_loss: float
    sync_every: int = 5


class _Batch:
    """Index tensors of one chunk's padded batch of sequences."""

    def __init__(self, prepared: Sequence[PreparedRequest], pad: int, device: torch.device):
        seqs, req_of_seq, lookup = [], [], []
        t_rows, t_cols, t_tok, t_req, t_w = [], [], [], [], []
        kl_rows, kl_cols = [], []
        h_rows, h_cols = [], []
        for i, p in enumerate(prepared):
            n_t = len(p.rewrites)
            tgt = p.target_ids
            for t, enc in enumerate(p.rewrites):
                row = len(seqs)
                ids = list(enc.ids) + list(tgt[:-1])
                seqs.append(ids)
                req_of_seq.append(i)
                lookup.append(enc.subject_last)
                if t == 0:
                    h_rows.append(row)
                    h_cols.append(enc.subject_last)
                first = len(enc.ids) - 1  # the logit here predicts target[0]
                for j, tok in enumerate(tgt):
                    t_rows.append(row)
                    t_cols.append(first + j)
                    t_tok.append(tok)
                    t_req.append(i)
                    t_w.append(1.0 / (len(tgt) * n_t))
            row = len(seqs)
            seqs.append(list(p.kl.ids))
            req_of_seq.append(i)
            lookup.append(p.kl.subject_last)
            kl_rows.append(row)
            kl_cols.append(p.kl.subject_last)

        def lt(x):
            return torch.tensor(x, dtype=torch.long, device=device)

        self.n = len(prepared)
        self.input_ids, self.attention_mask = pad_right(seqs, pad, device)
        self.req_of_seq = lt(req_of_seq)
        self.seq_idx = torch.arange(len(seqs), device=device)
        self.lookup = lt(lookup)
        self.t_rows, self.t_cols, self.t_tok, self.t_req = (
            lt(t_rows),
            lt(t_cols),
            lt(t_tok),
            lt(t_req),
        )
        self.t_w = torch.tensor(t_w, dtype=torch.float32, device=device)
        self.kl_rows, self.kl_cols = lt(kl_rows), lt(kl_cols)
        self.h_rows, self.h_cols = lt(h_rows), lt(h_cols)


def _logits_at(
    adapter: ModelAdapter,
    runner: BlockRunner | None,
    hidden_L: torch.Tensor,
    batch: _Batch,
    delta: torch.Tensor,
) -> torch.Tensor:
    """Log-probabilities ``(P, V)`` fp32 at the loss positions (target positions first, then
    the KL positions), with ``delta[i]`` added to block L's output at request ``i``'s lookup
    positions."""
    dev = hidden_L.device
    rows, cols = batch.seq_idx.to(dev), batch.lookup.to(dev)
    add = delta.to(dev)[batch.req_of_seq.to(dev)]
    edited = (hidden_L[rows, cols].float() + add).to(hidden_L.dtype)
    h = hidden_L.index_put((rows, cols), edited)
    if runner is not None:
        h = runner.run(h)
    prow = torch.cat([batch.t_rows, batch.kl_rows]).to(h.device)
    pcol = torch.cat([batch.t_cols, batch.kl_cols]).to(h.device)
    hs = h[prow, pcol]
    hs = adapter.final_norm(hs.to(_param_device(adapter.final_norm, hs.device)))
    logits = adapter.head(hs.to(adapter.head.weight.device))
    return F.log_softmax(logits.float(), dim=-1)


def _param_device(module, default):
    for p in module.parameters():
        return p.device
    return default


def optimize_chunk(
    model,
    adapter: ModelAdapter,
    prepared: Sequence[PreparedRequest],
    settings: TargetSettings,
    pad: int,
) -> TargetResult:
    """Target vectors for one chunk of requests (see the module docstring)."""
    L = settings.layer
    dev_in = input_device(model)
    batch = _Batch(prepared, pad, dev_in)
    n = batch.n

    # One pass through the whole model: cache block L's output and record the arguments of
    # the blocks after it.
    runner = BlockRunner(adapter, L + 1) if L + 1 < adapter.n_layers else None
    cache: dict[str, torch.Tensor] = {}

    def grab(mod, args, out):
        cache["h"] = block_output(out).detach()

    handles = [adapter.block(L).register_forward_hook(grab)]
    if runner is not None:
        handles += runner.capture_hooks()
    with hooks(handles), torch.no_grad():
        forward_until(model, batch.input_ids, batch.attention_mask)
    hidden_L = cache["h"]
    dev = hidden_L.device
    h0 = hidden_L[batch.h_rows.to(dev), batch.h_cols.to(dev)].float()  # (n, dh)
    h_norm = h0.norm(dim=1)
    max_norm = settings.clamp_norm_factor * h_norm

    dh = h0.shape[1]
    delta = torch.zeros(n, dh, dtype=torch.float32, device=dev)
    m = torch.zeros_like(delta)
    v = torch.zeros_like(delta)
    active = torch.ones(n, dtype=torch.bool, device=dev)
    steps_used = torch.zeros(n, dtype=torch.long, device=dev)
    loss_last = torch.zeros(n, device=dev)
    nll_last = torch.zeros(n, device=dev)
    kl_last = torch.zeros(n, device=dev)
    kl_init = None
    n_t = batch.t_rows.numel()
    b1, b2 = ADAM_BETAS

    for it in range(settings.steps):
        with torch.enable_grad():
            d = delta.detach().requires_grad_(True)
            logp = _logits_at(adapter, runner, hidden_L, batch, d)
            ldev = logp.device
            tok_lp = logp[:n_t].gather(1, batch.t_tok.to(ldev)[:, None]).squeeze(1)
            nll = torch.zeros(n, device=ldev).index_add(
                0, batch.t_req.to(ldev), -tok_lp * batch.t_w.to(ldev)
            )
            kl_lp = logp[n_t:]
            if kl_init is None:
                kl_init = kl_lp.detach()
            kl = (kl_init.exp() * (kl_init - kl_lp)).sum(dim=1)
            nll, kl = nll.to(dev), kl.to(dev)
            wd = settings.weight_decay * d.norm(dim=1) / h_norm**2
            loss = nll + settings.kl_factor * kl + wd
            # Record the figures of the requests still running; stop those below threshold.
            loss_last = torch.where(active, loss.detach(), loss_last)
            nll_last = torch.where(active, nll.detach(), nll_last)
            kl_last = torch.where(active, kl.detach(), kl_last)
            active = active & (loss.detach() >= settings.early_stop_loss)
            if it == settings.steps - 1:
                break
            if settings.sync_every and (it + 1) % settings.sync_every == 0:
                if not bool(active.any()):
                    break
            (grad,) = torch.autograd.grad(loss.sum(), d)
        # Adam, per row, applied to the rows still active (torch.optim.Adam's arithmetic).
        t = it + 1
        upd = active[:, None]
        m = torch.where(upd, m.lerp(grad, 1 - b1), m)
        v = torch.where(upd, v * b2 + (1 - b2) * grad * grad, v)
        step_size = settings.lr / (1 - b1**t)
        denom = v.sqrt() / math.sqrt(1 - b2**t) + ADAM_EPS
        new = delta - step_size * m / denom
        # Clamp the norm of each row.
        nrm = new.norm(dim=1)
        scale = torch.where(nrm > max_norm, max_norm / nrm, torch.ones_like(nrm))
        new = new * scale[:, None]
        delta = torch.where(upd, new, delta)
        steps_used = steps_used + active.long()

    return TargetResult(
        z=h0 + delta,
        h=h0,
        loss=loss_last,
        nll=nll_last,
        kl=kl_last,
        steps=steps_used,
    )


def is_oom(e: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None)
    if oom is not None and isinstance(e, oom):
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


def compute_targets(
    model,
    adapter: ModelAdapter,
    prepared: Sequence[PreparedRequest],
    settings: TargetSettings,
    pad: int,
    chunk_size: int,
    progress: bool = False,
) -> TargetResult:
    """Target vectors for all requests, ``chunk_size`` requests at a time. On out-of-memory
    the chunk is halved and the work goes on (a warning says so); the result is the same,
    since each request's trajectory does not depend on its batch."""
    parts: list[TargetResult] = []
    i = 0
    size = chunk_size
    pbar = None
    if progress:
        from tqdm.auto import tqdm

        pbar = tqdm(total=len(prepared), desc="target vectors", unit="req")
    while i < len(prepared):
        chunk = prepared[i : i + size]
        try:
            parts.append(optimize_chunk(model, adapter, chunk, settings, pad))
        except Exception as e:
            if not is_oom(e) or size == 1:
                raise
            size = max(1, size // 2)
            log.warning("out of memory in the target phase; continuing with chunks of %d", size)
            _empty_cache()
            continue
        i += len(chunk)
        if pbar is not None:
            pbar.update(len(chunk))
    if pbar is not None:
        pbar.close()
    dev = parts[0].z.device
    return TargetResult(
        z=torch.cat([p.z.to(dev) for p in parts]),
        h=torch.cat([p.h.to(dev) for p in parts]),
        loss=torch.cat([p.loss.to(dev) for p in parts]),
        nll=torch.cat([p.nll.to(dev) for p in parts]),
        kl=torch.cat([p.kl.to(dev) for p in parts]),
        steps=torch.cat([p.steps.to(dev) for p in parts]),
    )


def _empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
