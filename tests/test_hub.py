"""Where checkpoints come from (qwen3_scratch.hub): local folders, preset names, the Hugging Face Hub (offline,
from a hand-built cache; mirrors; network errors as one line) and ModelScope."""
import shutil
import sys
import types

import pytest
import torch

from qwen3_scratch.hub import preset_repo_id, resolve_checkpoint
from qwen3_scratch.weights import load_pretrained

IDS = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))  # (B, T)


@torch.no_grad()
def max_diff(model, ref):
    """Largest logit difference between our loaded model and the transformers model it came from."""
    return (model(IDS) - ref(IDS).logits).abs().max().item()


# ---------------------------------------------------------------- where checkpoints come from
def test_resolve_local_and_bad_arguments(hf_ckpt, tmp_path):
    folder = hf_ckpt["dense"][1]
    assert resolve_checkpoint(folder) == folder
    assert resolve_checkpoint(folder / "config.json") == folder, "a file inside the folder is fine"
    assert resolve_checkpoint(str(folder), source="local") == folder
    with pytest.raises(FileNotFoundError, match="'./no/such/dir' is not an existing directory"):
        resolve_checkpoint("./no/such/dir")
    with pytest.raises(FileNotFoundError, match="'Org/Name' is not an existing directory"):
        resolve_checkpoint("Org/Name", source="local")
    with pytest.raises(ValueError, match="source='github'"):
        resolve_checkpoint("Org/Name", source="github")
    with pytest.raises(ValueError, match="revision='v1' only applies to repo ids"):
        resolve_checkpoint(folder, revision="v1")
    assert preset_repo_id("0.6B") == "Qwen/Qwen3-0.6B" and preset_repo_id("30B-A3B") == "Qwen/Qwen3-30B-A3B"
    assert preset_repo_id("Qwen/Qwen3-0.6B") is None


COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, picked up through HF_HUB_CACHE; offline mode on; snapshot_download spied."""
    import huggingface_hub
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    calls, real = [], huggingface_hub.snapshot_download

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    return cache, calls


def test_hub_cache_offline(hf_ckpt, offline_cache):
    cache, calls = offline_cache
    ref, folder = hf_ckpt["moe"]
    repo = cache / "models--Org--Tiny-MoE"
    shutil.copytree(folder, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    model = load_pretrained("Org/Tiny-MoE", device="cpu")
    (args, kwargs), = calls
    assert (args[:1] or (kwargs.get("repo_id"),))[0] == "Org/Tiny-MoE"
    assert "*.safetensors" in kwargs["allow_patterns"] and "config.json" in kwargs["allow_patterns"]
    assert not any("bin" in p for p in kwargs["allow_patterns"]), "never download pickles"
    assert kwargs["local_files_only"] is True
    assert resolve_checkpoint("Org/Tiny-MoE") == repo / "snapshots" / COMMIT
    assert max_diff(model, ref) <= 1e-5
    with pytest.raises(RuntimeError, match="has no revision|could not download"):
        resolve_checkpoint("Org/Tiny-MoE", revision="v9")


def test_hub_uncached_offline_is_one_clear_line(offline_cache):
    with pytest.raises(RuntimeError, match=r"could not download Org/Missing \(.*HF_HUB_OFFLINE=1\)\. "
                                           r"Download it where you have internet with 'hf download Org/Missing "
                                           r"--local-dir DIR'") as info:
        load_pretrained("Org/Missing", device="cpu")
    assert "\n" not in str(info.value) and info.value.__cause__ is None and info.value.__suppress_context__
    with pytest.raises(RuntimeError, match=r"could not download Qwen/Qwen3-0\.6B"):
        load_pretrained("0.6B", device="cpu")  # a preset name means the official repo


def test_hub_connection_error_is_one_clear_line(monkeypatch):
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("Connection error, and we cannot find the files")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(RuntimeError, match=r"^could not download Org/Name \(no network\?\)\. .*source='modelscope'"):
        resolve_checkpoint("Org/Name")


def test_hub_endpoint_and_cache_dir_are_passed(monkeypatch, tmp_path):
    import huggingface_hub
    seen = {}
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: seen.update(kw, repo=repo) or str(tmp_path))
    monkeypatch.setenv("HF_ENDPOINT", "https://mirror.example")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert resolve_checkpoint("1.7B", revision="abc") == tmp_path
    assert seen["repo"] == "Qwen/Qwen3-1.7B" and seen["revision"] == "abc"
    assert seen["endpoint"] == "https://mirror.example" and seen["local_files_only"] is False
    assert seen["cache_dir"] == str(tmp_path / "home" / "hub")


def test_modelscope(monkeypatch, hf_ckpt):
    monkeypatch.setitem(sys.modules, "modelscope", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install modelscope"):
        resolve_checkpoint("Qwen/Qwen3-0.6B", source="modelscope")
    seen = {}
    fake = types.ModuleType("modelscope")
    fake.snapshot_download = lambda repo, **kw: seen.update(kw, repo=repo) or str(hf_ckpt["dense"][1])
    monkeypatch.setitem(sys.modules, "modelscope", fake)
    model = load_pretrained("0.6B", source="modelscope", device="cpu")
    assert seen["repo"] == "Qwen/Qwen3-0.6B" and "*.safetensors" in seen["allow_patterns"]
    assert max_diff(model, hf_ckpt["dense"][0]) <= 1e-5

    def broken(repo, **kw):
        raise OSError("connection refused\nmore details")
    fake.snapshot_download = broken
    with pytest.raises(RuntimeError, match=r"could not download Org/X from ModelScope \(OSError: connection refused\)"):
        resolve_checkpoint("Org/X", source="modelscope")


def test_unreachable_hub_gives_one_clear_line(tmp_path, monkeypatch):
    """Online mode, but the endpoint refuses connections (a closed port on loopback): the one-line advice."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(RuntimeError, match=r"^could not download Qwen/Qwen3-0.6B \(no network\?\)\. .*hf download"):
        load_pretrained("Qwen/Qwen3-0.6B", device="cpu")


def test_cached_checkpoint_never_downloads(hf_ckpt, offline_cache, monkeypatch):
    from qwen3_scratch.hub import cached_checkpoint
    cache, calls = offline_cache
    folder = hf_ckpt["dense"][1]
    assert cached_checkpoint(folder) == folder
    assert cached_checkpoint("Org/Not-Cached") is None
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # even online: local_files_only
    assert cached_checkpoint("Org/Not-Cached") is None
    assert all(kw["local_files_only"] is True for _, kw in calls)
    repo = cache / "models--Org--Tiny"
    shutil.copytree(folder, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    assert cached_checkpoint("Org/Tiny") == repo / "snapshots" / COMMIT
