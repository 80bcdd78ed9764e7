"""Sequential editing on the synthetic world: ``--batches`` batches of ``--size`` edits
applied one after another by one Editor, with and without remembering earlier batches'
keys (``remember_keys``). After each batch: efficacy success of every batch applied so
far, so the table shows how much of batch 1's efficacy survives the later ones.

    python benchmarks/sequential_world.py --config benchmarks/results/world_config.json

Prints a markdown table per mode and writes ``benchmarks/results/sequential_world.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness  # noqa: E402
from benchmarks.bench_edit import world_requests  # noqa: E402
from memit_fast import EditConfig  # noqa: E402
from memit_fast.editor import Editor  # noqa: E402
from memit_fast.evaluate import counterfact_metrics  # noqa: E402
from memit_fast.testing import load_world  # noqa: E402


def run(remember: bool, cfg: EditConfig, batches: int, size: int) -> list[list[float]]:
    """``es[j][b]``: efficacy success of batch ``b`` after batch ``j`` was applied."""
    model, tok, world = load_world()
    reqs = world_requests(world, batches * size)
    parts = [reqs[i * size : (i + 1) * size] for i in range(batches)]
    ed = Editor(model, tok, cfg, corpus=world.corpus_texts(n=2000), remember_keys=remember)
    out = []
    for j, part in enumerate(parts):
        ed.apply(part)
        row = [counterfact_metrics(model, tok, parts[b])["efficacy_success"] for b in range(j + 1)]
        out.append(row)
        print(f"remember_keys={remember} after batch {j + 1}: " + " ".join(f"{x:.2f}" for x in row))
    return out


def table(es: list[list[float]]) -> str:
    n = len(es)
    head = "| after batch | " + " | ".join(f"b{b + 1}" for b in range(n)) + " |"
    sep = "|---" * (n + 1) + "|"
    rows = []
    for j, row in enumerate(es):
        cells = [f"{x:.2f}" for x in row] + [""] * (n - len(row))
        rows.append(f"| {j + 1} | " + " | ".join(cells) + " |")
    return "\n".join([head, sep, *rows])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="EditConfig JSON")
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--size", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    with open(args.config) as f:
        cfg = EditConfig.from_json(f.read())
    res = {}
    for remember in (True, False):
        res["remember_keys" if remember else "plain"] = run(remember, cfg, args.batches, args.size)
    for k, es in res.items():
        first = es[-1][0] / es[0][0] if es[0][0] else float("nan")
        print(f"\n### {k}: batch 1 keeps {first:.0%} of its efficacy after batch {len(es)}\n")
        print(table(es))
    with open(harness.results_dir() / "sequential_world.json", "w") as f:
        json.dump({"config": json.loads(cfg.to_json()), "efficacy": res}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
