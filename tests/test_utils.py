"""The shared helpers of chapter 00: figures, devices, the environment report, parameter counting."""
import platform
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import qwen3_scratch  # noqa: E402
from qwen3_scratch.utils import (DTYPE_CHOICES, count_module_params, default_device, device_name,  # noqa: E402
                                 env_report, figures_dir, package_dir, parse_dtype, print_env, save_figure)


@pytest.fixture
def fig():
    fig, ax = plt.subplots(figsize=(2, 1.5))
    ax.plot([0, 1, 2], [2, 0, 1])
    ax.set_title("test")
    yield fig
    plt.close(fig)


def test_figures_dir_is_the_repo_folder(tmp_path, monkeypatch):
    repo_figures = Path(qwen3_scratch.__file__).resolve().parent.parent / "figures"
    monkeypatch.chdir(tmp_path)  # from any working directory, a checkout's figures/ is found
    expected = repo_figures if repo_figures.is_dir() else tmp_path / "figures"
    assert figures_dir() == expected


def test_package_dir_holds_the_package_and_its_data():
    assert package_dir() == Path(qwen3_scratch.__file__).parent
    assert (package_dir() / "data" / "tokenizer.json").is_file(), "the bundled tokenizer lives in package_dir()/data"


@pytest.mark.parametrize("given, want", [("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16),
                                         ("torch.float16", torch.float16), ("FP32", torch.float32),
                                         (torch.float64, torch.float64), ("half", torch.float16)])
def test_parse_dtype(given, want):
    assert parse_dtype(given) is want


@pytest.mark.parametrize("bad", ["int8", "bf15", torch.int64, None, 3])
def test_parse_dtype_refuses_non_floats_naming_the_culprit(bad):
    with pytest.raises(ValueError, match=rf"^--dtype={bad!r} is not a floating-point dtype".replace("(", r"\(")):
        parse_dtype(bad, what="--dtype")
    assert [parse_dtype(c) for c in DTYPE_CHOICES] == [torch.bfloat16, torch.float16, torch.float32]


def test_save_figure_writes_a_reproducible_png(fig, tmp_path):
    path = save_figure(fig, "99_test.png", folder=tmp_path / "new_dir")  # creates missing folders
    assert path == tmp_path / "new_dir" / "99_test.png" and path.is_file()
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"matplotlib" not in data, "the Software text chunk must be left out"
    assert save_figure(fig, "99_test", folder=tmp_path / "new_dir") == path, "'.png' is added when missing"
    assert path.read_bytes() == data, "same figure, same bytes"


def test_save_figure_dpi_and_default_folder(fig, tmp_path, monkeypatch):
    small = save_figure(fig, "small.png", dpi=50, folder=tmp_path)
    big = save_figure(fig, "big.png", dpi=200, folder=tmp_path)
    assert big.stat().st_size > small.stat().st_size
    monkeypatch.setattr("qwen3_scratch.utils.figures_dir", lambda: tmp_path / "figs")
    monkeypatch.setenv("QWEN3_SCRATCH_RUNS", str(tmp_path / "runs"))
    monkeypatch.delenv("QWEN3_SCRATCH_PUBLISH", raising=False)
    monkeypatch.delenv("QWEN3_SCRATCH_SAVE_FIGURES", raising=False)
    assert save_figure(fig, "default.png") == tmp_path / "runs" / "figures" / "default.png", "a run draws into runs/"
    monkeypatch.setenv("QWEN3_SCRATCH_PUBLISH", "1")
    monkeypatch.setenv("QWEN3_SCRATCH_QUICK", "0")
    assert save_figure(fig, "default.png") == tmp_path / "figs" / "default.png", "publishing draws into figures/"
    assert (tmp_path / "figs" / "default.png").is_file()


def test_default_device():
    dev = default_device()
    assert isinstance(dev, torch.device)
    if torch.cuda.is_available():
        assert dev.type == "cuda"
    elif not torch.backends.mps.is_available():
        assert dev.type == "cpu"
    torch.ones(2, device=dev)  # usable


def test_device_name():
    name = device_name("cpu")
    assert name.startswith("CPU (") and platform.machine() in name and f"{torch.get_num_threads()} thread" in name
    assert device_name(torch.device("cpu")) == name
    assert isinstance(device_name(), str) and device_name()
    if torch.cuda.is_available():
        assert device_name("cuda") == torch.cuda.get_device_name(0)


def test_env_report(capsys):
    report = env_report()
    assert report["python"] == platform.python_version() and report["torch"] == torch.__version__
    assert report["cuda_available"] == torch.cuda.is_available()
    assert report["device"] == str(default_device()) and report["device_name"] == device_name()
    assert set(report["dtypes"]) == {"float32", "bfloat16", "float16"}
    assert report["dtypes"]["float32"] is True and all(isinstance(v, bool) for v in report["dtypes"].values())
    assert isinstance(report["tf32_supported"], bool)
    assert report["float32_matmul_precision"] in ("highest", "high", "medium")
    assert env_report("cpu")["device_name"].startswith("CPU")
    print_env()
    out = capsys.readouterr().out
    assert torch.__version__ in out and "float32 yes" in out


class TinyLM(nn.Module):
    def __init__(self, vocab=10, dim=4, tie=True):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        if tie:
            self.head.weight = self.embed.weight


def test_count_module_params_tied_and_untied():
    norm = 4 + 4
    assert count_module_params(TinyLM(tie=True)) == 40 + norm
    assert count_module_params(TinyLM(tie=True), unique=False) == 80 + norm
    assert count_module_params(TinyLM(tie=False)) == count_module_params(TinyLM(tie=False), unique=False) == 80 + norm
    assert count_module_params(nn.Linear(3, 5)) == 20


def test_count_module_params_shared_storage():
    # two distinct Parameter objects over the same memory (what a loader that ties by copying views makes)
    model = TinyLM(tie=False)
    model.head.weight = nn.Parameter(model.embed.weight.data)
    assert model.head.weight is not model.embed.weight
    assert count_module_params(model) == 40 + 8 and count_module_params(model, unique=False) == 80 + 8


def test_count_module_params_meta_device():
    with torch.device("meta"):
        model = TinyLM(vocab=1000, dim=64, tie=False)
    assert count_module_params(model) == 2 * 1000 * 64 + 2 * 64


def test_device_name_counts_threads_in_good_english(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert device_name("cpu").endswith(", 1 thread)")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert device_name("cpu").endswith(", 8 threads)")


@pytest.mark.parametrize("measured", [False, True])
def test_figures_and_results_reach_the_course_only_when_publishing(fig, tmp_path, monkeypatch, measured):
    utils = qwen3_scratch.utils
    monkeypatch.setattr("qwen3_scratch.utils.figures_dir", lambda: tmp_path / "figs")
    monkeypatch.setattr("qwen3_scratch.utils.results_dir", lambda: tmp_path / "res")
    monkeypatch.setenv("QWEN3_SCRATCH_RUNS", str(tmp_path / "runs"))
    for name in ("QWEN3_SCRATCH_PUBLISH", "QWEN3_SCRATCH_SAVE_FIGURES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("QWEN3_SCRATCH_QUICK", "0")
    assert not utils.publishing()
    assert save_figure(fig, "timing.png", measured=measured) == tmp_path / "runs" / "figures" / "timing.png"
    assert utils.output_dir("results") == tmp_path / "runs" / "results"
    assert not (tmp_path / "figs").exists() and not (tmp_path / "res").exists(), "nothing committed is touched"
    assert save_figure(fig, "timing.png", measured=measured, folder=tmp_path / "out").exists(), "an explicit folder"
    monkeypatch.setenv("QWEN3_SCRATCH_PUBLISH", "1")
    assert utils.publishing()
    assert save_figure(fig, "timing.png", measured=measured) == tmp_path / "figs" / "timing.png"
    assert utils.output_dir("results") == tmp_path / "res"
    monkeypatch.setenv("QWEN3_SCRATCH_QUICK", "1")
    assert not utils.publishing(), "a quick run never publishes: its numbers would replace the full run's"
    with pytest.raises(ValueError, match="'figures' or 'results'"):
        utils.output_dir("data")


def test_the_old_switch_still_publishes_with_a_warning(monkeypatch):
    monkeypatch.delenv("QWEN3_SCRATCH_PUBLISH", raising=False)
    monkeypatch.setenv("QWEN3_SCRATCH_SAVE_FIGURES", "1")
    monkeypatch.setenv("QWEN3_SCRATCH_QUICK", "0")
    with pytest.warns(FutureWarning, match="QWEN3_SCRATCH_PUBLISH"):
        assert qwen3_scratch.utils.publishing()


def test_publish_folder_replaces_the_whole_folder_or_nothing(tmp_path, monkeypatch):
    from qwen3_scratch.utils import publish_folder
    run, shipped = tmp_path / "run", tmp_path / "shipped"
    run.mkdir()
    (run / "model.safetensors").write_bytes(b"new")
    (run / "config.json").write_text("{}")
    shipped.mkdir()
    (shipped / "model.safetensors").write_bytes(b"old")
    (shipped / "stale.json").write_text("{}")

    def broken_copy(src, dst):  # a copy cut short (a full disk, Ctrl-C)
        Path(dst).mkdir()
        (Path(dst) / "model.safetensors").write_bytes(b"ne")
        raise KeyboardInterrupt
    monkeypatch.setattr("qwen3_scratch.utils.shutil.copytree", broken_copy)
    with pytest.raises(KeyboardInterrupt):
        publish_folder(run, shipped)
    assert (shipped / "model.safetensors").read_bytes() == b"old", "an interrupted publish leaves the old folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "shipped"], "and nothing beside it"
    monkeypatch.undo()
    assert publish_folder(run, shipped) == shipped
    assert sorted(p.name for p in shipped.iterdir()) == ["config.json", "model.safetensors"], "stale files go"
    assert (shipped / "model.safetensors").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "shipped"]
    with pytest.raises(FileNotFoundError, match="nope"):
        publish_folder(tmp_path / "nope", shipped)


def test_quick_run_follows_the_environment(monkeypatch):
    monkeypatch.setenv("QWEN3_SCRATCH_QUICK", "1")
    assert qwen3_scratch.utils.quick_run()
    monkeypatch.setenv("QWEN3_SCRATCH_QUICK", "0")
    assert not qwen3_scratch.utils.quick_run()


def test_results_record_commands_and_paths_without_this_machines_folders():
    from qwen3_scratch.utils import command_line, repo_dir, repo_relative
    root = repo_dir()
    assert root is not None, "the tests run from a checkout"
    assert repo_relative(root / "results" / "x.json") == "results/x.json"
    assert repo_relative("/somewhere/else") == "/somewhere/else"
    main = root / "qwen3_scratch" / "__main__.py"
    assert command_line([str(main), "spec-bench", "--out", str(root / "results"), "--k", "3"]) == \
        "python -m qwen3_scratch spec-bench --out results --k 3"
    assert command_line([str(root / "tools" / "nb.py"), "check"]) == "tools/nb.py check"
