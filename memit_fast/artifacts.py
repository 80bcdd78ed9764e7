"""Saving, loading and sharing edits: safetensors + JSON, and PEFT LoRA adapters.

An edit saved with :func:`save_edit` is a directory::

    edit/
      edit.json              metadata (below); UTF-8 JSON
      update.safetensors     per layer either "layers.{l}.R" (dh, r) and "layers.{l}.U"
                             (dk, r), fp32, with dW = R U^T in (dh, dk) orientation (r = n,
                             or dh where the engine solved for dW^T: R = I), or
                             "layers.{l}.delta", the dense fp32 update in the weight's own
                             layout ((dk, dh) for GPT-2's Conv1D) -- whichever is smaller
      keys.safetensors       "layers.{l}.keys": the keys K (dk, n) fp32 each update was
                             solved for (what Editor.remember needs)
      originals.safetensors  "layers.{l}.weight": the weights before the edit, in their own
                             dtype and layout (only with include_originals=True)

``edit.json`` holds the format tag and version, the model's identity (``model_type``, its
architecture config and that config's SHA-256, per edited layer the parameter name, shape,
dtype, and the SHA-256 of the weight before and after the edit), the layers, the
:class:`~memit_fast.config.EditConfig`, the requests, the per-request figures, the timings,
and per layer which representation was stored with the SHA-256 of every stored tensor.
Only safetensors and JSON are written or read: loading an edit never executes code.

A weight's SHA-256 is taken over its bytes in row-major order of its logical shape, in its
own dtype (a column-major weight hashes like its row-major copy).

The engine writes ``W_new = round(W_old + dW)`` (fp32 accumulation, one rounding into the
weight's dtype). :meth:`LoadedEdit.apply` does the same -- through
:func:`memit_fast.linalg.apply_update` for factors, ``W.copy_((W.float() + delta).to(W.dtype))``
for a dense delta -- and then compares the result with the stored SHA-256 of the engine's
weight. A dense delta is chosen at save time so that this elementwise formula reproduces the
engine's bits on any device; factors reproduce them where the same kernel runs (same device
type), and :meth:`LoadedEdit.apply` reports any layer where they do not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from memit_fast.config import EditConfig
from memit_fast.data import EditRequest, normalize_requests

log = logging.getLogger(__name__)

FORMAT = "memit_fast.edit"
FORMAT_VERSION = 1
META_FILE = "edit.json"
UPDATE_FILE = "update.safetensors"
KEYS_FILE = "keys.safetensors"
ORIGINALS_FILE = "originals.safetensors"

# Keys of a transformers config that describe how a model was loaded or run, not what it
# is: they differ between a model built in memory and the same model saved and reloaded.
_RUNTIME_CONFIG_KEYS = (
    "_name_or_path",
    "name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "architectures",
    "use_cache",
    "return_dict",
    "output_attentions",
    "output_hidden_states",
    "torchscript",
)

__all__ = [
    "ArtifactError",
    "LoadedEdit",
    "ModelMismatchError",
    "load_edit",
    "model_config_fingerprint",
    "save_edit",
    "tensor_sha256",
    "to_peft",
    "unwrap_model",
]


class ArtifactError(ValueError):
    """A saved edit is malformed, corrupted or of an unsupported format version."""


class ModelMismatchError(ValueError):
    """The model is not the one the edit was made for (or not in the state it needs)."""


# ----------------------------------------------------------------------------- helpers


def tensor_sha256(t: torch.Tensor) -> str:
    """SHA-256 (hex) of ``t``'s bytes: row-major over its logical shape, in its own dtype."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    flat = t.contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy()).hexdigest()


_INT_OF_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bit_mismatch(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the elements whose bits differ (``-0.0`` vs ``0.0`` and NaN included)."""
    it = _INT_OF_WIDTH[a.element_size()]
    return a.contiguous().view(it) != b.contiguous().view(it)


def model_config_fingerprint(model) -> tuple[dict[str, Any], str]:
    """The architecture config of ``model`` (its transformers config without the keys that
    describe how it was loaded: name, dtype, versions, output switches, private ``_`` keys)
    and the SHA-256 of its canonical JSON."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        raise ModelMismatchError(
            f"{type(model).__name__} has no transformers config (model.config.to_dict()); "
            "memit_fast edits are made for Hugging Face causal LMs"
        )
    d = {
        k: v
        for k, v in cfg.to_dict().items()
        if k not in _RUNTIME_CONFIG_KEYS and not k.startswith("_")
    }
    canonical = json.loads(json.dumps(d, sort_keys=True, default=str))
    digest = hashlib.sha256(
        json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
    return canonical, digest


def unwrap_model(model):
    """The model inside the wrappers training code puts around it: ``DistributedDataParallel``
    and ``DataParallel`` (``.module``) and ``torch.compile`` (``._orig_mod``). Parameters are
    shared with the wrapper, so writing into the inner model edits the wrapped one."""
    for _ in range(8):
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        else:
            break
    return model


def _module_name(weight_name: str) -> str:
    return weight_name.removesuffix(".weight")


def _parameter(model, name: str) -> torch.Tensor | None:
    try:
        return model.get_parameter(name)
    except AttributeError:
        return None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _finite_or_none(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _write_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=1, sort_keys=False, allow_nan=False, default=str)
    path.write_text(text + "\n", encoding="utf-8")


def _prepare_target_dir(path: Path, overwrite: bool) -> None:
    """Refuse to replace anything but an empty directory or (with ``overwrite``) a saved
    edit or PEFT adapter."""
    if not path.exists():
        return
    if not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    entries = list(path.iterdir())
    if not entries:
        return
    if not overwrite:
        raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True to replace it")
    ours = (path / META_FILE).is_file() or (path / "adapter_config.json").is_file()
    if not ours:
        raise FileExistsError(
            f"{path} is not a saved edit or adapter (no {META_FILE} or adapter_config.json); "
            "refusing to replace it even with overwrite=True"
        )


class _AtomicDir:
    """Write into a temporary sibling directory, then move it to ``path`` in one rename."""

    def __init__(self, path: Path, overwrite: bool):
        self.path = path
        self.overwrite = overwrite

    def __enter__(self) -> Path:
        _prepare_target_dir(self.path, self.overwrite)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", dir=self.path.parent))
        os.chmod(self.tmp, 0o755)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if self.path.exists():
            shutil.rmtree(self.path)
        os.replace(self.tmp, self.path)


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(cpu, os.fspath(path), metadata={"format": "pt", FORMAT: str(FORMAT_VERSION)})
    return {k: tensor_sha256(v) for k, v in cpu.items()}


# ----------------------------------------------------------------------------- saving


def _dense_delta(
    W0: torch.Tensor, W1: torch.Tensor, R: torch.Tensor, U: torch.Tensor, transposed: bool
) -> torch.Tensor | None:
    """An fp32 ``delta`` in ``W0``'s layout with ``(W0.float() + delta).to(dtype)`` bit-equal
    to ``W1`` (the engine's result), or ``None`` when no such delta was found.

    Starts from the engine's product ``R U^T``; where a kernel summed in another order (so
    the elementwise formula rounds differently), those elements take ``W1 - W0`` instead.
    Elementwise fp32 addition and rounding are the same on every device, so the result is
    exact wherever it is applied."""
    D = R.to(W0.device, torch.float32) @ U.to(W0.device, torch.float32).T
    if transposed:
        D = D.T
    D = D.contiguous()
    bad = _bit_mismatch((W0.float() + D).to(W0.dtype), W1)
    if bool(bad.any()):
        D[bad] = (W1.float() - W0.float())[bad]
        bad = _bit_mismatch((W0.float() + D).to(W0.dtype), W1)
        if bool(bad.any()):
            return None
    return D


def save_edit(
    result, path: str | os.PathLike, *, include_originals: bool = True, overwrite: bool = False
) -> Path:
    """Save ``result`` (an :class:`~memit_fast.editor.EditResult`) to the directory ``path``.

    Per layer the smaller of the low-rank factors (``(dh + dk) r`` floats, ``r`` their rank)
    and the dense delta (``dh dk`` floats) is stored; both reproduce the engine's weights
    bit for bit (see the module docstring).

    Args:
        result: what :meth:`Editor.apply` returned. It must still hold its original weights
            (every ``EditResult`` from the engine does, reverted or not, except on layers
            where an earlier edit's ``revert(force=True)`` undid it).
        path: a directory; created (parents too). Written to a temporary sibling and moved
            into place in one rename, so a crash never leaves half an edit.
        include_originals: also store the weights of the edited layers as they were before
            the edit. Default ``True`` because the engine writes ``round(W_old + dW)`` into
            the weight's dtype, which loses bits: subtracting ``dW`` again does not give
            ``W_old`` back, so an exact :meth:`LoadedEdit.revert` needs the originals. They
            cost one weight per edited layer; with ``False`` the edit is still applicable,
            verifiable (the originals' SHA-256 is always stored) and exportable to PEFT,
            but not revertible from the file.
        overwrite: replace ``path`` if it already holds a saved edit.

    Returns:
        the directory written.
    """
    from memit_fast import linalg
    from memit_fast.editor import EditResult

    if not isinstance(result, EditResult):
        raise TypeError(f"save_edit: expected an EditResult, got {type(result).__name__}")
    adapter = result._adapter
    if adapter is None:
        raise ValueError("save_edit: this EditResult is not attached to a model")
    missing = [l for l in result.layers if l not in result._originals]
    if missing:
        raise ValueError(
            f"save_edit: the EditResult holds no original weights for layers {missing}; "
            "save it from the result Editor.apply returned, before an earlier edit's "
            "revert(force=True) undoes it there"
        )
    model = adapter.model
    config_dict, config_sha = model_config_fingerprint(model)
    path = Path(path)

    weights: dict[str, Any] = {}
    updates: dict[str, Any] = {}
    update_tensors: dict[str, torch.Tensor] = {}
    original_tensors: dict[str, torch.Tensor] = {}
    key_tensors: dict[str, torch.Tensor] = {}
    n = len(result.requests)
    for l in result.layers:
        R, U = result.factors[l]
        W0 = result._originals[l]
        # The engine's weight after this layer's update: the same call on a copy of W_old.
        W1 = W0.clone()
        with torch.no_grad():
            linalg.apply_update(W1, R, U, result.transposed)
        dh, dk = R.shape[0], U.shape[0]
        weights[str(l)] = {
            "name": result.weight_names[l],
            "shape": list(W0.shape),
            "dtype": _dtype_name(W0.dtype),
            "sha256_original": tensor_sha256(W0),
            "sha256_edited": tensor_sha256(W1),
        }
        r = R.shape[1]  # the factors' rank: n, or dh where MEMIT solved for dW^T
        D = _dense_delta(W0, W1, R, U, result.transposed) if dh * dk < (dh + dk) * r else None
        if D is not None:
            updates[str(l)] = {"kind": "dense", "tensors": {"delta": f"layers.{l}.delta"}}
            update_tensors[f"layers.{l}.delta"] = D.cpu()
        else:
            if dh * dk < (dh + dk) * r:
                log.info("layer %d: no exact dense delta; storing the factors", l)
            updates[str(l)] = {
                "kind": "factors",
                "rank": r,
                "tensors": {"R": f"layers.{l}.R", "U": f"layers.{l}.U"},
            }
            update_tensors[f"layers.{l}.R"] = R.float().cpu()
            update_tensors[f"layers.{l}.U"] = U.float().cpu()
        if l in result.keys:
            # The keys the update was solved for: an Editor that remembers this edit
            # (Editor.remember) protects them in later applies, as it would have in-process.
            key_tensors[f"layers.{l}.keys"] = result.keys[l].float().cpu().contiguous()
        if include_originals:
            original_tensors[f"layers.{l}.weight"] = W0
        del W1, D

    import memit_fast

    figures = [{k: _finite_or_none(v) for k, v in f.items()} for f in result.request_figures()]
    device = result._originals[result.layers[0]].device
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_with": {
            "memit_fast": memit_fast.__version__,
            "torch": torch.__version__,
            "device": device.type,
        },
        "model": {
            "model_type": getattr(model.config, "model_type", None),
            "config_sha256": config_sha,
            "config": config_dict,
            "name_or_path": getattr(model.config, "_name_or_path", None) or None,
            "transposed": bool(result.transposed),
            "weights": weights,
        },
        "layers": list(result.layers),
        "n_requests": n,
        "config": result.config.to_dict(),
        "requests": [r.to_dict() for r in result.requests],
        "request_figures": figures,
        "timings": {k: _finite_or_none(float(v)) for k, v in result.timings.items()},
        "updates": updates,
        "has_originals": bool(include_originals),
    }
    with _AtomicDir(path, overwrite) as tmp:
        files = {UPDATE_FILE: _save_tensors(tmp / UPDATE_FILE, update_tensors)}
        if include_originals:
            files[ORIGINALS_FILE] = _save_tensors(tmp / ORIGINALS_FILE, original_tensors)
        if key_tensors:
            files[KEYS_FILE] = _save_tensors(tmp / KEYS_FILE, key_tensors)
        meta["tensor_sha256"] = files
        _write_json(tmp / META_FILE, meta)
    log.info("edit saved to %s (%d layers, %d requests)", path, len(result.layers), n)
    return path


# ----------------------------------------------------------------------------- loading


class LoadedEdit:
    """An edit read back by :func:`load_edit`.

    Attributes:
        path: the directory it was read from (the originals are read from it on
            :meth:`revert`).
        config: the :class:`EditConfig` of the edit.
        requests: the requests (:class:`EditRequest`).
        layers: the edited layers.
        request_figures: per-request optimization figures (loss, nll, kl, steps, …).
        timings: seconds per phase of the original run.
        weight_names: per layer, the parameter written.
        transposed: whether the weights are stored ``(dk, dh)`` (GPT-2's Conv1D).
        kinds: per layer, ``"factors"`` or ``"dense"``: what the file holds.
        factors: ``{layer: (R (dh, r) fp32, U (dk, r) fp32)}`` for the layers stored as
            factors (``r = n``, or ``dh`` with ``R = I`` where the engine solved for
            ``dW^T``).
        keys: ``{layer: K (dk, n) fp32}``, the keys each update was solved for (what
            :meth:`Editor.remember` needs to continue sequential editing).
        has_originals: whether :meth:`revert` is possible.
        metadata: the parsed ``edit.json``.
    """

    def __init__(self, path: Path, meta: dict[str, Any], tensors: dict[str, torch.Tensor]):
        self.path = path
        self.metadata = meta
        model = meta["model"]
        self.config = EditConfig.from_dict(meta["config"])
        self.requests: list[EditRequest] = normalize_requests(meta["requests"])
        self.layers: tuple[int, ...] = tuple(int(l) for l in meta["layers"])
        self.request_figures: list[dict[str, Any]] = list(meta.get("request_figures", []))
        self.timings: dict[str, float] = dict(meta.get("timings", {}))
        self.transposed: bool = bool(model["transposed"])
        self.weight_names = {l: model["weights"][str(l)]["name"] for l in self.layers}
        self.kinds = {l: meta["updates"][str(l)]["kind"] for l in self.layers}
        self.has_originals: bool = bool(meta.get("has_originals"))
        self.factors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._dense: dict[int, torch.Tensor] = {}
        self.keys: dict[int, torch.Tensor] = {}
        for l in self.layers:
            if f"layers.{l}.keys" in tensors:
                self.keys[l] = tensors[f"layers.{l}.keys"]
            names = meta["updates"][str(l)]["tensors"]
            if self.kinds[l] == "factors":
                self.factors[l] = (tensors[names["R"]], tensors[names["U"]])
            else:
                self._dense[l] = tensors[names["delta"]]
        # Per layer, the hashes of weights this object wrote (revert accepts them).
        self._written: dict[int, set[str]] = {l: set() for l in self.layers}

    def __repr__(self) -> str:
        kinds = ", ".join(f"{l}:{k}" for l, k in self.kinds.items())
        return (
            f"LoadedEdit({os.fspath(self.path)!r}, {len(self.requests)} requests, "
            f"layers {{{kinds}}}, originals={self.has_originals})"
        )

    def _weight_meta(self, l: int) -> dict[str, Any]:
        return self.metadata["model"]["weights"][str(l)]

    def delta(self, layer: int) -> torch.Tensor:
        """The dense fp32 update of ``layer`` in the weight's own layout (CPU)."""
        if layer in self._dense:
            return self._dense[layer]
        R, U = self.factors[layer]
        d = R @ U.T
        return d.T.contiguous() if self.transposed else d

    # ------------------------------------------------------------------ checks

    def check_model(self, model, *, weights: str | None = "original") -> None:
        """Raise :class:`ModelMismatchError` unless ``model`` is the model this edit was made
        for: same ``model_type``, architecture config, edited parameter names and shapes.

        ``weights="original"`` also requires each edited weight's dtype and bits (SHA-256)
        to be those the edit was computed on; ``"edited"`` requires the dtypes only (the
        caller checks the bits); ``None`` checks neither.
        """
        model = unwrap_model(model)
        meta = self.metadata["model"]
        problems: list[str] = []
        mt = getattr(getattr(model, "config", None), "model_type", None)
        if mt != meta["model_type"]:
            raise ModelMismatchError(
                f"this edit was made for a {meta['model_type']!r} model, got model_type {mt!r}"
            )
        cfg, sha = model_config_fingerprint(model)
        if sha != meta["config_sha256"]:
            saved = meta.get("config", {})
            diff = sorted(k for k in set(cfg) | set(saved) if cfg.get(k) != saved.get(k))
            shown = ", ".join(
                f"{k} ({saved.get(k)!r} in the edit, {cfg.get(k)!r} here)" for k in diff[:6]
            )
            problems.append(f"the model's config differs from the edited model's: {shown}")
        for l in self.layers:
            wm = self._weight_meta(l)
            p = _parameter(model, wm["name"])
            if p is None:
                problems.append(f"layer {l}: the model has no parameter {wm['name']!r}")
                continue
            if list(p.shape) != wm["shape"]:
                problems.append(
                    f"layer {l}: {wm['name']} has shape {list(p.shape)}, the edit expects "
                    f"{wm['shape']}"
                )
                continue
            if weights is None:
                continue
            if _dtype_name(p.dtype) != wm["dtype"]:
                hint = (
                    " or pass check_weights=False to apply the update to this dtype without "
                    "the bit-exactness guarantee"
                    if weights == "original"
                    else ""
                )
                problems.append(
                    f"layer {l}: {wm['name']} is {_dtype_name(p.dtype)}, the edit was made on "
                    f"{wm['dtype']} (load the model with dtype=torch.{wm['dtype']}{hint})"
                )
                continue
            sha = tensor_sha256(p) if weights == "original" else None
            if sha is not None and sha != wm["sha256_original"]:
                why = (
                    "it already carries this edit"
                    if sha == wm["sha256_edited"]
                    else "it differs from the weight the edit was computed on (another "
                    "checkpoint, or other edits applied since)"
                )
                problems.append(
                    f"layer {l}: {wm['name']}: {why}; pass check_weights=False to apply the "
                    "update anyway"
                )
        if problems:
            raise ModelMismatchError(
                "the model does not match this edit:\n  " + "\n  ".join(problems)
            )

    # ------------------------------------------------------------------ apply / revert

    def apply(self, model, *, check_weights: bool = True) -> dict[int, bool]:
        """Write the edit into ``model`` (in place), exactly as the engine did.

        Args:
            model: the model the edit was made for (same architecture config, same
                edited weights -- e.g. a fresh copy of the unedited model).
            check_weights: refuse unless each edited weight has the dtype and the bits
                (SHA-256) the edit was computed on. ``False`` adds the update to whatever
                the weights hold (another checkpoint of the same architecture, a model
                with other edits), without the bit-exactness guarantee.

        Returns:
            per layer, whether the new weight is bit-identical to the engine's (its SHA-256
            matches). ``False`` with ``check_weights=True`` means the factors were applied
            by a different kernel than the engine's (another device type); a warning says
            so.

        Any exception leaves the weights as they were. Modes, ``requires_grad`` and the
        autograd state of the model are not touched.
        """
        from memit_fast import linalg

        model = unwrap_model(model)
        self.check_model(model, weights="original" if check_weights else None)
        params = {l: model.get_parameter(self.weight_names[l]) for l in self.layers}
        before: dict[int, torch.Tensor] = {}
        exact: dict[int, bool] = {}
        try:
            with torch.no_grad():
                for l in self.layers:
                    W = params[l]
                    before[l] = W.detach().clone()
                    if self.kinds[l] == "factors":
                        R, U = self.factors[l]
                        linalg.apply_update(W, R, U, self.transposed)
                    else:
                        D = self._dense[l].to(W.device)
                        W.copy_((W.float() + D).to(W.dtype))
                    sha = tensor_sha256(W)
                    self._written[l].add(sha)
                    exact[l] = sha == self._weight_meta(l)["sha256_edited"]
        except BaseException:
            with torch.no_grad():
                for l, w0 in before.items():
                    params[l].copy_(w0)
            raise
        off = [l for l, ok in exact.items() if not ok]
        if off and check_weights:
            saved_on = self.metadata.get("created_with", {}).get("device", "?")
            log.warning(
                "layers %s: the applied weights differ in rounding from the engine's: the "
                "factors ran through another kernel (the edit was made on %s, applied on %s); "
                "the edit is applied, not bit-identical",
                off,
                saved_on,
                params[off[0]].device.type,
            )
        return exact

    def revert(self, model, *, check: bool = True) -> None:
        """Restore the edited weights of ``model`` to the stored originals, bit for bit.

        The originals are read from ``originals.safetensors`` and verified against their
        SHA-256 before anything is written.

        Args:
            model: a model carrying this edit.
            check: refuse unless each edited weight is in the state this edit left it
                (the engine's bits, or what :meth:`apply` of this object wrote). ``False``
                restores the originals whatever the weights hold (discarding any change made
                since, e.g. later edits or fine-tuning).
        """
        if not self.has_originals:
            raise ArtifactError(
                f"{self.path} was saved with include_originals=False: an exact revert needs "
                "the original weights (W_new = round(W_old + dW) loses bits, so subtracting "
                "the update does not restore them). Reload the unedited model instead"
            )
        model = unwrap_model(model)
        self.check_model(model, weights="edited")
        params = {l: model.get_parameter(self.weight_names[l]) for l in self.layers}
        if check:
            problems = []
            for l in self.layers:
                sha = tensor_sha256(params[l])
                if sha != self._weight_meta(l)["sha256_edited"] and sha not in self._written[l]:
                    state = (
                        "does not carry this edit (it holds the original weight)"
                        if sha == self._weight_meta(l)["sha256_original"]
                        else "was changed after this edit (other edits or training)"
                    )
                    problems.append(f"layer {l}: {self.weight_names[l]} {state}")
            if problems:
                raise ModelMismatchError(
                    "refusing to revert:\n  "
                    + "\n  ".join(problems)
                    + "\n(revert(model, check=False) restores the originals anyway)"
                )
        originals = self._read_originals()
        with torch.no_grad():
            for l in self.layers:
                params[l].copy_(originals[l].to(params[l].device))

    def _read_originals(self) -> dict[int, torch.Tensor]:
        f = self.path / ORIGINALS_FILE
        if not f.is_file():
            raise ArtifactError(f"{f} is missing; the edit cannot be reverted from {self.path}")
        shas = self.metadata.get("tensor_sha256", {}).get(ORIGINALS_FILE, {})
        out = {}
        with safe_open(os.fspath(f), framework="pt", device="cpu") as sf:
            for l in self.layers:
                key = f"layers.{l}.weight"
                if key not in sf.keys():
                    raise ArtifactError(f"{f}: no tensor {key!r}")
                t = sf.get_tensor(key)
                want = self._weight_meta(l)["sha256_original"]
                if tensor_sha256(t) != want or shas.get(key, want) != want:
                    raise ArtifactError(
                        f"{f}: {key} does not match the SHA-256 of layer {l}'s original "
                        "weight; the file is corrupted"
                    )
                out[l] = t
        return out


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_sha256(v: Any) -> bool:
    return isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)


def _is_dtype_name(v: Any) -> bool:
    return isinstance(v, str) and isinstance(getattr(torch, v, None), torch.dtype)


def _is_number_or_null(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def _shown(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "..."


class _MetaReader:
    """Typed reads of ``edit.json``: a missing or mistyped field is an :class:`ArtifactError`
    naming the file and the field (``model.weights.2.name``)."""

    def __init__(self, mf: Path):
        self.mf = mf

    def error(self, msg: str) -> ArtifactError:
        return ArtifactError(f"{self.mf}: {msg}")

    def get(self, obj: Mapping, key: str, where: str, check, what: str, default: Any = ...):
        name = f"{where}.{key}" if where else key
        if key not in obj:
            if default is not ...:
                return default
            raise self.error(f"field {name!r} is missing")
        v = obj[key]
        if not check(v):
            raise self.error(f"field {name!r} must be {what}, got {_shown(v)}")
        return v

    def same_names(self, have, want, what: str) -> None:
        """``have`` (names found) must be ``want`` (names expected), both ways."""
        extra, missing = sorted(set(have) - set(want)), sorted(set(want) - set(have))
        if extra or missing:
            parts = [f"missing {missing}"] * bool(missing) + [f"unexpected {extra}"] * bool(extra)
            raise self.error(f"{what}: {'; '.join(parts)}")


def _check_meta(meta: Mapping, mf: Path) -> None:
    """Check that ``edit.json`` has every field :class:`LoadedEdit` reads, with its type, and
    that its parts agree: the layers listed are those of the config, of the weights, of the
    updates and of the tensors hashed (a shortened ``layers`` would apply a partial edit)."""
    rd = _MetaReader(mf)
    layers = rd.get(
        meta,
        "layers",
        "",
        lambda v: isinstance(v, list) and bool(v) and all(_is_int(x) and x >= 0 for x in v),
        "a non-empty list of layer indices (ints >= 0)",
    )
    if layers != sorted(set(layers)):
        raise rd.error(f"field 'layers' must be strictly increasing, got {layers}")
    want = [str(l) for l in layers]

    config = rd.get(meta, "config", "", lambda v: isinstance(v, Mapping), "an object")
    try:
        cfg = EditConfig.from_dict(config)
    except (ValueError, TypeError) as e:
        raise rd.error(f"field 'config' is not a valid EditConfig: {e}") from None
    if list(cfg.layers) != layers:
        raise rd.error(f"field 'layers' {layers} disagrees with 'config.layers' {list(cfg.layers)}")
    requests = rd.get(meta, "requests", "", lambda v: isinstance(v, list), "a list")
    try:
        n = len(normalize_requests(requests))
    except (ValueError, TypeError) as e:
        raise rd.error(f"field 'requests' is invalid: {e}") from None
    if n != len(requests):
        raise rd.error("field 'requests' holds duplicates (the engine's requests have none)")
    rd.get(
        meta,
        "n_requests",
        "",
        lambda v: _is_int(v) and v == n,
        f"{n}, the number of requests",
        None,
    )
    rd.get(
        meta,
        "request_figures",
        "",
        lambda v: isinstance(v, list) and len(v) == n and all(isinstance(f, Mapping) for f in v),
        f"a list of {n} objects (one per request)",
        None,
    )
    rd.get(
        meta,
        "timings",
        "",
        lambda v: isinstance(v, Mapping) and all(_is_number_or_null(x) for x in v.values()),
        "an object of numbers",
        None,
    )
    rd.get(meta, "created_with", "", lambda v: isinstance(v, Mapping), "an object", None)
    has_originals = rd.get(
        meta, "has_originals", "", lambda v: isinstance(v, bool), "true or false", False
    )

    model = rd.get(meta, "model", "", lambda v: isinstance(v, Mapping), "an object")
    rd.get(model, "model_type", "model", lambda v: v is None or isinstance(v, str), "a string")
    rd.get(model, "config_sha256", "model", _is_sha256, "a SHA-256 (64 hex digits)")
    rd.get(model, "config", "model", lambda v: isinstance(v, Mapping), "an object", None)
    rd.get(model, "transposed", "model", lambda v: isinstance(v, bool), "true or false")
    weights = rd.get(model, "weights", "model", lambda v: isinstance(v, Mapping), "an object")
    rd.same_names(weights, want, f"field 'model.weights' must have one entry per layer {layers}")
    names: dict[str, int] = {}
    for l in layers:
        w = rd.get(weights, str(l), "model.weights", lambda v: isinstance(v, Mapping), "an object")
        where = f"model.weights.{l}"
        name = rd.get(w, "name", where, lambda v: isinstance(v, str) and bool(v), "a name")
        if name in names:
            raise rd.error(f"layers {names[name]} and {l} both name the parameter {name!r}")
        names[name] = l
        rd.get(
            w,
            "shape",
            where,
            lambda v: isinstance(v, list) and len(v) == 2 and all(_is_int(x) and x > 0 for x in v),
            "[rows, columns] (positive ints)",
        )
        rd.get(w, "dtype", where, _is_dtype_name, "a torch dtype name")
        rd.get(w, "sha256_original", where, _is_sha256, "a SHA-256 (64 hex digits)")
        rd.get(w, "sha256_edited", where, _is_sha256, "a SHA-256 (64 hex digits)")

    updates = rd.get(meta, "updates", "", lambda v: isinstance(v, Mapping), "an object")
    rd.same_names(updates, want, f"field 'updates' must have one entry per layer {layers}")
    update_names = []
    for l in layers:
        u = rd.get(updates, str(l), "updates", lambda v: isinstance(v, Mapping), "an object")
        where = f"updates.{l}"
        kind = rd.get(u, "kind", where, lambda v: v in ("factors", "dense"), "'factors' or 'dense'")
        expected = {k: f"layers.{l}.{k}" for k in (("R", "U") if kind == "factors" else ("delta",))}
        rd.get(u, "tensors", where, lambda v, e=expected: v == e, f"{expected} for kind {kind!r}")
        if kind == "factors":
            rd.get(u, "rank", where, lambda v: _is_int(v) and v > 0, "a positive int", None)
        update_names += expected.values()

    hashes = rd.get(meta, "tensor_sha256", "", lambda v: isinstance(v, Mapping), "an object")
    rd.same_names(
        hashes,
        [UPDATE_FILE] + [KEYS_FILE] * (KEYS_FILE in hashes) + [ORIGINALS_FILE] * has_originals,
        f"field 'tensor_sha256' (has_originals is {str(has_originals).lower()})",
    )
    for fname in hashes:
        rd.get(
            hashes,
            fname,
            "tensor_sha256",
            lambda v: isinstance(v, Mapping) and all(_is_sha256(x) for x in v.values()),
            "an object of SHA-256s",
        )
    rd.same_names(
        hashes[UPDATE_FILE], update_names, f"field 'tensor_sha256.{UPDATE_FILE}' (per 'updates')"
    )
    if KEYS_FILE in hashes:
        rd.same_names(
            hashes[KEYS_FILE],
            [f"layers.{l}.keys" for l in layers],
            f"field 'tensor_sha256.{KEYS_FILE}' (one per layer of 'layers')",
        )
    if has_originals:
        originals = hashes[ORIGINALS_FILE]
        rd.same_names(
            originals,
            [f"layers.{l}.weight" for l in layers],
            f"field 'tensor_sha256.{ORIGINALS_FILE}' (one per layer of 'layers')",
        )
        for l in layers:
            if originals[f"layers.{l}.weight"] != weights[str(l)]["sha256_original"]:
                raise rd.error(
                    f"field 'tensor_sha256.{ORIGINALS_FILE}' gives layers.{l}.weight another "
                    f"SHA-256 than 'model.weights.{l}.sha256_original'"
                )


def _load_verified(f: Path, shas: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """The tensors of ``f``: exactly those ``shas`` lists, each matching its SHA-256."""
    try:
        tensors = load_file(os.fspath(f), device="cpu")
    except Exception as e:  # a damaged header: safetensors raises its own error types
        raise ArtifactError(f"{f}: not a readable safetensors file ({e})") from None
    missing = sorted(set(shas) - set(tensors))
    if missing:
        raise ArtifactError(f"{f}: tensors {missing} listed in {META_FILE} are missing")
    extra = sorted(set(tensors) - set(shas))
    if extra:
        raise ArtifactError(f"{f}: tensors {extra} are not listed in {META_FILE}")
    for name, t in tensors.items():
        if tensor_sha256(t) != shas[name]:
            raise ArtifactError(
                f"{f}: tensor {name!r} does not match its SHA-256; the file is corrupted"
            )
    return tensors


def _check_shapes(meta: Mapping, tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """Each stored tensor has the shape and dtype its layer's weight and requests imply."""
    transposed = meta["model"]["transposed"]
    n = len(meta["requests"])
    for l in meta["layers"]:
        rows, cols = meta["model"]["weights"][str(l)]["shape"]
        dk, dh = (rows, cols) if transposed else (cols, rows)
        u = meta["updates"][str(l)]
        if u["kind"] == "factors":
            R = tensors[f"layers.{l}.R"]
            r = u.get("rank", R.shape[-1] if R.dim() == 2 else 0)
            want = {f"layers.{l}.R": (dh, r), f"layers.{l}.U": (dk, r)}
        else:
            want = {f"layers.{l}.delta": (rows, cols)}
        if f"layers.{l}.keys" in tensors:
            want[f"layers.{l}.keys"] = (dk, n)
        for name, shape in want.items():
            t = tensors[name]
            if tuple(t.shape) != shape or t.dtype != torch.float32:
                f = path / (KEYS_FILE if name.endswith(".keys") else UPDATE_FILE)
                raise ArtifactError(
                    f"{f}: tensor {name!r} is {t.dtype} {tuple(t.shape)}; layer {l}'s weight "
                    f"{[rows, cols]} (transposed: {transposed}) and {n} requests in "
                    f"{META_FILE} need torch.float32 {shape}"
                )


def load_edit(path: str | os.PathLike) -> LoadedEdit:
    """Read an edit saved by :func:`save_edit` (the update tensors now, the originals on
    :meth:`LoadedEdit.revert`).

    ``edit.json`` is checked for every field and its type, and for agreement between its
    parts (layers, config, weights, updates, tensor hashes); every stored tensor must be
    listed in it with its SHA-256, and every listed tensor stored. Anything else raises
    :class:`ArtifactError` naming the file and the field or tensor. (``edit.json`` itself
    carries no hash: these checks catch damage and inconsistency, not a deliberate
    rewrite of the whole edit.)"""
    path = Path(path)
    mf = path / META_FILE
    if not mf.is_file():
        raise ArtifactError(f"{path} is not a saved edit: {META_FILE} is missing")
    try:
        meta = json.loads(mf.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mf}: not valid JSON ({e})") from None
    if not isinstance(meta, Mapping):
        raise ArtifactError(f"{mf}: not a memit_fast edit (a JSON {type(meta).__name__})")
    if meta.get("format") != FORMAT:
        raise ArtifactError(f"{mf}: not a memit_fast edit (format {meta.get('format')!r})")
    version = meta.get("format_version")
    if not _is_int(version) or not 1 <= version <= FORMAT_VERSION:
        raise ArtifactError(
            f"{mf}: format version {version!r}; this memit_fast reads versions 1 to "
            f"{FORMAT_VERSION} (upgrade memit_fast)"
        )
    _check_meta(meta, mf)
    hashes = meta["tensor_sha256"]
    uf = path / UPDATE_FILE
    if not uf.is_file():
        raise ArtifactError(f"{path}: {UPDATE_FILE} is missing")
    tensors = _load_verified(uf, hashes[UPDATE_FILE])
    kf = path / KEYS_FILE
    if KEYS_FILE in hashes:
        if not kf.is_file():
            raise ArtifactError(f"{path}: {KEYS_FILE} is missing")
        tensors = {**tensors, **_load_verified(kf, hashes[KEYS_FILE])}
    elif kf.exists():
        raise ArtifactError(f"{kf}: present, but {mf} lists no tensors of it (tensor_sha256)")
    of = path / ORIGINALS_FILE
    if not meta.get("has_originals") and of.exists():
        raise ArtifactError(f"{of}: present, but {mf} says has_originals: false")
    if of.is_file():  # read on revert; its tensor names are checked now (header only)
        try:
            with safe_open(os.fspath(of), framework="pt", device="cpu") as sf:
                stored = list(sf.keys())
        except Exception as e:
            raise ArtifactError(f"{of}: not a readable safetensors file ({e})") from None
        missing = sorted(set(hashes[ORIGINALS_FILE]) - set(stored))
        extra = sorted(set(stored) - set(hashes[ORIGINALS_FILE]))
        if missing or extra:
            raise ArtifactError(
                f"{of}: tensors {missing} listed in {META_FILE} are missing, {extra} are not listed"
            )
    _check_shapes(meta, tensors, path)
    return LoadedEdit(path, dict(meta), tensors)


# ----------------------------------------------------------------------------- PEFT


def _lora_factors(edit, l: int, dh: int, dk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B (dh, r), A (r, dk))`` with ``B A`` the update of layer ``l`` in ``(dh, dk)``
    orientation: ``(R, U^T)`` when the rank ``n`` is at most ``min(dh, dk)``, else the dense
    update against an identity (rank ``min(dh, dk)``)."""
    factors = edit.factors.get(l)
    if factors is not None and factors[0].shape[1] <= min(dh, dk):
        R, U = factors
        return R.detach().float().cpu(), U.detach().float().cpu().T.contiguous()
    D = edit.delta(l).detach().float().cpu()
    if edit.transposed:
        D = D.T
    D = D.contiguous()  # (dh, dk)
    if dh <= dk:
        return torch.eye(dh), D
    return D, torch.eye(dk)


def to_peft(
    edit,
    model,
    path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> Path:
    """Export an edit as a PEFT LoRA adapter, saved with ``save_pretrained`` into ``path``.

    ``peft.PeftModel.from_pretrained(base_model, path)`` on the *unedited* model then computes
    what the edited model computes (up to fp32 rounding: ``W x + B (A x)`` instead of
    ``(W + B A) x``).

    The adapter targets exactly the edited projections. Per layer, ``lora_B = R`` and
    ``lora_A = U^T`` with ``r = n`` (the number of requests) and ``lora_alpha = r`` (scaling
    1); when ``n`` exceeds ``min(dh, dk)``, or the layer was saved dense, the dense update is
    exported at rank ``min(dh, dk)`` against an identity factor instead (exact, and smaller).
    GPT-2's ``Conv1D`` projections get ``fan_in_fan_out=True``.

    Args:
        edit: an :class:`~memit_fast.editor.EditResult` or a :class:`LoadedEdit`.
        model: the model the edit was made for (edited or not; only its structure and
            config are read: the adapter is built on a weightless copy, ``model`` is not
            touched).
        path: the adapter directory.
        dtype: dtype of the LoRA weights.
        overwrite: replace ``path`` if it already holds an adapter or an edit.

    Returns:
        the directory written.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise ImportError("to_peft needs peft: pip install peft") from e
    from memit_fast.editor import EditResult

    model = unwrap_model(model)
    if isinstance(edit, EditResult):
        names = dict(edit.weight_names)
        loaded = None
    elif isinstance(edit, LoadedEdit):
        names = dict(edit.weight_names)
        loaded = edit
    else:
        raise TypeError(f"to_peft: expected an EditResult or LoadedEdit, got {type(edit).__name__}")
    if loaded is not None:
        loaded.check_model(model, weights=None)
    elif edit._adapter is not None:
        _, want = model_config_fingerprint(edit._adapter.model)
        if model_config_fingerprint(model)[1] != want:
            raise ModelMismatchError(
                "to_peft: the model's architecture config differs from the edited model's"
            )
    params = {}
    for l, name in names.items():
        p = _parameter(model, name)
        if p is None:
            raise ModelMismatchError(f"layer {l}: the model has no parameter {name!r}")
        params[l] = p

    targets: dict[int, str] = {l: _module_name(names[l]) for l in edit.layers}
    lora: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for l in edit.layers:
        shape = params[l].shape
        dk, dh = (shape[0], shape[1]) if edit.transposed else (shape[1], shape[0])
        lora[l] = _lora_factors(edit, l, dh, dk)
    ranks = {l: B.shape[1] for l, (B, _) in lora.items()}
    r0 = ranks[edit.layers[0]]
    pattern = {targets[l]: r for l, r in ranks.items() if r != r0}
    config = LoraConfig(
        r=r0,
        lora_alpha=r0,
        target_modules=[targets[l] for l in edit.layers],
        fan_in_fan_out=bool(edit.transposed),
        lora_dropout=0.0,
        bias="none",
        use_rslora=False,
        rank_pattern=dict(pattern),
        alpha_pattern=dict(pattern),
        task_type="CAUSAL_LM",
        base_model_name_or_path=getattr(model.config, "_name_or_path", None) or None,
    )
    # A weightless copy of the model carries the adapter, so the caller's model keeps its
    # modules, parameters and requires_grad flags.
    try:
        with torch.device("meta"):
            skeleton = type(model)(model.config)
    except Exception as e:
        raise RuntimeError(
            f"to_peft: could not build a weightless {type(model).__name__} from its config "
            f"({e}); the adapter is built on such a copy so that the model is not modified"
        ) from e
    peft_model = get_peft_model(skeleton, config)
    inner = peft_model.base_model.model
    for l, (B, A) in lora.items():
        mod = inner.get_submodule(targets[l])
        a, b = mod.lora_A["default"], mod.lora_B["default"]
        if tuple(a.weight.shape) != tuple(A.shape) or tuple(b.weight.shape) != tuple(B.shape):
            raise RuntimeError(
                f"layer {l}: peft built lora_A {tuple(a.weight.shape)} / lora_B "
                f"{tuple(b.weight.shape)} for {targets[l]}, expected {tuple(A.shape)} / "
                f"{tuple(B.shape)}"
            )
        a.weight = torch.nn.Parameter(A.to(dtype), requires_grad=False)
        b.weight = torch.nn.Parameter(B.to(dtype), requires_grad=False)
        if mod.scaling["default"] != 1.0:
            raise RuntimeError(f"layer {l}: LoRA scaling {mod.scaling['default']}, expected 1")
    path = Path(path)
    with _AtomicDir(path, overwrite) as tmp:
        peft_model.save_pretrained(os.fspath(tmp))
    log.info("PEFT adapter written to %s (layers %s, ranks %s)", path, list(edit.layers), ranks)
    return path
