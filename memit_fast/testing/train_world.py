"""Regenerate the committed world model (``memit_fast/resources/world``).

    python -m memit_fast.testing.train_world --out memit_fast/resources/world

Builds the world (:func:`~memit_fast.testing.world.make_world`, seed 0), trains its
tokenizer and the 4-layer GPT-2 on the CPU (one thread by default: the result is then
the same on any machine with the same torch build), measures how well the model knows its
facts and writes ``config.json``, ``model.safetensors``, the tokenizer files, ``world.json``
and ``metrics.json`` (accuracies, settings, training time). Fails if the model knows less
than ``--min-train-acc`` of its facts on the training templates.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import torch

from memit_fast.testing.world import (
    build_tokenizer,
    make_world,
    measure_world,
    train_world_model,
)

log = logging.getLogger("memit_fast.testing.train_world")

DEFAULTS = dict(
    n_subjects=240, seed=0, steps=800, batch_size=32, seq_len=64, lr=3e-3, vocab_size=1024
)


def _portable_tokenizer_config(path: str) -> None:
    """Name the class every transformers version knows (5.x writes its own backend name)."""
    with open(path) as f:
        cfg = json.load(f)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--n-subjects", type=int, default=DEFAULTS["n_subjects"])
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--seq-len", type=int, default=DEFAULTS["seq_len"])
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    p.add_argument("--vocab-size", type=int, default=DEFAULTS["vocab_size"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--min-train-acc", type=float, default=0.95)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    t0, c0 = time.perf_counter(), time.process_time()
    world = make_world(n_subjects=args.n_subjects, seed=args.seed)
    tokenizer = build_tokenizer(world, vocab_size=args.vocab_size)
    model = train_world_model(
        world,
        tokenizer,
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        seed=args.seed,
        threads=args.threads,
    )
    train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    acc = measure_world(model, tokenizer, world)
    log.info("accuracy %s (trained in %.0f s, %.0f s CPU)", acc, train_s, train_cpu_s)

    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    _portable_tokenizer_config(os.path.join(args.out, "tokenizer_config.json"))
    world.save(os.path.join(args.out, "world.json"))
    metrics = {
        "accuracy": acc,
        "train_seconds": round(train_s, 1),
        "train_cpu_seconds": round(train_cpu_s, 1),
        "settings": {k: getattr(args, k) for k in DEFAULTS} | {"threads": args.threads},
        "parameters": sum(p.numel() for p in model.parameters()),
        "torch": torch.__version__,
    }
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
        f.write("\n")
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    log.info("wrote %s (%.2f MB)", args.out, size / 2**20)
    if acc["train"] < args.min_train_acc:
        log.error("training-template accuracy %.3f < %.3f", acc["train"], args.min_train_acc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
