"""Eq. 1's completeness gap on the torchvision zoo, float64 and float32 (the core issue's table).

Random weights with every bias source randomised (captum_fullgrad.testing), 2 images,
target = the largest |logit|; prints a Markdown table and writes it to
benchmarks/results/completeness_zoo.md.

    python benchmarks/completeness_zoo.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torchvision

from captum_fullgrad import full_jacobian
from captum_fullgrad.testing import ZOO as TORCHVISION_ZOO
from captum_fullgrad.testing import randomize_parameters_, zoo_model

# The tests' zoo, plus a ViT larger than the tests' one.
ZOO = [*TORCHVISION_ZOO, "vit"]


def build(name: str) -> torch.nn.Module:
    if name != "vit":
        return zoo_model(name, seed=0)
    model = torchvision.models.VisionTransformer(
        image_size=64,
        patch_size=16,
        num_layers=4,
        num_heads=4,
        hidden_dim=64,
        mlp_dim=128,
        num_classes=10,
    )
    randomize_parameters_(model, 0)
    return model.eval()


def main() -> int:
    torch.set_num_threads(2)
    rows = [
        "| model | bias sources | spatial | relative gap float64 (max of 2) "
        "| relative gap float32 | bias share of f(x) | s (float64) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in ZOO:
        size = 80 if name == "inception_v3" else 64
        model = build(name)
        gaps = {}
        for dtype in (torch.float64, torch.float32):
            m = model.to(dtype)
            x = torch.rand(
                2, 3, size, size, dtype=dtype, generator=torch.Generator().manual_seed(0)
            )
            with torch.no_grad():
                target = m(x).abs().argmax(1)
            start = time.perf_counter()
            fj = full_jacobian(m, x, target=target)
            elapsed = time.perf_counter() - start
            gaps[dtype] = (
                fj,
                float((fj.completeness_delta.abs() / fj.output.abs()).max()),
                elapsed,
            )
        fj, gap64, seconds = gaps[torch.float64]
        share = float(((fj.output - fj.input_term).abs() / fj.output.abs()).min())
        spatial = sum(s.spatial for s in fj.sources.values())
        rows.append(
            f"| {name} | {len(fj.sources)} | {spatial} | {gap64:.1e} "
            f"| {gaps[torch.float32][1]:.1e} | {share:.2f} | {seconds:.1f} |"
        )
        print(rows[-1], flush=True)
    table = "\n".join(rows) + "\n"
    out = Path(__file__).parent / "results" / "completeness_zoo.md"
    out.write_text(
        "Completeness (eq. 1) on random-weight torchvision classifiers "
        "with randomised bias sources, "
        f"2 images of 64 px (inception_v3: 80 px), torch {torch.__version__}, CPU.\n"
        '"bias share" is the smallest |f(x) - <grad, x>| / |f(x)| of the two images: how much of '
        "the output the bias terms carry (a zero-bias network would show 0 and test nothing).\n\n"
        + table
    )
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
