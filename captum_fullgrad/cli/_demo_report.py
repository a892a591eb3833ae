"""The demo's ``report.md``: the bundled model's accuracy, eq. 1's terms for one scene,
the pointing game with time per method, and the completeness gap of eq. 1."""

from __future__ import annotations

import argparse
import datetime
import platform
from typing import TYPE_CHECKING, Any, Dict, List

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: The parameters the pointing-game table shows (with whatever bounds a method's time).
SHOWN_PARAMS = (
    "n_steps",
    "baseline",
    "nt_samples",
    "noise",
    "postprocess",
    "reduce",
    "interpolate_mode",
)


def render(
    *,
    args: argparse.Namespace,
    loaded: Any,
    accuracy: float,
    grid_maps: Any,
    summary: Any,
    pointing: Any,
    hits: Dict[str, "torch.Tensor"],
    chance: float,
    gap: "torch.Tensor",
    output: "torch.Tensor",
    imagenet: str,
    device: "torch.device",
    wall: float,
) -> str:
    import captum
    import torch

    from .. import __version__
    from ..methods import get_method

    n = args.n_pointing
    relative = gap.abs() / output.abs().clamp_min(1e-12)
    rows = []
    for name in pointing.maps:
        count = int(hits[name].sum())
        per_image = 1000.0 * pointing.seconds[name] / n
        method = get_method(name)
        shown = (*SHOWN_PARAMS, *method.cost_params)  # and whatever bounds its time
        params = ", ".join(f"{k}={v}" for k, v in method.parameters.items() if k in shown) or "-"
        rows.append(
            f"| {pointing.labels[name]} (`{name}`) | {count}/{n} | {count / n:.0%} "
            f"| {per_image:.3g} | {params} |"
        )
    generated = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    tf32_note = (
        "\nOn CUDA, convolutions run in TF32 by default "
        f"(`torch.backends.cudnn.allow_tf32 = {torch.backends.cudnn.allow_tf32}` here), which "
        "holds completeness to about 1e-3 relative; exactness checks belong in float64.\n"
        if device.type == "cuda"
        else ""
    )
    reproduce = (
        f"captum-fullgrad demo --out {args.out} --n-images {args.n_images} --n-eval {args.n_eval} "
        f"--n-pointing {args.n_pointing} --seed {args.seed}"
    )
    return f"""# captum-fullgrad demo report

Generated {generated} by `captum-fullgrad demo` in {wall:.1f} s
(device: {device.type}; torch {torch.__version__}, captum {captum.__version__},
captum-fullgrad {__version__}, Python {platform.python_version()}).

## The model and the data

The bundled `shapes` network (a 4-block conv-BN-ReLU VGG trained on synthetic scenes,
classes {", ".join(loaded.categories)}) on held-out scenes of seed {args.seed} (the training
scenes come from seed 0). Each scene has exactly one class-deciding object, whose pixel mask
is known, plus distractor rings and bars.

Held-out accuracy: **{accuracy:.1%}** on {args.n_eval} scenes.

## Comparison grid (the paper's Table 5)

![comparison grid](comparison_grid.png)

Rows: the first {args.n_images} held-out scenes, labelled with the predicted class and its
softmax probability (and the true class). Columns: the image, then each method's map for
the predicted class. Normalisation: every map is divided by its own 99th percentile and
clipped to [0, 1], one colour map for all, so the maps compare in shape, not in scale.
Also as [PDF](comparison_grid.pdf).

## Full-Jacobian decomposition (the paper's Figure 1)

![decomposition](decomposition.png)

{decomposition_table(summary, loaded.categories)}
## Pointing game and time per image

{n} held-out scenes, explaining the true class. A hit: every pixel where the map attains its
maximum lies on the class-deciding object's mask (tolerance 0 px; ties must all hit, as in
`captum_fullgrad.evaluation.pointing_game`). Chance level (a single random pixel): the mean
object area, **{chance:.1%}** of the image. Time: wall-clock per image on {device.type},
batches of {args.batch_size}, including each method's own forward passes.

| method | hits | hit rate | ms / image | parameters |
|---|---|---|---|---|
{chr(10).join(rows)}

## Completeness of eq. 1

FullGradient's convergence delta, (<grad f, x> + sum of all bias-Jacobians) - f(x), on the
same {n} scenes (float32; |f(x)| up to {float(output.abs().max()):.3g}):

| max abs gap | max relative gap | mean abs gap |
|---|---|---|
| {float(gap.abs().max()):.2e} | {float(relative.max()):.2e} | {float(gap.abs().mean()):.2e} |
{tf32_note}
## VGG-16-BN on ImageNet sample photos

{imagenet}
## Reproduce

```
{reproduce}
```
"""


def decomposition_table(summary: Any, categories: List[str]) -> str:
    """The report's eq. 1 table for a :class:`~captum_fullgrad.figures.DecompositionSummary`:
    each term's share of f(x), their sum, and the gap in Captum's sign (sum - f(x))."""
    sources = ", ".join(summary.non_spatial_sources) or "none"
    block_lines = "".join(
        f"| `{block}` | {value:+.5g} |\n" for block, value in summary.block_terms.items()
    )
    return f"""For scene #0: f(x) = {summary.output:.6g} (logit of '{categories[summary.target]}').

| term | share of f(x) |
|---|---|
| input term `<grad f, x>` | {summary.input_term:+.5g} |
{block_lines}| non-spatial biases ({sources}) | {summary.non_spatial:+.5g} |
| **sum** | **{summary.total:+.6g}** |
| completeness gap sum - f(x) | {summary.completeness_gap:+.2e} |
"""
