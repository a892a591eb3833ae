"""The command line, run in-process: demo, compare, decompose, and every bad input."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
import torchvision

from captum_fullgrad import cli
from captum_fullgrad.cli import _demo_report, _inputs, demo
from captum_fullgrad.datasets import synthetic_shapes
from captum_fullgrad.figures import decomposition_summary
from captum_fullgrad.models import ShapesVGG
from tests.conftest import UnseenSquareNet, assert_bad_input
from tests.conftest import run_cli as run
from tests.test_benchmark import tiny_cnn

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DPI = 200  # save_figure's default
PAGE_WIDTH_IN = 7.0  # the figures are laid out for a page width


@pytest.fixture(autouse=True)
def _hermetic(monkeypatch, tmp_path_factory):
    """One CPU thread, and an empty torch hub cache: the demo never finds ImageNet weights."""
    threads = torch.get_num_threads()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch-home")))
    monkeypatch.setenv("CAPTUM_FULLGRAD_OFFLINE", "1")
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """Two held-out shape scenes as PNG, and one as a JPEG of another size."""
    directory = tmp_path_factory.mktemp("images")
    images, _, _ = synthetic_shapes(3, seed=123)
    pixels = (images * 255).round().to(torch.uint8)
    torchvision.io.write_png(pixels[0], str(directory / "a.png"))
    torchvision.io.write_png(pixels[1], str(directory / "b.png"))
    larger = torch.nn.functional.interpolate(images[2:3], size=(80, 96), mode="bilinear")[0]
    torchvision.io.write_jpeg((larger * 255).round().to(torch.uint8), str(directory / "c.jpg"))
    return directory


def assert_png(path, size=None, dpi=DPI):
    """A PNG, of ``size`` pixels if given, else at most a page width at ``dpi``."""
    data = Path(path).read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[2] in (3, 4)
    assert pixels.shape[1] <= PAGE_WIDTH_IN * dpi + 1, pixels.shape
    if size is not None:
        height, width = size
        assert abs(pixels.shape[0] - height) <= 1 and abs(pixels.shape[1] - width) <= 1, (
            pixels.shape
        )
    return pixels


def decompose_argv(image, out, *extra):
    """``decompose`` on the bundled shapes model: the arguments every such test repeats."""
    return ("decompose", "--model", "shapes", "--image", image, "--out", out, *extra)


def files_in(directory):
    return sorted(str(p.relative_to(directory)) for p in Path(directory).rglob("*"))


# ---------------------------------------------------------------------------------------
# Help
# ---------------------------------------------------------------------------------------


def test_help_everywhere(capsys):
    status, out, err = run(capsys, "--help")
    assert status == 0 and err == ""
    for command in ("demo", "compare", "decompose"):
        assert command in out
        status, sub, _ = run(capsys, command, "--help")
        assert status == 0 and "--out" in sub and "usage: captum-fullgrad " + command in sub
    assert [c.name for c in cli.COMMANDS][:3] == ["demo", "compare", "decompose"]
    assert "evaluate" in [c.name for c in cli.COMMANDS]


def test_no_command_is_bad_input(capsys):
    assert_bad_input(capsys, match="COMMAND")


# ---------------------------------------------------------------------------------------
# compare and decompose
# ---------------------------------------------------------------------------------------


def test_compare_writes_the_grid(capsys, image_dir, tmp_path):
    out = tmp_path / "figs" / "grid.png"
    status, stdout, err = run(
        capsys,
        "compare",
        "--model",
        "shapes",
        "--images",
        image_dir,
        "--out",
        out,
        "--methods",
        "fullgrad,gradcam",
        "--batch-size",
        "2",
        "--no-progress",
        "--threads",
        "1",
    )
    assert status == 0, err
    assert err == ""  # no warnings, no progress bar
    assert str(out) in stdout
    # 3 rows (a.png, b.png, c.jpg) of 3 columns, at most a page wide at 200 dpi; taller than wide
    pixels = assert_png(out)
    assert pixels.shape[1] >= 0.9 * PAGE_WIDTH_IN * DPI and pixels.shape[0] > 3 * 1.5 * DPI
    assert files_in(tmp_path) == ["figs", "figs/grid.png"]


def test_compare_pdf_default_methods_and_target(capsys, image_dir, tmp_path):
    out = tmp_path / "grid.pdf"
    status, _, err = run(
        capsys,
        "compare",
        "--model",
        "shapes",
        "--images",
        image_dir / "a.png",
        "--out",
        out,
        "--methods",
        "guided_backprop,fullgrad_bias",
        "--target",
        "3",
        "--device",
        "cpu",
    )
    assert status == 0, err
    assert out.read_bytes().startswith(b"%PDF-")


def test_decompose_writes_the_figure(capsys, image_dir, tmp_path):
    out = tmp_path / "decomposition.png"
    status, _, err = run(capsys, *decompose_argv(image_dir / "c.jpg", out, "--target", "1"))
    assert status == 0, err
    # 4 blocks + image + input term: 2 rows of 3 panels of 2 in, then the chart.
    pixels = assert_png(out)
    assert pixels.shape[1] == round(3 * 2.0 * DPI)
    assert files_in(tmp_path) == ["decomposition.png"]


# ---------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit status 2, no output file
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bad")
    (directory / "garbage.png").write_bytes(b"this is not an image")
    images, _, _ = synthetic_shapes(1, seed=1)
    torchvision.io.write_png((images[0] * 255).to(torch.uint8), str(directory / "whole.png"))
    data = (directory / "whole.png").read_bytes()
    (directory / "truncated.png").write_bytes(data[: len(data) // 2])
    (directory / "empty.jpg").write_bytes(b"")
    (directory / "empty_dir").mkdir()
    (directory / "only_text").mkdir()
    (directory / "only_text" / "readme.txt").write_text("no images here")
    torch.save(ShapesVGG(widths=(8, 8)).state_dict(), directory / "other_architecture.pt")
    (directory / "garbage.pt").write_bytes(b"not a checkpoint")
    (directory / "a_file").write_text("a file, not a directory")
    return directory


def _bad_cases(bad):
    good = bad / "whole.png"
    compare = ["compare", "--model", "shapes", "--methods", "gradcam"]
    return {
        "corrupt image": (compare + ["--images", bad / "garbage.png"], "cannot read image"),
        "truncated image": (compare + ["--images", good, bad / "truncated.png"], "truncated.png"),
        "empty image file": (compare + ["--images", bad / "empty.jpg"], "cannot read image"),
        "missing image": (compare + ["--images", bad / "nope.png"], "does not exist"),
        "empty directory": (compare + ["--images", bad / "empty_dir"], "holds no PNG or JPEG"),
        "directory without images": (
            compare + ["--images", bad / "only_text"],
            "holds no PNG or JPEG",
        ),
        "unknown model": (
            ["compare", "--model", "vgg17", "--images", good],
            "unknown model 'vgg17'",
        ),
        "unknown method": (
            compare[:3] + ["--methods", "fullgrad,magic", "--images", good],
            "unknown method 'magic'",
        ),
        "mismatched weights": (
            compare + ["--weights", bad / "other_architecture.pt", "--images", good],
            "does not match the architecture",
        ),
        "corrupt weights": (
            compare + ["--weights", bad / "garbage.pt", "--images", good],
            "garbage.pt",
        ),
        "missing weights": (
            compare + ["--weights", bad / "missing.pt", "--images", good],
            "does not exist",
        ),
        "uncreatable out dir": (
            compare + ["--images", good],
            "is not a directory",
            bad / "a_file" / "sub" / "grid.png",
        ),
        "bad out extension": (
            compare + ["--images", good],
            "must end in .png or .pdf",
            bad / "grid.jpg",
        ),
        "target out of range": (compare + ["--images", good, "--target", "4"], "4 classes"),
        "bad batch size": (compare + ["--images", good, "--batch-size", "0"], "positive integer"),
        "bad device": (compare + ["--images", good, "--device", "tpu"], "--device"),
        "decompose corrupt image": (
            ["decompose", "--model", "shapes", "--image", bad / "garbage.png"],
            "cannot read image",
        ),
        "decompose directory": (
            ["decompose", "--model", "shapes", "--image", bad / "empty_dir"],
            "is a directory",
        ),
        "decompose unknown model": (
            ["decompose", "--model", "nope", "--image", good],
            "unknown model",
        ),
        "missing --out": (["decompose", "--model", "shapes", "--image", good], "--out"),
        "unknown weights name": (compare + ["--weights", "nonsense", "--images", good], "'random'"),
        "pretrained weights not cached": (
            ["compare", "--model", "resnet18", "--methods", "gradcam", "--images", good],
            "or pass --weights PATH (a state dict file) or --weights random",
        ),
        "repeated method": (
            compare[:3] + ["--methods", "fullgrad,gradcam,FullGrad", "--images", good],
            "each method may appear once; repeated: fullgrad",
        ),
        "no method": (compare[:3] + ["--methods", " , ", "--images", good], "at least one"),
        "evaluate without masks": (
            ["evaluate", "--model", "resnet18", "--n", "2"],
            "only generated for: shapes",
        ),
        "unimportable --import": (["--import", "no_such_module_xyz", "compare"], "--import"),
        "unknown command": (["colour"], "invalid choice: 'colour'"),
    }


BAD_CASES = list(_bad_cases(Path("/unused")))


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input(case, capsys, bad_files, tmp_path):
    argv, match, *out = _bad_cases(bad_files)[case]
    out_path = out[0] if out else tmp_path / "result.png"
    if "--out" not in [str(a) for a in argv] and case != "missing --out":
        argv = argv + ["--out", out_path]
    before = files_in(bad_files)
    err = assert_bad_input(capsys, *argv, match=match)
    assert "load_model" not in err and "weights=" not in err  # CLI terms, not the library's
    assert not Path(out_path).exists()
    assert files_in(tmp_path) == []
    assert files_in(bad_files) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_requested_without_cuda(capsys, image_dir, tmp_path):
    assert_bad_input(
        capsys,
        *decompose_argv(image_dir / "a.png", tmp_path / "x.png", "--device", "cuda"),
        match="CUDA is not available",
    )
    assert files_in(tmp_path) == []


def test_internal_errors_are_one_line_with_status_1(capsys, image_dir, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("something\nbroke")

    monkeypatch.setattr("captum_fullgrad.figures.decomposition_figure", boom)
    status, _, err = run(capsys, *decompose_argv(image_dir / "a.png", tmp_path / "x.png"))
    assert status == 1
    assert err.count("\n") == 1 and "internal error: RuntimeError: something broke" in err
    assert files_in(tmp_path) == []


# ---------------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------------


def test_demo_small(capsys, tmp_path):
    out = tmp_path / "demo"
    status, stdout, err = run(
        capsys,
        "demo",
        "--out",
        out,
        "--n-images",
        "2",
        "--n-eval",
        "16",
        "--n-pointing",
        "4",
        "--batch-size",
        "4",
        "--pointing-methods",
        "fullgrad,fullgrad_bias,gradcam,saliency",
        "--no-progress",
    )
    assert status == 0, err
    assert err == ""
    assert sorted(os.listdir(out)) == [
        "comparison_grid.pdf",
        "comparison_grid.png",
        "decomposition.png",
        "report.md",
    ]
    closing = stdout.strip().splitlines()[-1]
    assert all(name in closing for name in demo.DEMO_FILES) and "vgg16" not in closing
    # 2 rows x (image + 6 Table-5 methods), a page wide
    assert_png(out / "comparison_grid.png")
    assert (out / "comparison_grid.pdf").read_bytes().startswith(b"%PDF-")
    assert_png(out / "decomposition.png")
    report = (out / "report.md").read_text()
    assert "Held-out accuracy: **" in report and "on 16 scenes" in report
    for label in (
        "FullGrad (`fullgrad`)",
        "Bias-Jacobian (`fullgrad_bias`)",
        "Grad-CAM (`gradcam`)",
        "Gradient (`saliency`)",
    ):
        row = next(line for line in report.splitlines() if line.startswith(f"| {label} |"))
        hits, rate, ms = row.split("|")[2:5]
        assert hits.strip().endswith("/4") and rate.strip().endswith("%") and float(ms) > 0
    assert "max relative gap" in report and "completeness gap" in report
    assert "Not made: the ImageNet weights of VGG-16-BN are not in the torch hub cache" in report
    assert "![comparison grid](comparison_grid.png)" in report


def test_demo_report_states_the_gap_in_captums_sign():
    """The report's eq. 1 table labels the gap sum - f(x) and prints it with its sign: +f(x)
    through an unseen square, whose terms claim 2 f(x)."""
    net = UnseenSquareNet().double().eval()
    image = torch.rand(3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    summary = decomposition_summary(net, image, target=0)
    table = _demo_report.decomposition_table(summary, ["plus", "minus"])
    row = next(line for line in table.splitlines() if "completeness gap" in line)
    label, value = row.strip("|").split("|")
    assert label.strip() == "completeness gap sum - f(x)"
    assert value.strip().startswith("+")
    assert float(value) == pytest.approx(summary.output, rel=1e-2)
    assert "logit of 'plus'" in table


def test_demo_out_must_be_a_directory(capsys, tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    assert_bad_input(capsys, "demo", "--out", target, "--n-images", "1", match="not a directory")
    assert target.read_text() == "x"


def test_sample_photos_offline():
    photos = cli.sample_photos()
    names = [name for name, _ in photos]
    assert names[:4] == ["skimage chelsea", "skimage coffee", "skimage astronaut", "skimage rocket"]
    assert "matplotlib grace_hopper" in names
    for _, array in photos:
        assert array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3


def test_imagenet_grid_when_weights_are_cached(tmp_path, cached_vgg16_bn):
    """The VGG-16-BN part of the demo, with a stand-in model: it runs on the sample photos."""
    section, path = demo._imagenet_section(
        tmp_path, torch.device("cpu"), _inputs.methods("fullgrad,gradcam"), False, 4, False
    )
    assert path == tmp_path / "vgg16_bn_grid.png"
    assert "![VGG-16-BN grid](vgg16_bn_grid.png)" in section
    assert "| skimage chelsea |" in section and "| matplotlib grace_hopper |" in section
    assert_png(tmp_path / "vgg16_bn_grid.png")


# ---------------------------------------------------------------------------------------
# The common exit path, the entry points and lazy imports
# ---------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def python(*args, **kwargs):
    """Run the venv's Python on the package of this checkout."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, timeout=300, **kwargs
    )


def test_ctrl_c_exits_130_quietly(capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    command = cli.Command("stop", "raises KeyboardInterrupt", lambda parser: None, interrupted)
    monkeypatch.setattr(cli, "COMMANDS", [*cli.COMMANDS, command])
    assert run(capsys, "stop") == (130, "", "")


def test_ctrl_c_signal_exits_130_without_traceback(tmp_path):
    script = tmp_path / "sleeper.py"
    # A test run started in the background (``nohup``, ``&``, some CI runners) ignores
    # SIGINT, and the child would inherit that: give it a terminal's Ctrl-C handling.
    script.write_text(
        "import signal, sys, time\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "from captum_fullgrad import cli\n"
        "def run(args):\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(120)\n"
        "    return 0\n"
        "cli.COMMANDS.append(cli.Command('sleep', 'sleeps', lambda parser: None, run))\n"
        "sys.exit(cli.main(['sleep']))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert process.stdout.readline().strip() == "ready"
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130 and err == ""


def test_help_imports_neither_torch_nor_the_library():
    result = python(
        "-c",
        "import sys\n"
        "from captum_fullgrad.cli import main\n"
        "codes = [main(['--help']), main(['compare', '--help']), main(['demo', '--help'])]\n"
        "print('RESULT', codes, sorted(m for m in ('torch', 'captum', 'matplotlib', "
        "'captum_fullgrad.full_gradient') if m in sys.modules))\n",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "RESULT [0, 0, 0] []"


def test_evaluate_help_imports_no_torch():
    # evaluate's options come from the metric registry: its declarations must read without
    # torch (issue 11: `evaluate --help` took ~15 s when the evaluation package imported it).
    result = python(
        "-c",
        "import sys\n"
        "from captum_fullgrad.cli import main\n"
        "code = main(['evaluate', '--help'])\n"
        "print('RESULT', code, sorted(m for m in ('torch', 'captum', 'matplotlib', "
        "'captum_fullgrad.evaluation.run') if m in sys.modules))\n",
    )
    assert result.returncode == 0, result.stderr
    assert "--road-n" in result.stdout and "--maps STORE" in result.stdout
    assert result.stdout.splitlines()[-1] == "RESULT 0 []"


def test_python_dash_m_runs_the_same_cli():
    for module in ("captum_fullgrad", "captum_fullgrad.cli"):
        result = python("-m", module, "--version")
        assert (result.returncode, result.stdout) == (0, "captum-fullgrad 0.1.0\n"), result.stderr
        result = python("-m", module, "compare", "--model", "shapes")
        assert result.returncode == 2 and result.stderr.count("\n") == 1
        assert result.stderr.startswith("captum-fullgrad: error: the following arguments")


def test_python_dash_m_benchmark_is_bench_with_threads():
    result = python("-m", "captum_fullgrad.benchmark", "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: captum-fullgrad bench" in result.stdout and "--threads" in result.stdout
    assert "--noise-samples" in result.stdout


def test_every_option_parser_builds():
    parser = cli.build_parser()
    args = parser.parse_args(["bench", "--threads", "2", "--methods", "fullgrad"])
    assert args.threads == 2 and args._run is cli.load_command("bench").run
    assert {c.name for c in cli.COMMANDS} >= {"demo", "compare", "decompose", "bench", "evaluate"}


def test_demo_names_every_file_it_wrote(capsys, tmp_path, cached_vgg16_bn):
    """With VGG-16-BN's weights 'cached' (a stand-in model), the closing line names its grid."""
    out = tmp_path / "demo"
    status, stdout, err = run(
        capsys,
        *("demo", "--out", out, "--n-images", "1", "--n-eval", "4", "--n-pointing", "2"),
        *("--methods", "fullgrad", "--pointing-methods", "fullgrad", "--no-progress"),
    )
    assert status == 0, err
    written = sorted(os.listdir(out))
    assert written == sorted([*demo.DEMO_FILES, "vgg16_bn_grid.png"])
    closing = stdout.strip().splitlines()[-1]
    assert closing.startswith("wrote ") and str(out) in closing
    for name in written:
        assert name in closing, (name, closing)


# ---------------------------------------------------------------------------------------
# docs/extending.md: its worked examples, run as written
# ---------------------------------------------------------------------------------------


def docs_code(section, index):
    """The ``index``-th Python block of section ``## <section>`` of docs/extending.md."""
    text = (REPO / "docs" / "extending.md").read_text()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, re.S)[index]


@pytest.fixture
def clean_registry():
    from captum_fullgrad import methods

    saved = dict(methods._REGISTRY)
    yield
    methods._REGISTRY.clear()
    methods._REGISTRY.update(saved)


def test_extending_a_method(capsys, image_dir, tmp_path, monkeypatch, clean_registry):
    from captum_fullgrad.benchmark import run_benchmark
    from captum_fullgrad.methods import get_method, resolve_methods

    (tmp_path / "my_methods.py").write_text(docs_code("A method", 0))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_methods", raising=False)
    out = tmp_path / "grid.png"
    status, stdout, err = run(
        capsys,
        *("--import", "my_methods", "compare", "--model", "shapes", "--images"),
        *(image_dir / "a.png", "--out", out, "--methods", "fullgrad,noisy_gradient"),
    )
    assert status == 0, err
    assert_png(out)
    # What the second block of the page states.
    method = get_method("noisy_gradient", n_samples=4)
    assert (method.passes, method.stochastic, method.fast().passes) == (4, True, 2)
    with pytest.raises(ValueError, match="noisy_gradient: n_samples must be a positive"):
        get_method("noisy_gradient", n_samples=0)
    assert [m.name for m in resolve_methods("fullgrad,noisy_gradient")] == [
        "fullgrad",
        "noisy_gradient",
    ]
    # The traits at work: slow beyond --slow-max-batch, --noise-samples draws.
    result = run_benchmark(
        tiny_cnn(),
        "tiny",
        methods=["noisy_gradient"],
        batch_sizes=(1, 2),
        input_size=32,
        repeats=1,
        warmup=0,
        noise_samples=3,
        slow_methods_max_batch=1,
    )
    rows = {(m.method, m.batch_size): m for m in result.measurements}
    assert rows[("noisy_gradient", 1)].repeats == 1 and rows[("noisy_gradient", 1)].note == "n=3"
    assert (
        rows[("noisy_gradient", 2)].repeats == 0 and "skipped" in rows[("noisy_gradient", 2)].note
    )


def test_extending_a_subcommand(capsys, monkeypatch):
    import importlib.util

    from captum_fullgrad.models import load_model

    name = "captum_fullgrad.cli.classes"
    source = docs_code("A subcommand", 0)
    spec = importlib.util.spec_from_loader(name, loader=None)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    exec(compile(source, "docs/extending.md", "exec"), module.__dict__)
    registry_line = {}
    exec(docs_code("A subcommand", 1), registry_line)
    listed = registry_line["COMMAND_MODULES"]
    assert listed[-1] == "classes" and set(listed[:-1]) <= set(cli.COMMAND_MODULES)
    monkeypatch.setattr(cli, "COMMANDS", [cli.load_command(m) for m in listed])

    status, stdout, err = run(capsys, "classes", "--model", "shapes")
    assert (status, err) == (0, "")
    assert stdout.splitlines() == list(load_model("shapes").categories)
    status, stdout, _ = run(capsys, "--help")
    assert status == 0 and "classes" in stdout and "the class names of a model" in stdout
    assert_bad_input(
        capsys,
        *("classes", "--model", "shapes", "--grep", "nothing"),
        match="--grep 'nothing': no class of model 'shapes' matches",
    )


def test_param_option_reaches_the_registry():
    """The shared ``--param METHOD.NAME=VALUE`` reading (for any subcommand that adds it)."""
    parser = cli._common.Parser(prog="x")
    _inputs.add_param_option(parser)
    args = parser.parse_args(
        ["--param", "Integrated-Gradients.n_steps=5", "--param", "gradcam.layer=layer4"]
    )
    params = _inputs.method_params(args.param)
    assert params == {"integrated_gradients": {"n_steps": 5}, "gradcam": {"layer": "layer4"}}
    ig, gradcam = _inputs.methods("integrated_gradients,gradcam", params=params)
    assert ig.params == {"n_steps": 5} and gradcam.params == {"layer": "layer4"}
    with pytest.raises(cli.CliError, match="expected METHOD.NAME=VALUE"):
        parser.parse_args(["--param", "n_steps=5"])
    for bad, message in (
        ({"integrated_gradients": {"n_steps": 0}}, "--param: integrated_gradients: n_steps must"),
        ({"integrated_gradients": {"steps": 3}}, "--param: method 'integrated_gradients' has no"),
        ({"smoothgrad": {"nt_samples": 3}}, "--param: parameters given for method 'smoothgrad'"),
    ):
        with pytest.raises(cli.CliError, match=message):
            _inputs.methods("integrated_gradients,gradcam", params=bad)
