"""``Editor`` and ``EditResult``: MEMIT's layer-by-layer loop, transactions and revert."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from memit_fast import linalg, solvers
from memit_fast._attention import without_cudnn_attention
from memit_fast.arch import ArchSpec, ModelAdapter
from memit_fast.config import EditConfig, auto_config
from memit_fast.data import EditRequest, EditRequestError, normalize_requests
from memit_fast.keys import (
    SubjectNotFoundError,
    encode_target,
    encode_with_subject,
    eval_mode,
    input_device,
    keys_and_hidden,
    mlp_output_gain,
    pad_id,
)
from memit_fast.stats import (
    LayerStats,
    ReplayableTexts,
    StatsCache,
    bit_sums,
    collect_stats,
    corpus_id,
    default_corpus_path,
    is_one_shot,
    model_fingerprints,
    read_corpus,
    stats_meta,
    tokenizer_fingerprint,
)
from memit_fast.targets import PreparedRequest, TargetResult, TargetSettings, compute_targets
from memit_fast.templates import generate_context_templates

log = logging.getLogger(__name__)


def _clock() -> float:
    """``time.perf_counter()`` once the CUDA devices' queued work is done. CUDA runs
    asynchronously, so without the wait a phase's kernels are billed to the next phase that
    waits for a result. Touches CUDA only where it is already initialized, and only the
    devices this process has a context on (synchronizing another would create a context
    there: memory on a GPU the model does not use, or an error on one held exclusively)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        has_context = getattr(torch._C, "_cuda_hasPrimaryContext", lambda i: True)
        for i in range(torch.cuda.device_count()):
            if has_context(i):
                torch.cuda.synchronize(i)
    return time.perf_counter()


# The settings that the key statistics and the generated context templates depend on.
_STATS_FIELDS = ("stats_samples", "stats_max_length", "stats_dtype")
_TEMPLATE_FIELDS = (
    "context_templates",
    "context_template_seeds",
    "context_template_length",
    "context_template_top_k",
    "context_template_seed",
)


# Weight in C of a key coordinate that is zero on every statistics token, relative to the
# mean of C's diagonal (see _live).
DEAD_COORDINATE_WEIGHT = 1e-6


def _dead(C: torch.Tensor) -> torch.Tensor:
    """The key coordinates no statistics token activates: ``C``'s zero diagonal entries."""
    return C.diagonal() == 0


def _live(C: torch.Tensor, layer: int) -> torch.Tensor:
    """``C`` with a small positive diagonal where it is exactly zero: a key coordinate that no
    statistics token activates (a dead ReLU unit, common in OPT) has a zero row and column,
    which would make ``lambda C`` singular. Changing the weights it multiplies costs nothing
    on the statistics, so its preservation weight is ``DEAD_COORDINATE_WEIGHT`` times C's
    mean diagonal: decoupled from the other coordinates, it stays unchanged unless the
    edited keys use it, and where they do the update may use it almost freely, as the
    published solve of ``lambda C + K K^T`` would. ``C`` itself is returned where no
    coordinate is dead."""
    d = C.diagonal()
    dead = _dead(C)
    n_dead = int(dead.sum())
    if n_dead == 0 or n_dead == d.numel():
        return C
    log.info("layer %d: %d key coordinates are zero on every statistics token", layer, n_dead)
    out = C.clone()
    out.diagonal()[dead] = DEAD_COORDINATE_WEIGHT * d.mean()
    return out


class EditFailedError(RuntimeError):
    """The edit could not be computed (non-finite values, ill-conditioned solve). The model's
    weights are as they were before ``apply``."""


@contextlib.contextmanager
def _without_autocast():
    """A caller's ``torch.autocast`` switched off inside: the keys, hidden states and target
    vectors are computed in the model's own dtype (under a bfloat16 autocast the last layer's
    update of a two-layer edit of an fp32 model was off by more than its own size)."""
    with contextlib.ExitStack() as stack:
        for device_type in ("cpu", "cuda"):
            if torch.is_autocast_enabled(device_type):
                stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


def weight_fingerprint(W: torch.Tensor) -> torch.Tensor:
    """An exact checksum of ``W``'s bits (:func:`memit_fast.stats.bit_sums`, position-
    weighted): ``(2,)`` int64 on ``W``'s device, the same for the same bits on any run."""
    return bit_sums(W, weighted=True)


@dataclass(eq=False)
class EditResult:
    """What one ``apply`` did.

    Attributes:
        config: the configuration used (context templates filled in).
        requests: the requests applied (after validation and merging of duplicates).
        layers: the edited layers.
        factors: per layer ``(R, U)`` with ``dW = R U^T``: ``R (dh, r)`` and ``U (dk, r)``
            fp32, so that the update in ``(dh, dk)`` orientation is their product. Usually
            ``r = n``, the residuals and the solved keys; where MEMIT solved for the
            update's columns (``EditConfig.solve_order``, by default when ``dh < n``),
            ``R = I`` and ``U = dW^T`` (``r = dh``).
        targets: per-request optimization figures (loss, nll, kl, steps, target vectors).
        timings: seconds per phase.
        weight_names: the parameter written per layer.
        transposed: whether the weights are stored ``(dk, dh)`` (GPT-2's Conv1D).
        keys: per layer the keys ``K (dk, n)`` fp32 (CPU) the update was solved for.
    """

    config: EditConfig
    requests: list[EditRequest]
    layers: tuple[int, ...]
    factors: dict[int, tuple[torch.Tensor, torch.Tensor]]
    targets: TargetResult
    timings: dict[str, float]
    weight_names: dict[int, str]
    transposed: bool
    keys: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    _originals: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    _adapter: ModelAdapter | None = field(default=None, repr=False)
    _editor: Editor | None = field(default=None, repr=False)
    _fingerprints: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    reverted: bool = False

    def __repr__(self) -> str:
        # A summary: the fields hold every request, factor and target vector.
        state = "reverted" if self.reverted else "applied"
        total = self.timings.get("total")
        took = f", {total:.2f} s" if isinstance(total, (int, float)) else ""
        n = len(self.requests)
        return (
            f"EditResult({n} request{'' if n == 1 else 's'}, layers {list(self.layers)}, solver "
            f"{self.config.solver!r}, {state}{took})"
        )

    def delta(self, layer: int) -> torch.Tensor:
        """The dense fp32 update of ``layer`` in the weight's own layout."""
        R, U = self.factors[layer]
        d = R.float() @ U.float().T
        return d.T.contiguous() if self.transposed else d

    @property
    def deltas(self) -> dict[int, torch.Tensor]:
        return {l: self.delta(l) for l in self.layers}

    def request_figures(self) -> list[dict[str, Any]]:
        """One dict per request: ``case_id``, final ``loss``, ``nll``, ``kl``, ``steps``
        used, ``target_prob`` and ``delta_norm`` (``||z - h||``, :class:`TargetResult`)."""
        t = self.targets
        # One copy to the host per figure, not one per request and figure.
        loss, nll, kl = t.loss.tolist(), t.nll.tolist(), t.kl.tolist()
        steps, prob, norm = t.steps.tolist(), t.target_prob.tolist(), t.delta_norm.tolist()
        return [
            {
                "case_id": r.case_id,
                "loss": float(loss[i]),
                "nll": float(nll[i]),
                "kl": float(kl[i]),
                "steps": int(steps[i]),
                "target_prob": float(prob[i]),
                "delta_norm": float(norm[i]),
            }
            for i, r in enumerate(self.requests)
        ]

    def revert(self, *, force: bool = False) -> None:
        """Restore the exact original weights of every edited layer.

        Raises ``RuntimeError`` if a later edit of the same Editor on these layers is still
        applied (revert in reverse order), or if a layer's weights changed since this edit
        wrote them (another Editor's edit, a dropped later result, training): restoring
        would silently undo that change too. ``force=True`` restores anyway; the later
        edits of this Editor on these layers are then undone as well, and forgotten."""
        if self.reverted:
            raise RuntimeError("this edit was already reverted")
        if self._adapter is None:
            raise RuntimeError("this EditResult is not attached to a model")
        if self._editor is not None and not force:
            self._editor._check_revertible(self)
        if not force:
            changed = [
                l
                for l, fp in self._fingerprints.items()
                if not torch.equal(weight_fingerprint(self._adapter.weight(l)).cpu(), fp.cpu())
            ]
            if changed:
                raise RuntimeError(
                    f"the weights of layers {changed} changed after this edit wrote them "
                    "(another edit or Editor, or training): reverting would undo that change "
                    "too; revert it first, or pass force=True"
                )
        with torch.no_grad():
            for l, w0 in self._originals.items():
                self._adapter.weight(l).copy_(w0)
        self.reverted = True
        if self._editor is not None:
            self._editor._forget(self, undone_later=force)

    def save(
        self, path: str | os.PathLike, *, include_originals: bool = True, overwrite: bool = False
    ):
        """Save this edit as safetensors + JSON; see :func:`memit_fast.artifacts.save_edit`."""
        from memit_fast.artifacts import save_edit

        return save_edit(self, path, include_originals=include_originals, overwrite=overwrite)

    def to_peft(self, model, path: str | os.PathLike, **kwargs):
        """Export as a PEFT LoRA adapter; see :func:`memit_fast.artifacts.to_peft`."""
        from memit_fast.artifacts import to_peft

        return to_peft(self, model, path, **kwargs)


class Editor:
    """Edits a causal LM with MEMIT.

    Args:
        model: a Hugging Face causal LM (any dtype; may be split across devices).
        tokenizer: its tokenizer (a fast tokenizer gives robust subject positions).
        config: an :class:`EditConfig`; ``None`` picks :func:`auto_config` for the model.
        arch: an :class:`ArchSpec` for architectures without a built-in adapter.
        corpus: text for the key statistics (a file path, a list of strings, an iterable or a
            ``datasets`` dataset); defaults to the WikiText-2 sample shipped with the package.
        corpus_id: a name for ``corpus`` in the cache when it cannot be hashed (iterables).
        stats_dir: where statistics are cached (``None``: not cached on disk).
        stats: precomputed statistics ``{layer: (dk, dk) mom2}`` (skip the corpus pass).
        remember_keys: sequential editing: a later ``apply`` solves against
            ``lambda C + sum of K_b K_b^T`` over the batches written before (so it does not
            overwrite them); the cached factor is updated, not refactored. ``False``
            solves every batch against ``lambda C`` alone (plain MEMIT re-applied). With
            ``config.solver``: EMMET preserves ``lambda C + sum K_b K_b^T`` as well,
            AlphaEdit adds ``sum P K_b K_b^T P`` inside its inverse, ROME ignores them.
        progress: show progress bars for the long phases.
    """

    def __init__(
        self,
        model,
        tokenizer,
        config: EditConfig | None = None,
        *,
        arch: ArchSpec | None = None,
        corpus: str | os.PathLike | Iterable[str] | None = None,
        corpus_id: str | None = None,
        stats_dir: str | os.PathLike | None = None,
        stats: dict[int, torch.Tensor] | None = None,
        remember_keys: bool = True,
        progress: bool = False,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.adapter = ModelAdapter(model, arch)
        self._config: EditConfig | None = None
        self.config = config if config is not None else auto_config(model)
        # A generator is read once; kept replayable, every statistics pass sees its texts.
        self.corpus = ReplayableTexts(corpus) if is_one_shot(corpus) else corpus
        self.corpus_id = corpus_id
        self.stats_cache = StatsCache(stats_dir) if stats_dir is not None else None
        self.progress = progress
        self._stats: dict[int, LayerStats] = {}
        if stats is not None:
            for l, C in stats.items():
                # On the layer's device: the solves run where the statistics are.
                l = int(l)
                if 0 <= l < self.adapter.n_layers:
                    C = C.to(self.adapter.weight(l).device)
                self._stats[l] = LayerStats(mom2=C, count=-1)
        self._templates: tuple[str, ...] | None = self.config.context_templates
        self.remember_keys = remember_keys
        self._solvers: dict[int, linalg.LayerSolver] = {}
        # Per layer, from the fixed statistics: AlphaEdit's null-space basis, ROME's factor of C.
        self._nullspace: dict[int, torch.Tensor] = {}
        self._rome_factor: dict[int, torch.Tensor] = {}
        # Per layer, how the block's output moves with the MLP projection's (mlp_output_gain).
        self._gains: dict[int, float] = {}
        # The edits whose keys later applies protect, written or remembered (_Written). Held
        # weakly: a dropped result's keys still protect its edit (it is still applied), but
        # its copy of the original weights is freed.
        self._written: list[_Written] = []
        # Applied results in order, held weakly: a result the user dropped cannot be reverted
        # and so cannot block the revert of an earlier one.
        self._history: list[weakref.ref[EditResult]] = []
        self._head_checked = False

    # ------------------------------------------------------------------ configuration

    @property
    def config(self) -> EditConfig:
        """The configuration of the next ``apply``. Assigning a new one (a lambda sweep over
        the same statistics, say) checks its layers and drops what the old one derived:
        the layer solvers always, the statistics where their settings changed (statistics
        passed as ``stats=`` stay), the context templates where theirs changed."""
        assert self._config is not None
        return self._config

    @config.setter
    def config(self, config: EditConfig) -> None:
        if not isinstance(config, EditConfig):
            raise TypeError(f"Editor.config must be an EditConfig, got {type(config).__name__}")
        bad = [l for l in config.layers if not 0 <= l < self.adapter.n_layers]
        if bad:
            raise ValueError(
                f"EditConfig.layers {list(config.layers)}: layers {bad} do not exist in a "
                f"model with {self.adapter.n_layers} blocks"
            )
        offloaded = [l for l in config.layers if self.adapter.weight(l).device.type == "meta"]
        if offloaded:
            raise ValueError(
                f"layers {offloaded}: the edited weights are offloaded (on the meta device, as "
                "accelerate leaves CPU- or disk-offloaded modules); load the model with those "
                "layers on a device (no offloading) to edit them"
            )
        self._check_writable(config.layers)
        old, self._config = self._config, config
        if old is None:
            return  # __init__ sets up the caches
        if any(getattr(old, f) != getattr(config, f) for f in _STATS_FIELDS):
            self._stats = {l: s for l, s in self._stats.items() if s.count == -1}
        if config.context_templates is not None:
            self._templates = config.context_templates
        elif any(getattr(old, f) != getattr(config, f) for f in _TEMPLATE_FIELDS):
            self._templates = None
        self._solvers.clear()
        self._nullspace.clear()
        self._rome_factor.clear()

    def _check_writable(self, layers: Sequence[int]) -> None:
        """The edited weights are the modules' own tensors: a weight computed on access (a
        ``torch.nn.utils.parametrize`` parametrization, weight norm) would take the update
        in a temporary copy, and the model would not change."""
        computed = []
        for l in layers:
            mod, W = self.adapter.mlp_out(l), self.adapter.weight(l)
            if not any(t is W for t in (mod._parameters.get("weight"), mod._buffers.get("weight"))):
                computed.append(l)
        quantized = {
            l: str(self.adapter.weight(l).dtype)
            for l in layers
            if l not in computed and not self.adapter.weight(l).is_floating_point()
        }
        if quantized:
            raise ValueError(
                f"layers {sorted(quantized)}: the weight of {self.adapter.spec.mlp_out!r} is "
                f"{sorted(set(quantized.values()))[0]}, not floating point (a quantized or "
                "packed model): MEMIT adds a dense float update; load the model unquantized "
                "(float32, bfloat16 or float16) to edit it"
            )
        if computed:
            raise ValueError(
                f"layers {computed}: the weight of {self.adapter.spec.mlp_out!r} is computed "
                "on access (a parametrization such as weight norm), so an update written to it "
                "would not reach the model; remove the parametrization (e.g. "
                "torch.nn.utils.parametrize.remove_parametrizations) to edit these layers"
            )

    def _check_pad(self) -> None:
        """The id that pads the batches (masked, but still looked up in the embedding table)
        is one of the model's tokens."""
        pad = pad_id(self.tokenizer)
        rows = self.model.get_input_embeddings().weight.shape[0]
        if not 0 <= pad < rows:
            raise ValueError(
                f"the tokenizer's pad token id {pad} is outside the model's embedding table "
                f"({rows} tokens): a pad token added to the tokenizer but not to the model; "
                "call model.resize_token_embeddings(len(tokenizer)), or set "
                "tokenizer.pad_token = tokenizer.eos_token"
            )

    # ------------------------------------------------------------------ solver state

    def _solver(self, layer: int, C: torch.Tensor) -> linalg.LayerSolver:
        """The layer's solver: the factor of ``lambda C`` plus the remembered keys."""
        if layer not in self._solvers:
            C = _live(C, layer)
            try:
                s = linalg.LayerSolver(C, self.config.mom2_update_weight, name=f"layer {layer}")
            except linalg.IllConditionedError as e:
                # The solver's message already names the layer and the fix.
                raise EditFailedError(str(e)) from e
            except ValueError as e:
                raise EditFailedError(
                    f"layer {layer}: {e}; use a larger mom2_update_weight (lambda) or more "
                    "statistics samples"
                ) from e
            old = [w.keys[layer] for w in self._written if layer in w.keys]
            if old:
                s.commit(torch.cat(old, dim=1))
            self._solvers[layer] = s
        return self._solvers[layer]

    def _gain(self, layer: int, ids) -> float:
        """What ``layer``'s residuals are divided by, measured once per Editor: the factor
        by which the block scales its MLP's output (:func:`memit_fast.keys.mlp_output_gain`;
        Granite, MiniCPM 3), 1 where that is 1 to within 1 % or no one factor holds."""
        if layer not in self._gains:
            g = mlp_output_gain(self.model, self.adapter, layer, ids)
            if g is None:
                log.warning(
                    "layer %d: the block transforms its MLP's output further (a norm after "
                    "the MLP or after the residual sum): each layer's update moves the "
                    "block's output only approximately as MEMIT intends; the later layers "
                    "of the edit correct part of it",
                    layer,
                )
                g = 1.0
            elif abs(g - 1.0) > 1e-2:
                log.info("layer %d: the block scales its MLP's output by %.4g", layer, g)
            else:
                g = 1.0
            self._gains[layer] = g
        return self._gains[layer]

    def _solve_other(self, l, C, K, R, k_all, n, T, sources) -> tuple[torch.Tensor, torch.Tensor]:
        """The factors ``(R, U)`` of layer ``l``'s update for ``config.solver`` other than
        ``"memit"`` (see :mod:`memit_fast.solvers`); ``U`` float64, ``R`` as given (EMMET,
        AlphaEdit) or ROME's sequential residuals in ``R``'s dtype and device."""
        c = self.config
        Kc = K.to(C.device)
        try:
            if c.solver == "emmet":
                U = solvers.emmet_solve(self._solver(l, C), Kc, c.emmet_ridge, sources)
            elif c.solver == "alphaedit":
                if l not in self._nullspace:
                    self._nullspace[l] = solvers.nullspace_basis(C, c.alphaedit_threshold)
                    log.info(
                        "layer %d: AlphaEdit null space of dimension %d of %d",
                        l,
                        self._nullspace[l].shape[1],
                        C.shape[0],
                    )
                old = [w.keys[l] for w in self._written if l in w.keys]
                K_old = torch.cat(old, dim=1) if old else None
                U = solvers.alphaedit_solve(
                    self._nullspace[l], Kc, K_old, c.alphaedit_lambda, sources
                )
            elif c.solver == "rome":
                if l not in self._rome_factor:
                    self._rome_factor[l] = solvers.rome_factor(_live(C, l))
                K_bare = k_all.reshape(n, T, -1)[:, 0].T
                R64, U = solvers.rome_solve(self._rome_factor[l], Kc, K_bare, R, sources)
                R = R64.to(R.device, R.dtype)
            else:  # EditConfig validates the name
                raise ValueError(f"EditConfig.solver {c.solver!r} is unknown")
        except (linalg.IllConditionedError, solvers.SolverError) as e:
            raise EditFailedError(f"layer {l}: {e}") from e
        return R, U

    def _later_results(self, result: EditResult) -> list[EditResult]:
        """This Editor's results applied after ``result`` that are still held."""
        alive = [r for r in (ref() for ref in self._history) if r is not None]
        idx = next((i for i, r in enumerate(alive) if r is result), None)
        return alive[idx + 1 :] if idx is not None else []

    def _check_revertible(self, result: EditResult) -> None:
        for r in self._later_results(result):
            if not r.reverted and set(r._originals) & set(result._originals):
                raise RuntimeError(
                    "a later edit on the same layers is still applied: revert the edits in "
                    "reverse order"
                )

    def remember(self, edit) -> None:
        """Continue sequential editing after an edit made elsewhere: later applies protect the
        keys of ``edit`` (an :class:`EditResult` of another Editor, or a
        :class:`~memit_fast.artifacts.LoadedEdit` applied to this model) as if this Editor
        had written it. Raises ``ValueError`` if ``edit`` carries no keys for its layers.

        To continue exactly as one session would, the next apply needs that session's
        context templates and key statistics. The templates are taken from ``edit.config``
        when this Editor has none yet. The statistics are not: computed now they come from
        a model that holds the edit (its lower edited layers change the keys above them),
        so pass the first session's ``stats_dir`` (or ``stats=``) to this Editor."""
        keys = dict(getattr(edit, "keys", None) or {})
        layers = tuple(getattr(edit, "layers", ()))
        missing = [l for l in layers if l not in keys]
        if not layers or missing:
            raise ValueError(
                f"remember: the edit holds no keys for layers {missing or list(layers)} "
                "(saved by an older memit_fast?)"
            )
        if not self.remember_keys:
            raise ValueError("remember: this Editor was made with remember_keys=False")
        if getattr(edit, "reverted", False):
            raise ValueError("remember: this edit was reverted; its keys protect nothing")
        if self._find_written(edit) is not None:
            raise ValueError("remember: this edit is remembered already")
        dk = self.adapter.dims()[0]
        bad = {l: tuple(k.shape) for l, k in keys.items() if k.dim() != 2 or k.shape[0] != dk}
        bad_layers = [l for l in layers if not 0 <= l < self.adapter.n_layers]
        if bad or bad_layers:
            raise ValueError(
                f"remember: the edit does not fit this model (layers {bad_layers} missing, or "
                f"keys {bad} not ({dk}, n))"
            )
        check = getattr(edit, "check_model", None)
        if callable(check):  # a LoadedEdit: the model it was made for (structure only)
            check(self.model, weights=None)
        self._written.append(
            _Written(
                _holder(edit),
                {l: k.detach().float().cpu() for l, k in keys.items()},
                own=False,
                identity=_edit_identity(edit),
            )
        )
        self._solvers.clear()  # rebuilt from lambda C and every remembered key
        cfg = getattr(edit, "config", None)
        if self._templates is None and cfg is not None and cfg.context_templates:
            self._templates = tuple(cfg.context_templates)
        if self.stats_cache is None and not self._stats:
            log.warning(
                "remember: this Editor has no key statistics yet and no stats_dir: they will "
                "come from the model as it is now, with the edit applied, not from the model "
                "the edit was computed on; pass that session's stats_dir for the same result"
            )

    def forget(self, edit) -> None:
        """Stop protecting the keys of a remembered ``edit`` (say a
        :class:`~memit_fast.artifacts.LoadedEdit` reverted with its own ``revert``). An
        :class:`EditResult` of this Editor is forgotten by its ``revert()``."""
        pos = self._find_written(edit)
        if pos is None:
            raise ValueError("forget: this edit is not remembered by this Editor")
        self._written.pop(pos)
        self._solvers.clear()  # rebuilt from lambda C and the remaining keys

    def _find_written(self, edit) -> int | None:
        """The position of ``edit`` among the written and remembered edits: the same object,
        or the same edit in another form (a result saved and loaded again, or loaded twice):
        the same requests and the same keys. A subject edited twice, to two targets, has
        equal keys but other requests: two edits."""
        identity = _edit_identity(edit)
        keys = dict(getattr(edit, "keys", None) or {})
        for i, w in enumerate(self._written):
            if w.holder() is edit:
                return i
            if (
                identity is not None
                and w.identity == identity
                and set(w.keys) == set(keys)
                and all(torch.equal(w.keys[l], keys[l].detach().float().cpu()) for l in keys)
            ):
                return i
        return None

    def _forget(self, result, undone_later: bool = False) -> None:
        """Called by ``result.revert()``, which restored the layers of ``result._originals``:
        its keys no longer protect anything. With ``undone_later`` (a forced revert), this Editor's
        later edits were undone on those layers too: their keys there are dropped, and their
        own revert leaves those layers alone (a result left with none counts as reverted).
        Remembered edits keep their keys: when they were applied is not known here."""
        restored = set(result._originals)
        pos = next((i for i, w in enumerate(self._written) if w.holder() is result), None)
        if undone_later:
            for r in self._later_results(result):
                hit = sorted(set(r._originals) & restored)
                if r.reverted or not hit:
                    continue
                log.warning("revert(force=True): a later edit on layers %s is undone too", hit)
                for l in hit:
                    r._originals.pop(l, None)
                    r._fingerprints.pop(l, None)
                if not r._originals:
                    r.reverted = True
            if pos is not None:
                for w in self._written[pos + 1 :]:
                    if w.own:  # (also the results the caller dropped)
                        w.keys = {l: k for l, k in w.keys.items() if l not in restored}
        if pos is not None:
            self._written.pop(pos)
        before = len(self._written)
        self._written = [w for w in self._written if w.keys]
        if pos is not None or len(self._written) != before or undone_later:
            self._solvers.clear()  # rebuilt from lambda C and the remaining keys
        self._history = [ref for ref in self._history if ref() is not None and ref() is not result]

    # ------------------------------------------------------------------ inputs

    def context_templates(self) -> tuple[str, ...]:
        """The context templates (generated once per Editor when the config has none)."""
        if self._templates is None:
            c = self.config
            with eval_mode(self.model):
                self._templates = generate_context_templates(
                    self.model,
                    self.tokenizer,
                    seeds=c.context_template_seeds,
                    length=c.context_template_length,
                    top_k=c.context_template_top_k,
                    seed=c.context_template_seed,
                )
        return self._templates

    def prepare(
        self,
        requests: Sequence[EditRequest],
        templates: Sequence[str],
        *,
        indices: Sequence[int] | None = None,
    ) -> list[PreparedRequest]:
        """Tokenize every request; raise :class:`EditRequestError` listing every problem.
        ``indices``: the caller's index of each request, for the messages (``apply`` passes
        the positions in its input, which merged duplicates no longer match)."""
        tok = self.tokenizer
        problems: list[str] = []
        out: list[PreparedRequest] = []
        ctx = self.adapter.context_length()
        for j, r in enumerate(requests):
            i = indices[j] if indices is not None else j
            try:
                rewrites = tuple(
                    encode_with_subject(tok, t[: t.index("{}")], r.prompt, r.subject)
                    for t in templates
                )
                kl = encode_with_subject(tok, "", self.config.kl_prompt, r.subject)
                tgt = encode_target(tok, r.text, r.target)
            except SubjectNotFoundError as e:
                problems.append(f"request {i}: field 'subject': {e}")
                continue
            if not tgt:
                problems.append(f"request {i}: field 'target' {r.target!r} has no tokens")
                continue
            longest = max(len(e.ids) for e in rewrites) + len(tgt) - 1
            if ctx is not None and max(longest, len(kl.ids)) > ctx:
                problems.append(
                    f"request {i}: field 'prompt': prompt and target take {longest} tokens "
                    f"with context templates, more than the model's context of {ctx}"
                )
                continue
            out.append(PreparedRequest(rewrites=rewrites, target_ids=tgt, kl=kl))
        if problems:
            raise EditRequestError(problems)
        return out

    # ------------------------------------------------------------------ statistics

    def stats_length(self) -> int:
        """Tokens per statistics text: ``config.stats_max_length``, by default the model's
        (:meth:`ModelAdapter.stats_length`), never beyond its context."""
        ctx = self.adapter.context_length()
        max_len = self.config.stats_max_length or self.adapter.stats_length() or 1024
        if ctx is not None and max_len > ctx:
            log.info("stats_max_length %d is beyond the model's context: %d used", max_len, ctx)
            max_len = ctx
        return max_len

    def _stats_source(self):
        if self.corpus is not None:
            return self.corpus
        return default_corpus_path()

    def key_stats(self, layers: Sequence[int] | None = None) -> dict[int, LayerStats]:
        """Second moments of the keys for ``layers`` (default: the config's): from memory,
        the disk cache, or one corpus pass for all missing layers."""
        layers = list(self.config.layers if layers is None else layers)
        missing = [l for l in layers if l not in self._stats]
        if not missing:
            return {l: self._stats[l] for l in layers}
        self._check_pad()  # (the corpus pass pads its batches)
        c = self.config
        max_len = self.stats_length()
        source = self._stats_source()
        cid = corpus_id(source, self.corpus_id)
        metas = {}
        if self.stats_cache is not None and cid is None:
            log.warning(
                "stats_dir is set, but this corpus has no identity to cache its statistics "
                "under (a generator or dataset without a fingerprint): pass corpus_id=..."
            )
        if self.stats_cache is not None and cid is not None:
            fps = model_fingerprints(self.adapter, missing)
            tfp = tokenizer_fingerprint(self.tokenizer)
            for l in missing:
                metas[l] = stats_meta(
                    self.adapter, fps[l], l, cid, c.stats_samples, max_len, c.stats_dtype, tfp
                )
                got = self.stats_cache.load(metas[l], self.adapter.weight(l).device)
                if got is not None:
                    self._stats[l] = got
            missing = [l for l in missing if l not in self._stats]
        if missing:
            with eval_mode(self.model):
                new = collect_stats(
                    self.model,
                    self.tokenizer,
                    self.adapter,
                    missing,
                    read_corpus(source),
                    samples=c.stats_samples,
                    max_length=max_len,
                    batch_size=c.stats_batch_size,
                    dtype=c.stats_dtype,
                    progress=self.progress,
                )
            for l, s in new.items():
                self._stats[l] = s
                if l in metas:
                    self.stats_cache.save(metas[l], s)
        return {l: self._stats[l] for l in layers}

    # ------------------------------------------------------------------ the edit

    def _check_head(self) -> None:
        """Once per editor: the target optimization's logits (last block's output, final
        norm, head) are the model's own (:meth:`ModelAdapter.check_head`)."""
        if self._head_checked:
            return
        ids = list(self.tokenizer("The capital of France is Paris.")["input_ids"])
        self.adapter.check_head(torch.tensor([ids], device=input_device(self.model)))
        self._head_checked = True

    def apply(self, requests: Iterable[Any]) -> EditResult:
        """Write ``requests`` into the model (in place) and return an :class:`EditResult`.

        Raises :class:`EditRequestError` for malformed requests (nothing is touched) and
        :class:`EditFailedError` when the edit cannot be computed; any exception, including
        ``KeyboardInterrupt``, leaves the weights bit-identical to before.

        The model runs in eval mode, without autocast and without cuDNN attention (torch's
        global attention flags, restored on return; see
        :func:`memit_fast._attention.without_cudnn_attention`).
        """
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "Editor.apply cannot run under torch.inference_mode(): the target vectors are "
                "optimized with autograd; call it outside that context"
            )
        self._check_writable(self.config.layers)
        self._check_pad()
        timings: dict[str, float] = {}
        t0 = _clock()
        reqs, sources = normalize_requests(requests, with_indices=True)
        with eval_mode(self.model), _without_autocast(), without_cudnn_attention():
            self._check_head()
            tick = _clock()
            templates = self.context_templates()
            timings["context_templates"] = _clock() - tick
            prepared = self.prepare(reqs, templates, indices=sources)
            timings["validate"] = _clock() - t0 - timings["context_templates"]
            tick = _clock()
            stats = self.key_stats()
            timings["statistics"] = _clock() - tick
            result = self._apply_prepared(reqs, prepared, templates, stats, timings, sources)
        timings["total"] = _clock() - t0
        return result

    def _apply_prepared(self, reqs, prepared, templates, stats, timings, sources) -> EditResult:
        """``sources``: each request's index in the caller's input, for the messages."""
        c = self.config
        ad = self.adapter
        layers = c.layers
        L = layers[-1]
        pad = pad_id(self.tokenizer)
        tick = _clock()
        tr = compute_targets(
            self.model,
            ad,
            prepared,
            TargetSettings.from_config(c, L),
            pad,
            c.target_chunk_size,
            progress=self.progress,
        )
        timings["targets"] = _clock() - tick
        finite = torch.isfinite(tr.z).all(dim=1) & torch.isfinite(tr.loss).to(tr.z.device)
        bad = [sources[i] for i in (~finite).nonzero().flatten().tolist()]
        if bad:
            hint = ""
            if ad.weight(L).dtype == torch.float16:
                hint = "; a float16 model's forward may overflow: load it in bfloat16 or float32"
            raise EditFailedError(
                f"target vectors of requests {bad} are not finite (their loss or vector); "
                f"lower lr or check the model{hint}"
            )

        # Sequences for the keys: every request under every context template, up to the
        # subject's last token (the model is causal: what follows cannot change them).
        n = len(prepared)
        T = len(templates)
        seqs = [e.ids[: e.subject_last + 1] for p in prepared for e in p.rewrites]
        pos = [e.subject_last for p in prepared for e in p.rewrites]
        bare_rows = [i * T for i in range(n)]
        originals: dict[int, torch.Tensor] = {}
        factors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        written_keys: dict[int, torch.Tensor] = {}
        timings["keys"] = 0.0
        timings["solve"] = 0.0
        timings["update"] = 0.0
        # The fused solve/update's rule for what the solve is for (the keys, or dW^T).
        from memit_fast.kernels.reference import solve_order

        touched: list[int] = []  # layers whose cached factor took this edit's keys
        try:
            for j, l in enumerate(layers):
                tick = _clock()
                k_all, H = keys_and_hidden(
                    self.model,
                    ad,
                    seqs,
                    pos,
                    key_layer=l,
                    hidden_layer=L,
                    pad=pad,
                    hidden_rows=bare_rows,
                    batch_size=c.key_chunk_size * T,
                )
                K = _average_keys(k_all, n, T)  # (dk, n)
                timings["keys"] += _clock() - tick
                tick = _clock()
                Z = tr.z.to(H.device)
                R = ((Z - H) / (len(layers) - j)).T.contiguous()  # (dh, n)
                gain = self._gain(l, seqs[0])
                if gain != 1.0:
                    # The block scales its MLP's output: the projection must move by
                    # R / gain for the block's output to move by R.
                    R = R / gain
                C = stats[l].mom2
                dead = _dead(C)  # (see _live)
                if bool(dead.any()):
                    used = int((K[dead.to(K.device)] != 0).any(dim=1).sum())
                    if used:
                        log.warning(
                            "layer %d: the edited keys use %d key coordinates that no "
                            "statistics token activates; the update may change their weights "
                            "almost freely (more statistics samples would weigh them)",
                            l,
                            used,
                        )
                if c.solver == "memit":
                    solver = self._solver(l, C)
                    dh = R.shape[0]
                    try:
                        if solve_order(c.solve_order, dh, n) == "update":
                            # dW^T = A^-1 (K R^T): dh right-hand sides instead of n; the
                            # factors become (I, dW^T).
                            K64 = K.to(C.device, torch.float64)
                            U = solver.solve(K64, K64 @ R.to(C.device, torch.float64).T)
                            R = torch.eye(dh, dtype=R.dtype, device=R.device)
                        else:
                            U = solver.solve(K.to(C.device))
                    except linalg.IllConditionedError as e:
                        raise EditFailedError(f"layer {l}: {e}") from e
                else:
                    R, U = self._solve_other(l, C, K, R, k_all, n, T, sources)
                U = U.to(torch.float32)
                written_keys[l] = K.detach().to("cpu")
                timings["solve"] += _clock() - tick
                if not (torch.isfinite(U).all() and torch.isfinite(R).all()):
                    raise EditFailedError(
                        f"layer {l}: the update is not finite (lambda="
                        f"{c.mom2_update_weight}); use a larger lambda or more statistics"
                    )
                tick = _clock()
                W = ad.weight(l)
                with torch.no_grad():
                    if l not in originals:
                        originals[l] = W.detach().clone()
                    linalg.apply_update(W, R, U, ad.transposed)
                timings["update"] += _clock() - tick
                factors[l] = (R.detach(), U.to(R.device))
                log.info("layer %d written (%d requests)", l, n)
            result = EditResult(
                config=c.replace(context_templates=tuple(templates)),
                requests=list(reqs),
                layers=tuple(layers),
                factors=factors,
                targets=tr,
                timings=timings,
                weight_names={l: ad.weight_name(l) for l in layers},
                transposed=ad.transposed,
                keys=written_keys,
                _originals=originals,
                _adapter=ad,
                _editor=self,
                _fingerprints={l: weight_fingerprint(ad.weight(l)) for l in layers},
            )
            if self.remember_keys:
                # The keys join the layers' factors only with the rest of the edit: a
                # failure here drops the factors it touched (they rebuild from _written).
                for l, K in written_keys.items():
                    if l in self._solvers:  # solvers without a factor rebuild from _written
                        touched.append(l)
                        self._solvers[l].commit(K.to(self._solvers[l].A.device))
        except BaseException:
            for l in touched:
                self._solvers.pop(l, None)
            with torch.no_grad():
                for l, w0 in originals.items():
                    ad.weight(l).copy_(w0)
            raise
        if self.remember_keys:
            self._written.append(
                _Written(_holder(result), written_keys, own=True, identity=_edit_identity(result))
            )
        self._history.append(weakref.ref(result))
        return result


@dataclass
class _Written:
    """An edit whose keys later applies protect (``Editor._written``, in the order written
    or remembered)."""

    holder: Any  # () -> the edit, or None once a weakly held result was dropped
    keys: dict[int, torch.Tensor]
    own: bool  # written by this Editor's apply (so in apply order), not remembered
    identity: str | None  # what the edit was asked to do (_edit_identity)


def _edit_identity(edit) -> str | None:
    """What an edit was asked to do: the SHA-256 of its requests' prompts, subjects and
    targets (the same for a result and for its saved copy; a digest, not the requests, is
    kept per apply); ``None`` for an edit-like object without requests."""
    reqs = getattr(edit, "requests", None)
    if not reqs:
        return None
    try:
        asked = [(r.prompt, r.subject, r.target) for r in reqs]
    except AttributeError:
        return None
    return hashlib.sha256(json.dumps(asked, ensure_ascii=False).encode("utf-8")).hexdigest()


def _holder(edit):
    """How the Editor holds a written or remembered edit: weakly where it can (a dropped
    result frees its copy of the original weights; its keys are kept apart), else strongly."""
    try:
        return weakref.ref(edit)
    except TypeError:
        return lambda: edit


def _average_keys(k_all: torch.Tensor, n: int, T: int) -> torch.Tensor:
    """``(n*T, dk)`` keys (request-major, template 0 the bare prompt) to ``(dk, n)``: the
    mean over the prefixed templates, averaged 50/50 with the bare prompt's key."""
    k = k_all.reshape(n, T, -1)
    if T == 1:
        return k[:, 0].T.contiguous()
    return (0.5 * (k[:, 0] + k[:, 1:].mean(dim=1))).T.contiguous()


__all__ = ["Editor", "EditResult", "EditFailedError", "EditRequestError", "input_device"]
