"""Hardening of checkpoint loading (qwen3_scratch.weights): all-or-nothing loads, index entries that escape the
folder, config.json checked against the safetensors headers before anything is built, non-finite weights, each
header read once per load, and a property-based fuzz test (hypothesis) over headers, index and config."""
import json
import re
import shutil
import struct
import warnings

import pytest
import safetensors
import torch
from hf_ref import tiny_kwargs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qwen3_scratch.checkpoint as checkpoint
import qwen3_scratch.weights as weights
from qwen3_scratch.config import Qwen3Config
from qwen3_scratch.model import Qwen3Model
from qwen3_scratch.checkpoint import CheckpointError, checkpoint_files, expected_tensors
from qwen3_scratch.weights import load_pretrained, load_state_dict_strict, save_pretrained


def random_model(moe=False, tied=True, seed=0, **over):
    torch.manual_seed(seed)
    kw = tiny_kwargs(moe, tie_word_embeddings=tied, model_type="qwen3_moe" if moe else "qwen3", **over)
    model = Qwen3Model(Qwen3Config(**kw))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def unchanged(model, before):
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A sharded untied dense checkpoint (several shards) and the model it was saved from."""
    model = random_model(tied=False, seed=3)
    folder = save_pretrained(model, tmp_path_factory.mktemp("sharded"), max_shard_size="30KB")
    return folder, model


def copy(folder, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(folder, dst)
    return dst


def index_of(folder):
    return json.loads((folder / "model.safetensors.index.json").read_text())


def write_index(folder, index):
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


# ---------------------------------------------------------------- item 5: all or nothing
def break_last_shard_for_the_library(folder):
    """Rewrite the last shard so that our header check passes but safetensors refuses to open it (its
    __metadata__ must map strings to strings). Returns the shard's name."""
    last = sorted(set(index_of(folder)["weight_map"].values()))[-1]
    path = folder / last
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header["__metadata__"] = {"format": ["pt"]}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    return last


def test_a_later_bad_shard_leaves_an_existing_model_untouched(sharded, tmp_path):
    folder = copy(sharded[0], tmp_path)
    last = break_last_shard_for_the_library(folder)
    checkpoint.read_safetensors_header(folder / last)  # our own check is happy with it
    model = random_model(tied=False, seed=7)
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=rf"{last}: unreadable safetensors file"):
        load_state_dict_strict(model, folder, device="cpu")
    assert unchanged(model, before), "a failed load must not replace any parameter"


def test_a_later_bad_shard_leaves_a_meta_model_on_meta(sharded, tmp_path):
    folder = copy(sharded[0], tmp_path)
    break_last_shard_for_the_library(folder)
    with torch.device("meta"):
        model = Qwen3Model(Qwen3Config.from_hf(folder))
    with pytest.raises(CheckpointError, match="unreadable safetensors file"):
        load_state_dict_strict(model, folder, device="cpu")
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("entry", ["../outside.safetensors", "/tmp/outside.safetensors", "sub/../../x.safetensors",
                                   "C:\\x.safetensors", ""])
def test_weight_map_entries_must_stay_in_the_folder(sharded, tmp_path, entry):
    folder = copy(sharded[0], tmp_path)
    index = index_of(folder)
    name, shard = next(iter(index["weight_map"].items()))
    shutil.copy(folder / shard, tmp_path / "outside.safetensors")  # a loadable file outside the checkpoint
    index["weight_map"][name] = entry
    write_index(folder, index)
    with pytest.raises(CheckpointError, match=re.escape(f"index.json: weight_map[{name!r}] = {json.dumps(entry)} is "
                                                        "not a file name inside the checkpoint folder")):
        checkpoint_files(folder)


@pytest.mark.parametrize("index, what", [
    ({"weight_map": ["model.safetensors"]}, "weight_map must be an object"),
    ({"weight_map": {"model.norm.weight": 3}}, r"weight_map\['model.norm.weight'\] = 3"),
    ([1, 2], r"expected a JSON object \{...\}, found list"),
    ({"metadata": {}}, r"not a safetensors index \(no weight_map\)"),
])
def test_malformed_index_is_a_checkpoint_error(sharded, tmp_path, index, what):
    folder = copy(sharded[0], tmp_path)
    write_index(folder, index)
    with pytest.raises(CheckpointError, match=what):
        load_pretrained(folder, device="cpu")


# ---------------------------------------------------------------- reading each header once
def test_each_header_is_read_once_and_each_shard_opened_once(sharded, monkeypatch):
    folder, model = sharded
    reads, opens = [], []
    real_read, real_open = checkpoint.read_safetensors_header, safetensors.safe_open
    monkeypatch.setattr(checkpoint, "read_safetensors_header", lambda p: reads.append(p.name) or real_read(p))
    monkeypatch.setattr(safetensors, "safe_open", lambda p, *a, **k: opens.append(p) or real_open(p, *a, **k))
    loaded = load_pretrained(folder, device="cpu")
    shards = sorted(set(index_of(folder)["weight_map"].values()))
    assert sorted(reads) == shards, f"headers read: {sorted(reads)}"
    assert len(opens) == len(shards), f"shards opened: {opens}"
    assert unchanged(loaded, model.state_dict())


# ---------------------------------------------------------------- item 2: config.json against the headers
@pytest.fixture
def no_build(monkeypatch):
    """Building the model (on meta or anywhere) before config.json is checked against the headers fails."""
    def refuse(config):
        raise AssertionError(f"Qwen3Model built before config.json was checked against the headers: {config}")
    monkeypatch.setattr(weights, "Qwen3Model", refuse)


@pytest.mark.parametrize("key, value, culprit", [
    ("head_dim", 2_000_000_000, r"q_proj\.weight \(in model-\d+-of-\d+\.safetensors\): checkpoint \(64, 64\) vs model \(8000000000, 64\)"),
    ("num_hidden_layers", 1_000_000, r"config\.json describes 11,000,003 tensors.* holds 36"),
    ("num_hidden_layers", 4, r"missing tensors .*model\.layers\.3\."),
    ("vocab_size", 10**12, r"embed_tokens\.weight \(in .*\): checkpoint \(256, 64\) vs model \(1000000000000, 64\)"),
    ("num_experts", 10**9, r"describes .* tensors"),
])
def test_config_is_checked_against_the_headers_before_building(sharded, tmp_path, no_build, key, value, culprit):
    folder = copy(sharded[0], tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg[key] = value
    if key == "num_experts":
        cfg.update(model_type="qwen3_moe", num_experts_per_tok=2, moe_intermediate_size=32)
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=culprit):
        load_pretrained(folder, device="cpu")


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_expected_tensors_from_config_equals_the_skeleton(moe, tied):
    cfg = Qwen3Config(**tiny_kwargs(moe, tie_word_embeddings=tied, model_type="qwen3_moe" if moe else "qwen3",
                                    **(dict(decoder_sparse_step=2) if moe else {})))
    with torch.device("meta"):
        skeleton = Qwen3Model(cfg)
    assert expected_tensors(cfg) == expected_tensors(skeleton)
    assert weights._count_tensors(cfg) == len(expected_tensors(skeleton))


# ---------------------------------------------------------------- item 8: non-finite weights
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_finite_weights_are_named(tmp_path, dtype):
    model = random_model(tied=False).to(dtype)
    with torch.no_grad():
        model.layers[1].mlp.up_proj.weight[0, :3] = float("nan")
        model.layers[2].self_attn.k_norm.weight[5] = float("inf")
    folder = save_pretrained(model, tmp_path)
    with pytest.warns(UserWarning) as record:
        load_pretrained(folder, device="cpu")
    text = "\n".join(str(w.message) for w in record)
    assert "model.layers.1.mlp.up_proj.weight holds 3 NaN" in text, text
    assert "model.layers.2.self_attn.k_norm.weight holds 1 inf" in text, text
    assert "model.layers.0" not in text, text


def test_large_finite_weights_do_not_warn(tmp_path):
    model = random_model(tied=False).to(torch.bfloat16)
    with torch.no_grad():
        model.layers[0].mlp.down_proj.weight.fill_(3e38)  # their sum overflows, the values do not
    folder = save_pretrained(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_pretrained(folder, dtype="auto", device="cpu")


# ---------------------------------------------------------------- property-based fuzz test
@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    """A valid tiny sharded MoE checkpoint (2 layers) to mutate, and its model."""
    model = random_model(moe=True, tied=False, seed=5, num_hidden_layers=2, mlp_only_layers=[1], num_experts=4)
    folder = save_pretrained(model, tmp_path_factory.mktemp("fuzz_src"), max_shard_size="20KB")
    return folder, model


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)
CONFIG_KEYS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta",
               "tie_word_embeddings", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
               "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", "model_type", "rope_scaling",
               "rope_parameters", "torch_dtype", "dtype", "quantization_config", "hidden_act", "eos_token_id"]
HEADER_FIELDS = ["dtype", "shape", "data_offsets"]


def _mutate_config(folder, data):
    cfg = json.loads((folder / "config.json").read_text())
    for _ in range(data.draw(st.integers(1, 3), label="config edits")):
        key = data.draw(st.sampled_from(CONFIG_KEYS), label="config key")
        if data.draw(st.booleans(), label="delete"):
            cfg.pop(key, None)
        else:
            cfg[key] = data.draw(json_values | st.integers(0, 300), label=f"config[{key}]")
    (folder / "config.json").write_text(json.dumps(cfg))


def _mutate_index(folder, data):
    try:
        index = index_of(folder)
        wm = index["weight_map"]
        assert isinstance(wm, dict) and wm
    except Exception:  # an earlier edit broke it already
        return
    kind = data.draw(st.sampled_from(["value", "key", "drop", "weight_map", "raw"]), label="index edit")
    name = data.draw(st.sampled_from(sorted(wm)), label="index entry")
    if kind == "value":
        wm[name] = data.draw(st.sampled_from(sorted(map(str, wm.values())) + [
            "../x.safetensors", "/etc/passwd", "", "model.safetensors", "config.json"]) | json_values, label="file")
    elif kind == "key":
        wm[data.draw(st.text(max_size=12), label="new key")] = wm.pop(name)
    elif kind == "drop":
        wm.pop(name)
    elif kind == "weight_map":
        index["weight_map"] = data.draw(json_values, label="weight_map")
    if kind == "raw":
        raw = json.dumps(index).encode()
        cut = data.draw(st.integers(0, len(raw)), label="cut")
        (folder / "model.safetensors.index.json").write_bytes(raw[:cut] + data.draw(st.binary(max_size=4)))
    else:
        write_index(folder, index)


def _mutate_header(folder, data):
    path = data.draw(st.sampled_from(sorted(folder.glob("model-*.safetensors"))), label="shard")
    blob = path.read_bytes()
    try:
        (n,) = struct.unpack("<Q", blob[:8])
        header, body = json.loads(blob[8:8 + n]), blob[8 + n:]
        names = sorted(k for k in header if k != "__metadata__")
        assert names
    except Exception:  # an earlier edit broke it already
        return
    kind = data.draw(st.sampled_from(["field", "rename", "drop", "length", "bytes", "body", "metadata"]),
                     label="header edit")
    name = data.draw(st.sampled_from(names), label="tensor")
    if kind == "field":
        field = data.draw(st.sampled_from(HEADER_FIELDS), label="field")
        header[name][field] = data.draw(
            json_values | st.sampled_from(["F16", "BF16", "F64", "I8", "U8", "F8_E4M3", "BOOL"])
            | st.lists(st.integers(-2, 2**40), max_size=3), label=f"{name}.{field}")
    elif kind == "rename":
        header[data.draw(st.text(max_size=30), label="new name")] = header.pop(name)
    elif kind == "drop":
        header.pop(name)
    elif kind == "metadata":
        header["__metadata__"] = data.draw(json_values, label="metadata")
    raw = json.dumps(header).encode()
    n_new = len(raw)
    if kind == "length":
        n_new = data.draw(st.integers(0, 2**64 - 1), label="header length")
    if kind == "bytes":
        raw = bytearray(raw)
        i = data.draw(st.integers(0, len(raw) - 1), label="byte")
        raw[i] = data.draw(st.integers(0, 255), label="value")
        raw = bytes(raw)
    if kind == "body":
        body = body[:data.draw(st.integers(0, len(body)), label="keep")] + data.draw(st.binary(max_size=8))
    path.write_bytes(struct.pack("<Q", n_new) + raw + body)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_only_checkpoint_errors_and_nothing_half_loaded(small_ckpt, tmp_path_factory, data):
    src, source_model = small_ckpt
    folder = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(src, folder, dirs_exist_ok=True)
    for part in data.draw(st.lists(st.sampled_from(["config", "index", "header"]), min_size=1, max_size=3),
                          label="parts"):
        {"config": _mutate_config, "index": _mutate_index, "header": _mutate_header}[part](folder, data)
    target = random_model(moe=True, tied=False, seed=9, num_hidden_layers=2, mlp_only_layers=[1], num_experts=4)
    before = snapshot(target)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # untied heads, non-finite values: warnings are allowed
        try:
            load_state_dict_strict(target, folder, device="cpu")
        except ValueError:  # CheckpointError is a ValueError
            assert unchanged(target, before), "a failed load must leave the model as it was"
        try:
            loaded = load_pretrained(folder, device="cpu")
        except ValueError:
            loaded = None
    if loaded is not None:  # whatever was accepted is a complete model, nothing left on meta
        assert not any(t.is_meta for t in list(loaded.parameters()) + list(loaded.buffers()))
    shutil.rmtree(folder)
