"""The arithmetic a training run computes in: what `precision = "auto"` means on this machine, and
the autocast context for it."""

import torch

from edge.runtime.cpu_features import station_cpu_features
from trainer.config import ConfigError

# Where bf16 has hardware behind it on a CPU (oneDNN); elsewhere it is emulated, slower than fp32.
NATIVE_BF16_CPU_FEATURES = ("avx512_bf16", "amx_bf16")


def resolve_precision(precision: str, device: torch.device) -> tuple[str, str]:
    """(the precision a run computes in, why). auto: bf16 on a CPU with native bf16, where it was
    measured to train about twice the images per second of fp32 and to reach better figures in the
    same time (README); fp32 elsewhere, GPUs included (not measured here)."""
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("precision fp16 needs a CUDA GPU; on a CPU use bf16 or auto")
    if precision != "auto":
        return precision, "set in the config"
    if device.type == "cpu":
        native = sorted(set(NATIVE_BF16_CPU_FEATURES) & station_cpu_features())
        if native:
            return "bf16", f"auto: this CPU has {' and '.join(native)}"
        return "fp32", f"auto: this CPU has none of {', '.join(NATIVE_BF16_CPU_FEATURES)}"
    return "fp32", "auto: not a CPU"


def autocast(precision: str, device: torch.device):
    """bf16 on GPUs and CPUs (oneDNN; AMX or AVX-512 BF16 where the CPU has them); fp16 (GPUs only,
    see resolve_precision). `precision` is a resolved one, never auto."""
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
