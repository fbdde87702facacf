"""`trainer pretrain`: the denoiser weights the product ships, learned once on procedural pictures
(trainer/data/procedural.py), so that a part's own training budget goes to what is specific to it
and not to learning what noise is. `trainer fit` starts its denoiser from them (`denoiser_start`).

The loss is the joint objective's noise term on both scales (t_s in [0, τ), t_b in [τ, T)), the
schedule the same warm-up + cosine, the arithmetic the same `precision = "auto"`.
"""

import hashlib
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset

from trainer.config import ConfigError
from trainer.data.color import CHANNELS
from trainer.data.procedural import procedural_image
from trainer.data.training_set import to_model_range
from trainer.diffusion import linear_alpha_bars
from trainer.losses import noise_loss
from trainer.method import MethodConfig
from trainer.nets.denoiser import Denoiser
from trainer.objective import denoise_both_scales, draw_step_randomness, lr_factor
from trainer.profiles import get_profile
from trainer.precision import autocast, resolve_precision

SHIPPED_DIR = Path(__file__).resolve().parent / "weights"
BATCH = 16
WARMUP_FRACTION = 0.02
FINAL_LR_FRACTION = 0.05


def shipped_denoiser(profile: str, color: str) -> Path:
    """Where the product keeps the pretrained denoiser of a profile and colour mode (it may not exist:
    only `small` is shipped; `paper` would need GPU-days, `tiny` is for tests)."""
    return SHIPPED_DIR / f"denoiser-{profile}-{color}.safetensors"


class ProceduralImages(Dataset):
    """Item i: procedural picture i of the seed, in model range; the same for any worker layout."""

    def __init__(self, size: int, channels: int, seed: int, length: int):
        self.size, self.channels, self.seed, self.length = size, channels, seed, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        return to_model_range(procedural_image(self.size, np.random.default_rng([self.seed, index])), self.channels)


def pretrain(profile_name: str, color: str, time_limit_s: float, out: Path, seed: int = 0) -> dict:
    """Train a denoiser on procedural pictures for `time_limit_s` of wall time; save it to `out` with
    what it was trained on in the file's metadata. Returns that metadata."""
    profile, channels, method = get_profile(profile_name), CHANNELS[color], MethodConfig()
    precision, why = resolve_precision("auto", torch.device("cpu"))
    print(f"precision: {precision} ({why})")
    torch.manual_seed(seed)
    denoiser = Denoiser(profile.denoiser, profile.image_size, channels).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=profile.learning_rate)
    alpha_bars = linear_alpha_bars(method.num_timesteps, method.beta_start, method.beta_end).float()
    noise_gen = torch.Generator().manual_seed(seed)
    images = ProceduralImages(profile.image_size, channels, seed, length=2**31 - 1)
    shape = (channels, profile.image_size, profile.image_size)
    step, start, loss = 0, time.perf_counter(), float("nan")
    for batch in DataLoader(images, batch_size=BATCH, num_workers=1):
        elapsed = time.perf_counter() - start
        if elapsed >= time_limit_s:
            break
        for group in optimizer.param_groups:
            group["lr"] = profile.learning_rate * lr_factor(elapsed / time_limit_s, WARMUP_FRACTION, FINAL_LR_FRACTION)
        t_s, t_b, eps_s, eps_b = draw_step_randomness(BATCH, shape, method, noise_gen)
        with autocast(precision, torch.device("cpu")):
            _, _, eps_s_hat, eps_b_hat = denoise_both_scales(denoiser, batch, t_s, t_b, eps_s, eps_b, alpha_bars)
            total = noise_loss(eps_s, eps_s_hat) + noise_loss(eps_b, eps_b_hat)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        step, loss = step + 1, total.item()
        if step % 50 == 0:
            print(f"step {step}: noise loss {loss:.4f}, {elapsed / 60:.1f} min", flush=True)
    metadata = {"profile": profile_name, "color": color, "steps": str(step), "images": str(step * BATCH),
                "minutes": f"{(time.perf_counter() - start) / 60:.1f}", "final_noise_loss": f"{loss:.4f}",
                "precision": precision, "seed": str(seed), "torch": torch.__version__}
    # fp16 halves the shipped file (6 MB for small); it is only a starting point, loaded into fp32 weights and trained on.
    state = {k: v.detach().half().contiguous() for k, v in denoiser.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out), metadata=metadata)
    return metadata


def load_pretrained(denoiser: Denoiser, path: Path) -> str:
    """Copy the weights at `path` into `denoiser` (in its dtype); their sha256. A file that does not
    fit the denoiser's profile and colour mode is a ConfigError naming both."""
    state = load_file(str(path))
    try:
        denoiser.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as err:
        raise ConfigError(f"{path}: these denoiser weights do not fit this model ({str(err).splitlines()[0]})") from None
    return hashlib.sha256(path.read_bytes()).hexdigest()
