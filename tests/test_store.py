"""The attribution store: layout, block markers, refusal of foreign stores, lazy reading."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("zarr")

from captum_fullgrad.store import (  # noqa: E402
    FORMAT_NAME,
    StoreLock,
    StoreLockedError,
    StoreMismatchError,
    create_store,
    lock_path,
    open_attributions,
    remove_store,
)

IDS = [f"img/{i:03d}.png" for i in range(10)]
META = {"model": "shapes", "weights": "DEFAULT", "seed": 0, "source_fingerprint": "abc"}


def _store(path, **overrides):
    options = dict(
        ids=IDS,
        methods=["fullgrad", "gradcam"],
        map_size=(4, 4),
        dtype="float32",
        block_size=4,
        metadata=META,
    )
    options.update(overrides)
    return create_store(path, **options)


def _block(store, block, seed=0):
    start, stop = store.block_range(block)
    n = stop - start
    rng = np.random.default_rng(seed + block)
    return dict(
        maps={m: rng.random((n, 4, 4), dtype=np.float32) for m in store.methods},
        labels=np.arange(start, stop),
        targets=np.arange(start, stop) % 3,
        probabilities=rng.random(n, dtype=np.float32),
        deltas=rng.random(n, dtype=np.float32),
        valid=np.ones(n, dtype=bool),
        errors=[""] * n,
    )


def test_blocks_written_in_any_order_read_back_in_data_set_order(tmp_path):
    store = _store(tmp_path / "s.zarr")
    assert (store.n_blocks, store.pending_blocks()) == (3, [0, 1, 2])
    assert store.block_range(2) == (8, 10)  # the last block is short
    written = {k: _block(store, k) for k in (2, 0)}
    for k, arrays in written.items():
        store.write_block(k, **arrays)
    assert store.pending_blocks() == [1] and not store.complete
    opened = open_attributions(tmp_path / "s.zarr")
    assert list(opened.ids) == IDS
    assert opened.methods == ["fullgrad", "gradcam"]
    np.testing.assert_array_equal(opened["gradcam"][8:10], written[2]["maps"]["gradcam"])
    np.testing.assert_array_equal(opened["fullgrad"][0:4], written[0]["maps"]["fullgrad"])
    # Unwritten images: NaN maps, target -1, not valid.
    assert np.isnan(opened["fullgrad"][4:8]).all()
    np.testing.assert_array_equal(opened.targets[4:8], -1)
    np.testing.assert_array_equal(opened.valid, [True] * 4 + [False] * 4 + [True] * 2)
    np.testing.assert_array_equal(opened.deltas[8:], written[2]["deltas"])
    assert opened.metadata["model"] == "shapes" and opened.metadata["format"] == FORMAT_NAME


def test_arrays_without_marker_do_not_count(tmp_path):
    store = _store(tmp_path / "s.zarr")
    store.write_arrays(0, **_block(store, 0))  # killed before mark_done
    assert store.pending_blocks() == [0, 1, 2]
    store.mark_done(0)
    assert store.pending_blocks() == [1, 2]


def test_a_torn_marker_reads_as_not_done(tmp_path):
    store = _store(tmp_path / "s.zarr")
    for k in range(3):
        store.write_block(k, **_block(store, k))
    (tmp_path / "s.zarr" / "done" / "1").write_bytes(b"\x01\x02")  # not a valid chunk
    assert store.pending_blocks() == [1]


def test_each_block_is_its_own_chunk_file(tmp_path):
    # Processes write disjoint files: one chunk per block in every per-image array (zarr
    # skips chunks that equal the fill value, such as an all-empty "errors" block).
    store = _store(tmp_path / "s.zarr")
    store.write_block(1, **_block(store, 1))
    for name in ("fullgrad", "targets", "valid"):
        chunks = {p.name for p in (tmp_path / "s.zarr" / name).iterdir()}
        assert {c for c in chunks if not c.startswith(".")} == (
            {"1.0.0"} if name == "fullgrad" else {"1"}
        )


def test_bad_images_are_listed(tmp_path):
    store = _store(tmp_path / "s.zarr")
    arrays = _block(store, 0)
    arrays["valid"][2] = False
    arrays["errors"][2] = "truncated file"
    arrays["maps"] = {m: v.copy() for m, v in arrays["maps"].items()}
    for v in arrays["maps"].values():
        v[2] = np.nan
    store.write_block(0, **arrays)
    assert open_attributions(tmp_path / "s.zarr").bad_images == [("img/002.png", "truncated file")]


def test_metadata_mismatch_is_reported_by_key(tmp_path):
    store = _store(tmp_path / "s.zarr")
    store.check_matches(META, META.keys())
    with pytest.raises(StoreMismatchError, match="model: store has 'shapes', this run 'vgg'") as e:
        store.check_matches({**META, "model": "vgg"}, META.keys())
    assert e.value.differences == [("model", "shapes", "vgg")]


def test_float16_maps_and_xarray_dimensions(tmp_path):
    store = _store(tmp_path / "s.zarr", dtype="float16")
    assert store["fullgrad"].dtype == np.float16
    attrs = json.loads((tmp_path / "s.zarr" / "fullgrad" / ".zattrs").read_text())
    assert attrs["_ARRAY_DIMENSIONS"] == ["image", "y", "x"]
    # Plain zarr reads it without this package.
    import zarr

    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    assert group.attrs["format"] == FORMAT_NAME and group["ids"][3] == IDS[3]


def test_refusals(tmp_path):
    _store(tmp_path / "s.zarr")
    with pytest.raises(FileExistsError):
        _store(tmp_path / "s.zarr")
    with pytest.raises(ValueError, match="clash"):
        _store(tmp_path / "t.zarr", methods=["targets"])
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an attribution store"):
        remove_store(tmp_path / "plain")
    assert (tmp_path / "plain" / "keep.txt").exists()
    with pytest.raises(ValueError, match="not"):
        open_attributions(tmp_path / "plain")
    with pytest.raises(FileNotFoundError):
        open_attributions(tmp_path / "missing")
    with pytest.raises(KeyError, match="holds"):
        open_attributions(tmp_path / "s.zarr")["smoothgrad"]
    remove_store(tmp_path / "s.zarr")
    assert not (tmp_path / "s.zarr").exists()


# ---- the lock against two jobs on one store (real processes) ---------------------------

ROOT = Path(__file__).resolve().parents[1]
# A job that takes the lock, says so, and keeps it until killed.
_HOLD = (
    "import sys, time\n"
    "from captum_fullgrad.store import StoreLock\n"
    "StoreLock.acquire(sys.argv[1])\n"
    "print('held', flush=True)\n"
    "time.sleep(120)\n"
)
# A job that tries once and says whether it got the lock.
_TRY = (
    "import sys\n"
    "from captum_fullgrad.store import StoreLock, StoreLockedError\n"
    "sys.stdin.readline()\n"  # start together
    "try:\n"
    "    StoreLock.acquire(sys.argv[1])\n"
    "    print('held', flush=True)\n"
    "except StoreLockedError:\n"
    "    print('refused', flush=True)\n"
    "sys.stdin.readline()\n"  # keep a won lock until every racer has answered
)


@pytest.fixture(autouse=True)
def _no_launcher_ids(monkeypatch):
    # The tests' processes are separate jobs even when pytest runs under torchrun or SLURM.
    for key in ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "SLURM_STEP_ID"):
        monkeypatch.delenv(key, raising=False)


def _python(code, *args, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)], env=env, text=True, **kwargs
    )


def hold_lock(store):
    """A live process holding ``store``'s lock (kill it to leave a stale lock)."""
    process = _python(_HOLD, store, stdout=subprocess.PIPE)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_lock_held_by_a_live_process_is_refused_and_a_dead_ones_taken_over(tmp_path):
    store = tmp_path / "maps.zarr"
    holder = hold_lock(store)
    try:
        with pytest.raises(StoreLockedError, match=f"pid {holder.pid} on host") as caught:
            StoreLock.acquire(store)
        assert caught.value.path == lock_path(store) == tmp_path / "maps.zarr.lock"
        assert str(lock_path(store)) in str(caught.value)
    finally:
        holder.kill()  # SIGKILL: no clean-up, the lock file stays
        holder.wait()
    assert lock_path(store).exists()
    with StoreLock.acquire(store) as lock:
        assert lock.took_over["pid"] == holder.pid
        assert json.loads(lock_path(store).read_text())["pid"] == os.getpid()
    assert not lock_path(store).exists()


def test_a_lock_of_another_host_is_refused_with_the_way_out(tmp_path):
    store = tmp_path / "maps.zarr"
    lock_path(store).write_text(json.dumps({"pid": 1, "host": "node-7", "job": None}))
    assert socket.gethostname() != "node-7"
    with pytest.raises(StoreLockedError, match="pid 1 on host 'node-7'.*delete the lock file"):
        StoreLock.acquire(store)


def test_the_same_torchrun_job_takes_its_lock_over_from_another_host(tmp_path, monkeypatch):
    # An elastic restart or a requeued job (same --rdzv-id) whose rank 0 moved to another
    # node; torchrun's default id "none" and other ids do not count.
    store = tmp_path / "maps.zarr"
    for held, ours in (("job-42", "job-41"), ("none", "none"), ("job-42", "")):
        lock_path(store).write_text(json.dumps({"pid": 1, "host": "node-7", "run": held}))
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", ours)
        with pytest.raises(StoreLockedError, match="node-7"):
            StoreLock.acquire(store)
    owner = {"pid": 1, "host": "node-7", "job": None, "run": "job-42"}
    lock_path(store).write_text(json.dumps(owner))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-42")
    with StoreLock.acquire(store) as lock:
        assert lock.took_over == owner and lock.owner["run"] == "job-42"
    # On this host the pid decides, whatever the run id: a live owner keeps its lock.
    lock_path(store).write_text(json.dumps({**owner, "host": socket.gethostname(), "pid": 1}))
    with pytest.raises(StoreLockedError, match="pid 1 on host"):
        StoreLock.acquire(store)


def test_of_processes_that_race_for_a_lock_exactly_one_gets_it(tmp_path):
    store = tmp_path / "maps.zarr"
    # A stale lock first, so that the racers also race to take it over.
    dead = _python("pass")
    dead.wait()
    lock_path(store).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    racers = [_python(_TRY, store, stdin=subprocess.PIPE, stdout=subprocess.PIPE) for _ in range(4)]
    for racer in racers:
        racer.stdin.write("go\n")
        racer.stdin.flush()
    answers = sorted(racer.stdout.readline().strip() for racer in racers)
    for racer in racers:
        racer.communicate(timeout=60)
    assert answers == ["held", "refused", "refused", "refused"]
