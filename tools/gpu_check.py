"""The steps of tools/gpu_check.sh (issue 7's GPU check), one subcommand each, so the shell script can put a
timeout on every step:

    python tools/gpu_check.py checkpoint --cache DIR [--tiny]     a random Qwen3-0.6B-shaped checkpoint, bf16, in
                                                                  the Hugging Face cache layout (models--Qwen--...)
    python tools/gpu_check.py decode --out STEM [--device cuda] [--batch 1 8] [--compile on|off] [--tiny]
                                                                  plain / fast / transformers decode side by side
    python tools/gpu_check.py flash --out STEM [--device cuda] [--tiny]
                                                                  chapter 21's Triton kernels beside SDPA's flash
                                                                  backend: error vs fp32, TFLOP/s, decode GB/s

`--tiny` is the CPU smoke test's shape (seconds on a laptop); without it, Qwen3-0.6B's. Weights are random: the
timings are real, the tokens are meaningless (but must agree between the paths in fp32)."""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO_ID = "Qwen/Qwen3-0.6B"  # where the random checkpoint pretends to come from
REVISION = "0" * 40  # a fake commit hash: the cache layout needs one
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=512)


def write_checkpoint(cache: Path, tiny: bool) -> Path:
    """models--Qwen--Qwen3-0.6B/{refs/main, snapshots/<rev>/config.json + model.safetensors}, as the Hub writes it."""
    from qwen3_scratch.config import Qwen3Config
    from qwen3_scratch.model import Qwen3Model
    from qwen3_scratch.weights import save_pretrained
    cfg = Qwen3Config(**TINY) if tiny else Qwen3Config.from_preset("0.6B")
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = Qwen3Model(cfg).to(torch.bfloat16)
    repo = cache / ("models--" + REPO_ID.replace("/", "--"))
    snapshot = repo / "snapshots" / REVISION
    save_pretrained(model, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(REVISION)
    print(f"wrote {snapshot} ({sum(p.stat().st_size for p in snapshot.iterdir()) / 2**20:.0f} MiB)")
    return snapshot


def decode(out: str, device: str, batches, compile: bool, tiny: bool, new_tokens: int) -> dict:
    """Load the checkpoint through the Hub resolver (offline, bf16 on CUDA), then time every generate path at each
    batch size in one round-robin; write <out>.json and <out>.csv after each batch size (a timeout keeps the rest)."""
    from qwen3_scratch.lab.bench import generate_paths, result_row, spread, time_samples, weight_bytes_per_token
    from qwen3_scratch.utils import default_threads, device_name
    from qwen3_scratch.weights import load_pretrained
    torch.set_num_threads(default_threads())  # the CLI's and the notebooks' default (QWEN3_SCRATCH_THREADS)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    t0 = time.perf_counter()
    model = load_pretrained(REPO_ID, dtype=dtype, device=device)
    load_s = time.perf_counter() - t0
    p = next(model.parameters())
    assert p.dtype == dtype and p.device.type == device, f"loaded as {p.dtype} on {p.device}"
    meta = {"device": device, "device_name": device_name(device), "dtype": str(dtype).removeprefix("torch."),
            "torch": torch.__version__, "weights": f"random, {REPO_ID} shape" + (" (tiny)" if tiny else ""),
            "load_seconds": load_s, "weight_bytes": weight_bytes_per_token(model), "new_tokens": new_tokens,
            "compile": compile, "command": " ".join(sys.argv)}
    print(f"loaded {REPO_ID} (random) in {load_s:.1f} s: {meta['device_name']}, {meta['dtype']}", flush=True)
    rows = []
    for B in batches:
        ids = torch.randint(model.config.vocab_size, (B, 16), generator=torch.Generator().manual_seed(B)).to(device)
        runs = generate_paths(model, ids, new_tokens, compile=compile, with_hf=True)
        samples = time_samples(runs, device, warmup=1, repeats=3 if tiny else 5)
        ref = runs["ours: plain generate (ch. 9)"]()
        for name, t in samples.items():
            sp = spread([B * new_tokens / s for s in t])
            rows.append(result_row("decode", "tokens_per_second", sp["median"], name, context=B, unit="tok/s",
                                   spread=sp))
            same = torch.equal(runs[name]()[:, :ref.shape[1]], ref)
            rows.append(result_row("decode", "same_tokens_as_plain", int(same), name, context=B))
            print(f"batch {B:>2} | {name:<40} {sp['median']:9.1f} tok/s (IQR {sp['q1']:.1f}-{sp['q3']:.1f}) "
                  f"same tokens: {same}", flush=True)
        _write(out, {"meta": meta, "rows": rows})
    return {"meta": meta, "rows": rows}


def flash(out: str, device: str, tiny: bool) -> dict:
    """Chapter 21's kernels at Qwen3-0.6B's attention shape (16 query heads, 8 KV heads, head_dim 128, bf16): max error
    against float64 attention beside SDPA's, causal-forward TFLOP/s for T = 512 ... 16,384 and decode-step time for
    caches of those lengths, both beside SDPA's flash backend. --tiny: a few seconds on a CPU, in Triton's interpreter.
    Writes <out>.json and <out>.csv after each step (a timeout keeps the rest)."""
    from qwen3_scratch.lab.flash_bench import kernel_rows
    from qwen3_scratch.triton_attention import TRITON_VERSION
    from qwen3_scratch.utils import default_threads, device_name
    torch.set_num_threads(default_threads())
    shape = dict(lengths=(64, 128), heads=4, kv_heads=2, head_dim=64, dtype=torch.float32, tokens=128, check_len=64,
                 warmup=1, repeats=2) if tiny else {}
    dtype = shape.get("dtype", torch.bfloat16)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    meta = {"device": device, "device_name": device_name(device), "dtype": str(dtype).removeprefix("torch."),
            "torch": torch.__version__, "triton": triton_version, "triton_pinned": TRITON_VERSION,
            "interpreted": os.environ.get("TRITON_INTERPRET") == "1", "shape": "tiny" if tiny else
            "Qwen3-0.6B attention: H16 K8 Dh128", "command": " ".join(sys.argv)}
    print(f"flash kernels on {meta['device_name']} (torch {torch.__version__}, triton {triton_version})", flush=True)
    rows = kernel_rows(device, log=lambda line: print(line, flush=True),
                       checkpoint=lambda rows: _write(out, {"meta": meta, "rows": rows}), **shape)
    _write(out, {"meta": meta, "rows": rows})
    return {"meta": meta, "rows": rows}


def _write(stem: str, results: dict) -> None:
    from qwen3_scratch.lab.bench_run import CSV_FIELDS
    import csv
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    with stem.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in results["rows"]:
            writer.writerow({k: r.get(k, results["meta"].get(k)) for k in CSV_FIELDS})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="tools/gpu_check.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="step", required=True)
    ck = sub.add_parser("checkpoint")
    ck.add_argument("--cache", required=True, type=Path, help="the HF_HUB_CACHE folder to write into")
    ck.add_argument("--tiny", action="store_true")
    de = sub.add_parser("decode")
    de.add_argument("--out", required=True, help="path without suffix: writes OUT.json and OUT.csv")
    de.add_argument("--device", default="cuda")
    de.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    de.add_argument("--compile", choices=["on", "off"], default="on")
    de.add_argument("--new-tokens", type=int, default=128)
    de.add_argument("--tiny", action="store_true")
    fl = sub.add_parser("flash")
    fl.add_argument("--out", required=True, help="path without suffix: writes OUT.json and OUT.csv")
    fl.add_argument("--device", default="cuda")
    fl.add_argument("--tiny", action="store_true")
    args = ap.parse_args(argv)
    if args.step == "checkpoint":
        write_checkpoint(args.cache, args.tiny)
    else:
        if args.device == "cuda" and not torch.cuda.is_available():
            print("error: no CUDA device (run with --cpu-smoke to test the script on a CPU)", file=sys.stderr)
            return 1
        if args.step == "flash":
            flash(args.out, args.device, args.tiny)
        else:
            decode(args.out, args.device, args.batch, args.compile == "on", args.tiny, args.new_tokens)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
