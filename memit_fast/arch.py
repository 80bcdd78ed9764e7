"""Per-architecture adapters: where the blocks, the MLP output projections, the final norm
and the output head of a Hugging Face causal LM live.

MEMIT edits ``W_l``, the MLP output projection of block ``l`` (``R^dk -> R^dh``). Its input
(``dk``-dimensional) is the *key*; the output of the whole block is the hidden state.

GPT-2 stores that projection as a ``Conv1D`` whose weight is ``(dk, dh)`` (the transpose of
``nn.Linear``'s ``(dh, dk)``); :attr:`ModelAdapter.transposed` says which layout a model uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    """Attribute paths (dotted, relative to the model) of one architecture family."""

    blocks: str  # ModuleList of transformer blocks
    mlp_out: str  # relative to a block: the MLP output projection
    final_norm: str  # a model whose attribute there is ``None`` has none (OPT-350m)
    transposed: bool = False  # weight stored (dk, dh) as in GPT-2's Conv1D
    # Applied after the final norm where the model has it (``None`` there: it has not), as
    # OPT-350m's ``project_out`` to the embedding width.
    final_proj: str | None = None


# model_type (config.model_type) -> spec
ARCH_SPECS: dict[str, ArchSpec] = {
    "gpt2": ArchSpec("transformer.h", "mlp.c_proj", "transformer.ln_f", transposed=True),
    "gptj": ArchSpec("transformer.h", "mlp.fc_out", "transformer.ln_f"),
    "gpt_neox": ArchSpec("gpt_neox.layers", "mlp.dense_4h_to_h", "gpt_neox.final_layer_norm"),
    "llama": ArchSpec("model.layers", "mlp.down_proj", "model.norm"),
    "mistral": ArchSpec("model.layers", "mlp.down_proj", "model.norm"),
    "qwen2": ArchSpec("model.layers", "mlp.down_proj", "model.norm"),
    "qwen3": ArchSpec("model.layers", "mlp.down_proj", "model.norm"),
    "gemma": ArchSpec("model.layers", "mlp.down_proj", "model.norm"),
    "phi3": ArchSpec("model.layers", "mlp.down_proj", "model.norm"),
    "olmo": ArchSpec("model.layers", "mlp.down_proj", "model.norm"),
    "olmo2": ArchSpec("model.layers", "mlp.down_proj", "model.norm"),
    "olmo3": ArchSpec("model.layers", "mlp.down_proj", "model.norm"),
    "gemma2": ArchSpec("model.layers", "mlp.down_proj", "model.norm"),
    "gemma3_text": ArchSpec("model.layers", "mlp.down_proj", "model.norm"),
    "cohere": ArchSpec("model.layers", "mlp.down_proj", "model.norm"),
    "cohere2": ArchSpec("model.layers", "mlp.down_proj", "model.norm"),
    "granite": ArchSpec("model.layers", "mlp.down_proj", "model.norm"),
    "smollm3": ArchSpec("model.layers", "mlp.down_proj", "model.norm"),
    "stablelm": ArchSpec("model.layers", "mlp.down_proj", "model.norm"),
    "glm": ArchSpec("model.layers", "mlp.down_proj", "model.norm"),
    "exaone4": ArchSpec("model.layers", "mlp.down_proj", "model.norm"),
    "arcee": ArchSpec("model.layers", "mlp.down_proj", "model.norm"),
    "apertus": ArchSpec("model.layers", "mlp.down_proj", "model.norm"),
    "nemotron": ArchSpec("model.layers", "mlp.down_proj", "model.norm"),
    "glm4": ArchSpec("model.layers", "mlp.down_proj", "model.norm"),
    "ernie4_5": ArchSpec("model.layers", "mlp.down_proj", "model.norm"),
    "helium": ArchSpec("model.layers", "mlp.down_proj", "model.norm"),
    "ministral": ArchSpec("model.layers", "mlp.down_proj", "model.norm"),
    "ministral3": ArchSpec("model.layers", "mlp.down_proj", "model.norm"),
    "seed_oss": ArchSpec("model.layers", "mlp.down_proj", "model.norm"),
    "hunyuan_v1_dense": ArchSpec("model.layers", "mlp.down_proj", "model.norm"),
    "jais2": ArchSpec("model.layers", "mlp.down_proj", "model.norm"),
    "vaultgemma": ArchSpec("model.layers", "mlp.down_proj", "model.norm"),
    "granite_swa": ArchSpec("model.layers", "mlp.down_proj", "model.norm"),
    "hyperclovax": ArchSpec("model.layers", "mlp.down_proj", "model.norm"),
    "nanochat": ArchSpec("model.layers", "mlp.fc2", "model.norm"),
    "starcoder2": ArchSpec("model.layers", "mlp.c_proj", "model.norm"),
    "phi": ArchSpec("model.layers", "mlp.fc2", "model.final_layernorm"),
    "falcon": ArchSpec("transformer.h", "mlp.dense_4h_to_h", "transformer.ln_f"),
    "bloom": ArchSpec("transformer.h", "mlp.dense_4h_to_h", "transformer.ln_f"),
    "gpt_bigcode": ArchSpec("transformer.h", "mlp.c_proj", "transformer.ln_f"),
    "gpt_neo": ArchSpec("transformer.h", "mlp.c_proj", "transformer.ln_f"),
    "codegen": ArchSpec("transformer.h", "mlp.fc_out", "transformer.ln_f"),
    "ctrl": ArchSpec("transformer.h", "ffn.2", "transformer.layernorm"),
    "mpt": ArchSpec("transformer.blocks", "ffn.down_proj", "transformer.norm_f"),
    "opt": ArchSpec(
        "model.decoder.layers",
        "fc2",
        "model.decoder.final_layer_norm",
        final_proj="model.decoder.project_out",
    ),  # fmt: skip
    "xglm": ArchSpec("model.layers", "fc2", "model.layer_norm"),
    "biogpt": ArchSpec("biogpt.layers", "fc2", "biogpt.layer_norm"),
    "persimmon": ArchSpec("model.layers", "mlp.dense_4h_to_h", "model.final_layernorm"),
    # Image-text models edited through their language model (text-only prompts).
    "gemma3": ArchSpec("model.language_model.layers", "mlp.down_proj", "model.language_model.norm"),
}


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    mod = root
    for part in path.split("."):
        mod = getattr(mod, part)
    return mod


class UnsupportedArchitectureError(ValueError):
    pass


class ModelAdapter:
    """Finds the parts of ``model`` that MEMIT reads and writes.

    Args:
        model: a Hugging Face causal LM.
        spec: an explicit :class:`ArchSpec` for architectures not in :data:`ARCH_SPECS`.
    """

    def __init__(self, model: nn.Module, spec: ArchSpec | None = None):
        self.model = model
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if spec is None:
            if model_type not in ARCH_SPECS:
                experts = _experts(model)
                if experts is not None:
                    raise UnsupportedArchitectureError(
                        f"model_type {model_type!r} is a mixture of experts ({experts!r}): its "
                        "MLP has one output projection per expert, not the single one MEMIT "
                        "edits; mixture-of-experts models are not supported"
                    )
                raise UnsupportedArchitectureError(
                    f"model_type {model_type!r} has no built-in adapter (known: "
                    f"{', '.join(sorted(ARCH_SPECS))}); pass "
                    "arch=memit_fast.arch.ArchSpec(blocks='model.layers', "
                    "mlp_out='mlp.down_proj', final_norm='model.norm', transposed=False) "
                    "with the attribute paths of your model"
                )
            spec = ARCH_SPECS[model_type]
        self.spec = spec
        self.model_type = model_type
        try:
            self.blocks = get_submodule(model, spec.blocks)
            # A post-norm model (OPT-350m) has ``None`` where the final norm would be.
            norm = get_submodule(model, spec.final_norm)
            self.final_norm = nn.Identity() if norm is None else norm
            self.final_proj = get_submodule(model, spec.final_proj) if spec.final_proj else None
            projections = [self.mlp_out(layer) for layer in range(len(self.blocks))]
        except (AttributeError, TypeError) as e:
            raise UnsupportedArchitectureError(
                f"model of type {type(model).__name__} does not match the adapter {spec}: {e}"
            ) from e
        self._check_projections(projections)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is None:
            raise UnsupportedArchitectureError(f"{type(model).__name__} has no output head")
        self.head = head
        cfg = getattr(model, "config", None)
        # What the model's forward does to the head's output: Gemma 2/3 cap the logits
        # (``cap * tanh(logits / cap)``), Cohere multiplies them by ``logit_scale``, Granite
        # divides them by ``logits_scaling``. The model's own config says so, not a
        # sub-config: Gemma 3's image-text model does not cap what its text config would.
        # :meth:`check_head` verifies the result.
        self.logit_softcap = _positive(getattr(cfg, "final_logit_softcapping", None))
        scale = _positive(getattr(model, "logit_scale", None) or getattr(cfg, "logit_scale", None))
        divisor = _positive(getattr(cfg, "logits_scaling", None))
        self.logit_multiplier = (scale or 1.0) / (divisor or 1.0)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's next-token logits from the last block's output ``hidden`` (``(..., dh)``):
        the final norm, the head, and the model's own post-processing of the logits."""
        norm_dev = next((p.device for p in self.final_norm.parameters()), hidden.device)
        h = self.final_norm(hidden.to(norm_dev))
        if self.final_proj is not None:
            h = self.final_proj(h.to(self.final_proj.weight.device))
        logits = self.head(h.to(self.head.weight.device))
        if self.logit_multiplier != 1.0:
            logits = logits * self.logit_multiplier
        if self.logit_softcap is not None:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits

    @torch.no_grad()
    def check_head(self, input_ids: torch.Tensor, rtol: float | None = None) -> float:
        """Runs the model on ``input_ids`` (``(1, t)``) and checks that :meth:`logits` of the
        last block's output gives the model's own logits; MEMIT's target optimization
        computes them that way. Returns the relative difference; raises
        :class:`UnsupportedArchitectureError` if it exceeds ``rtol`` (default: 1e-5 in fp32,
        2e-2 in 16-bit), which means the model's forward does more after its last block than
        the adapter knows (or the spec names the wrong final norm)."""
        got = {}

        def grab(mod, args, out):
            got["h"] = block_output(out)

        handle = self.blocks[self.n_layers - 1].register_forward_hook(grab)
        try:
            out = self.model(input_ids=input_ids, use_cache=False)
        finally:
            handle.remove()
        want = (out.logits if hasattr(out, "logits") else out[0]).float()
        if not bool(torch.isfinite(want).all()):
            raise ValueError(
                f"{type(self.model).__name__}: the model's own forward gives non-finite logits "
                f"on a probe text ({self.head.weight.dtype}): the model's weights hold NaN/Inf, "
                "or its forward overflows (float16: load it in bfloat16 or float32)"
            )
        try:
            mine = self.logits(got["h"]).float().to(want.device)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as e:  # widths that do not fit (a projection the spec omits)
            raise UnsupportedArchitectureError(
                f"{type(self.model).__name__}: the last block's output through "
                f"{self.spec.final_norm!r} and the output head does not give the model's "
                f"own logits ({e}). Check ArchSpec.final_norm and ArchSpec.final_proj, or "
                "report the architecture"
            ) from e
        diff = float((mine - want).norm() / want.norm().clamp_min(1e-30))
        if rtol is None:
            rtol = 1e-5 if self.head.weight.dtype in (torch.float32, torch.float64) else 2e-2
        if not diff <= rtol:
            raise UnsupportedArchitectureError(
                f"{type(self.model).__name__}: the logits from the last block's output through "
                f"{self.spec.final_norm!r} and the output head differ from the model's own by "
                f"{diff:.3g} (relative): its forward transforms the hidden state or the logits "
                "after the last block in a way the adapter does not reproduce. Check "
                "ArchSpec.final_norm, or report the architecture"
            )
        return diff

    def _check_projections(self, projections: list) -> None:
        """Every block's ``mlp_out`` (``projections``) is one module with a 2-D weight, of
        one shape in all blocks (a dense MLP's output projection, not a set of experts'
        weights)."""
        shapes = set()
        for layer, mod in enumerate(projections):
            w = getattr(mod, "weight", None) if isinstance(mod, nn.Module) else None
            if not isinstance(w, torch.Tensor) or w.dim() != 2:
                what = (
                    f"a {type(mod).__name__} with a weight of shape {tuple(w.shape)}"
                    if isinstance(w, torch.Tensor)
                    else f"a {type(mod).__name__} without a weight"
                )
                experts = _experts(self.model)
                raise UnsupportedArchitectureError(
                    f"{type(self.model).__name__}: mlp_out {self.spec.mlp_out!r} of block "
                    f"{layer} is {what}, not a projection with a 2-D weight"
                    + (
                        f"; the model is a mixture of experts ({experts!r}), which MEMIT's "
                        "single projection per block does not cover"
                        if experts is not None
                        else ""
                    )
                )
            shapes.add(tuple(w.shape))
        if len(shapes) > 1:
            raise UnsupportedArchitectureError(
                f"{type(self.model).__name__}: the blocks' mlp_out {self.spec.mlp_out!r} "
                f"weights differ in shape ({sorted(shapes)}); the adapter takes one key width"
            )

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def transposed(self) -> bool:
        return self.spec.transposed

    def block(self, layer: int) -> nn.Module:
        return self.blocks[layer]

    def mlp_out(self, layer: int) -> nn.Module:
        return get_submodule(self.blocks[layer], self.spec.mlp_out)

    def weight(self, layer: int) -> torch.Tensor:
        """The parameter MEMIT writes at ``layer``: ``(dh, dk)``, or ``(dk, dh)`` if transposed."""
        return self.mlp_out(layer).weight

    def weight_name(self, layer: int) -> str:
        return f"{self.spec.blocks}.{layer}.{self.spec.mlp_out}.weight"

    def dims(self) -> tuple[int, int]:
        """``(dk, dh)``: key (MLP) width and hidden (model) width."""
        w = self.weight(0)
        return (w.shape[0], w.shape[1]) if self.transposed else (w.shape[1], w.shape[0])

    def tied_head(self) -> bool:
        emb = self.model.get_input_embeddings()
        return emb is not None and emb.weight is self.head.weight

    def stats_length(self) -> int | None:
        """The longest statistics text by default: the context, but for LongRoPE models
        (Phi-3 128k, Phi-3.5, Phi-4-mini) their original context. Past it LongRoPE switches
        every position of a forward pass to its long frequencies, so a batch's keys would
        depend on the longest text it holds."""
        cfg = text_config(self.model)
        rope = getattr(cfg, "rope_scaling", None) or getattr(cfg, "rope_parameters", None)
        kind = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
        original = getattr(cfg, "original_max_position_embeddings", None)
        if kind == "longrope" and isinstance(original, int) and original > 0:
            ctx = self.context_length()
            return original if ctx is None else min(original, ctx)
        return self.context_length()

    def context_length(self) -> int | None:
        return context_length(self.model)


def context_length(model) -> int | None:
    """The longest sequence ``model`` (or its configuration) takes, if its configuration
    says: the size of its position table, under whichever name the family uses."""
    cfg = text_config(model)
    for name in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length",
                 "max_sequence_length"):  # fmt: skip
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def text_config(model):
    """The configuration of ``model``'s language model (``model`` a model or a
    configuration): the configuration itself, or for an image-text model (Gemma 3) its
    ``text_config``."""
    cfg = getattr(model, "config", model)  # (a configuration has no ``config``)
    get = getattr(cfg, "get_text_config", None)
    return get() if callable(get) else cfg


def _experts(model: nn.Module) -> str | None:
    """The name of a mixture-of-experts submodule of ``model`` (``...experts``, a router's
    experts), or ``None`` if it has none."""
    for name, _ in model.named_modules():
        if name.rsplit(".", 1)[-1] in ("experts", "block_sparse_moe", "moe"):
            return name
    return None


def _positive(x) -> float | None:
    """``x`` as a float if it is a positive number, else ``None``."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if v > 0 else None


def block_output(out) -> torch.Tensor:
    """The hidden state a block returns (blocks return a tensor or a tuple, by version)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def replace_block_output(out, hidden: torch.Tensor):
    if isinstance(out, tuple):
        return (hidden,) + tuple(out[1:])
    if isinstance(out, list):
        return [hidden] + list(out[1:])
    return hidden
