"""Train the bundled synthetic-shapes network and write ``captum_fullgrad/weights/shapes_vgg.pt``.

Reproducible: the data come from fixed seeds (training scenes from ``--train-seed``,
held-out scenes from the disjoint ``--heldout-seed``), and every random choice of the
training (initialisation, shuffling, augmentation) comes from ``--seed``. Runs on CPU in a
few minutes with two threads::

    python benchmarks/train_shapes.py

It prints one line per epoch (loss, training accuracy, held-out accuracy, elapsed time) and
fails with exit status 1 if the final held-out accuracy is below ``--min-accuracy``, in which
case the weights file is left untouched.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from captum_fullgrad.datasets import SHAPE_CLASSES, random_symmetry, synthetic_shapes
from captum_fullgrad.models import ShapesVGG

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "captum_fullgrad" / "weights" / "shapes_vgg.pt"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-size", type=int, default=8000, help="training images")
    parser.add_argument("--heldout-size", type=int, default=2000, help="held-out images")
    parser.add_argument("--train-seed", type=int, default=0, help="seed of the training scenes")
    parser.add_argument(
        "--heldout-seed",
        type=int,
        default=10_000,
        help="seed of the held-out scenes (not trained on)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of initialisation, shuffling, augmentation"
    )
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--lr", type=float, default=3e-3, help="peak learning rate of the one-cycle schedule"
    )
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--min-accuracy", type=float, default=0.95, help="required held-out accuracy"
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="where to write the state dict"
    )
    return parser.parse_args(argv)


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy of ``model`` in eval mode."""
    model.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = model(images[start : start + batch_size])
        correct += int((logits.argmax(1) == labels[start : start + batch_size]).sum())
    return correct / max(len(images), 1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    if args.train_seed == args.heldout_seed:
        raise SystemExit(
            "--train-seed and --heldout-seed must differ, or the held-out set is not held out"
        )

    start = time.perf_counter()
    train_x, train_y, _ = synthetic_shapes(args.train_size, seed=args.train_seed)
    heldout_x, heldout_y, _ = synthetic_shapes(args.heldout_size, seed=args.heldout_seed)
    print(
        f"data: {len(train_x)} training scenes (seed {args.train_seed}), {len(heldout_x)} held-out "
        f"scenes (seed {args.heldout_seed}), classes {SHAPE_CLASSES}, "
        f"rendered in {time.perf_counter() - start:.1f} s",
        flush=True,
    )

    model = ShapesVGG()
    num_params = sum(p.numel() for p in model.parameters())
    print(f"model: ShapesVGG, {num_params} parameters", flush=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = -(-len(train_x) // args.batch_size)
    # One-cycle: a short warm-up then a decay to ~0 gets the most out of a few epochs.
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch, pct_start=0.2
    )
    loss_fn = nn.CrossEntropyLoss()

    heldout_accuracy = 0.0
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(len(train_x), generator=generator)
        total_loss, correct = 0.0, 0
        for step in range(steps_per_epoch):
            index = order[step * args.batch_size : (step + 1) * args.batch_size]
            images, labels = random_symmetry(train_x[index], generator), train_y[index]
            logits = model(images)
            loss = loss_fn(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += loss.item() * len(index)
            correct += int((logits.argmax(1) == labels).sum())
        heldout_accuracy = accuracy(model, heldout_x, heldout_y)
        print(
            f"epoch {epoch}/{args.epochs}: loss {total_loss / len(train_x):.4f}, "
            f"train accuracy {correct / len(train_x):.4f}, "
            f"held-out accuracy {heldout_accuracy:.4f}, "
            f"{time.perf_counter() - start:.0f} s",
            flush=True,
        )

    train_accuracy = accuracy(model, train_x, train_y)
    elapsed = time.perf_counter() - start
    print(
        f"final: train accuracy {train_accuracy:.4f} (eval mode), held-out accuracy "
        f"{heldout_accuracy:.4f} on {len(heldout_x)} scenes of seed {args.heldout_seed}, "
        f"{elapsed:.0f} s in total",
        flush=True,
    )
    if heldout_accuracy < args.min_accuracy:
        print(
            f"held-out accuracy below {args.min_accuracy}; {args.out} left unchanged",
            file=sys.stderr,
        )
        return 1

    args.out.parent.mkdir(parents=True, exist_ok=True)
    # A plain state dict of contiguous CPU tensors: what load_model reads with weights_only=True.
    state_dict = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    torch.save(state_dict, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
