"""Key statistics: ``C_l = mean over corpus tokens of k k^T`` for every edited layer, in one
pass that stops after the deepest edited block, cached on disk (safetensors + JSON metadata,
verified on load).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from memit_fast.arch import ModelAdapter
from memit_fast.keys import StopForward, forward_until, hooks, input_device, pad_id, pad_right

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class LayerStats:
    """Second moment of the keys of one layer: ``mom2 (dk, dk)`` (the mean of ``k k^T``)."""

    mom2: torch.Tensor
    count: int


class StatsCacheError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- corpus


def default_corpus_path() -> Path:
    """The WikiText-2 validation text shipped with the package (the default corpus)."""
    return Path(__file__).resolve().parent / "resources" / "wikitext2_valid.txt"


def read_corpus(source: str | os.PathLike | Iterable[str]) -> Iterable[str]:
    """Texts from a text file (one text per non-empty line), an iterable of strings, or a
    ``datasets`` dataset with a ``text`` column."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"statistics corpus {str(path)!r} is not a file")

        def lines():
            with path.open(encoding="utf-8") as f:
                for line in f:
                    line = line.strip()
                    if line:
                        yield line

        return lines()
    if hasattr(source, "column_names") and "text" in getattr(source, "column_names", ()):
        return (row["text"] for row in source if row["text"].strip())
    return (t for t in source if isinstance(t, str) and t.strip())


def corpus_id(source, given: str | None = None) -> str | None:
    """A content hash of the corpus when it can be computed without consuming it."""
    if given is not None:
        return given
    h = hashlib.sha256()
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return "sha256:" + h.hexdigest()
    if isinstance(source, (list, tuple)):
        for t in source:
            h.update(str(t).encode("utf-8"))
            h.update(b"\0")
        return "sha256:" + h.hexdigest()
    return None


# ----------------------------------------------------------------------------- model identity


def model_fingerprint(adapter: ModelAdapter) -> str:
    """Identity of a model for the statistics cache: its config and a strided sample of the
    input embedding and of block 0 (excluding the edited projection, so that an edited model
    keeps the identity of the model it came from)."""
    model = adapter.model
    cfg = model.config.to_dict()
    for k in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures"):
        cfg.pop(k, None)
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode())
    skip = adapter.mlp_out(0).weight
    tensors = [model.get_input_embeddings().weight]
    tensors += [p for p in adapter.block(0).parameters() if p is not skip]
    for t in tensors:
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = flat[::step].float().cpu().contiguous()
        h.update(sample.numpy().tobytes())
    return "sha256:" + h.hexdigest()


# ----------------------------------------------------------------------------- the pass


def collect_stats(
    model,
    tokenizer,
    adapter: ModelAdapter,
    layers: Sequence[int],
    texts: Iterable[str],
    *,
    samples: int,
    max_length: int,
    batch_size: int = 8,
    dtype: str = "float32",
    progress: bool = False,
) -> dict[int, LayerStats]:
    """One corpus pass that accumulates the keys' second moment of every layer in ``layers``.

    Each text is truncated to ``max_length`` tokens; every non-padding token counts. The
    forward stops inside the deepest layer, right after its keys are read. Accumulators are
    ``dtype`` on each layer's device; keys stream through
    ``memit_fast.kernels.covariance_accumulate`` (Triton on CUDA, torch elsewhere).
    """
    from memit_fast import kernels

    layers = sorted(set(int(x) for x in layers))
    acc_dtype = _DTYPES[dtype]
    dk, _ = adapter.dims()
    accs: dict[int, torch.Tensor] = {}
    for l in layers:
        dev = adapter.weight(l).device
        accs[l] = torch.zeros(dk, dk, dtype=acc_dtype, device=dev)
    count = 0
    deepest = layers[-1]
    dev_in = input_device(model)
    pad = pad_id(tokenizer)
    state: dict[str, torch.Tensor] = {}

    def make_hook(l):
        def hook(mod, args):
            x = args[0]
            X = x.reshape(-1, x.shape[-1])
            m = state["mask"].reshape(-1).to(X.device)
            kernels.covariance_accumulate(accs[l], X, m)
            if l == deepest:
                raise StopForward

        return hook

    # Tokenize lazily in groups, sort each group by length to limit padding.
    pbar = None
    if progress:
        from tqdm.auto import tqdm

        pbar = tqdm(total=samples, desc="key statistics", unit="text")
    handles = [adapter.mlp_out(l).register_forward_pre_hook(make_hook(l)) for l in layers]
    n_texts = 0
    group: list[list[int]] = []

    def flush(group):
        nonlocal count
        group.sort(key=len)
        for b in range(0, len(group), batch_size):
            batch = group[b : b + batch_size]
            ids, mask = pad_right(batch, pad, dev_in)
            state["mask"] = mask
            forward_until(model, ids, mask)
            count += sum(len(s) for s in batch)  # the mask's ones, without a device sync

    with hooks(handles), torch.no_grad():
        for text in texts:
            if n_texts >= samples:
                break
            ids = tokenizer(text, add_special_tokens=True, truncation=True, max_length=max_length)[
                "input_ids"
            ]
            if not ids:
                continue
            group.append(list(ids))
            n_texts += 1
            if len(group) >= batch_size * 16:
                flush(group)
                if pbar is not None:
                    pbar.update(len(group))
                group = []
        if group:
            flush(group)
            if pbar is not None:
                pbar.update(len(group))
    if pbar is not None:
        pbar.close()
    if count == 0:
        raise ValueError("the statistics corpus produced no tokens")
    out = {}
    for l in layers:
        kernels.covariance_finalize(accs[l])
        out[l] = LayerStats(mom2=(accs[l] / count).to(torch.float32), count=count)
    log.info("key statistics: %d texts, %d tokens, layers %s", n_texts, count, layers)
    return out


# ----------------------------------------------------------------------------- the cache


def _tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


class StatsCache:
    """Statistics on disk, one safetensors file per (model, layer, corpus, samples, length,
    dtype). Writes are atomic (temporary file + rename). A file is used only when its
    metadata matches the request exactly and the tensor's checksum verifies; otherwise it is
    recomputed (``on_mismatch="recompute"``, the default, with a warning) or refused
    (``on_mismatch="error"``)."""

    def __init__(self, directory: str | os.PathLike, on_mismatch: str = "recompute"):
        if on_mismatch not in ("recompute", "error"):
            raise ValueError("on_mismatch must be 'recompute' or 'error'")
        self.dir = Path(directory)
        self.on_mismatch = on_mismatch

    @staticmethod
    def key(meta: dict) -> str:
        h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:24]
        return f"mom2_layer{meta['layer']}_{h}.safetensors"

    def path(self, meta: dict) -> Path:
        return self.dir / self.key(meta)

    def load(self, meta: dict, device: torch.device) -> LayerStats | None:
        """The cached statistics for ``meta`` (the expected metadata), or ``None``."""
        path = self.path(meta)
        if not path.exists():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                stored = f.metadata() or {}
                mom2 = f.get_tensor("mom2")
            info = json.loads(stored.get("memit_fast", "{}"))
            problems = []
            for k, v in meta.items():
                if info.get(k) != v:
                    problems.append(f"{k}: cached {info.get(k)!r}, expected {v!r}")
            if info.get("format") != CACHE_FORMAT:
                problems.append(f"format {info.get('format')!r}")
            if _tensor_sha256(mom2) != info.get("sha256"):
                problems.append("checksum mismatch")
            dk = meta.get("dk")
            if tuple(mom2.shape) != (dk, dk) or mom2.dtype != torch.float32:
                problems.append(f"tensor {tuple(mom2.shape)} {mom2.dtype}")
            if problems:
                raise StatsCacheError("; ".join(problems))
        except Exception as e:
            msg = f"statistics cache file {path} is unusable ({e})"
            if self.on_mismatch == "error":
                raise StatsCacheError(msg) from e
            log.warning("%s; recomputing", msg)
            return None
        return LayerStats(mom2=mom2.to(device), count=int(info["count"]))

    def save(self, meta: dict, stats: LayerStats) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        mom2 = stats.mom2.detach().to("cpu", torch.float32).contiguous()
        info = dict(meta, format=CACHE_FORMAT, count=stats.count, sha256=_tensor_sha256(mom2))
        path = self.path(meta)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-", suffix=".safetensors")
        os.close(fd)
        try:
            save_file({"mom2": mom2}, tmp, metadata={"memit_fast": json.dumps(info)})
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path


def stats_meta(
    adapter: ModelAdapter,
    fingerprint: str,
    layer: int,
    corpus: str,
    samples: int,
    max_length: int,
    dtype: str,
) -> dict:
    dk, _ = adapter.dims()
    return {
        "model": fingerprint,
        "model_type": adapter.model_type,
        "model_dtype": str(adapter.weight(layer).dtype).replace("torch.", ""),
        "layer": int(layer),
        "dk": int(dk),
        "corpus": corpus,
        "samples": int(samples),
        "max_length": int(max_length),
        "stats_dtype": dtype,
    }
