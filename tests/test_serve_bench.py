"""Chapter 17's serving benchmark (lab): the queue a one-at-a-time server would be, and a whole run against the
tiny random model over HTTP: closed-loop waves and open-loop arrivals give the same greedy tokens, open-loop
requests are sent at their own arrival times, and the figure draws."""
import matplotlib

matplotlib.use("Agg")
import pytest  # noqa: E402

from qwen3_scratch.lab import serve_bench  # noqa: E402
from qwen3_scratch.server import OpenAIServer, ServerThread, build_engine  # noqa: E402
from qwen3_scratch.tokenizer import Qwen3Tokenizer  # noqa: E402


def test_one_at_a_time_queue_by_hand():
    # arrivals 0, 0.1, 0.2 and 5.0; each takes 1 s to serve and 0.01 s to its first token when alone
    waits = serve_bench.one_at_a_time_ttft([0.0, 0.2, 0.1, 5.0], 1.0, 0.01)
    assert waits == pytest.approx([0.01, 0.91, 1.81, 0.01])  # sorted by arrival: 0 waits 0, 0.1 waits 0.9, ...


def test_benchmark_closed_and_open_loop_over_http(one_thread):
    engine = build_engine(serve_bench.tiny_random_model(), max_batch=3, max_model_len=64)
    with ServerThread(OpenAIServer(engine, Qwen3Tokenizer(), "bench").app) as running:
        res = serve_bench.run_benchmark(running.url, "bench", serve_bench.BENCH_PROMPTS[:3], 4, loads=(1.0, 4.0))
    assert res["sequential"]["tokens"] == res["concurrent"]["tokens"] == 12
    assert res["service_rate"] == pytest.approx(1 / res["sequential"]["latency_p50"])
    for w in res["open_loop"]:
        assert w["tokens"] == 12 and w["rate"] == pytest.approx(w["load"] * res["service_rate"])
        starts = [r["start"] for r in w["requests"]]
        assert min(starts) >= 0 and max(starts) > 0, "sent at their own arrival times, not all at once"
        assert w["one_at_a_time_ttft_p50"] >= res["sequential"]["ttft_p50"]
    res["meta"] = {"model": "tiny", "device": "cpu"}
    assert len(serve_bench.plot_benchmark(res).axes) == 3
