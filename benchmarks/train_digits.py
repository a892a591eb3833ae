"""Tables 2-4 of the seed paper on real images: scikit-learn's handwritten digits (issue 16).

The protocol of sections 7.1 and 7.2, scaled to two CPU cores:

- **Data.** ``sklearn.datasets.load_digits`` (1,797 real 8x8 scans, 10 classes, bundled with
  scikit-learn, nothing downloaded), bilinearly upsampled to 16 px. A fixed stratified
  split (``--split-seed``): per class 45 test images (touched only for the tables), 25
  validation images (every choice) and the rest (104-113 per class) as the training pool.
  ``--dataset shapes`` runs the same protocol on the synthetic shapes instead.
- **Teacher.** One VGG-4 trained on the whole pool.
- **Distillation (Tables 2/3).** A deeper VGG-7 student on 5 / 10 / 50 examples per class,
  with the cross-entropy alone or with one of the six matching objectives of
  :data:`captum_fullgrad.training.MATCHING_PRESETS`. The weight of the non-output terms is
  chosen per method on the validation split.
- **Regularisation (Table 4).** The student architecture on 10 / 50 / 100 examples per
  class with no regulariser, dropout, bias weight decay or the bias-Jacobian penalty, all
  on the last convolutional block; each strength chosen per data size on the validation
  split.
- **Seeds.** Every final configuration runs with the same student seeds; a seed fixes the
  class-balanced training subset (nested across sizes), the initialisation and the data
  order, so two methods with the same seed see the same data and start from the same
  weights, and their accuracies are compared *paired*.

Statistics (``summarise``): per cell the mean test accuracy with a 95 % Student-t
interval over seeds; per method the paired differences to the baseline row (cross-entropy,
or no regularisation) with their 95 % t-interval, the two-sided paired t-test, and the
exact two-sided sign-flip permutation test on the mean difference (all ``2^n`` sign
patterns; its smallest attainable p-value is ``2 / 2^n``, 0.031 with 6 seeds).

Every finished job is appended to ``benchmarks/results/training_digits_runs.jsonl`` at once,
so an interrupted run keeps its results and ``--resume`` skips them::

    python benchmarks/train_digits.py           # the full run (15 CPU-min: ~8 min on 2 quiet cores)
    python benchmarks/train_digits.py --smoke   # the whole pipeline on tiny sizes, about 1 min
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import multiprocessing as mp
import os
import statistics
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import cross_entropy, environment, student_loss  # noqa: E402
from captum_fullgrad.datasets import (  # noqa: E402
    handwritten_digits,
    random_symmetry,
    synthetic_shapes,
)
from captum_fullgrad.training import (  # noqa: E402
    MATCHING_PRESETS,
    MatchingWeights,
    bias_blocks,
)
from train_uses import (  # noqa: E402  (the sibling script, importable once its folder is on the path)
    DISTILLATION_METHODS,
    METHOD_LABELS,
    PAPER_TABLE2,
    PAPER_TABLE4,
    REGULARISATION_METHODS,
    VGG,
    accuracy,
    fit,
    num_layers,
    subset,
    write_doc,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
DOC_PATH = ROOT / "docs" / "training.md"
MATCHING_METHODS = list(MATCHING_PRESETS)
REGULARISERS = ["dropout", "bias_weight_decay", "bias_jacobian"]

#: The orderings the paper reports (better, worse) in its low-data columns: Tables 2/3 (each
#: method above the previous baseline; full-Jacobians + attention best) and Table 4 (the
#: bias-Jacobian penalty above no regularisation, dropout and bias weight decay).
ORDERINGS: Dict[str, List[Tuple[str, str]]] = {
    "distillation": [
        ("activation", "cross_entropy"),
        ("i_jacobian", "activation"),
        ("full_jacobian", "i_jacobian"),
        ("attention", "activation"),
        ("i_jacobian_attention", "i_jacobian"),
        ("full_jacobian_attention", "i_jacobian_attention"),
        ("full_jacobian_attention", "attention"),
        ("full_jacobian_attention", "cross_entropy"),
    ],
    "regularisation": [
        ("bias_jacobian", "none"),
        ("bias_jacobian", "dropout"),
        ("bias_jacobian", "bias_weight_decay"),
        ("dropout", "none"),
        ("bias_weight_decay", "none"),
    ],
}

# The seed paper's CIFAR-10 Table 3 (mean ± std over two runs; columns: examples per class).
PAPER_TABLE3 = {
    "columns": [50, 100, 500, 1000, 5000],
    "rows": {
        "cross_entropy": [
            "49.29 ± 1.6",
            "59.93 ± 0.1",
            "79.36 ± 0.04",
            "83.87 ± 0.1",
            "91.95 ± 0.1",
        ],
        "activation": ["55.43 ± 2.1", "65.33 ± 2.2", "85.44 ± 0.1", "88.77 ± 0.3", "92.47 ± 0.1"],
        "i_jacobian": ["55.73 ± 2", "67.22 ± 3.0", "85.84 ± 0.1", "89.30 ± 0.3", "92.04 ± 0.01"],
        "attention": ["68.11 ± 0.8", "74.44 ± 0.2", "85.88 ± 0.1", "88.61 ± 0.1", "91.20 ± 0.01"],
        "i_jacobian_attention": [
            "70.83 ± 1.0",
            "77.06 ± 0.2",
            "86.51 ± 0.3",
            "89.63 ± 0.1",
            "90.68 ± 0.04",
        ],
        "full_jacobian": [
            "58.88 ± 0.2",
            "69.42 ± 1.4",
            "86.55 ± 0.1",
            "89.76 ± 0.1",
            "91.49 ± 0.05",
        ],
        "full_jacobian_attention": [
            "72.75 ± 0.4",
            "78.71 ± 0.1",
            "87.31 ± 0.3",
            "89.87 ± 0.3",
            "90.68 ± 0.1",
        ],
    },
}


# --------------------------------------------------------------------------- config
def default_config(dataset: str = "digits", smoke: bool = False) -> Dict[str, Any]:
    """Every setting of the run (also written to the results file)."""
    config: Dict[str, Any] = {
        "dataset": dataset,
        "image_size": 16 if dataset == "digits" else 32,
        # digits: a stratified split of the 1,797 scans, per class; shapes: rendered scenes.
        "split": {"test_per_class": 45, "val_per_class": 25, "seed": 0},
        "shapes_sizes": {"pool": 4000, "val": 400, "test": 800},
        "augment": "shift" if dataset == "digits" else "symmetry",
        "max_shift": 2,
        "seeds": [0, 1, 2, 3, 4, 5],
        "teacher": {"widths": [8, 16, 32], "convs_per_stage": 1, "steps": 600, "batch_size": 64},
        "student": {"widths": [8, 16, 32], "convs_per_stage": 2},
        "lr": 3e-3,
        "batch_size": 32,
        # Optimisation steps per training-set size (examples per class): 51 / 32 / 8 / 5
        # epochs; every student reaches (nearly) 100 % training accuracy (CPU budget).
        "steps": {"5": 80, "10": 100, "50": 120, "100": 150},
        "distillation_sizes": [5, 10, 50],
        "regularisation_sizes": [10, 50, 100],
        "num_pairs": 2,
        # Validation choices (never the test split): the weight of every non-output matching
        # term, per method at 10 examples per class; each regulariser's strength per size.
        "validation_seeds": [100],
        "matching_grid": {"per_class": 10, "scales": [0.1, 1.0, 10.0]},
        "regularisation_grid": {
            "dropout": [0.25, 0.5],
            "bias_weight_decay": [0.01, 0.1, 1.0],
            "bias_jacobian": [0.1, 1.0, 10.0],
        },
        "workers": 2,
        "threads_per_worker": 1,
    }
    if smoke:
        config.update(
            seeds=[0, 1],
            distillation_sizes=[5],
            regularisation_sizes=[10],
            validation_seeds=[100],
            steps={"5": 6, "10": 6, "50": 6, "100": 6},
        )
        config["teacher"] = {**config["teacher"], "steps": 30}
        config["matching_grid"] = {"per_class": 5, "scales": [10.0, 100.0]}
        config["regularisation_grid"] = {
            "dropout": [0.5],
            "bias_weight_decay": [0.1],
            "bias_jacobian": [1.0, 10.0],
        }
        config["shapes_sizes"] = {"pool": 200, "val": 80, "test": 80}
    return config


# --------------------------------------------------------------------------- data
def stratified_split(
    labels: Tensor, test_per_class: int, val_per_class: int, seed: int
) -> Dict[str, Tensor]:
    """Disjoint index sets ``test``, ``val``, ``pool`` (the rest), per class at random."""
    generator = torch.Generator().manual_seed(seed)
    parts: Dict[str, List[Tensor]] = {"test": [], "val": [], "pool": []}
    for c in range(int(labels.max()) + 1):
        of_class = torch.nonzero(labels == c).flatten()
        if len(of_class) <= test_per_class + val_per_class:
            raise ValueError(
                f"class {c} has {len(of_class)} images: too few for {test_per_class} test and "
                f"{val_per_class} validation images"
            )
        of_class = of_class[torch.randperm(len(of_class), generator=generator)]
        parts["test"].append(of_class[:test_per_class])
        parts["val"].append(of_class[test_per_class : test_per_class + val_per_class])
        parts["pool"].append(of_class[test_per_class + val_per_class :])
    return {name: torch.cat(index).sort().values for name, index in parts.items()}


_DATA: Dict[str, Tuple[Tensor, Tensor]] = {}


def data(config: Dict[str, Any], split: str) -> Tuple[Tensor, Tensor]:
    """``(images, labels)`` of ``pool``, ``val`` or ``test``, built once per process."""
    if not _DATA:
        if config["dataset"] == "digits":
            images, labels = handwritten_digits(config["image_size"])
            s = config["split"]
            index = stratified_split(labels, s["test_per_class"], s["val_per_class"], s["seed"])
            for name, idx in index.items():
                _DATA[name] = (images[idx], labels[idx])
        else:
            for seed, name in enumerate(("pool", "val", "test")):
                images, labels, _ = synthetic_shapes(
                    config["shapes_sizes"][name], seed=seed, size=config["image_size"]
                )
                _DATA[name] = (images, labels)
    return _DATA[split]


def random_shift(images: Tensor, generator: torch.Generator, max_shift: int) -> Tensor:
    """Translate each image by up to ``max_shift`` pixels per axis, filling with zeros (the
    digits' background). Draws ``2 * len(images)`` numbers from ``generator``."""
    if max_shift <= 0:
        return images
    n, size = images.shape[0], images.shape[-1]
    shifts = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator)
    padded = F.pad(images, [max_shift] * 4)
    return torch.stack(
        [
            padded[i, :, int(a) : int(a) + size, int(b) : int(b) + size]
            for i, (a, b) in enumerate(shifts)
        ]
    )


def augmentation(config: Dict[str, Any]) -> Callable[[Tensor, torch.Generator], Tensor]:
    if config["augment"] == "symmetry":
        return random_symmetry
    max_shift = int(config["max_shift"])
    return lambda images, generator: random_shift(images, generator, max_shift)


# --------------------------------------------------------------------------- one job
def job_key(job: Dict[str, Any]) -> str:
    """A job's identity, for ``--resume``."""
    fields = ("phase", "method", "per_class", "seed", "strength", "scale")
    return "|".join(str(job.get(f)) for f in fields)


def make_model(config: Dict[str, Any], role: str, seed: int, dropout: float = 0.0) -> VGG:
    torch.manual_seed(seed)
    in_channels = 1 if config["dataset"] == "digits" else 3
    net = config[role]
    return VGG(
        net["widths"],
        net["convs_per_stage"],
        10 if config["dataset"] == "digits" else 4,
        dropout=dropout,
        in_channels=in_channels,
    )


def matching_weights(method: str, scale: float) -> MatchingWeights:
    """The preset with every non-output term multiplied by ``scale``."""
    preset = MATCHING_PRESETS[method]
    return MatchingWeights(
        output=preset.output,
        input_jacobian=preset.input_jacobian * scale,
        bias_jacobian=preset.bias_jacobian * scale,
        attention=preset.attention * scale,
    )


def run_job(config: Dict[str, Any], job: Dict[str, Any]) -> Dict[str, Any]:
    """Train one network, return its accuracy on ``job["evaluate_on"]`` (a worker process)."""
    torch.set_num_threads(config["threads_per_worker"])
    start, cpu_start = time.perf_counter(), time.process_time()
    pool_x, pool_y = data(config, "pool")
    result = {k: v for k, v in job.items() if k != "teacher_state"}
    augment = augmentation(config)

    if job["phase"] == "teacher":
        model = make_model(config, "teacher", seed=0)
        t = config["teacher"]
        fit(
            model,
            pool_x,
            pool_y,
            cross_entropy,
            steps=t["steps"],
            batch_size=t["batch_size"],
            lr=config["lr"],
            seed=0,
            augment=augment,
        )
        result["state"] = {k: v.clone() for k, v in model.state_dict().items()}
        result["accuracy"] = accuracy(model, *data(config, "test"))
        result["val_accuracy"] = accuracy(model, *data(config, "val"))
        result["train_accuracy"] = accuracy(model, pool_x, pool_y)
        result["num_layers"] = num_layers(model)
        result["seconds"] = time.perf_counter() - start
        result["cpu_seconds"] = time.process_time() - cpu_start
        return result

    method, seed, per_class = job["method"], job["seed"], job["per_class"]
    strength = float(job.get("strength") or 0.0)  # 0: no regulariser (baselines)
    index = subset(pool_y, per_class, seed)
    images, labels = pool_x[index], pool_y[index]
    model = make_model(config, "student", seed, dropout=strength if method == "dropout" else 0.0)
    last_block = [b for b in bias_blocks(model, images[:2]) if b.spatial][-1]

    teacher, weights = None, None
    if method in MATCHING_PRESETS:
        teacher = make_model(config, "teacher", seed=0)
        teacher.load_state_dict(job["teacher_state"])
        teacher.eval()
        weights = matching_weights(method, job.get("scale") or 1.0)
    loss_fn = student_loss(
        method,
        last_block,
        strength,
        teacher=teacher,
        weights=weights,
        num_pairs=config["num_pairs"],
    )

    fit(
        model,
        images,
        labels,
        loss_fn,
        steps=config["steps"][str(per_class)],
        batch_size=config["batch_size"],
        lr=config["lr"],
        seed=seed,
        augment=augment,
    )
    result["accuracy"] = accuracy(model, *data(config, job["evaluate_on"]))
    result["train_accuracy"] = accuracy(model, images, labels)
    result["layer"] = last_block.name
    result["seconds"] = time.perf_counter() - start
    result["cpu_seconds"] = time.process_time() - cpu_start
    return result


# --------------------------------------------------------------------------- statistics
def t_quantile(df: int, q: float = 0.975) -> float:
    from scipy import stats  # a dependency of scikit-learn; imported only for the summary

    return float(stats.t.ppf(q, df))


def mean_interval(values: Sequence[float]) -> Dict[str, Any]:
    """Mean, sample std and the half-width of the 95 % Student-t interval of the mean."""
    n = len(values)
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if n > 1 else 0.0
    half = t_quantile(n - 1) * std / math.sqrt(n) if n > 1 else float("nan")
    return {"n": n, "mean": mean, "std": std, "ci95": half, "runs": list(values)}


def sign_flip_p_value(differences: Sequence[float]) -> float:
    """Exact two-sided sign-flip permutation test of ``mean(differences) = 0``.

    Under the null the sign of each paired difference is a fair coin; the p-value is the
    share of the ``2^n`` sign patterns whose mean is at least as far from 0 as the observed
    one. The observed pattern and its mirror image always count, so ``p >= 2 / 2^n``: 0.031
    with 6 differences, 0.0625 with 5. All-zero differences give ``p = 1``.
    """
    n = len(differences)
    observed = abs(sum(differences)) - 1e-12
    hits = sum(
        abs(sum(s * d for s, d in zip(signs, differences))) >= observed
        for signs in itertools.product((1.0, -1.0), repeat=n)
    )
    return hits / 2**n


def paired_comparison(values: Sequence[float], baseline: Sequence[float]) -> Dict[str, Any]:
    """``values - baseline`` paired by seed: mean, 95 % t-interval, t-test, sign-flip test."""
    if len(values) != len(baseline):
        raise ValueError(f"{len(values)} runs paired with {len(baseline)} baseline runs")
    differences = [a - b for a, b in zip(values, baseline)]
    summary = mean_interval(differences)
    n, mean, std = summary["n"], summary["mean"], summary["std"]
    if n < 2:
        p_t = float("nan")
    elif std == 0.0:
        p_t = 1.0 if mean == 0.0 else 0.0
    else:
        from scipy import stats

        p_t = float(2 * stats.t.sf(abs(mean / (std / math.sqrt(n))), n - 1))
    return {
        **summary,
        "p_t": p_t,
        "p_sign_flip": sign_flip_p_value(differences),
        "baseline_std": statistics.stdev(baseline) if n > 1 else float("nan"),
    }


# --------------------------------------------------------------------------- orchestration
def choose(runs: Sequence[Dict[str, Any]], key: str, options: Sequence[Any]) -> Tuple[Any, Dict]:
    """The option with the highest mean validation accuracy (ties: the first in ``options``)."""
    means = {}
    for option in options:
        accs = [r["accuracy"] for r in runs if r.get(key) == option]
        means[option] = statistics.fmean(accs) if accs else float("-inf")
    best = max(options, key=lambda o: (means[o], -list(options).index(o)))
    return best, {str(k): v for k, v in means.items()}


class Runner:
    """Submits jobs as their dependencies finish; logs every result to a JSON-lines file."""

    def __init__(
        self,
        config: Dict[str, Any],
        executor: ProcessPoolExecutor,
        runs_path: Path,
        teacher_cache: Path,
        previous: Dict[str, Dict[str, Any]],
        log: Callable[[str], None],
    ) -> None:
        self.config, self.executor, self.log = config, executor, log
        self.runs_path, self.teacher_cache, self.previous = runs_path, teacher_cache, previous
        self.pending: Dict[Future, Dict[str, Any]] = {}
        self.ready: List[Dict[str, Any]] = []
        self.results: List[Dict[str, Any]] = []
        self.teacher_state: Optional[Dict[str, Tensor]] = None
        self.start = time.perf_counter()

    def submit(self, job: Dict[str, Any]) -> None:
        key = job_key(job)
        if key in self.previous and not (
            job["phase"] == "teacher" and not self.teacher_cache.exists()
        ):
            result = dict(self.previous[key])
            if job["phase"] == "teacher":
                result["state"] = torch.load(self.teacher_cache)
            self.ready.append(result)
            return
        self.pending[self.executor.submit(run_job, self.config, job)] = job

    def finished(self) -> List[Dict[str, Any]]:
        """Results that arrived since the last call (waits for at least one)."""
        if not self.ready:
            done, _ = wait(list(self.pending), return_when=FIRST_COMPLETED)
            for future in done:
                self.pending.pop(future)
                result = future.result()
                if result["phase"] == "teacher":
                    torch.save(result["state"], self.teacher_cache)
                with self.runs_path.open("a") as out:
                    record = {k: v for k, v in result.items() if k != "state"}
                    out.write(json.dumps(record) + "\n")
                self.log(
                    f"{result['phase']:>9} {result['method']:>24} {result['per_class']!s:>4}/class "
                    f"seed {result['seed']!s:>3} strength {result.get('strength')!s:>6} scale "
                    f"{result.get('scale')!s:>6}: {100 * result['accuracy']:.1f} % "
                    f"({result['seconds']:.0f} s) [{time.perf_counter() - self.start:.0f} s]"
                )
                self.ready.append(result)
        ready, self.ready = self.ready, []
        self.results.extend(ready)
        return ready

    def busy(self) -> bool:
        return bool(self.pending or self.ready)


def run_all(config: Dict[str, Any], runner: Runner) -> Dict[str, Any]:
    """Every job of the protocol, each submitted as soon as what it needs is known."""
    seeds, val_seeds = config["seeds"], config["validation_seeds"]
    d_sizes, r_sizes = config["distillation_sizes"], config["regularisation_sizes"]
    grid, mgrid = config["regularisation_grid"], config["matching_grid"]
    base = {"strength": None, "scale": None}

    # Needs nothing: the teacher (longest first), the regularisation grid, the baselines.
    runner.submit(
        {"phase": "teacher", "method": "teacher", "per_class": None, "seed": None, **base}
    )
    for per_class in r_sizes:
        for method in reversed(REGULARISERS):
            for strength in grid[method]:
                for seed in val_seeds:
                    runner.submit(
                        {
                            "phase": "reg_grid",
                            "method": method,
                            "per_class": per_class,
                            "seed": seed,
                            **base,
                            "strength": strength,
                            "evaluate_on": "val",
                        }
                    )
    for per_class in sorted({*r_sizes, mgrid["per_class"]}):
        for seed in val_seeds:
            runner.submit(
                {
                    "phase": "val_baseline",
                    "method": "cross_entropy",
                    "per_class": per_class,
                    "seed": seed,
                    **base,
                    "evaluate_on": "val",
                }
            )
    for per_class in sorted({*d_sizes, *r_sizes}):
        for seed in seeds:
            runner.submit(
                {
                    "phase": "baseline",
                    "method": "cross_entropy",
                    "per_class": per_class,
                    "seed": seed,
                    **base,
                    "evaluate_on": "test",
                }
            )

    chosen_scale: Dict[str, Any] = {}
    chosen_strength: Dict[str, Dict[str, Any]] = {}
    validation: Dict[str, Any] = {"matching": {}, "regularisation": {}}
    reg_grid_done = {s: False for s in r_sizes}
    matching_done = {m: False for m in MATCHING_METHODS}
    teacher_result: Optional[Dict[str, Any]] = None
    finals_submitted = False
    results = runner.results

    def of(phase: str, **match: Any) -> List[Dict[str, Any]]:
        return [
            r
            for r in results
            if r["phase"] == phase and all(r.get(k) == v for k, v in match.items())
        ]

    while runner.busy():
        for result in runner.finished():
            if result["phase"] == "teacher":
                teacher_result = result
                runner.teacher_state = result["state"]
                runner.log(
                    f"teacher VGG-{result['num_layers']}: test {100 * result['accuracy']:.1f} %, "
                    f"validation {100 * result['val_accuracy']:.1f} %"
                )
                for method in reversed(MATCHING_METHODS):
                    scales = mgrid["scales"] if method != "activation" else [None]
                    for scale in scales:
                        for seed in val_seeds:
                            runner.submit(
                                {
                                    "phase": "match_grid",
                                    "method": method,
                                    "per_class": mgrid["per_class"],
                                    "seed": seed,
                                    **base,
                                    "scale": scale,
                                    "evaluate_on": "val",
                                    "teacher_state": runner.teacher_state,
                                }
                            )
        # Matching weight chosen per method once its grid is complete.
        for method in MATCHING_METHODS:
            scales = mgrid["scales"] if method != "activation" else [None]
            runs = of("match_grid", method=method)
            if matching_done[method] or len(runs) < len(scales) * len(val_seeds):
                continue
            matching_done[method] = True
            scale, means = choose(runs, "scale", scales)
            chosen_scale[method] = scale
            validation["matching"][method] = means
            runner.log(f"chosen scale for {method}: {scale} (validation {means})")
        # Regularisation strength chosen per size once its grid is complete.
        for per_class in r_sizes:
            expected = sum(len(grid[m]) for m in REGULARISERS) * len(val_seeds)
            runs = of("reg_grid", per_class=per_class)
            if reg_grid_done[per_class] or len(runs) < expected:
                continue
            reg_grid_done[per_class] = True
            chosen_strength[str(per_class)] = {}
            validation["regularisation"][str(per_class)] = {
                "none": statistics.fmean(
                    r["accuracy"] for r in of("val_baseline", per_class=per_class)
                )
                if of("val_baseline", per_class=per_class)
                else None
            }
            for method in reversed(REGULARISERS):
                strength, means = choose(
                    [r for r in runs if r["method"] == method], "strength", grid[method]
                )
                chosen_strength[str(per_class)][method] = strength
                validation["regularisation"][str(per_class)][method] = means
            runner.log(f"chosen strengths at {per_class}/class: {chosen_strength[str(per_class)]}")
        if not finals_submitted and all(matching_done.values()) and all(reg_grid_done.values()):
            # Every choice is made: the final runs, in the order that leaves the most useful
            # tables if the run is cut short: the first 5 seeds before any later one (5 paired
            # seeds are enough for the t-test), size by size (distillation, then
            # regularisation), and within a size seed by seed, so that every method has the
            # same seeds.
            finals_submitted = True
            groups = [seeds[:5], seeds[5:]] if len(seeds) > 5 else [seeds]
            for group, index in itertools.product(groups, range(max(len(d_sizes), len(r_sizes)))):
                for seed in group:
                    for method in MATCHING_METHODS if index < len(d_sizes) else []:
                        runner.submit(
                            {
                                "phase": "distillation",
                                "method": method,
                                "per_class": d_sizes[index],
                                "seed": seed,
                                **base,
                                "scale": chosen_scale[method],
                                "evaluate_on": "test",
                                "teacher_state": runner.teacher_state,
                            }
                        )
                for seed in group:
                    for method in REGULARISERS if index < len(r_sizes) else []:
                        runner.submit(
                            {
                                "phase": "regularisation",
                                "method": method,
                                "per_class": r_sizes[index],
                                "seed": seed,
                                **base,
                                "strength": chosen_strength[str(r_sizes[index])][method],
                                "evaluate_on": "test",
                            }
                        )
    if teacher_result is None:
        raise RuntimeError("the teacher did not run")
    teacher = {k: v for k, v in teacher_result.items() if k != "state"}
    return {
        "teacher": teacher,
        "chosen_scale": chosen_scale,
        "chosen_strength": chosen_strength,
        "validation": validation,
        "runs": [{k: v for k, v in r.items() if k != "state"} for r in results],
        "wall_seconds": time.perf_counter() - runner.start,
    }


def summarise(config: Dict[str, Any], runs: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Per table, method and size: the accuracy interval and the paired comparison."""

    def accuracies(phases: Sequence[str], method: str, per_class: int) -> Dict[int, float]:
        return {
            r["seed"]: 100 * r["accuracy"]
            for r in runs
            if r["phase"] in phases and r["method"] == method and r["per_class"] == per_class
        }

    out: Dict[str, Any] = {}
    for table, methods, sizes, phase in (
        ("distillation", DISTILLATION_METHODS, config["distillation_sizes"], "distillation"),
        (
            "regularisation",
            REGULARISATION_METHODS,
            config["regularisation_sizes"],
            "regularisation",
        ),
    ):
        cells: Dict[str, Any] = {}
        paired: Dict[str, Any] = {}
        for method in methods:
            cells[method], paired[method] = {}, {}
            for per_class in sizes:
                if method in ("cross_entropy", "none"):
                    acc = accuracies(["baseline"], "cross_entropy", per_class)
                else:
                    acc = accuracies([phase], method, per_class)
                seeds = [s for s in config["seeds"] if s in acc]
                if not seeds:
                    continue
                cells[method][str(per_class)] = mean_interval([acc[s] for s in seeds])
                if method in ("cross_entropy", "none"):
                    continue
                baseline = accuracies(["baseline"], "cross_entropy", per_class)
                both = [s for s in seeds if s in baseline]
                if len(both) >= 2:
                    paired[method][str(per_class)] = paired_comparison(
                        [acc[s] for s in both], [baseline[s] for s in both]
                    )
        orderings: List[Dict[str, Any]] = []
        for better, worse in ORDERINGS[table]:
            for per_class in sizes:
                a, b = (
                    accuracies(
                        ["baseline"] if m in ("cross_entropy", "none") else [phase],
                        "cross_entropy" if m in ("cross_entropy", "none") else m,
                        per_class,
                    )
                    for m in (better, worse)
                )
                both = [s for s in config["seeds"] if s in a and s in b]
                if len(both) >= 2:
                    comparison = paired_comparison([a[s] for s in both], [b[s] for s in both])
                    orderings.append(
                        {
                            "better": better,
                            "worse": worse,
                            "per_class": per_class,
                            **comparison,
                            "verdict": verdict(comparison),
                        }
                    )
        out[table] = {"cells": cells, "paired": paired, "orderings": orderings}
    return out


def verdict(comparison: Dict[str, Any]) -> str:
    """``reproduced`` / ``reversed`` when the 95 % interval of the paired difference
    excludes 0 on the paper's / the other side; ``within noise`` otherwise."""
    low = comparison["mean"] - comparison["ci95"]
    high = comparison["mean"] + comparison["ci95"]
    if low > 0:
        return "reproduced"
    if high < 0:
        return "reversed"
    return "within noise"


# --------------------------------------------------------------------------- report
def _cell(stats: Optional[Dict[str, Any]], seeds: int) -> str:
    if not stats:
        return "–"
    n = "" if stats["n"] == seeds else f" (n={stats['n']})"
    return f"{stats['mean']:.1f} ± {stats['ci95']:.1f}{n}"


def _delta(stats: Optional[Dict[str, Any]]) -> str:
    if not stats:
        return "–"
    low, high = stats["mean"] - stats["ci95"], stats["mean"] + stats["ci95"]
    return (
        f"{stats['mean']:+.1f} [{low:+.1f}, {high:+.1f}] "
        f"p={stats['p_t']:.3f}/{stats['p_sign_flip']:.3f}"
    )


def _table(
    summary: Dict[str, Any],
    methods: Sequence[str],
    sizes: Sequence[int],
    papers: Sequence[Tuple[str, Dict[str, Any], Sequence[int]]],
    seeds: int,
) -> List[str]:
    """Our cells per size, then the chosen columns of each ``(label, paper table, columns)``."""
    header = ["# examples / class →", *[str(s) for s in sizes]]
    for label, _, columns in papers:
        header += [f"{label} {c}" for c in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in methods:
        cells = summary["cells"].get(method, {})
        row = [METHOD_LABELS[method], *[_cell(cells.get(str(s)), seeds) for s in sizes]]
        for _, paper, columns in papers:
            row += [paper["rows"][method][paper["columns"].index(c)] for c in columns]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _paired_table(
    summary: Dict[str, Any], methods: Sequence[str], sizes: Sequence[int]
) -> List[str]:
    header = ["Δ accuracy vs baseline (points) →", *[str(s) for s in sizes]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in methods:
        paired = summary["paired"].get(method, {})
        lines.append(
            "| "
            + " | ".join([METHOD_LABELS[method], *[_delta(paired.get(str(s))) for s in sizes]])
            + " |"
        )
    return lines


def _orderings_table(summary: Dict[str, Any]) -> List[str]:
    lines = [
        "| paper's ordering | per class | Δ (points) [95 % CI] | p (t / sign-flip) | "
        "Δ / seed std of the worse row | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for o in summary["orderings"]:
        low, high = o["mean"] - o["ci95"], o["mean"] + o["ci95"]
        noise = o["baseline_std"]
        ratio = f"{o['mean'] / noise:+.1f}" if noise > 0 else "–"
        lines.append(
            f"| {METHOD_LABELS[o['better']]} > {METHOD_LABELS[o['worse']]} | {o['per_class']} | "
            f"{o['mean']:+.1f} [{low:+.1f}, {high:+.1f}] | {o['p_t']:.3f} / {o['p_sign_flip']:.3f} "
            f"| {ratio} | {o['verdict']} |"
        )
    return lines


def markdown(config: Dict[str, Any], payload: Dict[str, Any]) -> str:
    summary, teacher = payload["summary"], payload["teacher"]
    n = len(config["seeds"])
    d_sizes, r_sizes = config["distillation_sizes"], config["regularisation_sizes"]
    data_text = (
        f"scikit-learn digits at {config['image_size']} px, 10 classes (chance 10 %), test "
        f"{10 * config['split']['test_per_class']} images"
        if config["dataset"] == "digits"
        else f"synthetic shapes at {config['image_size']} px, 4 classes (chance 25 %), test "
        f"{config['shapes_sizes']['test']} scenes"
    )
    stats_text = f"mean ± half-width of the 95 % t-interval over {n} student seeds"
    lines = [
        f"**Distillation** ({data_text}; test accuracy %, {stats_text}). Teacher "
        f"VGG-{teacher['num_layers']} on the whole pool: {100 * teacher['accuracy']:.1f} %. "
        f"Student VGG-{payload['student_layers']}. Non-output matching weight chosen per method "
        f"on validation: "
        + ", ".join(f"{m} {s:g}" for m, s in payload["chosen_scale"].items() if s is not None)
        + ". Beside: the paper's low-data columns, CIFAR-100 (C100, Table 2) and CIFAR-10 "
        "(C10, Table 3), mean ± std of 2 runs.",
        "",
        *_table(
            summary["distillation"],
            DISTILLATION_METHODS,
            d_sizes,
            [("C100", PAPER_TABLE2, [5, 10, 50]), ("C10", PAPER_TABLE3, [50, 100])],
            n,
        ),
        "",
    ]
    lines += [
        f"Paired differences to cross-entropy (same seed: same subset, initialisation, order): "
        f"mean [95 % t-interval] and two-sided p-values, paired t-test / exact sign-flip test "
        f"(smallest attainable {2 / 2**n:.3f}).",
        "",
        *_paired_table(summary["distillation"], DISTILLATION_METHODS[1:], d_sizes),
        "",
    ]
    lines += [
        "The paper's distillation orderings, paired by seed (verdict: the 95 % interval of the "
        "difference is above 0, below 0, or contains it):",
        "",
        *_orderings_table(summary["distillation"]),
        "",
    ]
    strengths = "; ".join(
        f"{s}/class: " + ", ".join(f"{m} {v:g}" for m, v in chosen.items())
        for s, chosen in payload["chosen_strength"].items()
    )
    lines += [
        f"**Regularisation** ({data_text}; {stats_text}). Student architecture "
        f"VGG-{payload['student_layers']}, every regulariser on its last convolutional block "
        f"(`{payload['regularised_layer']}`). Strengths chosen per size on validation: "
        f"{strengths}. Beside: the paper's CIFAR-100 Table 4.",
        "",
        *_table(
            summary["regularisation"],
            REGULARISATION_METHODS,
            r_sizes,
            [("C100", PAPER_TABLE4, [50, 100, 500])],
            n,
        ),
        "",
        "Paired differences to no regularisation, as above.",
        "",
        *_paired_table(summary["regularisation"], REGULARISATION_METHODS[1:], r_sizes),
        "",
        "The paper's regularisation orderings, as above:",
        "",
        *_orderings_table(summary["regularisation"]),
        "",
        "{}{:.1f} CPU-min in the training processes ({} worker processes × {} thread on {} "
        "CPU cores), torch {}.{}".format(
            f"Wall time {payload['wall_seconds'] / 60:.1f} min; "
            if payload.get("wall_seconds")
            else "",
            payload["cpu_seconds"] / 60,
            config["workers"],
            config["threads_per_worker"],
            payload["environment"]["cpu_count"],
            torch.__version__,
            ""
            if payload.get("complete", True)
            else f" **Incomplete run: {payload['missing_final_runs']} final trainings missing; "
            "cells with fewer seeds say n.**",
        ),
    ]
    return "\n".join(lines)


def build_payload(
    config: Dict[str, Any],
    runs: Sequence[Dict[str, Any]],
    wall_seconds: Optional[float],
    runs_name: str,
) -> Dict[str, Any]:
    """The results file: configuration, choices made on validation, summary, every run.

    The choices are re-derived from the validation runs with the rule of :func:`run_all`,
    so the same function serves a finished run and one that was cut short.
    """
    runs = [r for r in runs if "accuracy" in r]
    teacher = next(
        ({k: v for k, v in r.items() if k != "state"} for r in runs if r["phase"] == "teacher"),
        None,
    )
    chosen_scale: Dict[str, Any] = {}
    chosen_strength: Dict[str, Dict[str, Any]] = {}
    validation: Dict[str, Any] = {"matching": {}, "regularisation": {}}
    for method in MATCHING_METHODS:
        grid_runs = [r for r in runs if r["phase"] == "match_grid" and r["method"] == method]
        if grid_runs:
            scales = config["matching_grid"]["scales"] if method != "activation" else [None]
            chosen_scale[method], validation["matching"][method] = choose(
                grid_runs, "scale", scales
            )
    for per_class in config["regularisation_sizes"]:
        key = str(per_class)
        base = [
            r["accuracy"]
            for r in runs
            if r["phase"] == "val_baseline" and r["per_class"] == per_class
        ]
        validation["regularisation"][key] = {"none": statistics.fmean(base) if base else None}
        for method in REGULARISERS:
            grid_runs = [
                r
                for r in runs
                if r["phase"] == "reg_grid"
                and r["method"] == method
                and r["per_class"] == per_class
            ]
            if grid_runs:
                strength, means = choose(
                    grid_runs, "strength", config["regularisation_grid"][method]
                )
                chosen_strength.setdefault(key, {})[method] = strength
                validation["regularisation"][key][method] = means
    expected = len(config["seeds"]) * (
        len(config["distillation_sizes"]) * len(MATCHING_METHODS)
        + len(config["regularisation_sizes"]) * len(REGULARISERS)
    )
    finals = sum(r["phase"] in ("distillation", "regularisation") for r in runs)
    return {
        "config": config,
        "environment": environment(),
        "complete": finals >= expected,
        "missing_final_runs": max(expected - finals, 0),
        "teacher": teacher,
        "student_layers": num_layers(make_model(config, "student", 0)),
        "regularised_layer": next(
            (r["layer"] for r in runs if r["phase"] == "regularisation"), None
        ),
        "chosen_scale": chosen_scale,
        "chosen_strength": chosen_strength,
        "validation": validation,
        "summary": summarise(config, runs),
        "paper": {
            "table2_cifar100": PAPER_TABLE2,
            "table3_cifar10": PAPER_TABLE3,
            "table4_cifar100": PAPER_TABLE4,
        },
        "wall_seconds": wall_seconds,
        "cpu_seconds": sum(r.get("cpu_seconds", 0.0) for r in runs),
        "runs_file": runs_name,
    }


def marks(dataset: str) -> Tuple[str, str]:
    """The markers around the generated tables of ``dataset`` in docs/training.md."""
    name = dataset.upper()
    return (
        f"<!-- BEGIN {name} TABLES (benchmarks/train_digits.py --dataset {dataset}) -->",
        f"<!-- END {name} TABLES -->",
    )


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--dataset", choices=("digits", "shapes"), default="digits")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: the pipeline in ~1 min")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        help="summary JSON (default benchmarks/results/training_DATASET.json)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="reuse the finished jobs of the runs file instead of starting over",
    )
    parser.add_argument(
        "--teacher-cache",
        type=Path,
        default=None,
        help="where the teacher's weights are kept for --resume (default: a temp dir)",
    )
    parser.add_argument("--doc", type=Path, default=DOC_PATH)
    parser.add_argument("--no-doc", action="store_true")
    parser.add_argument(
        "--report",
        action="store_true",
        help="train nothing: rewrite the doc's tables from the results file of an earlier run",
    )
    parser.add_argument(
        "--from-runs",
        action="store_true",
        help="(--report) rebuild the results file from the per-job log, e.g. of a run that was "
        "cut short (choices re-derived from the validation runs, the configuration from the "
        "defaults and --workers)",
    )
    args = parser.parse_args(argv)
    config = default_config(args.dataset, args.smoke)
    if args.workers:
        config["workers"] = args.workers
    stem = f"training_{args.dataset}" + ("_smoke" if args.smoke else "")
    results_path = args.results or RESULTS_DIR / f"{stem}.json"
    if args.report:
        runs_file = results_path.with_name(results_path.stem + "_runs.jsonl")
        if args.from_runs:
            runs = [json.loads(line) for line in runs_file.read_text().splitlines() if line]
            payload = build_payload(config, runs, None, runs_file.name)
            results_path.write_text(json.dumps(payload, indent=1) + "\n")
        else:
            payload = json.loads(results_path.read_text())
        text = markdown(payload["config"], payload)
        print(text)
        if not args.no_doc:
            write_doc(text, args.doc, *marks(payload["config"]["dataset"]))
        return 0
    runs_path = results_path.with_name(results_path.stem + "_runs.jsonl")
    teacher_cache = (
        args.teacher_cache
        or Path(os.environ.get("TMPDIR", "/tmp")) / f"captum_fullgrad_{stem}_teacher.pt"
    )
    results_path.parent.mkdir(parents=True, exist_ok=True)

    previous: Dict[str, Dict[str, Any]] = {}
    if args.resume and runs_path.exists():
        for line in runs_path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                previous[job_key(record)] = record
    else:
        runs_path.write_text("")

    def log(message: str) -> None:
        print(message, flush=True)

    log(f"config: {json.dumps(config)}")
    with ProcessPoolExecutor(
        max_workers=config["workers"], mp_context=mp.get_context("spawn")
    ) as ex:
        runner = Runner(config, ex, runs_path, teacher_cache, previous, log)
        if previous:
            # Resumed jobs are re-logged so the runs file stays complete.
            runs_path.write_text("".join(json.dumps(r) + "\n" for r in previous.values()))
        results = run_all(config, runner)
    payload = build_payload(config, results["runs"], results["wall_seconds"], runs_path.name)
    results_path.write_text(json.dumps(payload, indent=1) + "\n")
    text = markdown(config, payload)
    print(text)
    if not args.no_doc and not args.smoke:
        write_doc(text, args.doc, *marks(args.dataset))
    log(f"wall time {results['wall_seconds']:.0f} s; wrote {results_path} and {runs_path}")
    if not payload["complete"]:
        log(f"INCOMPLETE: {payload['missing_final_runs']} final runs missing")
    return 0


if __name__ == "__main__":
    sys.exit(main())
