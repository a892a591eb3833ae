r"""Maps for the evaluation suite read from an attribution store (``evaluate --maps STORE``).

``captum-fullgrad attribute`` (:mod:`captum_fullgrad.dataset_attribution`) computes the
maps of a data set once, possibly on many GPUs, into a store (:mod:`captum_fullgrad.store`,
``docs/scale.md``). :func:`read_store_maps` checks that a store describes the run the
evaluation is asked for and returns its maps in the form
:func:`~captum_fullgrad.evaluation.evaluate` takes through ``maps=``; the metrics that only
read maps then score the stored maps, and those that call the method again
(:attr:`~captum_fullgrad.evaluation.Metric.recomputes_maps`: the sanity check,
max-sensitivity) still do.

What must agree, each refused with the key that differs (:class:`~captum_fullgrad.store.
StoreMismatchError`):

- ``model`` and ``weights`` (as ``attribute`` records them);
- the images: the store's first ``n`` ids are the evaluation's scenes
  (``synthetic:<data seed>:<index>``), compared by fingerprint; the store must hold at
  least ``n`` images;
- ``target``: ``label``, since every map of the suite explains the true class (the
  class whose object the mask marks); a store of the predicted class differs wherever
  the model is wrong;
- ``map_size``: the images' size (the masks are per pixel);
- every method taken from the store: present, with the parameters the evaluation would
  call it with. The ``seed`` of a stochastic method is not compared: ``attribute``
  draws each image's noise from a seed derived from the image's index
  (:func:`~captum_fullgrad.dataset_attribution.image_seed`).

Images of the first ``n`` that the store marks unreadable, or has not written (an
unfinished job), are **excluded and reported** (:attr:`StoredMaps.excluded`), never
silently dropped; the evaluation then runs on the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Sequence, Tuple, Union

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor

__all__ = ["StoredMaps", "read_store_maps"]

#: Store metadata copied into the evaluation's ``results.json`` (``meta.maps_store``).
_RECORDED_KEYS = ("model", "weights", "target", "dtype", "map_size", "seed", "versions")


@dataclass
class StoredMaps:
    """What :func:`read_store_maps` read.

    Attributes:
        path: the store.
        maps: method name -> its maps of the kept images, float32 ``(n_kept, 1, H, W)``.
        indices: the kept images' indices (ascending, among the first ``n``).
        excluded: ``(id, reason)`` of the images left out (unreadable or not written).
        metadata: the store's run metadata (:attr:`AttributionStore.metadata`).
    """

    path: str
    maps: Dict[str, "Tensor"]
    indices: List[int]
    excluded: List[Tuple[str, str]] = field(default_factory=list)
    metadata: Dict[str, Any] = field(default_factory=dict)

    def describe(self) -> Dict[str, Any]:
        """The ``results.json`` entry ``meta.maps_store``: where the maps came from."""
        return {
            "path": self.path,
            "methods": list(self.maps),
            "images_used": len(self.indices),
            "excluded": [{"id": i, "reason": r} for i, r in self.excluded],
            **{key: self.metadata.get(key) for key in _RECORDED_KEYS},
        }


def _comparable(parameters: Mapping[str, Any], stochastic: bool) -> Any:
    from captum_fullgrad.store import _jsonable

    values = {k: v for k, v in parameters.items() if not (stochastic and k == "seed")}
    return _jsonable(values)


def _synthetic_fingerprint(n: int, data_seed: int) -> str:
    from captum_fullgrad.image_sources import open_image_source

    return open_image_source(f"synthetic:{n}", data_seed).fingerprint


def read_store_maps(
    path: Union[str, "Path"],
    *,
    n: int,
    model: str,
    weights: str,
    data_seed: int,
    methods: Mapping[str, Mapping[str, Any]],
    image_size: Sequence[int],
    stochastic: Sequence[str] = (),
) -> StoredMaps:
    """Check the store at ``path`` against the evaluation and read its maps.

    Args:
        path: a store written by ``captum-fullgrad attribute``.
        n: images of the evaluation (the first ``n`` of the store).
        model: the model's name (``load_model(...).name``).
        weights: the ``--weights`` value, as ``attribute`` records it
            (:func:`~captum_fullgrad.dataset_attribution.weights_identity`).
        data_seed: seed of the evaluation's generated scenes.
        methods: name -> parameters of every method whose maps to read.
        image_size: ``(H, W)`` of the images (and masks).
        stochastic: names among ``methods`` that are stochastic (their ``seed`` is not
            compared).

    Returns:
        :class:`StoredMaps`.

    Raises:
        FileNotFoundError, ValueError: no store at ``path``.
        StoreMismatchError: the store describes another run (see the module docstring);
            its ``differences`` name every key that differs.
    """
    import numpy as np
    import torch

    from captum_fullgrad.store import StoreMismatchError, open_attributions

    store = open_attributions(path)
    meta = store.metadata
    where = f"store {str(store.path)!r}"
    differences: List[Tuple[str, Any, Any]] = []

    def differ(key: str, stored: Any, wanted: Any) -> None:
        if stored != wanted:
            differences.append((key, stored, wanted))

    differ("model", meta.get("model"), model)
    differ("weights", meta.get("weights"), weights)
    differ("target", meta.get("target"), "label")
    differ("map_size", [int(s) for s in meta.get("map_size", [])], [int(s) for s in image_size])
    if meta.get("source_kind") != "synthetic":
        differ("source_kind", meta.get("source_kind"), "synthetic")
    else:
        differ("data_seed", meta.get("data_seed"), int(data_seed))
        if len(store) < n:
            differ("n_images", len(store), f"at least {n}")
        else:
            ids = [str(i) for i in store.ids[:n]]
            prefix = _source_fingerprint(ids)
            differ("images (fingerprint)", prefix[:16], _synthetic_fingerprint(n, data_seed)[:16])
    stored_params = meta.get("method_parameters", {})
    for name, parameters in methods.items():
        if name not in store.methods:
            differences.append((f"methods ({name})", store.methods, f"maps of {name}"))
            continue
        chaotic = name in stochastic
        differ(
            f"method_parameters ({name})",
            _comparable(stored_params.get(name, {}), chaotic),
            _comparable(parameters, chaotic),
        )
    if differences:
        shown = "; ".join(
            f"{k}: store has {a!r}, evaluation needs {b!r}" for k, a, b in differences
        )
        raise StoreMismatchError(f"{where} does not match this evaluation ({shown})", differences)

    valid = np.asarray(store.valid[:n], dtype=bool)
    errors = store.errors[:n]
    ids_n = store.ids[:n]
    excluded = [
        (str(ids_n[i]), str(errors[i]) or "not written (the attribute job is unfinished)")
        for i in np.flatnonzero(~valid)
    ]
    indices = [int(i) for i in np.flatnonzero(valid)]
    maps: Dict[str, Tensor] = {}
    for name in methods:
        values = np.asarray(store[name][:n], dtype=np.float32)[indices]
        maps[name] = torch.from_numpy(np.ascontiguousarray(values))[:, None]
    return StoredMaps(str(store.path), maps, indices, excluded, dict(meta))


def _source_fingerprint(ids: Sequence[str]) -> str:
    """The fingerprint a synthetic source listing ``ids`` has (:attr:`ImageSource.fingerprint`)."""
    from captum_fullgrad.image_sources import ImageSource

    return ImageSource("synthetic", "", list(ids)).fingerprint
