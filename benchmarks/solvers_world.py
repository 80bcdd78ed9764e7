"""Every ``EditConfig.solver`` on the synthetic world model (``memit_fast.testing.load_world``):
100 of the world's edit requests in one ``apply`` per solver, statistics over 2,000 of the
world's documents (computed once, shared), then efficacy / paraphrase / neighborhood success
(``memit_fast.evaluate.counterfact_metrics``); the model is reverted between solvers.

    OMP_NUM_THREADS=1 python benchmarks/solvers_world.py [--n 100] [--base CONFIG.json]

The base configuration is benchmarks/results/world_config.json when it exists, else the
setting below; ROME edits only the last of its layers. One JSON line per solver.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from memit_fast import EditConfig  # noqa: E402
from memit_fast.config import SOLVERS  # noqa: E402
from memit_fast.editor import Editor  # noqa: E402
from memit_fast.evaluate import counterfact_metrics  # noqa: E402
from memit_fast.testing import load_world  # noqa: E402

WORLD_CONFIG = os.path.join(ROOT, "benchmarks", "results", "world_config.json")
FALLBACK = EditConfig(
    layers=(0, 1),
    mom2_update_weight=1000.0,
    clamp_norm_factor=4.0,
    weight_decay=1e-3,
    steps=50,
    kl_factor=1.0,
    context_templates=("{}",),
)
KEYS = ("efficacy_success", "paraphrase_success", "neighborhood_success")


def base_config(path: str | None) -> tuple[EditConfig, str]:
    path = path or (WORLD_CONFIG if os.path.exists(WORLD_CONFIG) else None)
    if path is None:
        return FALLBACK, "built-in fallback"
    with open(path) as f:
        return EditConfig.from_json(f.read()), path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100, help="edit requests")
    ap.add_argument("--base", default=None, help="EditConfig JSON (default: see above)")
    ap.add_argument("--solvers", default=",".join(SOLVERS))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok, world = load_world()
    reqs = world.edit_requests(args.n)
    corpus = world.corpus_texts(n=2000)
    base, source = base_config(args.base)
    print(json.dumps({"base": source, "config": base.to_dict()}, default=list), flush=True)
    unedited = counterfact_metrics(model, tok, reqs)
    print(json.dumps({"solver": "unedited", **{k: unedited[k] for k in KEYS}}), flush=True)
    stats: dict[int, torch.Tensor] = {}
    for name in args.solvers.split(","):
        layers = base.layers[-1:] if name == "rome" else base.layers
        cfg = base.replace(solver=name, layers=layers)
        ed = Editor(model, tok, cfg, corpus=corpus, stats=stats or None)
        # Statistics of every solver's layers, computed once.
        stats.update({l: s.mom2 for l, s in ed.key_stats(base.layers).items()})
        t0 = time.perf_counter()
        res = ed.apply(reqs)
        wall = time.perf_counter() - t0
        m = counterfact_metrics(model, tok, reqs, baseline=unedited)
        res.revert()
        row = {"solver": name, "layers": list(cfg.layers), "seconds": round(wall, 2)}
        row.update({k: round(float(m[k]), 4) for k in KEYS})
        row["solve_s"] = round(res.timings["solve"], 4)
        row["delta_norm"] = {str(l): round(float(res.delta(l).norm()), 3) for l in res.layers}
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
