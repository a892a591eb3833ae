"""``captum-fullgrad attribute``: the maps of a whole data set, on every process of a job.

One command explains every image of a SOURCE (:mod:`~captum_fullgrad.image_sources`) with
one or more registered methods (:mod:`~captum_fullgrad.methods`) and writes the maps, the
targets, the model's probabilities and FullGrad's completeness gaps (eq. 1) to an
attribution store (:mod:`~captum_fullgrad.store`).

Run alone it is one process; under ``torchrun`` (one process per GPU, any number of nodes
through torchrun's rendezvous) the processes share the work with ``torch.distributed``
(NCCL on GPUs, gloo on CPUs), reading ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` from the
environment as torchrun (or SLURM through torchrun) sets them::

    captum-fullgrad attribute --model shapes --images synthetic:1000 \\
        --methods fullgrad,gradcam --out maps.zarr
    torchrun --nproc-per-node 8 -m captum_fullgrad attribute --model resnet50 \\
        --images /data/imagenet/val --methods fullgrad,gradcam,smoothgrad --out val.zarr

How the work is cut, so that a job can die at any moment and be resumed:

- The unit of work is a **block** of ``--block-size`` consecutive images in data-set
  order; it depends on neither the number of processes nor ``--batch-size``. The blocks
  not yet complete are dealt round-robin to the processes; each process writes only its
  own blocks' chunks, and a block's completion marker last.
- Running the same command again computes only the unmarked blocks, with any number of
  processes; a finished store is left alone; a store made by another model, weights,
  method set, parameters, image source, map size, dtype, target rule or block size is
  refused unless ``--overwrite``.
- Stochastic methods (SmoothGrad, SmoothFullGrad, any method registered with
  ``stochastic=True`` and a ``seed`` parameter) are called image by image with a seed
  derived from ``--seed`` and the image's index (:func:`image_seed`), so a map depends on
  neither the batch it fell in nor the world size.
- One job writes a store at a time: rank 0 takes the advisory lock ``STORE.lock``
  (:class:`~captum_fullgrad.store.StoreLock`, owner pid, host and job id) for the whole
  job, so the ranks of one job share the store and a second job is refused, naming the
  owner; the lock of a job killed on this host is taken over by the next run.
- An image that cannot be read is recorded (id, reason) in the store and the summary; its
  slots keep NaN and ``valid`` is False for it. The job carries on.

Preprocessing is the model's own (:func:`~captum_fullgrad.models.load_model`), applied in
DataLoader workers (``--num-workers``), which decode the next images while the model runs.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ._argtypes import (
    add_runtime_options,
    method_parameter,
    non_negative_int,
    positive_int,
    resolve_device,
)
from .cli._common import CliError, Parser, fail, run_command
from .image_sources import BadImageError, ImageSource, open_image_source

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_DATA_SEED",
    "EXIT_AFTER_BLOCKS_ENV_VAR",
    "add_arguments",
    "build_parser",
    "image_seed",
    "main",
    "run",
    "weights_identity",
]

#: Images per block: the unit of work, of chunking and of resumption.
DEFAULT_BLOCK_SIZE = 64
#: Seed of the synthetic scenes; the bundled model was trained on seed 0, so 10000 is
#: held out (the same default as ``evaluate --data-seed``).
DEFAULT_DATA_SEED = 10_000
#: Test hook: ``K`` or ``RANK:K`` makes a process (every one, or rank RANK) write the
#: arrays of its block K+1 and exit at once without marking it, as a kill would.
EXIT_AFTER_BLOCKS_ENV_VAR = "CAPTUM_FULLGRAD_EXIT_AFTER_BLOCKS"
# Metadata keys that must agree for a run to resume into an existing store.
_IDENTITY_KEYS = (
    "model",
    "weights",
    "methods",
    "method_parameters",
    "source_fingerprint",
    "n_images",
    "map_size",
    "dtype",
    "target",
    "block_size",
    "seed",
)
_FLOAT16_MAX = float(np.finfo(np.float16).max)
# Seconds between two reads of the other processes' block markers for the progress bar.
_PROGRESS_POLL_S = 2.0

PROG = "captum-fullgrad attribute"


# --------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------


def _target_spec(text: str) -> str:
    value = text.strip().lower()
    if value in ("pred", "label") or re.fullmatch(r"\d+", value):
        return value
    raise argparse.ArgumentTypeError(f"expected pred, label or a class index, got {text!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the options of ``captum-fullgrad attribute`` on ``parser``."""
    parser.add_argument(
        "--model", required=True, help="'shapes' (bundled) or a torchvision classifier"
    )
    parser.add_argument(
        "--weights",
        default="DEFAULT",
        help="DEFAULT, a torchvision weights name, a state dict file, or 'random' "
        "(default: DEFAULT)",
    )
    parser.add_argument(
        "--images",
        required=True,
        metavar="SOURCE",
        help="a directory of images (recursive; an ImageFolder layout gives labels), a text "
        "file of image paths, or synthetic:N (generated scenes, see --data-seed)",
    )
    parser.add_argument(
        "--methods",
        default="fullgrad",
        help="comma-separated registered method names (default: fullgrad)",
    )
    parser.add_argument(
        "--param",
        action="append",
        type=method_parameter,
        default=[],
        metavar="METHOD.NAME=VALUE",
        help="set a method parameter, e.g. smoothgrad.nt_samples=20 (repeatable)",
    )
    parser.add_argument("--out", required=True, metavar="STORE", help="the Zarr store to write")
    parser.add_argument(
        "--target",
        type=_target_spec,
        default="pred",
        help="class to explain: pred (the model's prediction), label (the source's label: "
        "ImageFolder or synthetic), or a class index (default: pred)",
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=32, help="images per call (default: 32)"
    )
    parser.add_argument(
        "--block-size",
        type=positive_int,
        default=DEFAULT_BLOCK_SIZE,
        help=f"images per unit of work and chunk (default: {DEFAULT_BLOCK_SIZE})",
    )
    parser.add_argument(
        "--map-size",
        type=positive_int,
        default=None,
        metavar="S",
        help="store S x S maps (default: the model's input size)",
    )
    parser.add_argument(
        "--dtype",
        choices=("float16", "float32"),
        default="float32",
        help="dtype of the stored maps (default: float32)",
    )
    parser.add_argument(
        "--num-workers",
        type=non_negative_int,
        default=2,
        help="DataLoader worker processes per process decoding images (default: 2)",
    )
    parser.add_argument(
        "--seed",
        type=non_negative_int,
        default=0,
        help="base of the per-image noise seeds of stochastic methods (default: 0)",
    )
    parser.add_argument(
        "--data-seed",
        type=int,
        default=DEFAULT_DATA_SEED,
        help=f"seed of the synthetic:N scenes (default: {DEFAULT_DATA_SEED}, held out)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a store made by a different run instead of refusing",
    )
    add_runtime_options(parser)


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone parser for ``python -m captum_fullgrad.dataset_attribution``."""
    parser = Parser(prog=PROG, description=(__doc__ or "").splitlines()[0])
    add_arguments(parser)
    return parser


def image_seed(base: int, index: int) -> int:
    """The noise seed of image ``index``: independent streams per image, reproducible."""
    state = np.random.SeedSequence([int(base), int(index)]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word such as bilinear


def _configured_methods(names_text: str, params: Sequence[str]) -> List[Any]:
    from .methods import resolve_methods
    from .store import RESERVED_NAMES

    overrides: Dict[str, Dict[str, Any]] = {}
    for item in params:
        key, _, value = item.partition("=")
        method, _, name = key.partition(".")
        method = method.strip().lower().replace("-", "_")
        overrides.setdefault(method, {})[name.strip()] = _parse_value(value.strip())
    try:
        methods = resolve_methods(names_text, params=overrides, unselected_params="error")
    except (ValueError, TypeError) as exc:
        raise CliError(f"--methods/--param: {exc}") from None
    reserved = sorted({m.name for m in methods} & set(RESERVED_NAMES))
    if reserved:
        raise CliError(f"--methods: {reserved} are names of the store's own arrays")
    for configured in methods:
        if configured.stochastic and "seed" not in configured.defaults:
            raise CliError(
                f"--methods: {configured.name} is stochastic but has no seed parameter, so its "
                "maps would change with batching and resumption; give it a 'seed' parameter"
            )
    return methods


# --------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------


@dataclass
class _Processes:
    """This process's place in the job (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialised_here: bool = False

    @classmethod
    def from_environment(cls, device_spec: str) -> "_Processes":
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        processes = cls(rank, world_size, local_rank)
        if world_size > 1 and not torch.distributed.is_initialized():
            uses_cuda = device_spec.startswith("cuda") or (
                device_spec == "auto" and torch.cuda.is_available()
            )
            if uses_cuda:
                torch.cuda.set_device(local_rank)
            # Rendezvous from torchrun's environment (MASTER_ADDR/PORT, RANK, WORLD_SIZE).
            torch.distributed.init_process_group(
                backend="nccl" if uses_cuda else "gloo", timeout=timedelta(hours=1)
            )
            processes.initialised_here = True
        return processes

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def device(self, spec: str) -> torch.device:
        device = resolve_device(spec)
        if device.type == "cuda" and device.index is None and self.distributed:
            device = torch.device("cuda", self.local_rank)
        return device

    def agree(self, step: Callable[[], Any]) -> Any:
        """Run ``step`` on every process; if it fails anywhere, raise the first failure's
        message everywhere (so no process waits forever on one that gave up)."""
        result, error = None, None
        try:
            result = step()
        except (CliError, ValueError, TypeError, OSError, BadImageError) as exc:
            error = " ".join(str(exc).split()) or type(exc).__name__
        if self.distributed:
            errors: List[Optional[str]] = [None] * self.world_size
            torch.distributed.all_gather_object(errors, error)
            error = next((e for e in errors if e is not None), None)
        if error is not None:
            raise CliError(error)
        return result

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every process."""
        if not self.distributed:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> List[Any]:
        if not self.distributed:
            return [value]
        values: List[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(values, value)
        return values

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.initialised_here and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


class _ImageDataset(torch.utils.data.Dataset):
    """``(index, model input, label, error)`` of each image; runs in DataLoader workers.

    An unreadable image gives a zero input and its reason in ``error`` ("" when fine).
    """

    def __init__(
        self, source: ImageSource, transform: Callable[[Any], Tensor], size: Tuple[int, int]
    ) -> None:
        self.source = source
        self.transform = transform
        self.size = size

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Tuple[int, Tensor, int, str]:
        try:
            image, label = self.source.load(index)
            x = self.transform(image)
            if tuple(x.shape[-2:]) != self.size:
                x = F.interpolate(x[None].float(), self.size, mode="bilinear", antialias=True)[0]
            return index, x.float(), label, ""
        except BadImageError as exc:
            reason = str(exc)
        except Exception as exc:  # noqa: BLE001 - a transform that rejects one image
            reason = f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:200]
        return index, torch.zeros(3, *self.size), -1, reason or "unreadable"


# --------------------------------------------------------------------------------------
# Maps
# --------------------------------------------------------------------------------------


def _is_builtin_fullgrad(method: Any) -> bool:
    from .methods import get_method

    return method.name == "fullgrad" and method.fn is get_method("fullgrad").fn


def _method_maps(
    method: Any, model: Any, x: Tensor, target: Tensor, indices: Sequence[int], seed: int
) -> Tuple[Tensor, Optional[Tensor]]:
    """``(maps (B, 1, H, W), FullGrad delta (B,) or None)`` of one method on one batch."""
    from . import methods as registry
    from .full_gradient import FullGradient

    if _is_builtin_fullgrad(method):
        p = method.parameters
        with torch.enable_grad():
            maps, delta = FullGradient(model, layers=p["layers"]).attribute(
                x,
                target=target,
                single_channel=True,
                include_input_gradient=p["include_input_gradient"],
                postprocess=p["postprocess"],
                interpolate_mode=p["interpolate_mode"],
                internal_batch_size=p["internal_batch_size"],
                return_convergence_delta=True,
            )
        return registry._check_output(maps, x, method.name), delta.detach().reshape(-1)
    if method.stochastic:
        # One call per image with its own seed: the noise of image i never depends on
        # which other images share its batch, nor on the number of processes. The noise
        # tunnels already batch their samples (64 noisy images per call by default), so
        # a call per image costs about what a batched call does.
        parts = [
            method.configure(seed=image_seed(seed, index))(model, x[k : k + 1], target[k : k + 1])
            for k, index in enumerate(indices)
        ]
        return torch.cat(parts), None
    return method(model, x, target), None


class _Block:
    """The arrays of one block, filled batch by batch until every image is in."""

    def __init__(
        self, start: int, stop: int, methods: Sequence[str], size: Tuple[int, int]
    ) -> None:
        n = stop - start
        self.start, self.stop, self.remaining = start, stop, n
        self.maps = {m: np.full((n, *size), np.nan, dtype=np.float32) for m in methods}
        self.labels = np.full(n, -1, dtype=np.int64)
        self.targets = np.full(n, -1, dtype=np.int64)
        self.probabilities = np.full(n, np.nan, dtype=np.float32)
        self.deltas = np.full(n, np.nan, dtype=np.float32)
        self.valid = np.zeros(n, dtype=bool)
        self.errors = [""] * n


# --------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------


def weights_identity(weights: str) -> str:
    """The ``--weights`` value as a store records it: a file by its absolute path, size and
    modification time (``evaluate --maps`` compares it the same way)."""
    path = Path(weights).expanduser()
    if weights not in ("DEFAULT",) and path.is_file():
        stat = path.stat()
        return f"{path.resolve()} ({stat.st_size} bytes, mtime {int(stat.st_mtime)})"
    return weights


def _load(args: argparse.Namespace, device: torch.device) -> Any:
    from .models import load_model

    spec: Any = None if args.weights.strip().lower() in ("random", "none") else args.weights
    if spec is not None and spec != "DEFAULT" and Path(spec).expanduser().exists():
        spec = Path(spec).expanduser()
    try:
        return load_model(args.model, weights=spec, device=device)
    except RuntimeError as exc:  # torch.load on a corrupt file
        raise ValueError(f"cannot load weights {args.weights!r}: {exc}") from None


def _versions() -> Dict[str, str]:
    import platform

    import captum
    import torchvision

    from . import __version__

    return {
        "captum_fullgrad": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "captum": captum.__version__,
        "python": platform.python_version(),
    }


def _prepare_store(
    args: argparse.Namespace, source: ImageSource, metadata: Dict[str, Any], methods: List[str]
) -> List[int]:
    """On rank 0: create, check or replace the store; return its pending blocks."""
    from .store import AttributionStore, create_store, remove_store

    out = Path(args.out).expanduser()
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()  # an empty directory made beforehand (e.g. by a job script) is no store
    if out.exists():
        try:
            store = AttributionStore(out, mode="r+")
        except ValueError:
            if not args.overwrite:
                raise
            store = None
        if store is not None:
            try:
                store.check_matches(metadata, _IDENTITY_KEYS)
                return store.pending_blocks()
            except ValueError:
                if not args.overwrite:
                    raise
        remove_store(out)
    size = tuple(metadata["map_size"])
    store = create_store(
        out,
        ids=source.ids,
        methods=methods,
        map_size=(int(size[0]), int(size[1])),
        dtype=args.dtype,
        block_size=args.block_size,
        metadata=metadata,
    )
    return store.pending_blocks()


def _exit_after_blocks(rank: int) -> Optional[int]:
    text = os.environ.get(EXIT_AFTER_BLOCKS_ENV_VAR, "").strip()
    if not text:
        return None
    which, _, count = text.rpartition(":")
    if which and int(which) != rank:
        return None
    return int(count)


def _progress_bar(enabled: bool, total: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        unit="img",
        desc="attribute",
        disable=not enabled,
        dynamic_ncols=True,
        file=sys.stderr,
    )


def run_job(args: argparse.Namespace) -> Dict[str, Any]:
    """Run (or resume) the job that ``args`` describe, as one process of it.

    Returns:
        The summary (identical on every process): ``store``, ``n_images``, ``computed``
        (images computed by this run), ``processes``, ``seconds``, ``bad_images``
        (``[(id, reason)]``), ``nothing_to_do``, ``complete``, ``took_over_lock`` (the
        dead owner of a lock this run took over, or None).

    Raises:
        CliError: bad input, a mismatched store without ``--overwrite``, or a store
            another job is writing (its lock), raised on every process alike.
    """
    from .store import AttributionStore

    started = time.perf_counter()
    processes = _Processes.from_environment(args.device)
    lock = None
    try:
        # One lock per job, taken by rank 0 alone: the ranks of this job share the store,
        # another job (another torchrun, another node's command) is refused.
        lock = processes.agree(lambda: _take_lock(args.out) if processes.rank == 0 else None)
        device = processes.agree(lambda: processes.device(args.device))
        source = processes.agree(lambda: open_image_source(args.images, args.data_seed))
        fingerprints = processes.gather(source.fingerprint)
        if len(set(fingerprints)) != 1:
            raise CliError(
                f"--images {args.images!r} lists different images on different processes "
                "(is the directory changing, or not shared between nodes?)"
            )
        methods = processes.agree(lambda: _configured_methods(args.methods, args.param))
        loaded = processes.agree(lambda: _load(args, device))

        def check_target() -> None:
            if args.target == "label" and not source.has_labels:
                raise ValueError(
                    f"--target label: {args.images!r} has no labels (use an ImageFolder "
                    "layout or synthetic:N, or --target pred)"
                )
            if args.target == "label" and len(source.classes) > len(loaded.categories):
                raise ValueError(
                    f"--target label: {args.images!r} has {len(source.classes)} class "
                    f"directories but model {loaded.name!r} has {len(loaded.categories)} "
                    "classes"
                )
            if args.target.isdigit() and int(args.target) >= len(loaded.categories):
                raise ValueError(
                    f"--target {args.target}: model {loaded.name!r} has "
                    f"{len(loaded.categories)} classes"
                )

        processes.agree(check_target)
        map_size = (args.map_size, args.map_size) if args.map_size else tuple(loaded.input_size)
        metadata = {
            "model": loaded.name,
            "weights": weights_identity(args.weights),
            "methods": [m.name for m in methods],
            "method_parameters": {m.name: m.parameters for m in methods},
            "source": args.images,
            "source_kind": source.kind,
            "source_fingerprint": source.fingerprint,
            "classes": source.classes,
            "categories": list(loaded.categories),
            "n_images": len(source),
            "input_size": list(loaded.input_size),
            "map_size": list(map_size),
            "dtype": args.dtype,
            "target": args.target,
            "block_size": args.block_size,
            "seed": args.seed,
            "data_seed": args.data_seed if source.kind == "synthetic" else None,
            "versions": _versions(),
        }
        pending = processes.agree(
            lambda: (
                _prepare_store(args, source, metadata, [m.name for m in methods])
                if processes.rank == 0
                else None
            )
        )
        pending = processes.broadcast(pending)
        store = AttributionStore(Path(args.out).expanduser(), mode="r+")
        computed = 0
        if pending:
            mine = pending[processes.rank :: processes.world_size]
            computed = _compute(
                args, processes, store, source, loaded, methods, map_size, mine, pending
            )
        computed = sum(processes.gather(computed))
        processes.barrier()
        summary = {
            "store": str(store.path),
            "n_images": len(store),
            "computed": computed,
            "processes": processes.world_size,
            "seconds": time.perf_counter() - started,
            "bad_images": store.bad_images if len(store) else [],
            "nothing_to_do": not pending,
            "complete": store.complete,
            "took_over_lock": processes.broadcast(lock.took_over if lock else None),
        }
        return summary
    finally:
        if lock is not None:
            lock.release()
        processes.close()


def _take_lock(out: str) -> Any:
    """The store's :class:`~captum_fullgrad.store.StoreLock` (bad input if another job holds
    it)."""
    from .store import StoreLock, StoreLockedError

    path = Path(out).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return StoreLock.acquire(path)
    except StoreLockedError as exc:
        raise CliError(str(exc)) from None


def _compute(
    args: argparse.Namespace,
    processes: _Processes,
    store: Any,
    source: ImageSource,
    loaded: Any,
    methods: List[Any],
    map_size: Tuple[int, int],
    mine: List[int],
    pending: List[int],
) -> int:
    """Compute and write this process's blocks; return how many images it computed."""
    device = next(loaded.model.parameters()).device
    dataset = _ImageDataset(source, loaded.transform, tuple(loaded.input_size))
    order = [i for block in mine for i in range(*store.block_range(block))]
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.batch_size,
        sampler=order,
        num_workers=args.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    names = [m.name for m in methods]
    blocks: Dict[int, _Block] = {}
    writer = _BlockWriter(store, _exit_after_blocks(processes.rank))
    total = sum(b - a for a, b in map(store.block_range, pending))
    others = [k for k in pending if k not in set(mine)]
    bar = _progress_bar(processes.rank == 0 and not args.no_progress and sys.stderr.isatty(), total)
    own_done, last_poll, others_done = 0, 0.0, 0
    try:
        for indices, images, labels, errors in loader:
            index_list = [int(i) for i in indices]
            for i in index_list:
                block = i // store.block_size
                if block not in blocks:
                    start, stop = store.block_range(block)
                    blocks[block] = _Block(start, stop, names, map_size)
            _compute_batch(
                args, loaded.model, methods, blocks, index_list, images, labels, errors,
                map_size, device, store.block_size,
            )  # fmt: skip
            for block in sorted({i // store.block_size for i in index_list}):
                if not blocks[block].remaining:
                    writer.submit(block, blocks.pop(block))
            own_done += len(index_list)
            now = time.monotonic()
            if bar.disable is False and others and now - last_poll > _PROGRESS_POLL_S:
                done = store.done_blocks()
                others_done = sum(
                    b - a for k in others if done[k] for a, b in [store.block_range(k)]
                )
                last_poll = now
            bar.n = own_done + others_done
            bar.refresh()
    finally:
        # Blocks already computed are written and marked even if a later batch failed.
        writer.close()
        bar.close()
    return own_done


class _BlockWriter:
    """Writes finished blocks on a background thread, so that compressing and writing a
    block overlaps the computation of the next one (Blosc and file writes release the
    GIL). At most ``depth`` blocks wait; a write error is raised on the next submit or on
    :meth:`close`. Each block's marker is written after its arrays, in the same task."""

    def __init__(self, store: Any, exit_after: Optional[int], depth: int = 2) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.store = store
        self.exit_after = exit_after
        self.depth = depth
        self.written = 0
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer")
        self.futures: List[Any] = []

    def _write(self, block: int, content: _Block) -> None:
        self.store.write_arrays(
            block,
            maps=content.maps,
            labels=content.labels,
            targets=content.targets,
            probabilities=content.probabilities,
            deltas=content.deltas,
            valid=content.valid,
            errors=content.errors,
        )
        if self.exit_after is not None and self.written >= self.exit_after:
            os._exit(43)  # the test hook: a kill between the arrays and the marker
        self.store.mark_done(block)
        self.written += 1

    def submit(self, block: int, content: _Block) -> None:
        self.futures.append(self.executor.submit(self._write, block, content))
        while len(self.futures) > self.depth:
            self.futures.pop(0).result()

    def close(self) -> None:
        try:
            for future in self.futures:
                future.result()
        finally:
            self.futures = []
            self.executor.shutdown(wait=True)


def _compute_batch(
    args: argparse.Namespace,
    model: Any,
    methods: List[Any],
    blocks: Dict[int, _Block],
    indices: List[int],
    images: Tensor,
    labels: Tensor,
    errors: Sequence[str],
    map_size: Tuple[int, int],
    device: torch.device,
    block_size: int,
) -> None:
    ok = [k for k, e in enumerate(errors) if not e]
    results: Dict[str, np.ndarray] = {}
    if ok:
        x = images[ok].to(device, non_blocking=True)
        with torch.no_grad():
            logits = model(x)
        if args.target == "pred":
            target = logits.argmax(dim=1)
        elif args.target == "label":
            target = labels[ok].to(device)
        else:
            target = torch.full((len(ok),), int(args.target), device=device, dtype=torch.long)
        probabilities = logits.float().softmax(dim=1).gather(1, target[:, None])[:, 0]
        results["targets"] = target.cpu().numpy()
        results["probabilities"] = probabilities.cpu().numpy()
        results["deltas"] = np.full(len(ok), np.nan, dtype=np.float32)
        ok_indices = [indices[k] for k in ok]
        for method in methods:
            maps, delta = _method_maps(method, model, x, target, ok_indices, args.seed)
            if tuple(maps.shape[-2:]) != tuple(map_size):
                maps = F.interpolate(maps, map_size, mode="bilinear", antialias=True)
            values = maps[:, 0].float().cpu().numpy()
            if args.dtype == "float16" and values.size and values.max() > _FLOAT16_MAX:
                raise CliError(
                    f"{method.name} maps reach {values.max():.3g}, beyond float16's range; "
                    "use --dtype float32"
                )
            results[method.name] = values
            if delta is not None:
                results["deltas"] = delta.float().cpu().numpy()
    for k, index in enumerate(indices):
        block = blocks[index // block_size]
        row = index - block.start
        block.remaining -= 1
        block.labels[row] = int(labels[k])
        if errors[k]:
            block.errors[row] = errors[k]
            continue
        j = ok.index(k)
        block.valid[row] = True
        block.targets[row] = results["targets"][j]
        block.probabilities[row] = results["probabilities"][j]
        block.deltas[row] = results["deltas"][j]
        for method in methods:
            block.maps[method.name][row] = results[method.name][j]


# --------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------


def _report(summary: Dict[str, Any]) -> None:
    bad = summary["bad_images"]
    stale = summary.get("took_over_lock")
    if stale:
        print(
            f"took over the lock left by pid {stale.get('pid')} on {stale.get('host')}, "
            "which no longer runs",
            file=sys.stderr,
        )
    if summary["nothing_to_do"]:
        print(f"{summary['store']}: complete ({summary['n_images']} images); nothing to do")
        return
    rate = summary["computed"] / summary["seconds"] if summary["seconds"] > 0 else 0.0
    print(
        f"{summary['store']}: {summary['computed']} images computed by "
        f"{summary['processes']} process(es) in {summary['seconds']:.1f} s "
        f"({rate:.1f} images/s); {summary['n_images']} in the store, "
        f"{len(bad)} unreadable{'' if summary['complete'] else '; NOT complete'}"
    )
    for image_id, reason in bad[:20]:
        print(f"  unreadable: {image_id}: {reason}")
    if len(bad) > 20:
        print(f"  ... and {len(bad) - 20} more (open_attributions(STORE).bad_images)")


def run(args: argparse.Namespace) -> int:
    """``captum-fullgrad attribute`` with parsed ``args``: run the job, print the summary
    on rank 0, return the exit status (bad input raises :class:`CliError`, exit status 2)."""
    summary = run_job(args)
    if int(os.environ.get("RANK", "0")) == 0:
        _report(summary)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m captum_fullgrad.dataset_attribution ...``: the same as
    ``python -m captum_fullgrad attribute ...``."""
    try:
        args = build_parser().parse_args(argv)
    except CliError as exc:
        return fail(str(exc))
    return run_command(run, args)


if __name__ == "__main__":  # pragma: no cover - exercised through subprocesses
    sys.exit(main())
