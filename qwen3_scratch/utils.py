"""Small helpers shared by the chapters: where figures go, which device to use, counting parameters."""
import platform
from pathlib import Path

import torch


def figures_dir() -> Path:
    repo = Path(__file__).resolve().parent.parent / "figures"
    d = repo if repo.is_dir() else Path("figures")
    d.mkdir(parents=True, exist_ok=True)
    return d


def save_figure(fig, name: str, dpi: int = 120) -> Path:
    path = figures_dir() / name
    fig.savefig(path, dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    return path


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def device_name(device=None) -> str:
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type.upper()} ({platform.machine()}, {torch.get_num_threads()} threads)"


def count_parameters(module, unique: bool = True) -> int:
    params = module.parameters() if unique else (p for _, p in module.named_parameters(remove_duplicate=False))
    return sum(p.numel() for p in params)
