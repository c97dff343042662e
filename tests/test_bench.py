"""Chapter 11's benchmark module: the KV-bytes formula, measured == computed, the roofline arithmetic, porting
weights to transformers, and the results writer behind `python -m qwen3_scratch bench`. No timed assertions."""
import csv
import dataclasses
import json

import pytest
import torch

from hf_ref import tiny_kwargs
from qwen3_scratch.lab.bench_run import CSV_FIELDS, main
from qwen3_scratch.lab.bench import (attention_variants, bench_config, cache_vs_nocache, decode_latency,
                                     measure_kv_cache_bytes, measure_read_bandwidth, random_model,
                                     roofline_bandwidth, roofline_seconds, spread, weight_bytes_per_token)
from qwen3_scratch.hf_port import to_transformers
from qwen3_scratch.kv_cache import kv_bytes_per_token, kv_cache_bytes
from qwen3_scratch.config import Qwen3Config


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: one torch thread


def test_kv_bytes_formula_at_qwen3_06b():
    v = attention_variants(Qwen3Config.from_preset("0.6B"))
    assert {n: c.num_key_value_heads for n, c in v.items()} == {"MHA": 16, "GQA": 8, "MQA": 1}
    assert kv_bytes_per_token(v["GQA"], torch.bfloat16) == 2 * 28 * 8 * 128 * 2 == 114_688
    assert kv_bytes_per_token(v["MHA"], torch.bfloat16) == 229_376
    assert kv_bytes_per_token(v["MQA"], torch.bfloat16) == 14_336
    assert kv_bytes_per_token(v["GQA"], torch.float32) == 2 * 114_688
    assert kv_cache_bytes(v["GQA"], 32768) == 114_688 * 32768
    assert kv_cache_bytes(v["GQA"], 1024, batch_size=4) == 4 * 1024 * 114_688


def test_variants_change_only_the_kv_heads():
    cfg = bench_config(small=True)
    for c in attention_variants(cfg).values():
        same = {f.name: getattr(c, f.name) for f in dataclasses.fields(c) if f.name != "num_key_value_heads"}
        assert same == {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "num_key_value_heads"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_measured_cpu_bytes_equal_computed(dtype):
    for c in attention_variants(bench_config(small=True)).values():
        for ctx in (1, 100, 1024):
            assert measure_kv_cache_bytes(c, ctx, dtype, "cpu") == kv_cache_bytes(c, ctx, dtype=dtype)


def test_weight_bytes_count_a_tied_embedding_once_and_skip_an_untied_one():
    tied = random_model(Qwen3Config(**tiny_kwargs()))
    n_tied = sum(p.numel() for p in tied.parameters())
    assert weight_bytes_per_token(tied) == 4 * n_tied
    assert tied.lm_head.weight is tied.embed_tokens.weight, "tiny_kwargs ties the embedding"
    untied = random_model(Qwen3Config(**tiny_kwargs(tie_word_embeddings=False)))
    emb = untied.embed_tokens.weight.numel()
    assert weight_bytes_per_token(untied) == 4 * (sum(p.numel() for p in untied.parameters()) - emb)
    assert roofline_seconds(3e9, 1e9, 2e12) == pytest.approx(2e-3)


def test_random_model_keeps_rope_frequencies_in_fp32():
    m = random_model(Qwen3Config(**tiny_kwargs()), dtype=torch.bfloat16)
    assert m.lm_head.weight.dtype == torch.bfloat16
    assert m.rotary.inv_freq.dtype == torch.float32


def test_to_transformers_gives_the_same_logits():
    model = random_model(Qwen3Config(**tiny_kwargs()))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    hf = to_transformers(model)
    ids = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=1e-5, atol=1e-5)


def test_decode_latency_and_cache_vs_nocache_shapes():
    model = random_model(Qwen3Config(**tiny_kwargs()))
    lat = decode_latency(model, (4, 16), warmup=1, repeats=3)
    assert list(lat) == [4, 16] and all(s > 0 for s in lat.values())
    cvn = cache_vs_nocache(model, prompt_len=5, max_new_tokens=6, repeats=2)
    assert len(cvn["cache"]) == len(cvn["no_cache"]) == 6
    assert cvn["total_cache"] == pytest.approx(sum(cvn["cache"]))
    assert cvn["speedup"] == pytest.approx(cvn["total_no_cache"] / cvn["total_cache"])


def test_main_writes_json_csv_and_figures(tmp_path):
    figs = tmp_path / "figs"
    res = main(["--quick", "--device", "cpu", "--compile", "off", "--out", str(tmp_path), "--figures", str(figs)])
    data = json.loads((tmp_path / "bench_cpu.json").read_text())
    meta = data["meta"]
    for key in ("device", "device_name", "dtype", "torch", "config", "shapes", "weights", "settings"):
        assert key in meta, f"meta lacks {key}"
    assert meta["device"] == "cpu" and meta["dtype"] == "float32" and meta["device_name"].startswith("CPU")
    rows = data["rows"]
    assert len(rows) == len(res["rows"])
    kinds = {(r["experiment"], r["metric"]) for r in rows}
    for needed in [("kv_bytes", "bytes_per_token"), ("kv_bytes", "measured"), ("decode_latency", "seconds_per_token"),
                   ("decode_latency", "roofline_fraction"), ("cache_vs_nocache", "speedup"),
                   ("bandwidth", "read_bandwidth"), ("bandwidth", "roofline_bandwidth"),
                   ("fast_path", "tokens_per_second"),
                   ("fast_path", "speedup_vs_plain"), ("fast_path", "speedup_vs_best_transformers")]:
        assert needed in kinds, f"no {needed} row"
    measured = {(r["variant"], r["context"]): r["value"] for r in rows if r["metric"] == "measured"}
    computed = {(r["variant"], r["context"]): r["value"] for r in rows if r["metric"] == "computed"}
    assert measured == computed and len(measured) == 3 * 2
    per_token = {r["variant"]: r["value"] for r in rows
                 if r["metric"] == "bytes_per_token" and r["shape"].startswith("Qwen3-0.6B")}
    assert per_token == {"MHA": 229_376, "GQA": 114_688, "MQA": 14_336}
    same = [r["value"] for r in rows if r["metric"] == "same_tokens_as_plain"]
    assert same and all(v == 1 for v in same), "every generate path should give plain greedy's tokens (fp32)"
    timed = [r for r in rows if r["metric"] in ("tokens_per_second", "seconds_per_token") and r["variant"] != "roofline"]
    assert timed and all(r["min"] <= r["q1"] <= r["value"] <= r["q3"] <= r["max"] for r in timed), \
        "every timing must come with its spread around the median"
    with (tmp_path / "bench_cpu.csv").open() as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == CSV_FIELDS and len(table) == len(rows)
    assert {t["device_name"] for t in table} == {meta["device_name"]} and {t["torch"] for t in table} == {torch.__version__}
    assert sorted(p.name for p in figs.iterdir()) == sorted(
        f"11_{n}.png" for n in ("kv_bytes", "decode_latency", "cache_vs_nocache", "roofline", "fast_path"))


def test_main_with_a_checkpoint_times_only_its_own_kv_heads(tmp_path):
    from qwen3_scratch.model import Qwen3Model
    from qwen3_scratch.weights import save_pretrained
    torch.manual_seed(0)
    save_pretrained(Qwen3Model(Qwen3Config(**tiny_kwargs())), tmp_path / "ckpt")
    res = main(["--quick", "--device", "cpu", "--compile", "off", "--no-hf", "--no-figures",
                "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path)])
    assert res["meta"]["weights"] == str(tmp_path / "ckpt") and res["meta"]["config"]["hidden_size"] == 64
    timed = {r["variant"] for r in res["rows"] if r["experiment"] == "decode_latency"}
    assert timed == {"GQA"}, "a checkpoint has one number of KV heads: only its own variant can be timed"
    same = [r["value"] for r in res["rows"] if r["metric"] == "same_tokens_as_plain"]
    assert same and all(v == 1 for v in same)


def test_spread_and_roofline_bandwidth():
    s = spread([5.0, 1.0, 3.0, 2.0, 4.0])
    assert s == dict(min=1.0, q1=2.0, median=3.0, q3=4.0, max=5.0)
    assert spread([7.0]) == dict(min=7.0, q1=7.0, median=7.0, q3=7.0, max=7.0)
    bws = {2**20: 30e9, 4 * 2**20: 20e9, 16 * 2**20: 10e9}
    assert roofline_bandwidth(bws, 3 * 2**20) == 20e9, "the size nearest the working set (log scale)"
    assert roofline_bandwidth(bws, 100 * 2**20) == 10e9
    measured = measure_read_bandwidth("cpu", [2**16, 2**20], repeats=2)
    assert list(measured) == [2**16, 2**20] and all(b > 1e8 for b in measured.values())


def test_default_output_is_outside_the_repository(tmp_path, monkeypatch):
    """`python -m qwen3_scratch bench` with no --out / --figures writes into ./bench_out, not results/ or figures/."""
    from qwen3_scratch.model import Qwen3Model
    from qwen3_scratch.weights import save_pretrained
    torch.manual_seed(0)
    save_pretrained(Qwen3Model(Qwen3Config(**tiny_kwargs())), tmp_path / "ckpt")  # tiny: seconds, not minutes
    monkeypatch.chdir(tmp_path)
    main(["--quick", "--device", "cpu", "--compile", "off", "--no-hf", "--checkpoint", "ckpt"])
    written = sorted(p.name for p in (tmp_path / "bench_out").iterdir())
    assert "bench_cpu.json" in written and "11_fast_path.png" in written, written
