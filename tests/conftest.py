import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # chapter 21's Triton kernels run on CPU tensors in Triton's interpreter, which is read when triton is imported;
    # transformers and torch.compile import it, so switch it on before any test module (or notebook kernel) starts
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))  # `import hf_ref` from any test


@pytest.fixture(scope="module")
def hf_ckpt(tmp_path_factory):
    """{'dense'|'moe': (transformers model, its save_pretrained folder)}; dense is tied, MoE untied.
    Checkpoints written by transformers itself, for the loading tests (test_weights, test_hub)."""
    from hf_ref import tiny_hf_model
    out = {}
    for kind in ("dense", "moe"):
        ref = tiny_hf_model(moe=kind == "moe", seed=1)
        folder = tmp_path_factory.mktemp(kind)
        ref.save_pretrained(folder)
        out[kind] = (ref, folder)
    return out


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module (restored after): for tiny matrices, and where a server's threads share
    the cores with the test's, one thread is fastest."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
