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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from memit_fast._attention import without_cudnn_attention
from memit_fast.arch import ModelAdapter
from memit_fast.keys import StopForward, forward_until, hooks, input_device, pad_id, pad_right

log = logging.getLogger(__name__)

CACHE_FORMAT = 2
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


class ReplayableTexts:
    """A one-shot iterable (a generator, an iterator) that can be read again: the items
    drawn so far are kept and replayed, later ones drawn from the source on demand. The
    editor wraps such a corpus so that a second statistics pass (another layer, more
    samples) reads the same texts as the first, not the ones the first left over."""

    def __init__(self, source: Iterable):
        self._it = iter(source)
        self._seen: list = []

    def __iter__(self):
        i = 0
        while True:
            if i == len(self._seen):
                try:
                    self._seen.append(next(self._it))
                except StopIteration:
                    return
            yield self._seen[i]
            i += 1


def is_one_shot(source) -> bool:
    """Whether iterating ``source`` consumes it (a generator or iterator, not a path, a
    sequence or a dataset)."""
    if source is None or isinstance(source, (str, bytes, os.PathLike)):
        return False
    try:
        return iter(source) is source
    except TypeError:
        return False


def read_corpus(source: str | os.PathLike | Iterable[str]) -> Iterable[str]:
    """Texts from a text file (one text per non-empty line), an iterable of strings, or a
    ``datasets`` dataset (or any iterable of rows) with a ``text`` column; empty texts are
    skipped. A dict of splits (``datasets.DatasetDict``) is refused: pass one split."""
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
    if isinstance(source, Mapping):
        raise ValueError(
            f"statistics corpus: got a mapping with keys {sorted(map(str, source))[:8]} (a "
            "DatasetDict of splits?); pass one split, e.g. corpus=ds['train']"
        )

    def texts():
        for row in source:
            if isinstance(row, Mapping):
                if "text" not in row:
                    raise ValueError(
                        f"statistics corpus: a row without a 'text' field (fields "
                        f"{sorted(map(str, row))[:8]}); pass the texts or a dataset with a "
                        "'text' column"
                    )
                row = row["text"]
            if isinstance(row, str) and row.strip():
                yield row

    return texts()


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
        # The texts as read_corpus yields them, in an unambiguous encoding.
        h.update(json.dumps(list(read_corpus(source)), ensure_ascii=False).encode("utf-8"))
        return "sha256:" + h.hexdigest()
    fp = getattr(source, "_fingerprint", None)  # a datasets.Dataset's content fingerprint
    if isinstance(fp, str) and fp:
        return f"datasets:{fp}"
    return None


# ----------------------------------------------------------------------------- model identity


# Elements per chunk of bit_sums (bounds its int64 temporaries to 32 MB).
_SUM_CHUNK = 1 << 22


def bit_sums(t: torch.Tensor, *, weighted: bool = False) -> torch.Tensor:
    """Exact checksums of ``t``'s bits, int64 on ``t``'s device: the sum of the raw bit
    patterns, and with ``weighted`` also their sum weighted by position (modulo a prime),
    which sees elements trade places. Integer sums (wrapping) are exact and independent of
    the reduction order, so the same bits give the same values on any device. One read of
    ``t`` in chunks, without a copy of it."""
    flat = t.detach().reshape(-1)
    bits = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[flat.element_size()]
    raw = flat.view(bits)
    out = torch.zeros(2 if weighted else 1, dtype=torch.int64, device=t.device)
    for a in range(0, raw.numel(), _SUM_CHUNK):
        x = raw[a : a + _SUM_CHUNK].to(torch.int64)
        out[0] += x.sum()
        if weighted:
            w = torch.arange(a, a + x.numel(), device=t.device) % 65521 + 1
            out[1] += (x * w).sum()
    return out


def bits_sum(t: torch.Tensor) -> int:
    """The plain checksum of :func:`bit_sums` as a Python int."""
    return int(bit_sums(t)[0])


def model_fingerprints(adapter: ModelAdapter, layers: Sequence[int]) -> dict[int, str]:
    """Identity of a model for each layer's cached statistics: its config, the input
    embedding and every parameter of blocks ``0..l`` (what layer ``l``'s keys depend on),
    each as its exact bit sum, except the edited projections' weights: an edited model keeps
    the identity of the model it came from, whose statistics (computed before a first edit,
    as one session does) are the ones to reuse. A change to any other weight of those
    blocks is a different model."""
    model = adapter.model
    cfg = model.config.to_dict()
    for k in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures"):
        cfg.pop(k, None)
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode())
    h.update(f"embed:{bits_sum(model.get_input_embeddings().weight)};".encode())
    wanted = set(int(l) for l in layers)
    out: dict[int, str] = {}
    for b in range(max(wanted) + 1 if wanted else 0):
        skip = adapter.mlp_out(b).weight
        for name, p in adapter.block(b).named_parameters():
            if p is not skip:
                h.update(f"{b}.{name}:{bits_sum(p)};".encode())
        if b in wanted:
            out[b] = "sha256:" + h.copy().hexdigest()
    return out


def tokenizer_fingerprint(tokenizer) -> str:
    """Identity of a tokenizer for the statistics cache: what decides the token ids of a
    text, its vocabulary and how it encodes a probe text (a BOS it adds, say). Not its
    class (a fast and a slow tokenizer of one vocabulary give the same statistics) nor its
    pad token (padding is masked out)."""
    probe = "The quick brown fox, 1879: naïve café!\n  Ünïcode — ok."
    try:
        vocab = sorted(tokenizer.get_vocab().items())
    except (AttributeError, NotImplementedError):
        vocab = None
    parts = {
        "size": len(tokenizer),
        "vocab": vocab,
        "probe": list(tokenizer(probe, add_special_tokens=True)["input_ids"]),
    }
    blob = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False)
    return "sha256:" + hashlib.sha256(blob.encode("utf-8")).hexdigest()


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

    with hooks(handles), torch.no_grad(), without_cudnn_attention():
        it = iter(texts)
        while n_texts < samples:  # (checked before a text is drawn: none is drawn in vain)
            text = next(it, None)
            if text is None:
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
            count = info.get("count")
            if not (isinstance(count, int) and not isinstance(count, bool) and count >= 1):
                problems.append(f"count {count!r} (a number of tokens >= 1 expected)")
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
        return LayerStats(mom2=mom2.to(device), count=count)

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
    tokenizer: str,
) -> dict:
    """The metadata that identifies one layer's cached statistics (``fingerprint`` from
    :func:`model_fingerprints`, ``tokenizer`` from :func:`tokenizer_fingerprint`)."""
    dk, _ = adapter.dims()
    return {
        "model": fingerprint,
        "tokenizer": tokenizer,
        "model_type": adapter.model_type,
        "model_dtype": str(adapter.weight(layer).dtype).replace("torch.", ""),
        "layer": int(layer),
        "dk": int(dk),
        "corpus": corpus,
        "samples": int(samples),
        "max_length": int(max_length),
        "stats_dtype": dtype,
    }
