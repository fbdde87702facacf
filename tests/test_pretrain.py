"""The shipped denoiser: procedural pictures, `trainer pretrain`, and `trainer fit` starting from it."""

import hashlib
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from trainer import pretrain
from trainer.cli import main
from trainer.config import ConfigError
from trainer.data.procedural import procedural_image
from trainer.nets.denoiser import Denoiser
from trainer.profiles import get_profile

TINY = get_profile("tiny")


def test_procedural_pictures_are_reproducible_and_varied():
    first = procedural_image(64, np.random.default_rng([0, 1]))
    assert first.dtype == np.uint8 and first.shape == (64, 64, 3)
    assert np.array_equal(first, procedural_image(64, np.random.default_rng([0, 1])))
    pictures = np.stack([procedural_image(64, np.random.default_rng([0, i])) for i in range(16)])
    assert pictures.std(axis=(1, 2, 3)).min() > 0, "a flat picture teaches nothing"
    assert len({p.tobytes() for p in pictures}) == 16


@pytest.fixture(scope="module")
def pretrained_tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("weights") / "denoiser-tiny-rgb.safetensors"
    assert main(["pretrain", "--profile", "tiny", "--time-limit", "3s", "--out", str(out)]) == 0
    return out


def test_pretrain_writes_fp16_weights_with_what_they_were_trained_on(pretrained_tiny):
    with safe_open(str(pretrained_tiny), "pt") as weights:
        metadata = weights.metadata()
        assert {weights.get_tensor(k).dtype for k in weights.keys()} == {torch.float16}
    assert metadata["profile"] == "tiny" and metadata["color"] == "rgb" and int(metadata["steps"]) >= 1
    denoiser = Denoiser(TINY.denoiser, TINY.image_size)
    assert pretrain.load_pretrained(denoiser, pretrained_tiny) == hashlib.sha256(pretrained_tiny.read_bytes()).hexdigest()
    with safe_open(str(pretrained_tiny), "pt") as weights:
        assert torch.equal(denoiser.input_conv.weight, weights.get_tensor("input_conv.weight").float())


def test_weights_of_another_colour_mode_are_refused_naming_the_file(pretrained_tiny):
    with pytest.raises(ConfigError, match="denoiser-tiny-rgb.safetensors: these denoiser weights do not fit"):
        pretrain.load_pretrained(Denoiser(TINY.denoiser, TINY.image_size, channels=1), pretrained_tiny)


@pytest.mark.slow
def test_fit_starts_from_the_shipped_denoiser_and_records_it(tmp_path, datasets_dir, pretrained_tiny, monkeypatch):
    monkeypatch.setattr(pretrain, "SHIPPED_DIR", pretrained_tiny.parent)
    for start in ("shipped", "scratch"):
        config = tmp_path / f"{start}.toml"
        config.write_text(f'profile = "tiny"\nbatch_size = 4\nnum_workers = 0\ndenoiser_start = "{start}"\n')
        assert main(["fit", str(datasets_dir / "hazelnut"), "--out", str(tmp_path / start), "--config", str(config),
                     "--max-steps", "1"]) == 0
    shipped = json.loads((tmp_path / "shipped" / "config.json").read_text())["denoiser_start"]
    assert shipped == {"weights": pretrained_tiny.name,
                       "sha256": hashlib.sha256(pretrained_tiny.read_bytes()).hexdigest()}
    scratch = json.loads((tmp_path / "scratch" / "config.json").read_text())["denoiser_start"]
    assert scratch == {"weights": None, "why": "scratch set in the config"}
