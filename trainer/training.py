"""`trainer fit`: joint training of denoiser and segmenter, single process or torchrun DDP.

Validation (normal images carved from train/good + synthetic anomalies) chooses the weights and
calibrates thresholds; test data is never read here.
"""

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from trainer import run_dir as files
from trainer.config import ConfigError, TrainConfig
from trainer.data.foreground import foreground_mask, load_user_masks
from trainer.data.mvtec import DataError, read_rgb, scan_mvtec, split_validation
from trainer.data.synthesis import AnomalySynthesizer, list_textures
from trainer.data.training_set import TrainingPairs, ValidationSet
from trainer.model import DiffusionAD
from trainer.objective import JointObjective, draw_step_randomness, lr_factor
from trainer.profiles import get_profile
from trainer.validation import calibrate_run, validate


@dataclass(frozen=True)
class RunLimits:
    """Whichever bound is reached first ends the run; with none, `epochs` of the config."""

    max_steps: int | None = None
    epochs: int | None = None
    time_limit_s: float | None = None


@dataclass(frozen=True)
class Distributed:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def start_distributed() -> Distributed:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; without them this is a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if world > 1:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        if device.type == "cpu":
            # Processes share the cores: split them instead of oversubscribing.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    return Distributed(int(os.environ.get("RANK", "0")), world, device)


@dataclass
class PreparedData:
    train: TrainingPairs
    validation: ValidationSet
    fingerprint: str
    num_train: int
    num_val: int


def fingerprint_files(root: Path, paths: list[Path]) -> str:
    """sha256 over the relative paths and bytes of the training images (provenance)."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def prepare_data(data_dir: Path, cfg: TrainConfig) -> PreparedData:
    """Scan, split, decode and compute foregrounds up front: bad data fails before any output."""
    size = get_profile(cfg.profile).image_size
    folder = scan_mvtec(data_dir, require_test=False)
    train_paths, val_paths = split_validation(folder.train, cfg.val_fraction, cfg.seed)
    user_masks = load_user_masks(cfg.foreground_masks, size) if cfg.foreground_masks else {}
    textures = list_textures(cfg.textures) if cfg.textures else []
    synthesizer = AnomalySynthesizer(size, textures, texture_probability=cfg.texture_probability)

    def load(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
        images = np.stack([read_rgb(p, size) for p in paths])
        fgs = np.stack([user_masks[p.stem] if p.stem in user_masks else foreground_mask(im, cfg.foreground)
                        for p, im in zip(paths, images)])
        return images, fgs

    train_images, train_fg = load(train_paths)
    val_images, val_fg = load(val_paths)
    return PreparedData(
        train=TrainingPairs(train_images, train_fg, synthesizer, cfg.seed),
        validation=ValidationSet(val_images, val_fg, synthesizer, cfg.seed + 1),
        fingerprint=fingerprint_files(data_dir, list(folder.train)),
        num_train=len(train_paths),
        num_val=len(val_paths),
    )


def _autocast(cfg: TrainConfig, device: torch.device):
    if cfg.precision == "fp32" or device.type != "cuda":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if cfg.precision == "bf16" else torch.float16)


def fit(data_dir: Path, run: Path, cfg: TrainConfig, limits: RunLimits, resume: bool = False) -> dict:
    """Train, select on validation, calibrate thresholds. Returns the final validation record."""
    ddp = start_distributed()
    try:
        return _fit(data_dir, run, cfg, limits, resume, ddp)
    finally:
        if ddp.world_size > 1:
            dist.destroy_process_group()


def _fit(data_dir: Path, run: Path, cfg: TrainConfig, limits: RunLimits, resume: bool, ddp: Distributed) -> dict:
    data = prepare_data(data_dir, cfg)
    profile = get_profile(cfg.profile)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = DiffusionAD(profile).to(ddp.device)
    model.denoiser.grad_checkpointing = cfg.grad_checkpointing
    objective = JointObjective(model, cfg.method).to(ddp.device)
    trainable = DistributedDataParallel(objective) if ddp.world_size > 1 else objective
    optimizer = torch.optim.Adam(
        [{"params": model.denoiser.parameters(), "lr": cfg.lr_denoiser},
         {"params": model.segmenter.parameters(), "lr": cfg.lr_segmenter}],
        weight_decay=cfg.weight_decay,
    )
    base_lrs = [cfg.lr_denoiser, cfg.lr_segmenter]
    scaler = torch.amp.GradScaler(enabled=cfg.precision == "fp16" and ddp.device.type == "cuda")
    noise_gen = torch.Generator().manual_seed(cfg.seed * 1000 + ddp.rank)

    sampler = DistributedSampler(data.train, ddp.world_size, ddp.rank, shuffle=True, seed=cfg.seed, drop_last=True)
    steps_per_epoch = len(sampler) // cfg.batch_size
    if steps_per_epoch == 0:
        raise DataError(f"{data_dir}: {data.num_train} training images are fewer than one batch "
                        f"({cfg.batch_size} per process × {ddp.world_size}); lower batch_size")
    total_steps = limits.max_steps
    if total_steps is None and (limits.epochs is not None or limits.time_limit_s is None):
        total_steps = (limits.epochs or cfg.epochs) * steps_per_epoch

    step, elapsed, best = 0, 0.0, {"selection": -1.0}
    if resume:
        state = files.load_checkpoint(run / files.CHECKPOINT)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if len(state["noise_rng"]) != ddp.world_size:
            raise ConfigError(f"{run}: resume with the same number of processes ({len(state['noise_rng'])})")
        noise_gen.set_state(state["noise_rng"][ddp.rank])
        step, elapsed, best = state["step"], state["elapsed_s"], state["best"]
    elif ddp.is_main:
        files.write_json(run / files.CONFIG, {
            "train": cfg.model_dump(mode="json"),
            "data": {"path": str(data_dir.resolve()), "fingerprint": data.fingerprint,
                     "train_images": data.num_train, "validation_images": data.num_val},
            "world_size": ddp.world_size,
        })

    def progress() -> float:
        by_steps = step / total_steps if total_steps else 0.0
        by_time = elapsed / limits.time_limit_s if limits.time_limit_s else 0.0
        return max(by_steps, by_time)

    def save_state() -> None:
        rng = [torch.zeros_like(noise_gen.get_state()) for _ in range(ddp.world_size)]
        if ddp.world_size > 1:
            dist.all_gather(rng, noise_gen.get_state())
        else:
            rng = [noise_gen.get_state()]
        if ddp.is_main:
            files.save_checkpoint(run / files.CHECKPOINT, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "elapsed_s": elapsed, "best": best, "noise_rng": rng,
            })

    def run_validation() -> None:
        nonlocal best
        if ddp.is_main:
            record = validate(model, cfg.method, data.validation, ddp.device)
            record.update(step=step, elapsed_s=round(elapsed, 1))
            if record["selection"] > best["selection"]:
                best = record
                files.save_weights(run / files.WEIGHTS, model)
            files.append_log(run, {"validation": record})
            bar.write(f"step {step}: validation image AUROC {record['image_auroc']:.3f}, "
                      f"pixel AP {record['pixel_ap']:.3f} (best at step {best['step']})")
        if ddp.world_size > 1:
            dist.barrier()

    bar = tqdm(total=total_steps, initial=step, disable=not ddp.is_main, unit="step", dynamic_ncols=True)
    images_per_step = 2 * cfg.batch_size * ddp.world_size
    size = profile.image_size
    done = False
    while not done:
        epoch, skip = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch)
        data.train.set_epoch(epoch)
        # Resuming mid-epoch: skip the indices already consumed, without synthesising them.
        indices = list(sampler)[skip * cfg.batch_size:]
        loader = DataLoader(data.train, batch_size=cfg.batch_size, sampler=indices, drop_last=True,
                            num_workers=cfg.num_workers, persistent_workers=False)
        for batch in loader:
            tick = time.perf_counter()
            model.train()
            lr_scale = lr_factor(progress(), cfg.warmup_fraction, cfg.final_lr_fraction)
            for group, base_lr in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base_lr * lr_scale
            t_s, t_b, eps_s, eps_b = draw_step_randomness(2 * cfg.batch_size, (3, size, size), cfg.method, noise_gen)
            inputs = [batch["normal"], batch["anomalous"], batch["mask"], t_s, t_b, eps_s, eps_b]
            with _autocast(cfg, ddp.device):
                total, l_noise, l_mask = trainable(*(x.to(ddp.device, non_blocking=True) for x in inputs))
            if not torch.isfinite(total):
                raise FloatingPointError(f"loss became {total.item()} at step {step}; lower the learning rates")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            scaler.step(optimizer)
            scaler.update()
            step += 1
            step_time = time.perf_counter() - tick
            elapsed += step_time
            bar.update(1)
            bar.set_postfix(loss=f"{total.item():.4f}", noise=f"{l_noise.item():.4f}", mask=f"{l_mask.item():.4f}",
                            img_s=f"{images_per_step / step_time:.1f}", lr=f"{lr_scale:.2f}")
            if ddp.is_main and step % 10 == 0:
                files.append_log(run, {"step": step, "loss": total.item(), "noise": l_noise.item(),
                                       "mask": l_mask.item(), "lr_scale": lr_scale, "elapsed_s": round(elapsed, 2)})
            if limits.time_limit_s and ddp.world_size > 1:
                # Every rank must agree to stop on the same step.
                flag = torch.tensor([elapsed >= limits.time_limit_s], dtype=torch.float32)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                time_up = bool(flag.item())
            else:
                time_up = bool(limits.time_limit_s and elapsed >= limits.time_limit_s)
            done = time_up or (total_steps is not None and step >= total_steps)
            if done or step % cfg.val_every == 0:
                run_validation()
            if done or step % cfg.checkpoint_every == 0:
                save_state()
            if done:
                break
    bar.close()
    result = best
    if ddp.is_main:
        files.load_weights(run / files.WEIGHTS, model)
        thresholds = calibrate_run(model, cfg, data.validation, ddp.device)
        files.write_json(run / files.THRESHOLDS, thresholds)
        result = {**best, "thresholds": thresholds}
    return result
