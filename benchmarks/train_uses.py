"""Training uses of the full-Jacobian (seed paper, Tables 2/3 and 4), scaled to two CPU cores.

(a) Distillation (section 7.1, Tables 2 and 3): a small VGG-style conv-BN "teacher" is
trained on the whole synthetic-shapes training pool; a deeper and wider VGG-style
"student" is trained on 5, 10 and 50 examples per class with the cross-entropy alone or
with one of the matching objectives of :data:`captum_fullgrad.training.MATCHING_PRESETS`.

(b) Regularisation (section 7.2, Table 4): the student architecture is trained with the
cross-entropy alone, with dropout after its last convolutional block, with weight decay on
that block's biases, or with the bias-Jacobian penalty of that block. Strengths are chosen
by a small grid on a validation split (one seed, one data size) before the final runs.

Every number is the held-out accuracy (a disjoint set of scenes, never used for any
choice) as mean +- standard deviation over seeds; a seed fixes the training subset, the
initialisation and the data order. Results go to ``benchmarks/results/training_uses.json``
and the tables to ``docs/training.md`` (between the generated-tables markers)::

    python benchmarks/train_uses.py            # the full run (about 15-20 min on 2 cores)
    python benchmarks/train_uses.py --smoke    # a 1-minute check of the whole pipeline

Jobs are small, so two worker processes with one thread each use the two cores better
than one process with two threads (the capture runs Python for every operation, and two
OpenMP threads on tiny convolutions mostly wait for each other).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from captum_fullgrad.datasets import SHAPE_CLASSES, random_symmetry, synthetic_shapes
from captum_fullgrad.training import (
    MATCHING_PRESETS,
    MatchingWeights,
    bias_blocks,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for _common, run or imported

from _common import cross_entropy, environment, student_loss  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS_PATH = ROOT / "benchmarks" / "results" / "training_uses.json"
DOC_PATH = ROOT / "docs" / "training.md"
BEGIN_MARK = "<!-- BEGIN GENERATED TABLES (benchmarks/train_uses.py) -->"
END_MARK = "<!-- END GENERATED TABLES -->"

DISTILLATION_METHODS = ["cross_entropy", *MATCHING_PRESETS]
REGULARISATION_METHODS = ["none", "dropout", "bias_weight_decay", "bias_jacobian"]
METHOD_LABELS = {
    "cross_entropy": "Cross-Entropy (CE)",
    "activation": "Activation Matching",
    "i_jacobian": "i-Jacobians",
    "attention": "Attention",
    "i_jacobian_attention": "i-Jacobians + Attention",
    "full_jacobian": "Full-Jacobians",
    "full_jacobian_attention": "Full-Jacobians + Attention",
    "none": "No regularization",
    "dropout": "Dropout",
    "bias_weight_decay": "Bias weight decay",
    "bias_jacobian": "Bias-Jacobian",
}

# The seed paper's numbers (test accuracy %, mean +- std over two runs), copied from its
# Tables 2 (CIFAR-100 distillation, VGG-9 teacher 66.82 %, VGG-11 student) and 4
# (CIFAR-100 regularisation). Columns: examples per class.
PAPER_TABLE2 = {
    "columns": [5, 10, 50, 100, 500],
    "rows": {
        "cross_entropy": [
            "7.45 ± 0.3",
            "11.83 ± 0.4",
            "40.88 ± 0.8",
            "51.19 ± 0.01",
            "69.95 ± 0.2",
        ],
        "activation": ["23.72 ± 1.3", "37.22 ± 0.2", "59.43 ± 0.02", "63.91 ± 0.2", "66.99 ± 0.2"],
        "i_jacobian": ["27.27 ± 1.2", "41.47 ± 1", "61.83 ± 0.01", "65.43 ± 0.6", "66.92 ± 0.7"],
        "attention": ["38.18 ± 1.9", "46.39 ± 0.1", "60.27 ± 0.3", "64.28 ± 0.2", "66.53 ± 0.3"],
        "i_jacobian_attention": [
            "42.75 ± 1.7",
            "51.16 ± 0.6",
            "62.62 ± 0.6",
            "65.38 ± 0.2",
            "67.25 ± 0.8",
        ],
        "full_jacobian": [
            "35.15 ± 0.5",
            "48.00 ± 0.4",
            "62.88 ± 0.1",
            "65.84 ± 0.1",
            "66.83 ± 0.1",
        ],
        "full_jacobian_attention": [
            "47.11 ± 0.9",
            "54.59 ± 0.2",
            "63.20 ± 0.4",
            "65.49 ± 0.1",
            "66.65 ± 0.4",
        ],
    },
}
PAPER_TABLE4 = {
    "columns": [50, 100, 500],
    "rows": {
        "none": ["33.25 ± 0.6", "46.24 ± 0.1", "68.48 ± 0.1"],
        "dropout": ["35.04 ± 0.6", "47.62 ± 0.7", "70.14 ± 0.06"],
        "bias_weight_decay": ["34.17 ± 0.2", "47.29 ± 0.7", "68.75 ± 0.04"],
        "bias_jacobian": ["36.02 ± 0.08", "48.76 ± 0.1", "71.49 ± 0.02"],
    },
}


# --------------------------------------------------------------------------- model
class VGG(nn.Module):
    """VGG-style network without hidden fully-connected layers (as in section 7.1).

    ``len(widths)`` stages of ``convs_per_stage`` conv3x3-BN-ReLU blocks, each stage ending
    in a 2x2 max-pool, then global average pooling and one linear layer. ``dropout > 0``
    puts a dropout layer after the last block's ReLU (the regularised layer of Table 4).
    """

    def __init__(
        self,
        widths: Sequence[int],
        convs_per_stage: int,
        num_classes: int,
        dropout: float = 0.0,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        layers: List[nn.Module] = []
        channels = in_channels
        for stage, width in enumerate(widths):
            for conv in range(convs_per_stage):
                layers += [
                    nn.Conv2d(channels, width, 3, padding=1),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                ]
                channels = width
                if dropout > 0 and stage == len(widths) - 1 and conv == convs_per_stage - 1:
                    layers.append(nn.Dropout(dropout))
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def num_layers(model: VGG) -> int:
    """Weight layers (convolutions and linear), the number in a VGG-k name."""
    return sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())


# --------------------------------------------------------------------------- config
def default_config(smoke: bool = False) -> Dict[str, Any]:
    config = {
        "image_size": 32,
        "pool_size": 4000,  # the teacher's "full" training set: 1000 per class
        "val_size": 400,
        "test_size": 800,
        "data_seeds": {"pool": 0, "val": 1, "test": 2},
        "seeds": [0, 1, 2],
        "teacher": {
            "widths": [16, 32, 64],
            "convs_per_stage": 1,
            "steps": 1200,
            "batch_size": 64,
            "lr": 3e-3,
        },
        "student": {"widths": [16, 32, 64], "convs_per_stage": 2},
        # Distillation students: double backpropagation costs ~4 plain steps, so fewer,
        # smaller steps.
        "train": {"steps": 100, "batch_size": 16, "lr": 3e-3},
        "regularisation_train": {"steps": 150, "batch_size": 32, "lr": 3e-3},
        "distillation_sizes": [5, 10, 50],
        "regularisation_sizes": [10, 50, 100],
        # Matching weights: the output term in logit units, the others on L2-normalised maps,
        # chosen by `--matching-grid 1 10 100 1000` on the validation split (docs/training.md).
        "matching_scale": {
            "output": 1.0,
            "input_jacobian": 100.0,
            "bias_jacobian": 100.0,
            "attention": 100.0,
        },
        "num_pairs": 2,
        "grid": {
            "size": 50,  # at 10 per class every regulariser is near chance: nothing to choose from
            "seed": 100,
            "dropout": [0.25, 0.5],
            "bias_weight_decay": [1e-1, 1.0, 1e1],
            "bias_jacobian": [1.0, 1e1, 1e2],
        },
        "workers": 2,
        "threads_per_worker": 1,
    }
    if smoke:
        config.update(
            pool_size=200,
            val_size=80,
            test_size=80,
            seeds=[0, 1],
            distillation_sizes=[5],
            regularisation_sizes=[10],
        )
        config["teacher"] = {**config["teacher"], "steps": 20}
        config["train"] = {**config["train"], "steps": 10}
        config["regularisation_train"] = {**config["regularisation_train"], "steps": 10}
        config["grid"] = {
            **config["grid"],
            "size": 10,
            "dropout": [0.5],
            "bias_weight_decay": [1e-1],
            "bias_jacobian": [1.0],
        }
    return config


# --------------------------------------------------------------------------- data
_DATA: Dict[str, Tuple[Tensor, Tensor]] = {}


def data(config: Dict[str, Any], split: str) -> Tuple[Tensor, Tensor]:
    """``(images, labels)`` of a split, rendered once per process."""
    if split not in _DATA:
        size = {
            "pool": config["pool_size"],
            "val": config["val_size"],
            "test": config["test_size"],
        }[split]
        images, labels, _ = synthetic_shapes(
            size, seed=config["data_seeds"][split], size=config["image_size"]
        )
        _DATA[split] = (images, labels)
    return _DATA[split]


def subset(labels: Tensor, per_class: int, seed: int) -> Tensor:
    """Indices of ``per_class`` examples of each class; nested in ``per_class`` for one seed."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(10_000 + seed))
    chosen = []
    for c in range(int(labels.max()) + 1):
        of_class = order[labels[order] == c]
        if len(of_class) < per_class:
            raise ValueError(
                f"class {c} has {len(of_class)} examples in the pool, {per_class} requested"
            )
        chosen.append(of_class[:per_class])
    return torch.cat(chosen).sort().values


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(images), 400):
        correct += int(
            (model(images[start : start + 400]).argmax(1) == labels[start : start + 400]).sum()
        )
    return correct / len(images)


# --------------------------------------------------------------------------- training
def fit(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    loss_fn: Callable[[nn.Module, Tensor, Tensor], Tensor],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    augment: Callable[[Tensor, torch.Generator], Tensor] = random_symmetry,
) -> None:
    """Adam with a one-cycle schedule, ``steps`` minibatches drawn epoch by epoch, each
    minibatch passed through ``augment`` (default: the square's symmetries, which keep the
    shapes' classes)."""
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=lr, total_steps=steps, pct_start=0.2
    )
    order = torch.empty(0, dtype=torch.long)
    batch_size = min(batch_size, len(images))
    for _ in range(steps):
        if len(order) < batch_size:
            order = torch.randperm(len(images), generator=generator)
        index, order = order[:batch_size], order[batch_size:]
        model.train()
        loss = loss_fn(model, augment(images[index], generator), labels[index])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()


def make_student(config: Dict[str, Any], num_classes: int, seed: int, dropout: float = 0.0) -> VGG:
    torch.manual_seed(seed)
    return VGG(
        config["student"]["widths"],
        config["student"]["convs_per_stage"],
        num_classes,
        dropout=dropout,
    )


def make_teacher(config: Dict[str, Any], num_classes: int, seed: int = 0) -> VGG:
    torch.manual_seed(seed)
    return VGG(config["teacher"]["widths"], config["teacher"]["convs_per_stage"], num_classes)


def scaled_weights(
    config: Dict[str, Any], preset: str, scale: Optional[Dict[str, float]] = None
) -> MatchingWeights:
    base, scale = MATCHING_PRESETS[preset], scale or config["matching_scale"]
    return MatchingWeights(**{k: v * scale[k] for k, v in asdict(base).items()})


def run_job(config: Dict[str, Any], job: Dict[str, Any]) -> Dict[str, Any]:
    """Train one network and return its accuracy (runs in a worker process)."""
    torch.set_num_threads(config["threads_per_worker"])
    start, cpu_start = time.perf_counter(), time.process_time()
    pool_x, pool_y = data(config, "pool")
    num_classes = int(pool_y.max()) + 1
    result = dict(job)
    result.pop("teacher_state", None)

    if job["kind"] == "teacher":
        model = make_teacher(config, num_classes)
        t = config["teacher"]
        fit(
            model,
            pool_x,
            pool_y,
            cross_entropy,
            steps=t["steps"],
            batch_size=t["batch_size"],
            lr=t["lr"],
            seed=0,
        )
        result["state"] = {k: v.clone() for k, v in model.state_dict().items()}
        result["accuracy"] = accuracy(model, *data(config, "test"))
        result["val_accuracy"] = accuracy(model, *data(config, "val"))
        result["seconds"] = time.perf_counter() - start
        result["cpu_seconds"] = time.process_time() - cpu_start
        result["num_layers"] = num_layers(model)
        return result

    index = subset(pool_y, job["per_class"], job["seed"])
    images, labels = pool_x[index], pool_y[index]
    method, seed, strength = job["method"], job["seed"], job.get("strength")
    model = make_student(
        config, num_classes, seed, dropout=strength if method == "dropout" else 0.0
    )
    last_block = [b for b in bias_blocks(model, images[:2]) if b.spatial][-1]

    teacher, weights = None, None
    if job["kind"] in ("distillation", "matching_grid") and method != "cross_entropy":
        teacher = make_teacher(config, num_classes)
        teacher.load_state_dict(job["teacher_state"])
        teacher.eval()
        weights = scaled_weights(config, method, job.get("matching_scale"))
    loss_fn = student_loss(
        method,
        last_block,
        strength,
        teacher=teacher,
        weights=weights,
        num_pairs=config["num_pairs"],
    )

    tr = (
        config["train"]
        if job["kind"] in ("distillation", "matching_grid")
        else config["regularisation_train"]
    )
    fit(
        model,
        images,
        labels,
        loss_fn,
        steps=tr["steps"],
        batch_size=tr["batch_size"],
        lr=tr["lr"],
        seed=seed,
    )
    result["accuracy"] = accuracy(model, *data(config, job["evaluate_on"]))
    result["seconds"] = time.perf_counter() - start
    result["cpu_seconds"] = time.process_time() - cpu_start
    result["layer"] = last_block.name
    return result


# --------------------------------------------------------------------------- orchestration
def mean_std(values: Sequence[float]) -> Dict[str, float]:
    return {
        "mean": 100 * statistics.fmean(values),
        "std": 100 * (statistics.stdev(values) if len(values) > 1 else 0.0),
        "runs": [100 * v for v in values],
    }


def run_all(config: Dict[str, Any], log: Callable[[str], None]) -> Dict[str, Any]:
    start = time.perf_counter()
    context = mp.get_context("spawn")
    results: Dict[str, Any] = {
        "teacher": None,
        "grid": [],
        "distillation": [],
        "regularisation": [],
    }
    grid = config["grid"]
    with ProcessPoolExecutor(max_workers=config["workers"], mp_context=context) as executor:

        def submit(job: Dict[str, Any]):
            return executor.submit(run_job, config, job)

        # Phase 1: the teacher, the regularisation grid and the unregularised runs need
        # nothing else.
        pending = {submit({"kind": "teacher"})}
        for method in ("dropout", "bias_weight_decay", "bias_jacobian"):
            for strength in grid[method]:
                pending.add(
                    submit(
                        {
                            "kind": "grid",
                            "method": method,
                            "strength": strength,
                            "per_class": grid["size"],
                            "seed": grid["seed"],
                            "evaluate_on": "val",
                        }
                    )
                )
        pending.add(
            submit(
                {
                    "kind": "grid",
                    "method": "none",
                    "strength": None,
                    "per_class": grid["size"],
                    "seed": grid["seed"],
                    "evaluate_on": "val",
                }
            )
        )
        for per_class in config["regularisation_sizes"]:
            for seed in config["seeds"]:
                pending.add(
                    submit(
                        {
                            "kind": "regularisation",
                            "method": "none",
                            "strength": None,
                            "per_class": per_class,
                            "seed": seed,
                            "evaluate_on": "test",
                        }
                    )
                )
        for per_class in config["distillation_sizes"]:
            for seed in config["seeds"]:
                pending.add(
                    submit(
                        {
                            "kind": "distillation",
                            "method": "cross_entropy",
                            "per_class": per_class,
                            "seed": seed,
                            "evaluate_on": "test",
                        }
                    )
                )
        chosen: Dict[str, float] = {}
        grid_left = sum(len(grid[m]) for m in ("dropout", "bias_weight_decay", "bias_jacobian")) + 1
        teacher_state = None
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                r = future.result()
                kind = r["kind"]
                if kind == "teacher":
                    teacher_state = r.pop("state")
                    results["teacher"] = r
                    log(
                        f"teacher: {r['num_layers']} layers, test accuracy "
                        f"{100 * r['accuracy']:.1f} %, {r['seconds']:.0f} s "
                        f"[{time.perf_counter() - start:.0f} s]"
                    )
                    for per_class in config["distillation_sizes"]:
                        for seed in config["seeds"]:
                            for method in MATCHING_PRESETS:
                                pending.add(
                                    submit(
                                        {
                                            "kind": "distillation",
                                            "method": method,
                                            "per_class": per_class,
                                            "seed": seed,
                                            "evaluate_on": "test",
                                            "teacher_state": teacher_state,
                                        }
                                    )
                                )
                    continue
                results[
                    {
                        "grid": "grid",
                        "distillation": "distillation",
                        "regularisation": "regularisation",
                    }[kind]
                ].append(r)
                log(
                    f"{kind:>14} {r['method']:>24} {r.get('strength')!s:>6} "
                    f"{r['per_class']:>4}/class seed {r['seed']}: {100 * r['accuracy']:.1f} % "
                    f"({r['seconds']:.0f} s) [{time.perf_counter() - start:.0f} s]"
                )
                if kind == "grid":
                    grid_left -= 1
                    if grid_left == 0:
                        for method in ("dropout", "bias_weight_decay", "bias_jacobian"):
                            runs = [g for g in results["grid"] if g["method"] == method]
                            best = max(runs, key=lambda g: (g["accuracy"], -runs.index(g)))
                            chosen[method] = best["strength"]
                        log(f"chosen strengths: {chosen}")
                        for per_class in config["regularisation_sizes"]:
                            for seed in config["seeds"]:
                                for method in ("dropout", "bias_weight_decay", "bias_jacobian"):
                                    pending.add(
                                        submit(
                                            {
                                                "kind": "regularisation",
                                                "method": method,
                                                "strength": chosen[method],
                                                "per_class": per_class,
                                                "seed": seed,
                                                "evaluate_on": "test",
                                            }
                                        )
                                    )
    results["chosen_strengths"] = chosen
    results["wall_seconds"] = time.perf_counter() - start
    every = [
        results["teacher"],
        *results["grid"],
        *results["distillation"],
        *results["regularisation"],
    ]
    results["cpu_seconds"] = sum(r.get("cpu_seconds", 0.0) for r in every)
    return results


def matching_grid(
    config: Dict[str, Any],
    scales: Sequence[float],
    per_class: int,
    seeds: Sequence[int],
    methods: Sequence[str],
    teacher_cache: Optional[Path],
    log: Callable[[str], None],
) -> Dict[str, Any]:
    """Validation accuracy of each matching method with every non-output weight set to ``scale``."""
    start = time.perf_counter()
    if teacher_cache is not None and teacher_cache.exists():
        teacher = torch.load(teacher_cache)
    else:
        teacher = run_job(config, {"kind": "teacher"})
        if teacher_cache is not None:
            torch.save(teacher, teacher_cache)
    log(
        f"teacher: test {100 * teacher['accuracy']:.1f} %, "
        f"validation {100 * teacher['val_accuracy']:.1f} %"
    )
    jobs = []
    for scale in scales:
        weights = {
            "output": 1.0,
            "input_jacobian": scale,
            "bias_jacobian": scale,
            "attention": scale,
        }
        for method in methods:
            for seed in seeds:
                jobs.append(
                    {
                        "kind": "matching_grid",
                        "method": method,
                        "per_class": per_class,
                        "seed": seed,
                        "evaluate_on": "val",
                        "matching_scale": weights,
                        "teacher_state": teacher["state"],
                    }
                )
    for seed in seeds:
        jobs.append(
            {
                "kind": "matching_grid",
                "method": "cross_entropy",
                "per_class": per_class,
                "seed": seed,
                "evaluate_on": "val",
            }
        )
        jobs.append(
            {
                "kind": "matching_grid",
                "method": "activation",
                "per_class": per_class,
                "seed": seed,
                "evaluate_on": "val",
                "teacher_state": teacher["state"],
            }
        )
    rows = []
    with ProcessPoolExecutor(
        max_workers=config["workers"], mp_context=mp.get_context("spawn")
    ) as executor:
        for r in executor.map(run_job, [config] * len(jobs), jobs):
            rows.append(r)
            log(
                f"{r['method']:>24} {r.get('matching_scale')} seed {r['seed']}: "
                f"{100 * r['accuracy']:.1f} % ({r['seconds']:.0f} s) "
                f"[{time.perf_counter() - start:.0f} s]"
            )
    return {
        "per_class": per_class,
        "seeds": list(seeds),
        "scales": list(scales),
        "runs": rows,
        "teacher_val_accuracy": teacher["val_accuracy"],
        "wall_seconds": time.perf_counter() - start,
    }


def summarise(config: Dict[str, Any], results: Dict[str, Any]) -> Dict[str, Any]:
    tables: Dict[str, Any] = {}
    for name, methods, sizes in (
        ("distillation", DISTILLATION_METHODS, config["distillation_sizes"]),
        ("regularisation", REGULARISATION_METHODS, config["regularisation_sizes"]),
    ):
        table = {}
        for method in methods:
            row = {}
            for per_class in sizes:
                runs = sorted(
                    (
                        r
                        for r in results[name]
                        if r["method"] == method and r["per_class"] == per_class
                    ),
                    key=lambda r: r["seed"],
                )
                if runs:
                    row[str(per_class)] = mean_std([r["accuracy"] for r in runs])
            table[method] = row
        tables[name] = table
    return tables


# --------------------------------------------------------------------------- report
def cell(stats: Optional[Dict[str, float]]) -> str:
    return "–" if not stats else f"{stats['mean']:.1f} ± {stats['std']:.1f}"


def _table_beside_paper(
    table: Dict[str, Any], methods: Sequence[str], sizes: Sequence[int], paper: Dict[str, Any]
) -> List[str]:
    """A Markdown table: one row per method, our accuracy per training-set size, then the
    paper's columns beside it."""
    header = [
        "# examples / class →",
        *[str(s) for s in sizes],
        *[f"paper {c}" for c in paper["columns"]],
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in methods:
        row = table[method]
        cells = [
            METHOD_LABELS[method],
            *[cell(row.get(str(s))) for s in sizes],
            *paper["rows"][method],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown_tables(config: Dict[str, Any], results: Dict[str, Any], tables: Dict[str, Any]) -> str:
    teacher = results["teacher"]
    lines = []
    d_sizes = config["distillation_sizes"]
    lines.append(
        f"**Table A — distillation** (cf. the paper's Tables 2 and 3). Synthetic shapes, "
        f"{config['image_size']} px, {len(SHAPE_CLASSES)} classes; held-out accuracy (%) on "
        f"{config['test_size']} scenes, mean ± std over {len(config['seeds'])} seeds. Teacher "
        f"VGG-{teacher['num_layers']} trained on {config['pool_size']} scenes: "
        f"{100 * teacher['accuracy']:.1f} %. Student VGG-{results['student_layers']}. Beside: "
        "the paper's CIFAR-100 Table 2 (VGG-9 teacher 66.82 %, VGG-11 student)."
    )
    lines.append("")
    lines += _table_beside_paper(
        tables["distillation"], DISTILLATION_METHODS, d_sizes, PAPER_TABLE2
    )
    lines.append("")
    r_sizes = config["regularisation_sizes"]
    chosen = results["chosen_strengths"]
    lines.append(
        f"**Table B — regularisation** (cf. the paper's Table 4). Student architecture "
        f"VGG-{results['student_layers']} trained with cross-entropy; every regulariser acts on "
        f"its last convolutional block (`{results['regularised_layer']}`). Strengths chosen on "
        f"the validation split ({config['grid']['size']} examples/class, seed "
        f"{config['grid']['seed']}): dropout p = {chosen['dropout']}, bias weight decay "
        f"λ = {chosen['bias_weight_decay']}, bias-Jacobian λ = {chosen['bias_jacobian']}. "
        "Beside: the paper's CIFAR-100 Table 4 "
        "(p = 0.5, λ = 1e-1, λ = 1e2)."
    )
    lines.append("")
    lines += _table_beside_paper(
        tables["regularisation"], REGULARISATION_METHODS, r_sizes, PAPER_TABLE4
    )
    lines.append("")
    grid_rows = sorted(results["grid"], key=lambda g: (g["method"], g["strength"] or 0))
    lines.append(
        "Validation grid (accuracy %): "
        + ", ".join(f"{g['method']} {g['strength']}: {100 * g['accuracy']:.1f}" for g in grid_rows)
        + "."
    )
    lines.append("")
    lines.append(
        f"Wall time of the run: {results['wall_seconds'] / 60:.1f} min on {os.cpu_count()} "
        f"CPU cores ({config['workers']} worker processes × {config['threads_per_worker']} thread; "
        f"{results['cpu_seconds'] / 60:.1f} CPU-min in the workers), torch {torch.__version__}."
    )
    return "\n".join(lines)


def write_doc(
    text: str, path: Path = DOC_PATH, begin: str = BEGIN_MARK, end: str = END_MARK
) -> None:
    """Replace the text between the markers ``begin`` and ``end`` of ``path`` (append both
    when absent)."""
    block = f"{begin}\n{text}\n{end}"
    if path.exists():
        doc = path.read_text()
        if begin in doc and end in doc:
            head, rest = doc.split(begin, 1)
            _, tail = rest.split(end, 1)
            path.write_text(head + block + tail)
            return
        path.write_text(doc.rstrip() + "\n\n" + block + "\n")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# Training uses\n\n" + block + "\n")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes: check the pipeline in about a minute"
    )
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--results", type=Path, default=RESULTS_PATH)
    parser.add_argument(
        "--doc", type=Path, default=DOC_PATH, help="markdown file whose generated tables to update"
    )
    parser.add_argument("--no-doc", action="store_true")
    parser.add_argument(
        "--matching-grid",
        type=float,
        nargs="+",
        metavar="SCALE",
        help="instead of the benchmark, run the validation grid that chose the matching weights: "
        "every non-output weight set to SCALE (results in "
        "benchmarks/results/training_uses_matching_grid.json)",
    )
    parser.add_argument(
        "--teacher-cache", type=Path, default=None, help="(--matching-grid) reuse a trained teacher"
    )
    parser.add_argument(
        "--grid-methods",
        nargs="+",
        default=list(MATCHING_PRESETS)[1:],
        choices=list(MATCHING_PRESETS),
        help="(--matching-grid) the methods to try",
    )
    args = parser.parse_args(argv)
    config = default_config(args.smoke)
    if args.workers:
        config["workers"] = args.workers

    def log(message: str) -> None:
        print(message, flush=True)

    if args.matching_grid:
        grid = matching_grid(
            config,
            args.matching_grid,
            per_class=10,
            seeds=[100, 101],
            methods=args.grid_methods,
            teacher_cache=args.teacher_cache,
            log=log,
        )
        path = args.results.with_name("training_uses_matching_grid.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"config": config, **grid}, indent=1) + "\n")
        log(f"wrote {path}")
        return 0

    log(f"config: {json.dumps(config)}")
    results = run_all(config, log)
    student = make_student(config, len(SHAPE_CLASSES), 0)
    results["student_layers"] = num_layers(student)
    results["regularised_layer"] = (
        results["regularisation"][0]["layer"] if results["regularisation"] else None
    )
    tables = summarise(config, results)
    payload = {
        "config": config,
        "environment": environment(),
        "teacher": results["teacher"],
        "student_layers": results["student_layers"],
        "regularised_layer": results["regularised_layer"],
        "chosen_strengths": results["chosen_strengths"],
        "grid": results["grid"],
        "tables": tables,
        "runs": {
            "distillation": results["distillation"],
            "regularisation": results["regularisation"],
        },
        "paper": {"table2_cifar100": PAPER_TABLE2, "table4_cifar100": PAPER_TABLE4},
        "wall_seconds": results["wall_seconds"],
        "cpu_seconds": results["cpu_seconds"],
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(payload, indent=1) + "\n")
    text = markdown_tables(config, results, tables)
    print(text)
    if not args.no_doc:
        write_doc(text, args.doc)
    log(f"wall time {results['wall_seconds']:.0f} s; wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
