"""``captum-fullgrad attribute``: one process and two (gloo, torchrun), kills and resumes,
unreadable images, refusal of foreign stores. Tiny synthetic scenes at the shapes model's
native 64 px."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

pytest.importorskip("zarr")

from captum_fullgrad.cli import CliError  # noqa: E402
from captum_fullgrad.dataset_attribution import (  # noqa: E402
    EXIT_AFTER_BLOCKS_ENV_VAR,
    build_parser,
    image_seed,
    run_job,
)
from captum_fullgrad.datasets import synthetic_shapes  # noqa: E402
from captum_fullgrad.methods import get_method  # noqa: E402
from captum_fullgrad.models import load_model  # noqa: E402
from captum_fullgrad.store import lock_path, open_attributions  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
N, SEED = 11, 3  # 11 images in blocks of 4: the last block is short
METHODS = ["fullgrad", "gradcam", "smoothgrad"]


def _argv(out, *extra):
    # The defaults: three methods, SmoothGrad with 3 samples; --methods in extra replaces them.
    methods = [] if "--methods" in extra else ["--methods", ",".join(METHODS)]
    methods += [] if "--methods" in extra else ["--param", "smoothgrad.nt_samples=3"]
    return [
        "--model", "shapes", "--images", f"synthetic:{N}", "--data-seed", str(SEED),
        *methods, "--block-size", "4", "--batch-size", "5", "--num-workers", "0",
        "--device", "cpu", "--no-progress", "--out", str(out), *extra,
    ]  # fmt: skip


def _run(out, *extra):
    return run_job(build_parser().parse_args(_argv(out, *extra)))


def _launch(out, nproc, *extra, env=None):
    """The job in fresh processes: torchrun with ``nproc`` workers, or plain python."""
    launcher = (
        ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
        if nproc > 1
        else []
    )
    command = [sys.executable, *launcher, "-m", "captum_fullgrad", "attribute"]
    environment = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        **(env or {}),
    }
    return subprocess.run(
        command + _argv(out, *extra),
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _assert_same_store(path, reference):
    a, b = open_attributions(path), open_attributions(reference)
    assert list(a.ids) == list(b.ids) and a.methods == b.methods and a.complete
    np.testing.assert_array_equal(a.targets, b.targets)
    np.testing.assert_array_equal(a.valid, b.valid)
    np.testing.assert_allclose(a.probabilities, b.probabilities, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.deltas, b.deltas, atol=1e-4)
    for method in a.methods:
        np.testing.assert_allclose(a[method][:], b[method][:], rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted single-process run."""
    out = tmp_path_factory.mktemp("reference") / "maps.zarr"
    summary = _run(out)
    assert summary["computed"] == N and summary["complete"] and not summary["bad_images"]
    return out


def test_store_holds_each_methods_map_target_probability_and_delta(reference):
    store = open_attributions(reference)
    images, labels, _ = synthetic_shapes(N, seed=SEED)
    model = load_model("shapes").model
    with torch.no_grad():
        logits = model(images)
    targets = logits.argmax(1)
    assert list(store.ids) == [f"synthetic:{SEED}:{i}" for i in range(N)]
    np.testing.assert_array_equal(store.targets, targets.numpy())
    np.testing.assert_array_equal(store.labels, labels.numpy())
    np.testing.assert_allclose(
        store.probabilities, logits.softmax(1)[torch.arange(N), targets].numpy(), rtol=1e-5
    )
    assert store.valid.all() and store.metadata["model"] == "shapes"
    for name in ("fullgrad", "gradcam"):
        expected = get_method(name)(model, images, targets)[:, 0].numpy()
        np.testing.assert_allclose(store[name][:], expected, rtol=1e-4, atol=1e-6)
    # eq. 1's completeness gap: float32 rounding only.
    assert np.isfinite(store.deltas).all() and np.abs(store.deltas).max() < 1e-3
    # SmoothGrad draws image i's noise from a seed of (--seed, i) alone.
    smooth = get_method("smoothgrad", nt_samples=3)
    for i in (0, 7):
        expected = smooth.configure(seed=image_seed(0, i))(model, images[i : i + 1], targets[i])
        np.testing.assert_allclose(store["smoothgrad"][i], expected[0, 0].numpy(), rtol=1e-4)


def test_batch_size_does_not_change_the_maps(reference, tmp_path):
    _run(tmp_path / "b3.zarr", "--batch-size", "3")
    # --batch-size is not part of a store's identity: same maps, any batch size.
    _assert_same_store(tmp_path / "b3.zarr", reference)


@pytest.mark.slow  # fresh processes: torch's import dominates
def test_two_processes_equal_one(reference, tmp_path):
    result = _launch(tmp_path / "two.zarr", 2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "11 images computed by 2 process(es)" in result.stdout
    _assert_same_store(tmp_path / "two.zarr", reference)


@pytest.mark.slow  # fresh processes: torch's import dominates
def test_killed_distributed_run_resumes_on_one_process(reference, tmp_path):
    out = tmp_path / "killed.zarr"
    # Rank 1 writes the arrays of its first block and dies before marking it; torchrun
    # then stops rank 0 too.
    result = _launch(out, 2, env={EXIT_AFTER_BLOCKS_ENV_VAR: "1:0"})
    assert result.returncode != 0
    pending = open_attributions(out).pending_blocks()
    assert 1 in pending  # block 1 is rank 1's first: arrays written, not marked
    left = sum(min(4, N - 4 * k) for k in pending)
    summary = _run(out)
    assert summary["computed"] == left  # only the unmarked blocks, each image once
    _assert_same_store(out, reference)


@pytest.mark.slow  # fresh processes: torch's import dominates
def test_killed_single_process_run_resumes_on_two(reference, tmp_path):
    out = tmp_path / "killed1.zarr"
    result = _launch(out, 1, env={EXIT_AFTER_BLOCKS_ENV_VAR: "1"})
    assert result.returncode == 43, result.stderr[-3000:]
    assert open_attributions(out).pending_blocks() == [1, 2]
    result = _launch(out, 2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "7 images computed by 2 process(es)" in result.stdout
    _assert_same_store(out, reference)


def test_finished_store_is_left_alone(reference, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in reference.rglob("*")}
    summary = _run(reference)
    assert summary["nothing_to_do"] and summary["computed"] == 0
    assert {p: p.stat().st_mtime_ns for p in reference.rglob("*")} == before


@pytest.mark.parametrize(
    "extra, key",
    [
        (["--methods", "fullgrad,gradcam"], "methods"),
        (["--data-seed", "4"], "source_fingerprint"),
        (["--methods", ",".join(METHODS), "--param", "smoothgrad.nt_samples=4"], "method_"),
        (["--dtype", "float16"], "dtype"),
        (["--weights", "random"], "weights"),
    ],
)
def test_store_of_another_run_is_refused(reference, extra, key):
    with pytest.raises(CliError, match=f"different run .*{key}"):
        _run(reference, *extra)
    assert open_attributions(reference).complete


def test_overwrite_replaces_a_foreign_store(tmp_path):
    out = tmp_path / "s.zarr"
    _run(out, "--methods", "gradcam", "--images", "synthetic:3")
    summary = _run(out, "--methods", "gradcam", "--images", "synthetic:5", "--overwrite")
    assert summary["computed"] == 5 and len(open_attributions(out)) == 5
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(CliError, match="not an attribution store"):
        _run(tmp_path / "mine", "--overwrite")
    assert (tmp_path / "mine" / "notes.txt").exists()


def test_unreadable_image_is_reported_and_skipped(tmp_path):
    images, _, _ = synthetic_shapes(3, seed=0)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(images):
        torchvision.io.write_png((image * 255).round().to(torch.uint8), str(folder / f"{i}.png"))
    (folder / "1b.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "s.zarr"
    summary = run_job(
        build_parser().parse_args(
            [
                "--model",
                "shapes",
                "--images",
                str(folder),
                "--methods",
                "fullgrad",
                "--num-workers",
                "1",
                "--device",
                "cpu",
                "--no-progress",
                "--out",
                str(out),
            ]
        )  # fmt: skip
    )
    store = open_attributions(out)
    assert list(store.ids) == ["0.png", "1.png", "1b.png", "2.png"]
    assert [image_id for image_id, _ in summary["bad_images"]] == ["1b.png"]
    assert store.bad_images[0][1]  # a reason
    np.testing.assert_array_equal(store.valid, [True, True, False, True])
    assert np.isnan(store["fullgrad"][2]).all() and store.targets[2] == -1
    assert np.isfinite(store["fullgrad"][[0, 1, 3]]).all()
    assert store.complete  # the block is done: the bad image is not retried


def test_target_options(tmp_path):
    summary = _run(tmp_path / "t.zarr", "--target", "2", "--methods", "gradcam")
    assert (open_attributions(tmp_path / "t.zarr").targets == 2).all() and summary["complete"]
    _run(tmp_path / "l.zarr", "--target", "label", "--methods", "gradcam")
    store = open_attributions(tmp_path / "l.zarr")
    np.testing.assert_array_equal(store.targets, synthetic_shapes(N, seed=SEED)[1].numpy())
    with pytest.raises(CliError, match="4 classes"):
        _run(tmp_path / "x.zarr", "--target", "4")
    with pytest.raises(CliError, match="not among the selected"):
        _run(tmp_path / "x.zarr", "--methods", "gradcam", "--param", "smoothgrad.noise=0.1")
    with pytest.raises(CliError, match="unknown method"):
        _run(tmp_path / "x.zarr", "--methods", "nonesuch")
    assert not (tmp_path / "x.zarr").exists()


def test_map_size_resizes_the_stored_maps(tmp_path):
    _run(tmp_path / "m.zarr", "--map-size", "16", "--methods", "gradcam", "--dtype", "float16")
    store = open_attributions(tmp_path / "m.zarr")
    assert store["gradcam"].shape == (N, 16, 16) and store["gradcam"].dtype == np.float16


def test_command_line_entry(tmp_path, capsys):
    from captum_fullgrad import cli
    from captum_fullgrad import open_attributions as exported

    assert exported is open_attributions
    assert "attribute" in [c.name for c in cli.COMMANDS]
    status = cli.main(["attribute", *_argv(tmp_path / "c.zarr", "--methods", "gradcam")])
    assert status == 0 and f"{N} images computed by 1 process" in capsys.readouterr().out
    status = cli.main(["attribute", *_argv(tmp_path / "c.zarr", "--methods", "fullgrad")])
    assert status == 2 and "different run" in capsys.readouterr().err


@pytest.mark.slow  # fresh processes: torch's import dominates
def test_sigkill_at_a_random_moment_then_resume(reference, tmp_path):
    out = tmp_path / "sigkill.zarr"
    command = [sys.executable, "-m", "captum_fullgrad", "attribute", *_argv(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    try:
        # Kill as soon as the first block is marked: the next block is being computed or
        # written, at no moment of our choosing.
        while not any((out / "done").glob("[0-9]*")) and time.monotonic() < deadline:
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    pending = open_attributions(out).pending_blocks()
    assert pending  # killed before the end
    summary = _run(out)
    assert summary["computed"] == sum(min(4, N - 4 * k) for k in pending)
    # The killed job's lock was left behind; its owner is dead, so the resume took it over.
    assert summary["took_over_lock"]["pid"] == process.pid
    assert not lock_path(out).exists()
    _assert_same_store(out, reference)


def test_a_store_locked_by_another_job_is_refused(tmp_path):
    from tests.test_store import hold_lock

    out = tmp_path / "locked.zarr"
    holder = hold_lock(out)
    try:
        with pytest.raises(CliError, match=f"being written by another job.*pid {holder.pid}"):
            _run(out, "--methods", "gradcam")
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow  # fresh processes: torch's import dominates
def test_two_jobs_started_together_never_both_write(tmp_path):
    out = tmp_path / "two-jobs.zarr"
    argv = _argv(out, "--methods", "gradcam", "--images", "synthetic:40")
    command = [sys.executable, "-m", "captum_fullgrad", "attribute", *argv]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    jobs = [
        subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [job.communicate(timeout=300) for job in jobs]
    codes = sorted(job.returncode for job in jobs)
    computed = sum(int(n) for o, _ in outputs for n in re.findall(r"(\d+) images computed", o))
    refused = [e for _, e in outputs if "is being written by another job" in e]
    nothing = [o for o, _ in outputs if "nothing to do" in o]
    # Either the second job found the lock taken, or it started after the first had
    # finished and found nothing to do; never two writers.
    assert (codes, len(refused)) == ([0, 2], 1) or (codes, len(nothing)) == ([0, 0], 1), outputs
    assert computed == 40 and open_attributions(out).complete


def test_an_empty_directory_is_taken_as_no_store(tmp_path):
    (tmp_path / "e.zarr").mkdir()
    assert _run(tmp_path / "e.zarr", "--methods", "gradcam")["computed"] == N


def test_label_target_needs_as_many_model_classes_as_class_directories(tmp_path):
    image = (synthetic_shapes(1, seed=0)[0][0] * 255).round().to(torch.uint8)
    for k in range(5):  # five classes; the shapes model has four
        (tmp_path / "images" / f"class{k}").mkdir(parents=True)
        torchvision.io.write_png(image, str(tmp_path / "images" / f"class{k}" / "a.png"))
    argv = ["--model", "shapes", "--images", str(tmp_path / "images"), "--target", "label",
            "--num-workers", "0", "--device", "cpu", "--no-progress",
            "--out", str(tmp_path / "s.zarr")]  # fmt: skip
    with pytest.raises(CliError, match="5 class directories"):
        run_job(build_parser().parse_args(argv))
