"""``captum-fullgrad attribute``: every image of a data set, on every process of a job.

The options and the job live in :mod:`captum_fullgrad.dataset_attribution` (also runnable
as ``python -m captum_fullgrad.dataset_attribution``); see ``docs/scale.md``.
"""

from __future__ import annotations

import argparse

from ._common import Command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..dataset_attribution import add_arguments as declare

    declare(parser)


def run(args: argparse.Namespace) -> int:
    from ..dataset_attribution import run as attribute

    return attribute(args)


COMMAND = Command(
    "attribute",
    "the maps of a whole data set into a chunked Zarr store; resumable, distributed under torchrun",
    add_arguments,
    run,
    description="Explain every image of --images (a directory, a text file of paths, or "
    "synthetic:N) with --methods and write the maps, targets, probabilities and FullGrad's "
    "completeness gaps to the Zarr store --out. Under torchrun the processes share the work "
    "(torch.distributed: NCCL on GPUs, gloo on CPUs); running the same command again resumes "
    "a killed job. See docs/scale.md.",
    epilog="example: captum-fullgrad attribute --model shapes --images synthetic:1000 "
    "--methods fullgrad,gradcam --out maps.zarr",
)
