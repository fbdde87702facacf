"""Would one verdict from both heads beat the better head? Both heads of each run on its selection
split (good images and their synthetic defects; never the test set), alone and fused: scores
standardised by the good images' median and standard deviation, maps divided by the median of the
good images' highest pixel, then averaged or maxed. Prints image AUROC / pixel AP / selection.

    .venv/bin/python bench/fusion_on_validation.py RUN [RUN ...]
"""

import argparse
from pathlib import Path

import numpy as np
import torch

from protocols.one_class import fit_knn
from trainer import run_dir as files
from trainer.evaluate import load_run, radar_record
from trainer.evaluation.metrics import image_auroc, pixel_ap
from trainer.radar_fit import load_radar, radar_outputs
from trainer.training import prepare_data
from trainer.validation import score_images

CPU = torch.device("cpu")


def standardised(good: np.ndarray, defective: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    centre, spread = np.median(good), good.std() + 1e-9
    return (good - centre) / spread, (defective - centre) / spread


def map_scaled(good: np.ndarray, defective: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scale = np.median(good.reshape(len(good), -1).max(axis=1)) + 1e-9
    return good / scale, defective / scale


def head_outputs(run: Path) -> tuple[dict[str, tuple], np.ndarray]:
    """Per head ((good scores, defective scores), (good maps, defective maps)), and the defect masks."""
    cfg, model, _ = load_run(run)
    val = prepare_data(Path(files.read_json(run / files.CONFIG)["data"]["path"]), cfg).validation
    good_maps, good_scores = score_images(model, cfg.method, val.normal, CPU)
    bad_maps, bad_scores = score_images(model, cfg.method, val.anomalous, CPU)
    radar, _ = load_radar(radar_record(run, cfg, model), model, cfg.method)
    radar_good_maps, good_features = radar_outputs(radar, val.normal, CPU)
    radar_bad_maps, bad_features = radar_outputs(radar, val.anomalous, CPU)
    knn, radar_good_scores = fit_knn(good_features)  # good images scored leave-one-out, as at selection
    heads = {"norm-guided": ((good_scores, bad_scores), (good_maps, bad_maps)),
             "RADAR": ((radar_good_scores, knn.score(bad_features)), (radar_good_maps, radar_bad_maps))}
    return heads, val.masks[:, 0].numpy() > 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    print("| run | norm-guided | RADAR | fused mean | fused max |\n|---|---|---|---|---|")
    for run in args.runs:
        heads, masks = head_outputs(run)
        ng, radar = heads["norm-guided"], heads["RADAR"]
        scores = [standardised(*ng[0]), standardised(*radar[0])]
        maps = [map_scaled(*ng[1]), map_scaled(*radar[1])]
        for name, combine in (("fused mean", lambda a, b: (a + b) / 2), ("fused max", np.maximum)):
            heads[name] = ((combine(scores[0][0], scores[1][0]), combine(scores[0][1], scores[1][1])),
                           (combine(maps[0][0], maps[1][0]), combine(maps[0][1], maps[1][1])))
        cells = []
        for (good, bad), (good_maps, bad_maps) in heads.values():
            labels = np.r_[np.zeros(len(good), bool), np.ones(len(bad), bool)]
            i_auroc = 100 * image_auroc(labels, np.r_[good, bad])
            p_ap = 100 * pixel_ap(np.concatenate([np.zeros(good_maps.shape, bool), masks]),
                                  np.concatenate([good_maps, bad_maps]))
            cells.append(f"{i_auroc:.1f} / {p_ap:.1f} / {(i_auroc + p_ap) / 2:.1f}")
        print(f"| {run.name} ({len(heads['RADAR'][0][0])} + {len(masks)} images) | " + " | ".join(cells) + " |",
              flush=True)


if __name__ == "__main__":
    main()
