"""`trainer fit`: joint training of denoiser and segmenter, single process or torchrun DDP.

Validation (normal images carved from train/good + synthetic anomalies) chooses the weights and
calibrates thresholds; test data is never read here.
"""

import hashlib
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from trainer import run_dir as files
from trainer.config import ConfigError, TrainConfig
from trainer.data.color import CHANNELS, GRAY_MAX_COLORED_SHARE, choose_color
from trainer.data.foreground import AUTO_OBJECT_SHARE, choose_foreground, foreground_mask, load_user_masks
from trainer.data.pose import MIN_ROTATION_DEGREES, MIN_SHIFT, choose_pose
from trainer.data.mvtec import DataError, HoldoutSplit, read_rgb, scan_mvtec, split_holdout
from trainer.data.synthesis import AnomalySynthesizer, resolve_textures, texture_source
from trainer.data.training_set import SyntheticDefects, TrainingKeys, TrainingPairs, ValidationSet, fixed_tiles
from trainer.model import DiffusionAD
from trainer.objective import JointObjective, draw_step_randomness, lr_factor
from trainer.precision import autocast, resolve_precision
from trainer.pretrain import load_pretrained, shipped_denoiser
from trainer.profiles import get_profile
from trainer.radar_fit import fit_radar
from trainer.tiling import frame_size
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


# Synthetic defects made on the calibration images for the thresholds' detection ceiling (at least
# one per image): enough that its 10 % quantile rests on ten of them.
CALIBRATION_DEFECTS = 100


@dataclass
class PreparedData:
    train: TrainingPairs
    selection: ValidationSet  # chooses the checkpoint: one tile of each selection image (the images when untiled)
    validation: ValidationSet  # the selection images whole: RADAR's constants, the heads' comparison, max-F1
    calibration: np.ndarray  # uint8 [N, H, W, 3] good images that set the thresholds, and nothing else
    calibration_defects: SyntheticDefects  # made on the calibration images: what the thresholds must still catch
    split: HoldoutSplit
    foreground: dict  # the mode synthesis used and who chose it (config.json)
    textures: dict  # the texture source synthesis used and who chose it (config.json)
    color: dict  # rgb | gray, and who chose it (config.json)
    pose: dict  # the training images' augmentation and who chose it (config.json)
    fingerprint: str

    @property
    def channels(self) -> int:
        return CHANNELS[self.color["mode"]]


def fingerprint_files(root: Path, paths: list[Path]) -> str:
    """sha256 over the relative paths and bytes of the training images (provenance)."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def prepare_data(data_dir: Path, cfg: TrainConfig) -> PreparedData:
    """Scan, split, decode and compute foregrounds up front: bad data fails before any output."""
    tile = get_profile(cfg.profile).image_size
    size = frame_size(tile, cfg.tiles_per_side)  # what inference sees: the training tiles are cut from it
    folder = scan_mvtec(data_dir, require_test=False)
    try:
        split = split_holdout(folder.train, cfg.val_fraction, cfg.calibration_fraction, cfg.seed)
    except ValueError as err:
        raise DataError(f"{data_dir / 'train' / 'good'}: {err}") from None
    train_paths, val_paths = split.train, split.selection
    user_masks = load_user_masks(cfg.foreground_masks, size) if cfg.foreground_masks else {}
    train_images = np.stack([read_rgb(p, size) for p in train_paths])
    val_images = np.stack([read_rgb(p, size) for p in val_paths])
    if cfg.color == "auto":
        color_mode, colored = choose_color(train_images)
        color = {"mode": color_mode, "chosen_by": "auto", "pixels_with_color": round(colored, 4)}
    else:
        color_mode, color = cfg.color, {"mode": cfg.color, "chosen_by": "config"}
    if cfg.foreground == "auto":
        mode, object_share = choose_foreground(train_images)
        foreground = {"mode": mode, "chosen_by": "auto", "images_showing_an_object": round(object_share, 3)}
    else:
        mode, foreground = cfg.foreground, {"mode": cfg.foreground, "chosen_by": "config"}
    # Texture classes always take a texture as anomaly source (METHOD.md); objects only sometimes.
    texture_probability = 1.0 if mode == "texture" else cfg.texture_probability
    source = resolve_textures(cfg.textures, mode)
    textures = {"source": str(source), "chosen_by": "auto" if cfg.textures == "auto" else "config"}
    synthesizer = AnomalySynthesizer(size, texture_source(source, size), texture_probability)
    tile_synthesizer = AnomalySynthesizer(tile, texture_source(source, tile), texture_probability)

    def foregrounds(paths: list[Path], images: np.ndarray) -> np.ndarray:
        return np.stack([user_masks[p.stem] if p.stem in user_masks else foreground_mask(im, mode)
                         for p, im in zip(paths, images)])

    train_fg, val_fg = foregrounds(train_paths, train_images), foregrounds(val_paths, val_images)
    augmentation, pose = choose_pose(cfg.augment, train_images, train_fg, is_object=mode == "object")
    calibration = np.stack([read_rgb(p, size) for p in split.calibration])
    validation = ValidationSet(val_images, val_fg, synthesizer, cfg.seed + 1, CHANNELS[color_mode])
    # Whole frames cost tiles_per_side² tile passes: a tiled model is chosen on one tile of each.
    selection = validation if size == tile else ValidationSet(
        *fixed_tiles(val_images, val_fg, tile, cfg.seed + 3), tile_synthesizer, cfg.seed + 1, CHANNELS[color_mode])
    return PreparedData(
        train=TrainingPairs(train_images, train_fg, tile_synthesizer, cfg.seed, CHANNELS[color_mode], augmentation),
        selection=selection,
        validation=validation,
        calibration=calibration,
        calibration_defects=SyntheticDefects(
            calibration, foregrounds(split.calibration, calibration), synthesizer, cfg.seed + 2,
            CHANNELS[color_mode], max(CALIBRATION_DEFECTS, len(calibration))),
        fingerprint=fingerprint_files(data_dir, list(folder.train)),
        split=split,
        foreground=foreground,
        textures=textures,
        color=color,
        pose=pose,
    )


def start_decisions(data: PreparedData, session: "TrainingSession") -> list[str]:
    """What the run decided for itself before its first step, one line each (config.json keeps them)."""
    lines = [f"precision: {session.precision} ({session.precision_reason})"]
    if data.color["chosen_by"] == "auto":
        lines.append(f"color: {data.color['mode']} ({data.color['pixels_with_color']:.2%} of the training pixels "
                     f"have colour; gray below {GRAY_MAX_COLORED_SHARE:.0%})")
    if data.foreground["chosen_by"] == "auto":
        lines.append(f"foreground: {data.foreground['mode']} ({data.foreground['images_showing_an_object']:.0%} of "
                     f"the training images show an object on a background; object from {AUTO_OBJECT_SHARE:.0%})")
    if data.textures["chosen_by"] == "auto":
        lines.append(f"textures: {data.textures['source']} (auto: procedural on objects, none on textures)")
    if data.pose["chosen_by"] == "auto":
        lines.append(f"augment: {data.pose['mode']} (±{data.pose['degrees']:.0f}°, ±{data.pose['shift']:.1%} of the "
                     f"side; 90 % of the training images lie within {data.pose['rotation_90th_degrees']:.0f}° and "
                     f"{data.pose['shift_90th']:.1%} of their typical pose; augmented from {MIN_ROTATION_DEGREES:.0f}° "
                     f"and {MIN_SHIFT:.0%})")
    start = session.denoiser_start
    lines.append(f"denoiser: from {start['weights']}" if start["weights"] else f"denoiser: from scratch ({start['why']})")
    return lines


def fit(data_dir: Path, run: Path, cfg: TrainConfig, limits: RunLimits, resume: bool = False) -> dict:
    """Train, select on validation, calibrate thresholds. Returns the best validation record
    (with the thresholds, on the main process)."""
    ddp = start_distributed()
    try:
        data = prepare_data(data_dir, cfg)
        session = TrainingSession(data_dir, run, cfg, data, ddp)
        if resume:
            limits = session.restore(limits)
        elif ddp.is_main:
            session.write_config()
        if ddp.is_main:
            print("\n".join(start_decisions(data, session)))
        try:
            session.train(limits)
        except KeyboardInterrupt:
            if ddp.world_size == 1:  # with DDP the peers may be gone: the periodic checkpoint stands
                session.save_checkpoint(limits)
            raise
        return session.finish()
    finally:
        if ddp.world_size > 1:
            dist.destroy_process_group()


class TrainingSession:
    """The state of one run: model, optimiser, step counter and clocks, and how to save them."""

    def __init__(self, data_dir: Path, run: Path, cfg: TrainConfig, data: PreparedData, ddp: Distributed):
        self.data_dir, self.run, self.cfg, self.data, self.ddp = data_dir, run, cfg, data, ddp
        self.size = get_profile(cfg.profile).image_size
        self.precision, self.precision_reason = resolve_precision(cfg.precision, ddp.device)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        # channels_last: oneDNN / cuDNN convolutions run faster on NHWC (≈1.2× per CPU step here).
        self.model = DiffusionAD(get_profile(cfg.profile), data.channels, cfg.tiles_per_side).to(
            ddp.device, memory_format=torch.channels_last)
        self.model.denoiser.grad_checkpointing = cfg.grad_checkpointing
        self.denoiser_start = self._start_denoiser()
        objective = JointObjective(self.model, cfg.method).to(ddp.device)
        self.objective = DistributedDataParallel(objective) if ddp.world_size > 1 else objective
        self.optimizer = torch.optim.Adam(
            [{"params": self.model.denoiser.parameters(), "lr": cfg.lr_denoiser},
             {"params": self.model.segmenter.parameters(), "lr": cfg.lr_segmenter}],
            weight_decay=cfg.weight_decay,
        )
        self.base_lrs = [cfg.lr_denoiser, cfg.lr_segmenter]
        self.scaler = torch.amp.GradScaler(enabled=self.precision == "fp16")
        self.noise_gen = torch.Generator().manual_seed(cfg.seed * 1000 + ddp.rank)
        self.sampler = DistributedSampler(data.train, ddp.world_size, ddp.rank, shuffle=True, seed=cfg.seed,
                                          drop_last=True)
        self.steps_per_epoch = len(self.sampler) // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise DataError(f"{data_dir}: {len(data.split.train)} training images are fewer than one batch "
                            f"({cfg.batch_size} per process × {ddp.world_size}); lower batch_size")
        self.step, self.elapsed, self.best = 0, 0.0, {"selection": -1.0, "step": 0}

    def _start_denoiser(self) -> dict:
        """Load the shipped pretrained denoiser where the config asks for it and one exists; say which."""
        shipped = shipped_denoiser(self.cfg.profile, self.data.color["mode"])
        if self.cfg.denoiser_start == "scratch":
            return {"weights": None, "why": "scratch set in the config"}
        if not shipped.is_file():
            return {"weights": None, "why": f"no shipped denoiser for {self.cfg.profile} {self.data.color['mode']}"}
        return {"weights": shipped.name, "sha256": load_pretrained(self.model.denoiser, shipped)}

    def write_config(self) -> None:
        files.write_json(self.run / files.CONFIG, {
            "train": self.cfg.model_dump(mode="json"),
            "data": {"path": str(self.data_dir.resolve()), "fingerprint": self.data.fingerprint,
                     "train_images": len(self.data.split.train),
                     # By name: which good images chose the model and which set its thresholds.
                     "selection_images": [p.name for p in self.data.split.selection],
                     "calibration_images": [p.name for p in self.data.split.calibration],
                     "foreground": self.data.foreground, "textures": self.data.textures, "color": self.data.color,
                     "pose": self.data.pose},
            "world_size": self.ddp.world_size,
            "precision": {"computed_in": self.precision, "why": self.precision_reason},
            "denoiser_start": self.denoiser_start,
        })

    def restore(self, limits: RunLimits) -> RunLimits:
        """Load the checkpoint; keep the interrupted run's budget unless a new bound is given."""
        state = files.load_checkpoint(self.run / files.CHECKPOINT)
        if len(state["noise_rng"]) != self.ddp.world_size:
            raise ConfigError(f"{self.run}: resume with the same number of processes ({len(state['noise_rng'])})")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.noise_gen.set_state(state["noise_rng"][self.ddp.rank])
        self.step, self.elapsed, self.best = state["step"], state["elapsed_s"], state["best"]
        return limits if limits != RunLimits() else RunLimits(**state["limits"])

    def save_checkpoint(self, limits: RunLimits) -> None:
        rng = [self.noise_gen.get_state()]
        if self.ddp.world_size > 1:
            rng = [torch.zeros_like(rng[0]) for _ in range(self.ddp.world_size)]
            dist.all_gather(rng, self.noise_gen.get_state())
        if self.ddp.is_main:
            files.save_checkpoint(self.run / files.CHECKPOINT, {
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
                "elapsed_s": self.elapsed, "best": self.best, "noise_rng": rng, "limits": asdict(limits),
            })

    def validate(self) -> str | None:
        """Score the validation split; keep the weights if they are the best so far."""
        message = None
        if self.ddp.is_main:
            record = validate(self.model, self.cfg.method, self.data.selection, self.ddp.device)
            record.update(step=self.step, elapsed_s=round(self.elapsed, 1))
            if record["selection"] > self.best["selection"]:
                self.best = record
                files.save_weights(self.run / files.WEIGHTS, self.model)
            files.append_log(self.run, {"validation": record})
            message = (f"step {self.step}: validation image AUROC {record['image_auroc']:.3f}, "
                       f"pixel AP {record['pixel_ap']:.3f} (best at step {self.best['step']})")
        if self.ddp.world_size > 1:
            dist.barrier()
        return message

    def train_step(self, batch: dict, lr_scale: float) -> tuple[float, float, float]:
        self.model.train()
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base_lr * lr_scale
        randomness = draw_step_randomness(2 * self.cfg.batch_size, (self.model.channels, self.size, self.size),
                                          self.cfg.method, self.noise_gen)
        inputs = [batch["normal"], batch["anomalous"], batch["mask"], *randomness]
        with autocast(self.precision, self.ddp.device):
            total, l_noise, l_mask = self.objective(*(x.to(self.ddp.device, non_blocking=True) for x in inputs))
        if not torch.isfinite(total):
            raise FloatingPointError(f"loss became {total.item()} at step {self.step}; lower the learning rates")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        return total.item(), l_noise.item(), l_mask.item()

    def _time_is_up(self, limits: RunLimits) -> bool:
        up = bool(limits.time_limit_s and self.elapsed >= limits.time_limit_s)
        if limits.time_limit_s and self.ddp.world_size > 1:
            flag = torch.tensor([float(up)])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops on the same step
            up = bool(flag.item())
        return up

    def _loader(self) -> DataLoader:
        return DataLoader(self.data.train, batch_size=self.cfg.batch_size,
                          sampler=TrainingKeys(self.sampler, self.cfg.batch_size, self.step),
                          num_workers=self.cfg.num_workers)

    def train(self, limits: RunLimits) -> None:
        total_steps = limits.max_steps
        if total_steps is None and (limits.epochs is not None or limits.time_limit_s is None):
            total_steps = (limits.epochs or self.cfg.epochs) * self.steps_per_epoch

        def progress() -> float:
            by_steps = self.step / total_steps if total_steps else 0.0
            by_time = self.elapsed / limits.time_limit_s if limits.time_limit_s else 0.0
            return max(by_steps, by_time)

        images_per_step = 2 * self.cfg.batch_size * self.ddp.world_size
        bar = tqdm(total=total_steps, initial=self.step, disable=not self.ddp.is_main, unit="step",
                   dynamic_ncols=True)
        done = self._time_is_up(limits) or (total_steps is not None and self.step >= total_steps)
        # The time budget is wall-clock: data loading and validation count too.
        start, elapsed_before = time.perf_counter(), self.elapsed
        if not done:
            for batch in self._loader():  # endless: the loop ends when the run is done
                tick = time.perf_counter()
                lr_scale = lr_factor(progress(), self.cfg.warmup_fraction, self.cfg.final_lr_fraction)
                loss, l_noise, l_mask = self.train_step(batch, lr_scale)
                step_time = time.perf_counter() - tick
                self.elapsed = elapsed_before + time.perf_counter() - start
                bar.update(1)
                done_fraction = progress()
                eta_s = self.elapsed * (1 - done_fraction) / done_fraction if done_fraction > 0 else 0.0
                bar.set_postfix(loss=f"{loss:.4f}", noise=f"{l_noise:.4f}", mask=f"{l_mask:.4f}",
                                img_s=f"{images_per_step / step_time:.1f}", lr=f"{lr_scale:.2f}",
                                eta=f"{eta_s / 60:.1f}min")
                if self.ddp.is_main and self.step % 10 == 0:
                    files.append_log(self.run, {"step": self.step, "loss": loss, "noise": l_noise, "mask": l_mask,
                                                "lr_scale": lr_scale, "elapsed_s": round(self.elapsed, 2)})
                done = self._time_is_up(limits) or (total_steps is not None and self.step >= total_steps)
                if done or self.step % self.cfg.val_every == 0:
                    if message := self.validate():
                        bar.write(message)
                if done or self.step % self.cfg.checkpoint_every == 0:
                    self.save_checkpoint(limits)
                if done:
                    break
        bar.close()

    def finish(self) -> dict:
        """Reload the selected weights, calibrate thresholds on the calibration split and fit the
        RADAR head on the same denoiser."""
        if not self.ddp.is_main:
            return self.best
        files.load_weights(self.run / files.WEIGHTS, self.model)
        if self.data.selection is not self.data.validation:
            # The heads are compared on whole frames (RADAR's figures are): score the chosen weights on them.
            self.best = {**self.best, **validate(self.model, self.cfg.method, self.data.validation, self.ddp.device),
                         "chosen_on_tiles": {k: self.best[k] for k in ("image_auroc", "pixel_ap", "selection")}}
        thresholds = calibrate_run(self.model, self.cfg, self.data.calibration, self.data.calibration_defects,
                                   self.data.validation, self.ddp.device)
        files.write_json(self.run / files.THRESHOLDS, thresholds)
        files.write_json(self.run / files.VALIDATION, self.best)
        radar = fit_radar(self.model, self.cfg.method, self.data.selection, self.data.validation, self.data.calibration,
                          self.data.calibration_defects, self.cfg.false_reject_rate, self.ddp.device)
        files.write_json(self.run / files.RADAR, radar)
        return {**self.best, "thresholds": thresholds, "radar": radar}
