import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("QWEN3_SCRATCH_QUICK", "1")  # chapters that train or time things run their short version
sys.path.insert(0, str(Path(__file__).parent))  # `import hf_ref` from any test
