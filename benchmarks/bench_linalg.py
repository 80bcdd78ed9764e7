"""Benchmark of MEMIT's layer solve: factor, update and refined solve.

For each key width ``dk`` and batch ``n`` it times, on one device:

- ``published``: ``torch.linalg.solve`` in float64 of ``(lam C + K K^T) U = K`` (the
  published code's path, forming the matrix included);
- ``torch_cholesky_fp64`` / ``torch_cholesky_fp32``: ``torch.linalg.cholesky`` of ``lam C``;
- ``cholesky_<p>``: memit_fast's blocked factor of ``lam C`` at trailing precision ``p``;
- ``update`` vs ``refactor``: adding ``K K^T`` to a cached factor by ``cholesky_update``
  against refactoring ``lam C + K K^T`` (forming included) at the factor's precision;
  ``update_<method>_b<nb>`` (``--update-methods``, ``--update-blocks``): the update by
  ``method`` (``qr`` Householder panels, ``chol`` refactored diagonal blocks, ``product``
  L times the factor of ``I + W W^T``) at block width ``nb`` (0: the op's default), with
  its relative difference from the refactored factor;
- ``layer_solve``: ``LayerSolver.solve(K)`` on a cached factor (update or refactor by
  cost, refinement to float64 accuracy) — what the engine pays per layer and batch;
- ``published_delta`` / ``layer_delta`` (where ``dh = dk / 4 < n``): the layer's update
  ``dW = R U^T`` as the published code computes it (float64 solve for the ``n`` keys, then
  the product) and as the engine does by default, one solve for the ``dh`` columns of
  ``K R^T`` (``EditConfig.solve_order``);
- ``memit_solve``: the one-shot refined solve (factor + refinement);
- ``update_<trsm>``, ``update_product_b0_<trsm>``, ``layer_solve_<trsm>`` (``--trsm``):
  the update and the layer solve again with the extension's triangular solves forced to
  ``library`` (LAPACK's / cuBLAS's) or ``blocked`` (GEMMs with inverted diagonal blocks,
  the default on CUDA) by ``MEMIT_FAST_TRSM``;

and the relative difference of the refined solutions from the float64 solve, and the
normwise backward error of each solution, the published one's included (``bwd_err``: at
a condition number of 1e7 two float64 solves differ by ~1e-10 on their own). Rows go to
``benchmarks/results/bench_linalg.csv`` (or ``$OUT``) through the shared harness.

    python benchmarks/bench_linalg.py --device cpu --dk 1536 --n 100,1000,10000
    python benchmarks/bench_linalg.py --device cuda            # dk 1536,6400,16384
    python benchmarks/bench_linalg.py --stats C.safetensors    # real statistics: tensor "C"
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness  # noqa: E402
from memit_fast import _ext  # noqa: E402
from memit_fast import linalg as la  # noqa: E402

LAM = 15000.0
# The "chol" and "product" updates factor a k x k matrix per block (and "chol" solves
# against it for every row below): they are for few keys, timed only up to this many.
CHOL_UPDATE_MAX_N = 1024


def synthetic_stats(dk: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """``(dk, dk)`` fp32 second moment of keys whose scales decay over 2.5 decades (a
    condition number of about 1e5, like the statistics of small real models)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    X = torch.randn(dk, dk, generator=g).to(device, torch.float64)
    X *= torch.logspace(0, -2.5, dk, device=device, dtype=torch.float64)
    # Formed in float64 and rounded once: a float32 product over dk = 16384 terms (GPU
    # reduction order) errs by more than the smallest eigenvalues and can leave C indefinite.
    C = (X @ X.T) / dk
    C.diagonal().add_(1e-7)
    return C.to(torch.float32)


def keys(dk: int, n: int, C: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """``(dk, n)`` fp32 keys of the size real keys have next to ``C`` (norm^2 ~ trace C)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    K = torch.randn(dk, n, generator=g).to(C.device)
    return K * math.sqrt(float(torch.trace(C)) / dk)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def bwd_err(A: torch.Tensor, X: torch.Tensor, B: torch.Tensor) -> float:
    """Normwise backward error of ``A X = B``, ``||B - A X|| / (||A|| ||X||)``, in float64.

    The yardstick of "float64 accuracy" for badly conditioned ``A``: two backward-stable
    float64 solves may differ by up to ``cond(A)`` times this, so the difference from the
    published solve (``rel_diff_fp64``) measures that solve's error as much as ours."""
    X = X.to(A.dtype)
    return float((B - A @ X).norm() / (A.norm() * X.norm()))


class Bench:
    def __init__(self, device: torch.device, rep: int, use_ext: bool | None, source: str) -> None:
        self.device, self.rep, self.use_ext = device, rep, use_ext
        on = _ext.has_kernel("cholesky", device) and use_ext is not False
        self.model = f"{source}/{'ext' if on else 'reference'}"  # statistics / code path
        self.dev = harness.device_name(device)
        self.rows: list[dict[str, object]] = []
        self.update_blocks: list[int] = []
        self.update_methods: list[str] = []
        self.trsm: list[str] = []  # triangular solves timed beside the default

    def record(self, dk: int, n, variant: str, metric: str, value: float, unit: str) -> None:
        self.rows.append(
            harness.make_row(
                device=self.dev,
                benchmark="bench_linalg",
                model=self.model,
                dtype="float64",
                n=n,
                shape=f"dk={dk}",
                variant=variant,
                metric=metric,
                value=value,
                unit=unit,
            )
        )
        print(f"dk={dk:>6} n={n!s:>6} {variant:<22} {metric:<14} {value:.4g} {unit}", flush=True)

    def timed(self, dk: int, n, variant: str, fn) -> tuple[float, object]:
        out = []

        def call():
            # Only the last output is kept (the timer calls this dozens of times on a GPU,
            # and at dk = 16384 each factor is 2.1 GB), and it is dropped before the next.
            out.clear()
            out.append(fn())

        t = harness.time_fn(call, self.device, warmup=1, rep=self.rep)
        self.record(dk, n, variant, "median_ms", t["median_ms"], "ms")
        return t["median_ms"], out[-1]

    def factor(self, C: torch.Tensor) -> la.LayerSolver:
        dk, A64, use_ext = C.shape[0], LAM * C.double(), self.use_ext
        self.timed(dk, "-", "torch_cholesky_fp64", lambda: torch.linalg.cholesky(A64))
        self.timed(dk, "-", "torch_cholesky_fp32", lambda: torch.linalg.cholesky(A64.float()))
        every = ("bf16", "tf32", "fp32", "fp64")  # (auto may skip some, see its docstring)
        for p in every if self.device.type == "cuda" else la.candidate_precisions(self.device):
            L, info = la.cholesky(A64, p, check_errors=False, use_ext=use_ext)
            if int(info) > 0:  # too coarse for this matrix: the solver's ladder skips it too
                self.record(dk, "-", f"cholesky_{p}", "not_pd_at_column", int(info) - 1, "-")
                continue
            self.timed(dk, "-", f"cholesky_{p}", lambda p=p: la.cholesky(A64, p, use_ext=use_ext))
        t, solver = self.timed(dk, "-", "layer_solver_init", lambda: la.LayerSolver(C, LAM))
        self.fixed = {
            p: la.LayerSolver(C, LAM, precision=p, use_ext=self.use_ext) for p in ("fp32", "fp64")
        }
        for p, hist in solver.selection.items():
            if isinstance(hist, list):  # backward errors of the probe's refinement
                self.record(dk, "-", f"probe_{p}", "steps", len(hist) - 1, "steps")
                self.record(dk, "-", f"probe_{p}", "final_bwd_err", hist[-1], "ratio")
        self.record(dk, "-", f"auto_{solver.precision}", "chosen", 1, "-")
        return solver

    def solve(self, C: torch.Tensor, solver: la.LayerSolver, n: int) -> None:
        dk, use_ext = C.shape[0], self.use_ext
        A64, K = LAM * C.double(), keys(C.shape[0], n, C)
        K64 = K.double()
        t_pub, U64 = self.timed(
            dk, n, "published", lambda: torch.linalg.solve(torch.addmm(A64, K64, K64.T), K64)
        )
        M64 = torch.addmm(A64, K64, K64.T)  # lam C + K K^T: backward errors, refactored L
        self.record(dk, n, "published", "bwd_err", bwd_err(M64, U64, K64), "ratio")
        t_upd, L_upd = self.timed(
            dk, n, "update", lambda: la.cholesky_update(solver.L, K64, use_ext=use_ext)
        )
        t_ref, _ = self.timed(
            dk, n, "refactor",
            lambda: la.cholesky(la.add_outer(A64, K64), solver.precision, use_ext=use_ext),
        )  # fmt: skip
        self.record(dk, n, "update", "speedup_vs_refactor", t_ref / t_upd, "x")
        L_ref = torch.linalg.cholesky(M64).to(L_upd.dtype)
        self.record(dk, n, "update", "rel_diff_refactor", rel(L_upd.tril(), L_ref), "ratio")
        del L_upd
        ref = {"t_ref": t_ref, "L_ref": L_ref, "t_pub": t_pub, "U64": U64, "M64": M64, "K64": K64}
        for trsm in self.trsm:
            self.trsm_rows(dk, n, solver, K, ref, trsm)
        for method in self.update_methods or ["auto"]:
            if method in ("chol", "product") and n > CHOL_UPDATE_MAX_N:
                print(f"update_{method}: skipped at n={n} (a k x k Cholesky per block)")
                continue
            for nb in self.update_blocks or [0]:  # block width (0: the op's default)
                if (method, nb) == ("auto", 0):
                    continue  # the "update" row
                self.update_rows(
                    dk, n, f"update_{method}_b{nb}",
                    lambda m=method, nb=nb: la.cholesky_update(
                        solver.L, K64, block_size=nb, method=m, use_ext=use_ext),
                    ref,
                )  # fmt: skip
        self.record(dk, n, "layer_solve", "uses_update", int(solver.prefers_update(n)), "-")
        dh = dk // 4  # the MLP output width of GPT-2 and GPT-J (dk = 4 dh)
        if dh < n:
            # The layer's update dW = R U^T: published, the solve for the n keys and a
            # product; the update order, one solve for the dh columns of K R^T (the
            # engine's default when dh < n; forming K R^T included).
            R64 = torch.randn(dh, n, generator=torch.Generator().manual_seed(2)).to(K64)
            t_pub_dw, dW = self.timed(
                dk, n, "published_delta",
                lambda: R64 @ torch.linalg.solve(torch.addmm(A64, K64, K64.T), K64).T,
            )  # fmt: skip
            t, D = self.timed(dk, n, "layer_delta", lambda: solver.solve(K64, K64 @ R64.T))
            self.record(dk, n, "layer_delta", "rel_diff_fp64", rel(D.T, dW), "ratio")
            self.record(dk, n, "layer_delta", "speedup", t_pub_dw / t, "x")
            # Both as solutions of (lam C + K K^T) dW^T = K R^T.
            KR = K64 @ R64.T
            self.record(dk, n, "published_delta", "bwd_err", bwd_err(M64, dW.T, KR), "ratio")
            self.record(dk, n, "layer_delta", "bwd_err", bwd_err(M64, D, KR), "ratio")
            del dW, D, KR
        for variant, fn in [
            ("layer_solve", lambda: solver.solve(K)),
            *[(f"layer_solve_{p}", lambda s=s: s.solve(K)) for p, s in self.fixed.items()],
            ("memit_solve", lambda: la.memit_solve(C, K, LAM, use_ext=use_ext)),
        ]:
            self.solve_rows(dk, n, variant, fn, ref)

    def update_rows(self, dk: int, n: int, variant: str, fn, ref: dict) -> None:
        """A factor update timed, against refactoring (``ref``: its time and factor)."""
        t, Lu = self.timed(dk, n, variant, fn)
        self.record(dk, n, variant, "speedup_vs_refactor", ref["t_ref"] / t, "x")
        self.record(dk, n, variant, "rel_diff_refactor", rel(Lu.tril(), ref["L_ref"]), "ratio")

    def solve_rows(self, dk: int, n: int, variant: str, fn, ref: dict) -> None:
        """A layer solve timed, against the published float64 solve (``ref``: its time and
        solution, the system and the keys)."""
        t, U = self.timed(dk, n, variant, fn)
        self.record(dk, n, variant, "rel_diff_fp64", rel(U, ref["U64"]), "ratio")
        self.record(dk, n, variant, "bwd_err", bwd_err(ref["M64"], U, ref["K64"]), "ratio")
        self.record(dk, n, variant, "speedup", ref["t_pub"] / t, "x")

    def trsm_rows(self, dk: int, n: int, solver: la.LayerSolver, K, ref: dict, trsm: str) -> None:
        """The update (``auto`` and ``product``) and the layer solve with the extension's
        triangular solves forced to ``trsm`` (``MEMIT_FAST_TRSM``, restored after), side by
        side with the default's rows above."""
        use_ext, K64 = self.use_ext, ref["K64"]
        before = os.environ.get("MEMIT_FAST_TRSM")
        os.environ["MEMIT_FAST_TRSM"] = trsm
        try:
            methods = [(f"update_{trsm}", "auto")]
            if n <= CHOL_UPDATE_MAX_N:
                methods.append((f"update_product_b0_{trsm}", "product"))
            for variant, method in methods:
                self.update_rows(
                    dk, n, variant,
                    lambda m=method: la.cholesky_update(solver.L, K64, method=m, use_ext=use_ext),
                    ref,
                )  # fmt: skip
            self.solve_rows(dk, n, f"layer_solve_{trsm}", lambda: solver.solve(K), ref)
        finally:
            if before is None:
                os.environ.pop("MEMIT_FAST_TRSM", None)
            else:
                os.environ["MEMIT_FAST_TRSM"] = before


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dk", default="1536,6400,16384")
    ap.add_argument("--n", default="100,1000,10000")
    ap.add_argument("--rep", type=int, default=3)
    ap.add_argument("--stats", help="safetensors file with a real C (tensor 'C'); ignores --dk")
    ap.add_argument("--no-ext", action="store_true", help="time the torch references")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    ap.add_argument(
        "--update-blocks",
        default="",
        help="also time cholesky_update at these block widths (e.g. 64,128,256,1024)",
    )
    ap.add_argument(
        "--update-methods",
        default="",
        help="also time cholesky_update by these methods (auto,qr,chol,product), at each block width",
    )
    ap.add_argument(
        "--trsm",
        default="",
        help="also time the update and the layer solve with the extension's triangular solves "
        "forced to library (LAPACK / cuBLAS trsm) and/or blocked (GEMMs with inverted diagonal "
        "blocks, the CUDA default), comma-separated",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    source = os.path.splitext(os.path.basename(args.stats))[0] if args.stats else "synthetic"
    bench = Bench(device, args.rep, False if args.no_ext else None, source)
    bench.update_blocks = [int(b) for b in args.update_blocks.split(",") if b]
    bench.update_methods = [m for m in args.update_methods.split(",") if m]
    bench.trsm = [t for t in args.trsm.split(",") if t]
    if not set(bench.trsm) <= {"library", "blocked"}:
        ap.error("--trsm takes library and/or blocked")
    if args.stats:
        from safetensors.torch import load_file

        matrices = [load_file(args.stats)["C"].to(device, torch.float32)]
    else:
        matrices = [synthetic_stats(int(dk), device) for dk in args.dk.split(",")]
    saved = 0

    def save() -> None:  # rows reach the CSV as each size finishes (a later one may fail)
        nonlocal saved
        if len(bench.rows) > saved:
            path = harness.append_rows("bench_linalg", bench.rows[saved:])
            print(f"{len(bench.rows) - saved} rows -> {path}", flush=True)
            saved = len(bench.rows)

    for C in matrices:
        solver = bench.factor(C)
        save()
        for n in args.n.split(","):
            bench.solve(C, solver, int(n))
            save()
    print(harness.markdown_table(bench.rows, ["shape", "n", "variant", "metric", "value", "unit"]))


if __name__ == "__main__":
    main()
