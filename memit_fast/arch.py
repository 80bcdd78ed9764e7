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
    final_norm: str
    transposed: bool = False  # weight stored (dk, dh) as in GPT-2's Conv1D


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
            self.final_norm = get_submodule(model, spec.final_norm)
            self.mlp_out(0)
        except AttributeError as e:
            raise UnsupportedArchitectureError(
                f"model of type {type(model).__name__} does not match the adapter {spec}: {e}"
            ) from e
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is None:
            raise UnsupportedArchitectureError(f"{type(model).__name__} has no output head")
        self.head = head

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

    def context_length(self) -> int | None:
        cfg = self.model.config
        for name in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
            v = getattr(cfg, name, None)
            if isinstance(v, int) and v > 0:
                return v
        return None


def block_output(out) -> torch.Tensor:
    """The hidden state a block returns (blocks return a tensor or a tuple, by version)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def replace_block_output(out, hidden: torch.Tensor):
    if isinstance(out, tuple):
        return (hidden,) + tuple(out[1:])
    if isinstance(out, list):
        return [hidden] + list(out[1:])
    return hidden
