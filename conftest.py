"""pytest's settings for every run, tests and notebooks alike (`pytest notebooks/12_pretraining.ipynb` too):
no network, no windows, and the short, checked version of chapters that train or time things."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("QWEN3_SCRATCH_QUICK", "1")  # see qwen3_scratch.utils.quick_run

if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n 2`: two workers share the cores, one torch thread each
    import torch

    torch.set_num_threads(1)
