"""The lab: each chapter's experiments, one floor above the library. Benchmarks, result tables, figure makers and
the commands that rewrite `results/` live here; they import the library (`qwen3_scratch.*`), and the library never
imports them (tests/test_layers.py walks the imports). Run them through `python -m qwen3_scratch COMMAND`."""
