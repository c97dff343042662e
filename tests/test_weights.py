"""Checkpoint loading (qwen3_scratch.weights): hub format in and out, parity with transformers, strict errors,
dtype/device handling. Where checkpoints come from (Hub, ModelScope) is tests/test_hub.py."""
import json
import shutil
from pathlib import Path

import pytest
import safetensors
import torch
from hf_ref import tiny_hf_model, tiny_kwargs
from safetensors.torch import load_file, save_file

from qwen3_scratch.config import Qwen3Config
from qwen3_scratch.model import Qwen3Model
from qwen3_scratch.rope import rope_inv_freq
from qwen3_scratch.checkpoint import checkpoint_files, CheckpointError, expected_tensors, read_safetensors_header
from qwen3_scratch.weights import choose_dtype, load_pretrained, load_state_dict_strict, save_pretrained

IDS = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))  # (B, T)


# ---------------------------------------------------------------- fixtures (hf_ckpt: tests/conftest.py)
def copy_ckpt(hf_ckpt, kind, tmp_path):
    dst = tmp_path / kind
    shutil.copytree(hf_ckpt[kind][1], dst)
    return dst


def ref_logits(ref):
    with torch.no_grad():
        return ref(IDS).logits


def our_logits(model):
    with torch.no_grad():
        return model(IDS)


def random_model(moe, tied, seed=0):
    torch.manual_seed(seed)
    model = Qwen3Model(Qwen3Config(**tiny_kwargs(moe, tie_word_embeddings=tied, model_type="qwen3_moe" if moe else "qwen3")))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


# ---------------------------------------------------------------- the safetensors header and file discovery
def test_header_matches_safetensors(hf_ckpt):
    path = hf_ckpt["moe"][1] / "model.safetensors"
    header = read_safetensors_header(path)
    assert header["__metadata__"] == {"format": "pt"}
    with safetensors.safe_open(str(path), "pt") as f:
        assert set(f.keys()) == set(header) - {"__metadata__"}
        for name in f.keys():
            assert list(f.get_slice(name).get_shape()) == header[name]["shape"], name
            assert f.get_slice(name).get_dtype() == header[name]["dtype"], name
    assert "model.layers.0.mlp.experts.7.down_proj.weight" in header, "one tensor per expert on disk"
    assert "model.layers.0.mlp.gate.weight" in header and "lm_head.weight" in header


def test_expected_tensors_on_meta(hf_ckpt):
    for kind in ("dense", "moe"):
        folder = hf_ckpt[kind][1]
        with torch.device("meta"):
            model = Qwen3Model(Qwen3Config.from_hf(folder))
        expected = expected_tensors(model)
        header = read_safetensors_header(folder / "model.safetensors")
        assert expected == {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}, kind
        assert ("lm_head.weight" in expected) == (kind == "moe"), "tied models store no lm_head.weight"


# ---------------------------------------------------------------- round trips through our own save_pretrained
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("shard", [None, "100KB"], ids=["single", "sharded"])
def test_round_trip(tmp_path, moe, tied, shard):
    model = random_model(moe, tied)
    folder = save_pretrained(model, tmp_path / "ckpt", max_shard_size=shard)
    names = sorted(p.name for p in folder.iterdir())
    if shard is None:
        assert names == ["config.json", "model.safetensors"]
        stored = set(read_safetensors_header(folder / "model.safetensors")) - {"__metadata__"}
    else:
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors", shards
        assert names == sorted(["config.json", "model.safetensors.index.json"] + shards)
        stored = set(index["weight_map"])
        assert index["metadata"]["total_size"] == sum(
            t.numel() * t.element_size() for t in load_sharded(folder).values())
        for file in shards:  # every shard respects the limit, unless one tensor alone is larger
            header = read_safetensors_header(folder / file)
            data = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
            assert data <= 100_000 or len(header) == 2, file
    assert all(n.startswith("model.") or n == "lm_head.weight" for n in stored)
    assert ("lm_head.weight" in stored) == (not tied)

    loaded = load_pretrained(folder, device="cpu")
    assert not loaded.training
    assert (loaded.lm_head.weight is loaded.embed_tokens.weight) == tied
    sd_in, sd_out = model.state_dict(), loaded.state_dict()
    assert sd_in.keys() == sd_out.keys()
    assert all(torch.equal(sd_in[k], sd_out[k]) for k in sd_in)
    assert (our_logits(model) - our_logits(loaded)).abs().max() <= 1e-6  # same weights; kernels may differ in order


def load_sharded(folder):
    out = {}
    for f in sorted(folder.glob("model-*.safetensors")):
        out.update(load_file(f))
    return out


def test_save_overwrites_stale_shards(tmp_path):
    model = random_model(False, True)
    save_pretrained(model, tmp_path, max_shard_size="20KB")
    save_pretrained(model, tmp_path)  # now a single file: the old shards and index must go
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    with pytest.raises(ValueError, match="max_shard_size='lots'"):
        save_pretrained(model, tmp_path, max_shard_size="lots")


def test_transformers_reads_our_checkpoint(tmp_path, hf_ckpt):
    from transformers import AutoModelForCausalLM
    ref, folder = hf_ckpt["moe"]
    ours = load_pretrained(folder, device="cpu")
    saved = save_pretrained(ours, tmp_path / "ours", max_shard_size="100KB")
    back = AutoModelForCausalLM.from_pretrained(saved, attn_implementation="eager").eval()
    assert (ref_logits(back) - ref_logits(ref)).abs().max() <= 1e-6


# ---------------------------------------------------------------- parity with transformers
@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_parity_transformers_checkpoint(hf_ckpt, kind):
    ref, folder = hf_ckpt[kind]
    cfg = json.loads((folder / "config.json").read_text())
    assert "rope_parameters" in cfg and ("num_local_experts" in cfg) == (kind == "moe"), "transformers 5 style"
    model = load_pretrained(folder, device="cpu")
    assert model.embed_tokens.weight.dtype == torch.float32
    assert (our_logits(model) - ref_logits(ref)).abs().max() <= 1e-5


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_parity_released_style_config(hf_ckpt, tmp_path, kind):
    """The released config.json spells rope_theta at top level, num_experts, and torch_dtype."""
    ref, _ = hf_ckpt[kind]
    folder = copy_ckpt(hf_ckpt, kind, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["rope_theta"] = cfg.pop("rope_parameters")["rope_theta"]
    cfg["torch_dtype"] = cfg.pop("dtype")
    if kind == "moe":
        cfg["num_experts"] = cfg.pop("num_local_experts")
    (folder / "config.json").write_text(json.dumps(cfg))
    model = load_pretrained(folder, device="cpu")
    assert model.config.rope_theta == 1e6 and model.config.num_experts == (8 if kind == "moe" else 0)
    assert (our_logits(model) - ref_logits(ref)).abs().max() <= 1e-5


def test_parity_transformers_sharded(tmp_path):
    ref = tiny_hf_model(moe=True, seed=2)
    ref.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    assert len(set(checkpoint_files(tmp_path).values())) > 1
    model = load_pretrained(tmp_path, device="cpu")
    assert (our_logits(model) - ref_logits(ref)).abs().max() <= 1e-5


# ---------------------------------------------------------------- dtype and device
class SafeOpenSpy:
    """Wraps safetensors.safe_open and records every tensor it hands out."""
    real = safetensors.safe_open
    seen, names = [], []

    def __init__(self, *args, **kwargs):
        self.f = SafeOpenSpy.real(*args, **kwargs)
        self.device = kwargs.get("device")

    def __enter__(self):
        self.f.__enter__()
        return self

    def __exit__(self, *exc):
        return self.f.__exit__(*exc)

    def keys(self):
        return self.f.keys()

    def get_tensor(self, name):
        t = self.f.get_tensor(name)
        SafeOpenSpy.seen.append(t)
        SafeOpenSpy.names.append(name)
        return t

    def get_slice(self, name):
        return self.f.get_slice(name)


def test_bf16_loads_as_bf16_without_a_float32_copy(tmp_path, monkeypatch):
    model = random_model(True, False).to(torch.bfloat16)
    folder = save_pretrained(model, tmp_path)
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "bfloat16"
    SafeOpenSpy.seen = []
    monkeypatch.setattr(safetensors, "safe_open", SafeOpenSpy)
    loaded = load_pretrained(folder, dtype=torch.bfloat16, device="cpu")
    read = {t.data_ptr() for t in SafeOpenSpy.seen}
    assert {t.dtype for t in SafeOpenSpy.seen} == {torch.bfloat16}, "read as stored"
    for name, p in loaded.named_parameters():
        assert p.dtype == torch.bfloat16, name
        assert p.data_ptr() in read, f"{name} is a copy, not the tensor read from the file"
    assert loaded.rotary.inv_freq.dtype == torch.float32 and not loaded.rotary.inv_freq.is_meta
    assert torch.equal(loaded.rotary.inv_freq, rope_inv_freq(16, 1e6))
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in loaded.state_dict().items())


def test_default_dtype_and_device(tmp_path, monkeypatch):
    folder = save_pretrained(random_model(False, True).to(torch.bfloat16), tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = load_pretrained(folder)  # no GPU: cpu, and float32 although the file is bf16
    assert model.embed_tokens.weight.device.type == "cpu" and model.embed_tokens.weight.dtype == torch.float32
    assert load_pretrained(folder, dtype="auto").embed_tokens.weight.dtype == torch.bfloat16
    assert load_pretrained(folder, dtype="float16").norm.weight.dtype == torch.float16
    with pytest.raises(ValueError, match="dtype='int8'"):
        load_pretrained(folder, dtype="int8")
    assert choose_dtype(None, "cuda", {"torch_dtype": "bfloat16"}) == torch.bfloat16
    assert choose_dtype(None, "cuda", {"dtype": "float32"}) == torch.float32
    assert choose_dtype(None, "cuda", {}, {"a": ("BF16", [1]), "b": ("BF16", [1]), "c": ("F32", [1])}) == torch.bfloat16
    assert choose_dtype(None, "cpu", {"torch_dtype": "bfloat16"}) == torch.float32


# ---------------------------------------------------------------- strict errors, each naming its culprit
def meta_model(folder):
    with torch.device("meta"):
        return Qwen3Model(Qwen3Config.from_hf(folder))


def edit_tensors(folder, fn):
    sd = load_file(folder / "model.safetensors")
    fn(sd)
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})


def test_unexpected_tensor(hf_ckpt, tmp_path):
    folder = copy_ckpt(hf_ckpt, "dense", tmp_path)
    edit_tensors(folder, lambda sd: sd.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors.*model\.layers\.0\.self_attn\.rotary_emb\.inv_freq"):
        load_pretrained(folder, device="cpu")


def test_missing_tensor_and_nothing_half_loaded(hf_ckpt, tmp_path):
    folder = copy_ckpt(hf_ckpt, "moe", tmp_path)
    edit_tensors(folder, lambda sd: sd.pop("model.layers.2.mlp.experts.3.up_proj.weight"))
    model = meta_model(folder)
    with pytest.raises(CheckpointError, match=r"missing tensors.*model\.layers\.2\.mlp\.experts\.3\.up_proj\.weight"):
        load_state_dict_strict(model, folder, device="cpu")
    assert all(p.is_meta for p in model.parameters()), "validation happens before any tensor is loaded"


def test_shape_mismatch(hf_ckpt, tmp_path):
    folder = copy_ckpt(hf_ckpt, "dense", tmp_path)
    edit_tensors(folder, lambda sd: sd.update({"model.layers.0.self_attn.q_proj.weight": torch.zeros(128, 64)}))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight: checkpoint \(128, 64\) "
                                              r"vs model \(64, 64\)"):
        load_pretrained(folder, device="cpu")


def test_all_problems_in_one_error(hf_ckpt, tmp_path):
    folder = copy_ckpt(hf_ckpt, "dense", tmp_path)

    def breaks(sd):
        sd.pop("model.norm.weight")
        sd["model.extra.weight"] = torch.ones(2)
        sd["model.layers.1.mlp.down_proj.weight"] = torch.zeros(64, 64)
        sd["model.layers.1.input_layernorm.weight"] = torch.zeros(64, dtype=torch.int8)
    edit_tensors(folder, breaks)
    with pytest.raises(CheckpointError) as info:
        load_pretrained(folder, device="cpu")
    msg = str(info.value)
    for culprit in ("model.norm.weight", "model.extra.weight", "model.layers.1.mlp.down_proj.weight: checkpoint",
                    "model.layers.1.input_layernorm.weight: I8", str(folder)):
        assert culprit in msg, (culprit, msg)


def test_tied_checkpoint_with_redundant_lm_head(hf_ckpt, tmp_path, monkeypatch):
    folder = copy_ckpt(hf_ckpt, "dense", tmp_path)
    edit_tensors(folder, lambda sd: sd.update({"lm_head.weight": sd["model.embed_tokens.weight"].clone()}))
    SafeOpenSpy.seen, SafeOpenSpy.names = [], []
    monkeypatch.setattr(safetensors, "safe_open", SafeOpenSpy)
    model = load_pretrained(folder, device="cpu")  # the same matrix stored twice is fine
    assert model.lm_head.weight is model.embed_tokens.weight
    assert "lm_head.weight" not in SafeOpenSpy.names, "the redundant copy is compared from the file, never loaded"



def test_tied_config_with_a_different_stored_head_unties_like_transformers(hf_ckpt, tmp_path):
    from transformers import Qwen3ForCausalLM
    folder = copy_ckpt(hf_ckpt, "dense", tmp_path)

    def different_head(sd):
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
        sd["lm_head.weight"][-1, -1] += 1.0
    edit_tensors(folder, different_head)
    with pytest.warns(UserWarning, match=r"model\.safetensors: .*lm_head.weight differs from model.embed_tokens.weight"):
        model = load_pretrained(folder, device="cpu")
    stored = load_file(folder / "model.safetensors")
    assert model.lm_head.weight is not model.embed_tokens.weight, "a different stored head must be untied"
    assert torch.equal(model.lm_head.weight, stored["lm_head.weight"])
    assert torch.equal(model.embed_tokens.weight, stored["model.embed_tokens.weight"])
    assert model.config.tie_word_embeddings is False
    reference = Qwen3ForCausalLM.from_pretrained(folder).eval()  # transformers 5 also unties here
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids).logits, atol=1e-5, rtol=0)


def test_redundant_head_compared_block_by_block(hf_ckpt, tmp_path):
    from qwen3_scratch.weights import _same_as_embedding
    folder = copy_ckpt(hf_ckpt, "dense", tmp_path)
    embedding = load_file(folder / "model.safetensors")["model.embed_tokens.weight"]  # (V, D), V = 256
    head = embedding.clone()
    head[-1, 0] += 1.0  # only the last, partial block differs
    save_file({"lm_head.weight": head}, tmp_path / "head.safetensors")
    assert _same_as_embedding(tmp_path / "head.safetensors", embedding.clone(), rows=100) is False
    save_file({"lm_head.weight": embedding.clone()}, tmp_path / "head.safetensors")
    assert _same_as_embedding(tmp_path / "head.safetensors", embedding, rows=100) is True
    assert _same_as_embedding(tmp_path / "head.safetensors", embedding.double(), rows=100) is True, "any dtype"


def test_non_qwen3_model_type(hf_ckpt, tmp_path):
    folder = copy_ckpt(hf_ckpt, "dense", tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(cfg, model_type="llama")))
    with pytest.raises(CheckpointError, match=r"dense/config\.json: .*'llama'"):
        load_pretrained(folder, device="cpu")
    (folder / "config.json").write_text(json.dumps(dict(cfg, quantization_config={"quant_method": "fp8"})))
    with pytest.raises(CheckpointError, match=r"config\.json: quantized checkpoints \(fp8\)"):
        load_pretrained(folder, device="cpu")
    (folder / "config.json").write_text('{"model_type": "qwen3",')
    with pytest.raises(CheckpointError, match=r"dense/config\.json: not valid JSON"):
        load_pretrained(folder, device="cpu")
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"dense/config\.json not found"):
        load_pretrained(folder, device="cpu")


def test_only_pickle_is_refused(hf_ckpt, tmp_path):
    folder = copy_ckpt(hf_ckpt, "dense", tmp_path)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not even read")
    with pytest.raises(CheckpointError, match=r"only pytorch_model\.bin \(PyTorch pickle\), which is refused: "
                                              r"unpickling can run arbitrary code"):
        load_pretrained(folder, device="cpu")
    (folder / "pytorch_model.bin").unlink()
    with pytest.raises(CheckpointError, match=r"no model\.safetensors or model\.safetensors\.index\.json"):
        load_pretrained(folder, device="cpu")


def test_truncated_and_corrupt_files(hf_ckpt, tmp_path):
    folder = copy_ckpt(hf_ckpt, "dense", tmp_path)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-1])
    with pytest.raises(CheckpointError, match=r"dense/model\.safetensors: truncated file"):
        load_pretrained(folder, device="cpu")
    path.write_bytes(data[:1000])  # cut inside the JSON header
    with pytest.raises(CheckpointError, match=r"dense/model\.safetensors: truncated or not a safetensors file"):
        load_pretrained(folder, device="cpu")
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match=r"dense/model\.safetensors: truncated or not a safetensors file"):
        load_pretrained(folder, device="cpu")
    path.write_bytes(data[:9] + b"}" + data[10:])  # a damaged header of the right length
    with pytest.raises(CheckpointError, match=r"dense/model\.safetensors: corrupt safetensors header"):
        load_pretrained(folder, device="cpu")
    path.write_bytes(data + b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"dense/model\.safetensors: corrupt file: 16 bytes after"):
        load_pretrained(folder, device="cpu")


def write_raw_safetensors(path, header: dict, data_bytes: int):
    """A .safetensors file with a hand-written header (possibly wrong) and `data_bytes` zero bytes of data."""
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(data_bytes))


@pytest.mark.parametrize("offsets_b, message", [
    ([4, 12], r"'b' starts at data byte 4, expected 8 \(overlaps the tensor before it\)"),
    ([12, 20], r"'b' starts at data byte 12, expected 8 \(leaves a gap before it\)"),
])
def test_header_offsets_must_tile_the_data(tmp_path, offsets_b, message):
    """Sizes that add up are not enough: two tensors sharing bytes, or a hole, mean a corrupt header."""
    path = tmp_path / "x.safetensors"
    write_raw_safetensors(path, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                 "b": {"dtype": "F32", "shape": [2], "data_offsets": offsets_b}}, offsets_b[1])
    with pytest.raises(CheckpointError, match=r"x\.safetensors: corrupt safetensors header: " + message):
        read_safetensors_header(path)


@pytest.mark.parametrize("entry", [
    {"dtype": "F32", "shape": [-2, -1], "data_offsets": [0, 8]},  # negative dims whose product looks right
    {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]},  # end before begin
    {"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8.0]},  # not integers
    {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]},  # unknown dtype
    {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]},  # 3 floats do not fit in 8 bytes
])
def test_header_entry_must_be_consistent(tmp_path, entry):
    path = tmp_path / "x.safetensors"
    write_raw_safetensors(path, {"w": entry}, 8)
    with pytest.raises(CheckpointError, match=r"x\.safetensors: corrupt safetensors header entry for 'w'"):
        read_safetensors_header(path)


def test_sharded_errors(tmp_path):
    folder = save_pretrained(random_model(False, False), tmp_path / "ckpt", max_shard_size="30KB")
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    moved = folder / "elsewhere.bin"
    (folder / shard).rename(moved)
    with pytest.raises(CheckpointError, match=rf"missing shard\(s\): {shard}"):
        load_pretrained(folder, device="cpu")
    moved.rename(folder / shard)
    name = next(n for n, f in index["weight_map"].items() if f == shard)
    other = next(f for f in index["weight_map"].values() if f != shard)
    index_path.write_text(json.dumps({"weight_map": dict(index["weight_map"], **{name: other})}))
    with pytest.raises(CheckpointError, match=rf"listed but not in the shard: {name}.*in a shard but not listed: {name} \(in {shard}\)"):
        load_pretrained(folder, device="cpu")
    index_path.write_text("{not json")
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: not valid JSON \(line 1, column 2"):
        load_pretrained(folder, device="cpu")
    index_path.write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: not a safetensors index \(no weight_map\)"):
        load_pretrained(folder, device="cpu")


def test_sharded_mismatch_names_the_shard(tmp_path):
    folder = save_pretrained(random_model(False, False), tmp_path / "ckpt", max_shard_size="30KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    name = "model.layers.1.self_attn.q_proj.weight"
    shard = index["weight_map"][name]
    sd = load_file(folder / shard)
    sd[name] = torch.zeros(8, 8)
    save_file(sd, folder / shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{name} \(in {shard}\): checkpoint \(8, 8\) vs model"):
        load_pretrained(folder, device="cpu")


def test_an_interrupted_save_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    """Issue: save_pretrained removed the old file, then wrote in place; a Ctrl-C left 1,000 bytes of model."""
    import safetensors.torch
    folder = save_pretrained(random_model(False, False), tmp_path / "ckpt")
    before = load_file(folder / "model.safetensors")

    def dies_halfway(tensors, path, metadata=None):
        Path(path).write_bytes(b"\0" * 1000)
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(random_model(False, False, seed=5), folder)
    after = load_file(folder / "model.safetensors")
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"], "no temporary file left"


def test_saved_files_get_the_permissions_of_any_new_file(tmp_path):
    """safetensors creates its files 0600; a teacher's shared checkpoint must be readable by the students."""
    import os
    umask = os.umask(0o022)
    os.umask(umask)
    folder = save_pretrained(random_model(False, False), tmp_path / "ckpt", max_shard_size="30KB")
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    assert set(modes.values()) == {0o666 & ~umask}, modes
