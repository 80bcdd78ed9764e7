"""An independent, deliberately plain implementation of MEMIT (DESIGN §2) for tests.

One request at a time, the whole model every optimization step (the edit enters through a
forward hook on block L), ``torch.optim.Adam``, per-layer corpus passes one text at a time in
float64, and a float64 ``torch.linalg.solve``. Tokenization follows the published rule:
the subject's last token is ``len(tok(text up to the end of the subject)) - 1``. It shares no
code with the engine.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def blocks_of(model):
    """(blocks, block -> MLP output projection, weight stored transposed?) of ``model``."""
    mt = model.config.model_type
    if mt == "gpt2":
        return model.transformer.h, (lambda b: b.mlp.c_proj), True
    if mt == "gptj":
        return model.transformer.h, (lambda b: b.mlp.fc_out), False
    if mt == "gpt_neox":
        return model.gpt_neox.layers, (lambda b: b.mlp.dense_4h_to_h), False
    if mt in ("falcon", "bloom"):
        return model.transformer.h, (lambda b: b.mlp.dense_4h_to_h), False
    if mt == "gpt_bigcode":
        return model.transformer.h, (lambda b: b.mlp.c_proj), False
    if mt == "phi":
        return model.model.layers, (lambda b: b.mlp.fc2), False
    if mt == "starcoder2":
        return model.model.layers, (lambda b: b.mlp.c_proj), False
    if mt == "gemma3":  # image-text: the language model's blocks
        return model.model.language_model.layers, (lambda b: b.mlp.down_proj), False
    if hasattr(model, "model") and hasattr(model.model, "layers"):
        return model.model.layers, (lambda b: b.mlp.down_proj), False  # the Llama layout
    raise NotImplementedError(mt)


def residual_branch_multiplier(cfg) -> float:
    """What a family's blocks multiply their MLP's output by before adding it to the residual
    stream, from its config (1 for most)."""
    if cfg.model_type == "minicpm3":
        return cfg.scale_depth / cfg.num_hidden_layers**0.5
    return float(getattr(cfg, "residual_multiplier", 1.0))


def _out(o):
    return o[0] if isinstance(o, tuple) else o


def _tok(tok, text, special=True):
    return list(tok(text, add_special_tokens=special)["input_ids"])


def encode(tok, prefix, prompt, subject):
    i = prompt.index("{}")
    ids = _tok(tok, prefix + prompt.replace("{}", subject))
    last = len(_tok(tok, prefix + prompt[:i] + subject)) - 1
    return ids, last


def target_ids(tok, target):
    t = target if target.startswith(" ") else " " + target
    return _tok(tok, t, special=False)


def ref_stats(model, tok, layer, texts, max_length):
    """float64 mean of k k^T over every token of every text, one text per forward."""
    blocks, proj, _ = blocks_of(model)
    acc = None
    count = 0
    got = {}
    h = proj(blocks[layer]).register_forward_pre_hook(lambda m, a: got.__setitem__("x", a[0]))
    try:
        with torch.no_grad():
            for t in texts:
                ids = _tok(tok, t)[:max_length]
                model(input_ids=torch.tensor([ids]))
                x = got["x"][0].double()
                acc = x.T @ x if acc is None else acc + x.T @ x
                count += x.shape[0]
    finally:
        h.remove()
    return acc / count


def ref_target(
    model,
    tok,
    req,
    templates,
    layer,
    steps,
    lr,
    clamp,
    wd,
    kl_factor,
    stop_loss,
    kl_prompt="{} is a",
):
    """One request's target vector z (fp32, (dh,)) and the number of Adam steps taken."""
    blocks, _, _ = blocks_of(model)
    tgt = target_ids(tok, req["target"])
    seqs, looks = [], []
    for t in templates:
        ids, last = encode(tok, t[: t.index("{}")], req["prompt"], req["subject"])
        seqs.append(ids + tgt[:-1])
        looks.append(last)
    n_rw = len(seqs)
    ids, last = encode(tok, "", kl_prompt, req["subject"])
    seqs.append(ids)
    looks.append(last)
    S = max(len(s) for s in seqs)
    input_ids = torch.zeros(len(seqs), S, dtype=torch.long)
    mask = torch.zeros(len(seqs), S, dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1

    cfg = getattr(model.config, "text_config", None) or model.config
    delta = torch.zeros(
        cfg.hidden_size if hasattr(cfg, "hidden_size") else cfg.n_embd, requires_grad=True
    )
    state = {}

    def hook(mod, args, out):
        h = _out(out)
        if "h0" not in state:
            state["h0"] = h[0, looks[0]].detach().float().clone()
        h = h.clone()
        for i, p in enumerate(looks):
            h[i, p] = (h[i, p].float() + delta).to(h.dtype)
        return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h

    opt = torch.optim.Adam([delta], lr=lr)
    handle = blocks[layer].register_forward_hook(hook)
    kl_init = None
    taken = 0
    try:
        for it in range(steps):
            opt.zero_grad()
            logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
            logp = F.log_softmax(logits.float(), dim=-1)
            nlls = []
            for i in range(n_rw):
                n = int(mask[i].sum())
                lp = 0.0
                for j, t in enumerate(tgt):
                    lp = lp + logp[i, n - len(tgt) + j, t]
                nlls.append(-lp / len(tgt))
            nll = torch.stack(nlls).mean()
            kl_lp = logp[n_rw, looks[n_rw]]
            if kl_init is None:
                kl_init = kl_lp.detach().clone()
            kl = (kl_init.exp() * (kl_init - kl_lp)).sum()
            h0 = state["h0"]
            loss = nll + kl_factor * kl + wd * delta.norm() / h0.norm() ** 2
            if loss.item() < stop_loss or it == steps - 1:
                break
            loss.backward()
            opt.step()
            taken += 1
            with torch.no_grad():
                mx = clamp * h0.norm()
                if delta.norm() > mx:
                    delta.mul_(mx / delta.norm())
    finally:
        handle.remove()
    return (state["h0"] + delta.detach()), taken


def ref_key_and_hidden(model, tok, req, templates, key_layer, z_layer):
    blocks, proj, _ = blocks_of(model)
    keys = []
    hid = None
    for ti, t in enumerate(templates):
        ids, last = encode(tok, t[: t.index("{}")], req["prompt"], req["subject"])
        got = {}
        h1 = proj(blocks[key_layer]).register_forward_pre_hook(
            lambda m, a, got=got, last=last: got.__setitem__("k", a[0][0, last].double())
        )
        h2 = blocks[z_layer].register_forward_hook(
            lambda m, a, o, got=got, last=last: got.__setitem__("h", _out(o)[0, last].double())
        )
        try:
            with torch.no_grad():
                model(input_ids=torch.tensor([ids]))
        finally:
            h1.remove()
            h2.remove()
        keys.append(got["k"])
        if ti == 0:
            hid = got["h"]
    k = keys[0] if len(keys) == 1 else 0.5 * (keys[0] + torch.stack(keys[1:]).mean(0))
    return k, hid


def ref_memit(
    model,
    tok,
    requests,
    templates,
    layers,
    stats,
    *,
    steps,
    lr,
    clamp,
    wd,
    kl_factor,
    stop_loss,
    lam,
    systems=None,
):
    """Apply MEMIT to ``model`` in place. Returns (Z (n, dh), steps per request, {layer: dW
    in (dh, dk) orientation, float64}). ``systems``, a dict if given, receives each layer's
    matrix ``A = lam C + K K^T`` (float64)."""
    blocks, proj, transposed = blocks_of(model)
    L = layers[-1]
    zs, taken = [], []
    for r in requests:
        z, s = ref_target(model, tok, r, templates, L, steps, lr, clamp, wd, kl_factor, stop_loss)
        zs.append(z.double())
        taken.append(s)
    Z = torch.stack(zs, 1)  # (dh, n)
    dws = {}
    for j, l in enumerate(layers):
        ks, hs = zip(*[ref_key_and_hidden(model, tok, r, templates, l, L) for r in requests])
        K = torch.stack(ks, 1)
        H = torch.stack(hs, 1)
        # The block output moves by the projection's output times the residual branch's
        # multiplier (Granite's residual_multiplier, MiniCPM 3's depth scale; read from the
        # config): the projection must move by R / multiplier.
        R = (Z - H) / (len(layers) - j) / residual_branch_multiplier(model.config)
        A = lam * stats[l].double() + K @ K.T
        U = torch.linalg.solve(A, K)
        if systems is not None:
            systems[l] = A
        dW = R @ U.T  # (dh, dk)
        W = proj(blocks[l]).weight
        with torch.no_grad():
            W += (dW.T if transposed else dW).to(W.dtype)
        dws[l] = dW
    return Z.T.float(), taken, dws


def ref_memit_config(model, tok, requests, templates, cfg, stats, systems=None):
    """``ref_memit`` with the MEMIT settings of an ``EditConfig`` ``cfg``."""
    return ref_memit(
        model,
        tok,
        requests,
        templates,
        cfg.layers,
        stats,
        steps=cfg.steps,
        lr=cfg.lr,
        clamp=cfg.clamp_norm_factor,
        wd=cfg.weight_decay,
        kl_factor=cfg.kl_factor,
        stop_loss=cfg.early_stop_loss,
        lam=cfg.mom2_update_weight,
        systems=systems,
    )
