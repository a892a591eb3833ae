"""The attribution store: every map of a data set in one chunked Zarr directory.

``captum-fullgrad attribute`` (:mod:`captum_fullgrad.dataset_attribution`) writes it, one
block of consecutive images at a time, from any number of processes;
:func:`open_attributions` reads it back. The format is plain Zarr (format 2, which
zarr-python 2 and 3, xarray and dask all read), documented in ``docs/scale.md``:

==================  ==============  ===========  ==============================================
array               shape           dtype        content
==================  ==============  ===========  ==============================================
``<method>``        ``(N, S, S)``   f2 or f4     the method's map, data-set order; NaN = missing
``ids``             ``(N,)``        ``<U{L}``    image ids (paths, ``synthetic:<seed>:<index>``)
``labels``          ``(N,)``        i8           class label from the source; -1 = none
``targets``         ``(N,)``        i8           the class explained; -1 = not written
``probabilities``   ``(N,)``        f4           the model's softmax probability of the target
``deltas``          ``(N,)``        f4           FullGrad's completeness gap (eq. 1); NaN = none
``valid``           ``(N,)``        bool         True once the image's maps are written
``errors``          ``(N,)``        ``<U256``    why an image could not be read ("" if fine)
``done``            ``(blocks,)``   u1           1 once every array of that block is written
==================  ==============  ===========  ==============================================

Every array is chunked by **blocks** of ``block_size`` consecutive images along its first
axis (``done`` by one block per chunk), so the process that computes a block writes its
own chunk files and no other process touches them. A block counts only once its ``done``
entry is 1, written after all its arrays; a process killed half-way leaves the block
unmarked and the next run recomputes it. The root group's attributes hold the run's
metadata (:data:`FORMAT_NAME`, the model, weights, methods and their parameters, the
image source's fingerprint, versions...), written once when the store is created.
Arrays carry xarray's ``_ARRAY_DIMENSIONS`` attribute (``image``, ``y``, ``x``,
``block``), so ``xarray.open_zarr(STORE)`` gives a Dataset.

Example::

    >>> from captum_fullgrad.store import open_attributions
    >>> maps = open_attributions("val.zarr")
    >>> maps.methods
    ['fullgrad', 'gradcam']
    >>> maps["fullgrad"][:8].shape          # reads only the chunks it needs
    (8, 224, 224)
    >>> maps.ids[:2], maps.targets[:2], maps.deltas[:2]
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "RESERVED_NAMES",
    "AttributionStore",
    "StoreLock",
    "StoreLockedError",
    "StoreMismatchError",
    "create_store",
    "lock_path",
    "open_attributions",
    "remove_store",
]

#: ``format`` attribute of a store's root group.
FORMAT_NAME = "captum-fullgrad-attributions"
#: Bumped when the layout changes incompatibly.
FORMAT_VERSION = 1
#: Array names used by the store itself; no method may take one of them.
RESERVED_NAMES = (
    "ids",
    "labels",
    "targets",
    "probabilities",
    "deltas",
    "valid",
    "errors",
    "done",
)
#: Longest reason kept for an unreadable image (fixed-width strings keep the format simple).
ERROR_LENGTH = 256

PathLike = Union[str, "os.PathLike[str]"]


class StoreMismatchError(ValueError):
    """An existing store was made by a different run (model, methods, images, ...).

    Attributes:
        differences: ``(key, in the store, requested)`` for every metadata key that differs.
    """

    def __init__(self, message: str, differences: Sequence[Tuple[str, Any, Any]]) -> None:
        super().__init__(message)
        self.differences = list(differences)


class StoreLockedError(RuntimeError):
    """Another job holds the store's lock (:class:`StoreLock`).

    Attributes:
        path: the lock file.
        owner: what the lock file says about its owner (``pid``, ``host``, ``job``,
            ``started``), or ``{}`` if unreadable.
    """

    def __init__(self, message: str, path: Path, owner: Mapping[str, Any]) -> None:
        super().__init__(message)
        self.path = path
        self.owner = dict(owner)


def lock_path(store: PathLike) -> Path:
    """The lock file of the store at ``store``: ``<store>.lock``, beside the store (not in it,
    so that ``--overwrite`` can remove the store while the lock is held)."""
    path = Path(store).expanduser()
    return path.with_name(path.name + ".lock")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _job_id() -> Optional[str]:
    """The launcher's id of this job: torchrun's run id (``--rdzv-id``; random for
    ``--standalone``), else SLURM's job and step ids; None when launched by hand."""
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        return f"TORCHELASTIC_RUN_ID={os.environ['TORCHELASTIC_RUN_ID']}"
    if os.environ.get("SLURM_JOB_ID"):
        step = os.environ.get("SLURM_STEP_ID", "")
        return f"SLURM_JOB_ID={os.environ['SLURM_JOB_ID']}" + (f".{step}" if step else "")
    return None


class StoreLock:
    """An advisory lock that keeps two jobs from writing one store at the same time.

    The lock is the file :func:`lock_path` (``<store>.lock``), created exclusively
    (``O_CREAT | O_EXCL``) with its owner in JSON: ``pid``, ``host``, ``job`` (torchrun's
    or SLURM's id) and ``started``. One process per job takes it: ``attribute`` takes it on
    rank 0 only, so the ranks of one job never lock each other out. :meth:`release`
    removes it; a job killed with SIGKILL leaves it behind, and it is taken over by

    - a job on the same host, which finds the owner's pid dead;
    - the same torchrun job restarted on another host (the same run id, ``--rdzv-id``:
      an elastic restart, or a requeued SLURM job launched with
      ``--rdzv-id $SLURM_JOB_ID``; not torchrun's default id ``none``), whose rank 0 may
      now run on another node. On the same host the pid decides, so a live process is
      never taken over.

    Any other lock left by a process on another host cannot be checked from here: the
    error says which host, pid and job hold it and that deleting the file releases it.
    (A SLURM job id alone is recorded but never trusted: two commands of one batch
    script share it.)

    Use::

        with StoreLock.acquire("maps.zarr"):
            ...  # create, check and write the store
    """

    def __init__(
        self, path: Path, owner: Mapping[str, Any], took_over: Optional[Dict[str, Any]]
    ) -> None:
        self.path = path
        self.owner = dict(owner)
        #: The dead owner whose lock this one replaced, or None.
        self.took_over = took_over

    @classmethod
    def acquire(cls, store: PathLike) -> "StoreLock":
        """Take the lock of the store at ``store`` (which need not exist yet).

        Raises:
            StoreLockedError: a live process (or one on another host) holds it.
            OSError: the lock file cannot be created (e.g. the parent directory is missing).
        """
        path = lock_path(store)
        host = socket.gethostname()
        owner: Dict[str, Any] = {
            "pid": os.getpid(),
            "host": host,
            "job": _job_id(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        # torchrun's run id; "none" is torchrun's default when --rdzv-id is not given, shared
        # by unrelated jobs, so it identifies nothing.
        run = os.environ.get("TORCHELASTIC_RUN_ID") or None
        run = None if run is None or run.lower() == "none" else run
        owner["run"] = run
        took_over: Optional[Dict[str, Any]] = None
        for _ in range(5):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = cls._read(path)
                if not cls._stale(holder, host, run):
                    raise StoreLockedError(
                        cls._message(store, path, holder), path, holder
                    ) from None
                # The owner died on this host: move its file aside (atomic), then race for
                # a fresh one through O_EXCL as usual (two takers cannot both create it).
                # If what was moved is not the dead owner's (another taker was quicker and
                # already holds a fresh lock), put it back.
                aside = path.with_name(f"{path.name}.stale-{os.getpid()}")
                try:
                    os.rename(path, aside)
                except FileNotFoundError:
                    continue
                if cls._read(aside) == holder:
                    took_over = holder
                else:
                    try:
                        os.link(aside, path)
                    except FileExistsError:  # pragma: no cover - a third taker won meanwhile
                        pass
                os.unlink(aside)
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump(owner, handle)
            return cls(path, owner, took_over)
        raise StoreLockedError(  # pragma: no cover - five lost races in a row
            f"could not take the lock {str(path)!r}: other processes keep taking it", path, {}
        )

    @staticmethod
    def _read(path: Path) -> Dict[str, Any]:
        text = ""
        for _ in range(20):
            try:
                text = path.read_text(encoding="utf-8")
            except FileNotFoundError:
                return {}
            try:
                value = json.loads(text)
                return value if isinstance(value, dict) else {}
            except json.JSONDecodeError:
                # Created but not yet written by its owner: wait for the JSON.
                time.sleep(0.05)
        return {"unreadable": text[:200]}

    @staticmethod
    def _stale(holder: Mapping[str, Any], host: str, run: Optional[str]) -> bool:
        """True when ``holder`` is a process of this host that no longer exists, or a
        process of this same torchrun job (run id ``run``) on another host."""
        if not holder:
            return True  # vanished between our create and read: try again
        pid = holder.get("pid")
        if holder.get("host") == host:
            return isinstance(pid, int) and not _pid_alive(pid)
        return run is not None and holder.get("run") == run

    @staticmethod
    def _message(store: PathLike, path: Path, holder: Mapping[str, Any]) -> str:
        if "pid" not in holder:
            who = "a process that left no readable owner"
        else:
            who = f"pid {holder.get('pid')} on host {holder.get('host')!r}"
            if holder.get("job"):
                who += f" ({holder['job']})"
            if holder.get("started"):
                who += f", since {holder['started']}"
        return (
            f"store {str(store)!r} is being written by another job: its lock {str(path)!r} is "
            f"held by {who}; wait for that job to finish (if it is dead on another host, "
            "delete the lock file)"
        )

    def release(self) -> None:
        """Remove the lock file if it is still ours."""
        if self._read(self.path) == self.owner:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> "StoreLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _zarr() -> Any:
    try:
        import zarr
    except ImportError as exc:  # pragma: no cover - zarr is in the scale and test extras
        raise ImportError(
            "the attribution store needs zarr: pip install 'captum-fullgrad[scale]'"
        ) from exc
    return zarr


def _zarr_major() -> int:
    return int(str(_zarr().__version__).split(".")[0])


def _open_group(path: Path, mode: str) -> Any:
    zarr = _zarr()
    if _zarr_major() >= 3:
        # Format 2 so that zarr-python 2 (the newest release for Python < 3.11) reads it too.
        return zarr.open_group(str(path), mode=mode, zarr_format=2)
    return zarr.open_group(str(path), mode=mode)  # pragma: no cover - zarr 2 only


def _create_array(
    group: Any, name: str, shape: Tuple[int, ...], chunks: Tuple[int, ...], dtype: Any, fill: Any
) -> Any:
    if hasattr(group, "create_array"):  # zarr 3
        return group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill)
    return group.create_dataset(  # pragma: no cover - zarr 2 only
        name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill
    )


def _jsonable(value: Any) -> Any:
    """Metadata as JSON would give it back (tuples become lists), to compare like with like."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def create_store(
    path: PathLike,
    *,
    ids: Sequence[str],
    methods: Sequence[str],
    map_size: Tuple[int, int],
    dtype: str,
    block_size: int,
    metadata: Mapping[str, Any],
) -> "AttributionStore":
    """Create an empty store at ``path`` (which must not exist) and return it opened for writing.

    Args:
        path: the store's directory.
        ids: one id per image, in data-set order.
        methods: method names, one ``(N, S, S)`` array each.
        map_size: ``(S_h, S_w)`` of the stored maps.
        dtype: ``"float16"`` or ``"float32"``, the maps' dtype.
        block_size: images per block (the unit of work and of chunking).
        metadata: the run's description, stored in the root group's attributes and
            compared by :meth:`AttributionStore.check_matches` when a run resumes.
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"store {str(path)!r} already exists")
    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be float16 or float32, got {dtype!r}")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    clash = sorted(set(methods) & set(RESERVED_NAMES))
    if clash:
        raise ValueError(f"method names {clash} clash with the store's own arrays")
    n = len(ids)
    group = _open_group(path, "w")
    blocks = max(1, -(-n // block_size))
    image_chunk = (max(1, min(block_size, n)),)
    width = max(1, max((len(i) for i in ids), default=1))
    arrays: List[Tuple[str, Tuple[int, ...], Tuple[int, ...], Any, Any, List[str]]] = [
        ("ids", (n,), image_chunk, f"<U{width}", "", ["image"]),
        ("labels", (n,), image_chunk, "int64", -1, ["image"]),
        ("targets", (n,), image_chunk, "int64", -1, ["image"]),
        ("probabilities", (n,), image_chunk, "float32", np.nan, ["image"]),
        ("deltas", (n,), image_chunk, "float32", np.nan, ["image"]),
        ("valid", (n,), image_chunk, "bool", False, ["image"]),
        ("errors", (n,), image_chunk, f"<U{ERROR_LENGTH}", "", ["image"]),
        ("done", (blocks,), (1,), "uint8", 0, ["block"]),
    ]
    for name in methods:
        arrays.append(
            (name, (n, *map_size), (image_chunk[0], *map_size), dtype, np.nan, ["image", "y", "x"])
        )
    for name, shape, chunks, array_dtype, fill, dims in arrays:
        array = _create_array(group, name, shape, chunks, array_dtype, fill)
        array.attrs["_ARRAY_DIMENSIONS"] = dims
    if n:
        group["ids"][:] = np.asarray(list(ids), dtype=f"<U{width}")
    group.attrs.update(
        {
            **_jsonable(metadata),
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "n_images": n,
            "block_size": int(block_size),
            "methods": list(methods),
            "map_size": list(map_size),
            "dtype": dtype,
        }
    )
    return AttributionStore(path, mode="r+")


def remove_store(path: PathLike) -> None:
    """Delete the store at ``path`` (``--overwrite``); refuses a directory that is not one."""
    path = Path(path)
    if not path.exists():
        return
    if not _is_store(path):
        raise ValueError(f"{str(path)!r} exists and is not an attribution store; not removing it")
    shutil.rmtree(path)


def _is_store(path: Path) -> bool:
    try:
        return _open_group(path, "r").attrs.get("format") == FORMAT_NAME
    except Exception:  # noqa: BLE001 - anything unreadable is not a store
        return False


class AttributionStore:
    """An attribution store on disk (see the module docstring for the layout).

    Reading: :attr:`ids`, :attr:`methods`, :attr:`targets`, :attr:`labels`,
    :attr:`probabilities`, :attr:`deltas`, :attr:`valid`, :attr:`metadata`,
    :attr:`bad_images`, and ``store[method]``, a Zarr array that reads lazily with numpy
    slicing (``store["fullgrad"][10:20]`` reads only the chunks of images 10 to 19).

    Writing (the job's processes): :meth:`pending_blocks`, :meth:`write_block`
    (:meth:`write_arrays` then :meth:`mark_done`).
    """

    def __init__(self, path: PathLike, mode: str = "r") -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"no attribution store at {str(self.path)!r}")
        try:
            self._group = _open_group(self.path, mode)
            attrs = self._group.attrs.asdict()
        except Exception as exc:  # noqa: BLE001 - report what is wrong with the path
            raise ValueError(f"{str(self.path)!r} is not a Zarr store: {exc}") from None
        if attrs.get("format") != FORMAT_NAME:
            raise ValueError(
                f"{str(self.path)!r} is a Zarr store but not an attribution store "
                f"(format attribute {attrs.get('format')!r}, expected {FORMAT_NAME!r})"
            )
        if attrs.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"store {str(self.path)!r} has format version {attrs.get('format_version')}; "
                f"this version of captum-fullgrad reads version {FORMAT_VERSION}"
            )
        self.metadata: Dict[str, Any] = dict(attrs)

    # ---- reading ---------------------------------------------------------------------

    @property
    def methods(self) -> List[str]:
        """The methods whose maps the store holds, in the order they were requested."""
        return list(self.metadata["methods"])

    @property
    def block_size(self) -> int:
        return int(self.metadata["block_size"])

    @property
    def n_blocks(self) -> int:
        return int(self._group["done"].shape[0])

    def __len__(self) -> int:
        return int(self.metadata["n_images"])

    def __getitem__(self, method: str) -> Any:
        """The ``(N, S, S)`` Zarr array of ``method``'s maps (NaN where not written)."""
        if method not in self.methods:
            raise KeyError(f"no maps of {method!r} in this store; it holds {self.methods}")
        return self._group[method]

    def _read(self, name: str) -> np.ndarray:
        return np.asarray(self._group[name][:])

    @property
    def ids(self) -> np.ndarray:
        """Image ids, data-set order."""
        return self._read("ids")

    @property
    def labels(self) -> np.ndarray:
        """The source's labels (ImageFolder class index, the synthetic label), -1 if none."""
        return self._read("labels")

    @property
    def targets(self) -> np.ndarray:
        """The class each map explains (-1 where not written)."""
        return self._read("targets")

    @property
    def probabilities(self) -> np.ndarray:
        """The model's softmax probability of each target (NaN where not written)."""
        return self._read("probabilities")

    @property
    def deltas(self) -> np.ndarray:
        """FullGrad's completeness gap per image (eq. 1; NaN without ``fullgrad``)."""
        return self._read("deltas")

    @property
    def valid(self) -> np.ndarray:
        """True where the image's maps are written (False: unreadable or not yet done)."""
        return self._read("valid")

    @property
    def errors(self) -> np.ndarray:
        """Why each image could not be read ("" where it could)."""
        return self._read("errors")

    @property
    def bad_images(self) -> List[Tuple[str, str]]:
        """``(id, reason)`` of every image that could not be read, in data-set order."""
        errors = self.errors
        ids = self.ids
        return [(str(ids[i]), str(errors[i])) for i in np.flatnonzero(errors != "")]

    def done_blocks(self) -> np.ndarray:
        """Boolean ``(n_blocks,)``: which blocks are complete.

        A marker chunk torn by a kill reads as not done (the block is recomputed).
        """
        done = self._group["done"]
        try:
            return np.asarray(done[:]) == 1
        except Exception:  # noqa: BLE001 - one damaged marker must not hide the others
            flags = np.zeros(done.shape[0], dtype=bool)
            for k in range(done.shape[0]):
                try:
                    flags[k] = int(done[k]) == 1
                except Exception:  # noqa: BLE001
                    flags[k] = False
            return flags

    @property
    def complete(self) -> bool:
        """True when every block is written."""
        return bool(self.done_blocks().all()) if len(self) else True

    def block_range(self, block: int) -> Tuple[int, int]:
        """``(start, stop)`` image indices of ``block``."""
        start = block * self.block_size
        return start, min(start + self.block_size, len(self))

    def pending_blocks(self) -> List[int]:
        """Blocks not yet complete, ascending."""
        if not len(self):
            return []
        return [int(k) for k in np.flatnonzero(~self.done_blocks())]

    # ---- writing ---------------------------------------------------------------------

    def write_block(self, block: int, **arrays: Any) -> None:
        """Write every array of ``block`` (see :meth:`write_arrays`), then its marker."""
        self.write_arrays(block, **arrays)
        self.mark_done(block)

    def write_arrays(
        self,
        block: int,
        *,
        maps: Mapping[str, np.ndarray],
        labels: np.ndarray,
        targets: np.ndarray,
        probabilities: np.ndarray,
        deltas: np.ndarray,
        valid: np.ndarray,
        errors: Sequence[str],
    ) -> None:
        """Write the per-image arrays of ``block`` (its images in data-set order), not its
        marker: until :meth:`mark_done`, the block counts as not written."""
        start, stop = self.block_range(block)
        count = stop - start
        missing = sorted(set(self.methods) - set(maps))
        if missing:
            raise ValueError(f"block {block}: no maps for {missing}")
        for method in self.methods:
            values = np.asarray(maps[method])
            if values.shape[0] != count:
                raise ValueError(f"block {block}: {values.shape[0]} maps of {method} for {count}")
            self._group[method][start:stop] = values
        self._group["labels"][start:stop] = np.asarray(labels, dtype=np.int64)
        self._group["targets"][start:stop] = np.asarray(targets, dtype=np.int64)
        self._group["probabilities"][start:stop] = np.asarray(probabilities, dtype=np.float32)
        self._group["deltas"][start:stop] = np.asarray(deltas, dtype=np.float32)
        self._group["valid"][start:stop] = np.asarray(valid, dtype=bool)
        self._group["errors"][start:stop] = np.asarray(
            [e[:ERROR_LENGTH] for e in errors], dtype=f"<U{ERROR_LENGTH}"
        )

    def mark_done(self, block: int) -> None:
        """Mark ``block`` complete: written last, after all of its arrays."""
        self._group["done"][block] = 1

    def check_matches(self, metadata: Mapping[str, Any], keys: Iterable[str]) -> None:
        """Raise :class:`StoreMismatchError` if the store's ``keys`` differ from ``metadata``'s."""
        wanted = _jsonable(metadata)
        differences = [
            (key, self.metadata.get(key), wanted.get(key))
            for key in keys
            if self.metadata.get(key) != wanted.get(key)
        ]
        if differences:
            shown = "; ".join(f"{k}: store has {a!r}, this run {b!r}" for k, a, b in differences)
            raise StoreMismatchError(
                f"store {str(self.path)!r} was made by a different run ({shown}); "
                "use another --out, or --overwrite to replace it",
                differences,
            )


def open_attributions(path: PathLike) -> AttributionStore:
    """Open the attribution store at ``path`` for reading.

    Returns:
        An :class:`AttributionStore`: ``.ids``, ``.methods``, ``.targets``, ``.deltas``,
        ``.probabilities``, ``.labels``, ``.valid``, ``.bad_images``, ``.metadata``,
        ``.complete``, and ``store[method]``, a lazily read ``(N, S, S)`` array.

    Raises:
        FileNotFoundError: no directory at ``path``.
        ValueError: the directory is not an attribution store (or of a newer format).
    """
    return AttributionStore(path, mode="r")
