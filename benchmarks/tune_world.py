"""Measure MEMIT settings on the synthetic world model (``memit_fast.testing.load_world``):
100 of the world's edit requests in one ``apply`` per setting, then efficacy / paraphrase /
neighborhood success; the model is reverted between settings.

    python benchmarks/tune_world.py --grid '[{"layers": [0, 1], "mom2_update_weight": 1000}]'

Each line of output is one setting as JSON (the overrides, ES, PS, NS, seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from memit_fast import EditConfig  # noqa: E402
from memit_fast.editor import Editor  # noqa: E402
from memit_fast.evaluate import counterfact_metrics  # noqa: E402
from memit_fast.testing import load_world  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--grid", required=True, help="JSON list of EditConfig overrides")
    ap.add_argument("--base", default=None, help="EditConfig JSON file the overrides apply to")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok, world = load_world()
    reqs = world.edit_requests(args.n)
    corpus = world.corpus_texts(n=2000)
    base = EditConfig.from_json(open(args.base).read()) if args.base else None
    stats = {}
    unedited = counterfact_metrics(model, tok, reqs)
    print(json.dumps({"unedited": {k: unedited[k] for k in _KEYS}}), flush=True)
    for over in json.loads(args.grid):
        over = dict(over)
        if "layers" in over:
            over["layers"] = tuple(over["layers"])
        cfg = base.replace(**over) if base else EditConfig(**over)
        ed = Editor(model, tok, cfg, corpus=corpus, stats=stats or None)
        t0 = time.perf_counter()
        res = ed.apply(reqs)
        wall = time.perf_counter() - t0
        stats.update({l: s.mom2 for l, s in ed.key_stats().items()})
        m = counterfact_metrics(model, tok, reqs, baseline=unedited)
        res.revert()
        row = {"overrides": over, "seconds": round(wall, 2)}
        row.update({k: m[k] for k in _KEYS})
        row["steps_mean"] = float(res.targets.steps.float().mean())
        print(json.dumps(row, default=list), flush=True)
    return 0


_KEYS = ("efficacy_success", "paraphrase_success", "neighborhood_success")

if __name__ == "__main__":
    sys.exit(main())
