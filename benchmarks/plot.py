"""PNG plots from the benchmark CSVs (``benchmarks/results/*.csv`` or ``--results``).

    python benchmarks/plot.py                          # benchmarks/results -> same folder
    python benchmarks/plot.py --results $OUT --out $OUT

- ``edit_time_vs_n.png``: seconds per phase against N (log-log), one panel per model and
  device; the fast engine solid, the published structure dashed.
- ``edit_speedup.png``: published structure / fast against N, end to end and per phase.
- ``stats_passes.png``: key statistics, one pass for all layers against one per layer.
- ``kernel_throughput.png``: the kernels against their size: covariance and update
  TFLOP/s, the layer solve's time per variant.

For each (device, model, dtype, N, variant, metric) the last row in the file is used, so a
re-run replaces earlier figures in the plots while the CSV keeps the history. A plot with
no data is not written.
"""

from __future__ import annotations

import argparse
import csv
import os
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
PHASES = ("statistics", "targets", "keys", "solve", "update", "total")
COLORS = {
    "statistics": "tab:blue",
    "targets": "tab:orange",
    "keys": "tab:green",
    "solve": "tab:red",
    "update": "tab:purple",
    "total": "black",
    "total_excl_statistics": "tab:gray",
}


def read(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    latest: dict[tuple, dict[str, str]] = {}
    for r in rows:
        key = tuple(r.get(k, "") for k in ("device", "model", "dtype", "n", "shape", "variant", "metric"))  # fmt: skip
        latest[key] = r
    rows = list(latest.values())

    # An edit run's shape is its settings (layers, steps, ...): a model's latest settings
    # supersede the older ones, whose rows would otherwise mix into its curves.
    def group(r):
        return r.get("device", ""), r.get("model", ""), r.get("dtype", "")

    newest: dict[tuple, tuple[str, str]] = {}
    for r in rows:
        if r.get("benchmark") == "edit":
            stamp = (r.get("timestamp", ""), r.get("shape", ""))
            newest[group(r)] = max(newest.get(group(r), ("", "")), stamp)
    return [
        r for r in rows if r.get("benchmark") != "edit" or r.get("shape", "") == newest[group(r)][1]
    ]


def num(x: str) -> float | None:
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def short_device(d: str) -> str:
    return d.replace("NVIDIA ", "").replace(" 80GB HBM3", "")


def plot_edit_times(rows, out: Path) -> Path | None:
    groups = defaultdict(list)
    for r in rows:
        if r["variant"] in ("fast", "published") and r["metric"] in PHASES and num(r["n"]):
            groups[(r["model"], r["device"], r["dtype"])].append(r)
    if not groups:
        return None
    keys = sorted(groups)
    cols = min(3, len(keys))
    nrows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(max(6.5, 5.2 * cols), 4 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        series = defaultdict(list)
        for r in groups[key]:
            v = num(r["value"])
            if v and v > 0:
                series[(r["variant"], r["metric"])].append((int(float(r["n"])), v))
        for (variant, phase), pts in sorted(series.items()):
            pts.sort()
            xs, ys = zip(*pts)
            ax.plot(
                xs,
                ys,
                linestyle="-" if variant == "fast" else "--",
                marker="o" if variant == "fast" else "x",
                color=COLORS.get(phase, "tab:brown"),
                label=f"{phase} ({variant})",
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("requests N")
        ax.set_ylabel("seconds")
        ax.set_title(f"{key[0]} — {short_device(key[1])}, {key[2]}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.suptitle("Time per phase vs N (solid: fast, dashed: published structure)", fontsize=10)
    fig.tight_layout()
    path = out / "edit_time_vs_n.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_edit_speedup(rows, out: Path) -> Path | None:
    series = defaultdict(list)
    for r in rows:
        if r["variant"] == "ratio" and num(r["n"]) and num(r["value"]):
            label = f"{r['model']} @ {short_device(r['device'])}"
            series[(label, r["metric"])].append((int(float(r["n"])), float(r["value"])))
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    labels = sorted({k[0] for k in series})
    markers = "osD^v<>ph*"
    for i, lab in enumerate(labels):
        for phase in ("total", "targets", "statistics", "keys", "total_excl_statistics"):
            pts = sorted(series.get((lab, phase), []))
            if not pts:
                continue
            xs, ys = zip(*pts)
            ax.plot(
                xs,
                ys,
                marker=markers[i % len(markers)],
                linestyle="-" if phase == "total" else ":",
                color=COLORS.get(phase, "tab:brown"),
                label=f"{lab}: {phase}",
            )
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("requests N")
    ax.set_ylabel("published structure / fast (x)")
    ax.set_title("Speed-up of the fast engine over the published structure")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    path = out / "edit_speedup.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_stats(rows, out: Path) -> Path | None:
    data = defaultdict(dict)
    for r in rows:
        if r["metric"] == "seconds" and num(r["value"]):
            data[f"{r['model']} @ {short_device(r['device'])}\n{r['shape']}"][r["variant"]] = float(
                r["value"]
            )
    if not data:
        return None
    variants = ("one_pass", "per_layer_stop", "per_layer_full")
    fig, ax = plt.subplots(figsize=(max(6, 3.2 * len(data)), 4.2))
    width = 0.25
    for j, v in enumerate(variants):
        xs = [i + (j - 1) * width for i in range(len(data))]
        ys = [d.get(v, 0.0) for d in data.values()]
        bars = ax.bar(xs, ys, width, label=v)
        for x, y, k in zip(xs, ys, data):
            one = data[k].get("one_pass")
            if y and one:
                ax.annotate(f"{y / one:.1f}x", (x, y), ha="center", va="bottom", fontsize=7)
        del bars
    ax.set_xticks(range(len(data)))
    ax.set_xticklabels(list(data), fontsize=6)
    ax.set_ylabel("seconds")
    ax.set_title("Key statistics: one pass for all layers vs one pass per layer")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "stats_passes.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_kernels(results: Path, out: Path) -> Path | None:
    panels = []
    cov = [r for r in read(results / "covariance.csv") if r["metric"] == "throughput"]
    if cov:
        panels.append(("covariance  C += X^T X", "keys t", "TFLOP/s", cov, "n"))
    upd = [r for r in read(results / "update.csv") if r["metric"] == "throughput"]
    if upd:
        panels.append(("update  W += R (A^-1 K)^T", "requests n", "TFLOP/s", upd, "n"))
    lin = [r for r in read(results / "bench_linalg.csv") if r["metric"] == "median_ms"]
    lin = [r for r in lin if num(r["n"])]
    if lin:
        panels.append(("layer solve", "requests n", "ms (median)", lin, "n"))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, (title, xl, yl, rs, xkey) in zip(axes.flat, panels):
        series = defaultdict(list)
        for r in rs:
            x, y = num(r[xkey]), num(r["value"])
            if x and y is not None:
                extra = f" {r['shape']}" if "linalg" in r["benchmark"] else ""
                lab = f"{r['variant']}{extra} {r['dtype']} @ {short_device(r['device'])}"
                series[lab].append((x, y))
        for lab, pts in sorted(series.items()):
            pts.sort()
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", label=lab)
        ax.set_xscale("log")
        if yl.startswith("ms"):
            ax.set_yscale("log")
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=5)
    fig.suptitle("Kernels: throughput / time against size", fontsize=10)
    fig.tight_layout()
    path = out / "kernel_throughput.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = os.environ.get("OUT") or str(HERE / "results")
    ap.add_argument("--results", default=default, help="folder with the CSVs")
    ap.add_argument("--out", default=None, help="folder for the PNGs (default: --results)")
    args = ap.parse_args(argv)
    results = Path(args.results)
    out = Path(args.out) if args.out else results
    out.mkdir(parents=True, exist_ok=True)
    edit = read(results / "edit.csv")
    made = [
        plot_edit_times(edit, out),
        plot_edit_speedup(edit, out),
        plot_stats(read(results / "stats.csv"), out),
        plot_kernels(results, out),
    ]
    for p in made:
        if p is not None:
            print(f"wrote {p}")
    if not any(made):
        print(f"no benchmark CSVs with data in {results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
