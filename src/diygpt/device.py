"""Pick the compute device: cuda, then mps, then cpu, unless the user names one."""

from __future__ import annotations

import torch

from diygpt.errors import ConfigError


def select_device(name: str | None = None) -> torch.device:
    if name is None or name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(
            f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} asked for, but CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {name!r} asked for, but only {torch.cuda.device_count()} GPU(s) exist"
            )
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError(f"device {name!r} asked for, but MPS is not available here")
    elif device.type != "cpu":
        raise ConfigError(f"unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return device
