"""Accuracy per CPU budget: trains `small` with the product's defaults (no config) on each shared
set for M minutes of wall time, evaluates both heads on the set's test split, and writes the table
to docs/accuracy.md. Not part of `make bench` (an hour a set at the README's budget).

    .venv/bin/python bench/accuracy.py --minutes 60 [--sets bottle magnetic_tile hazelnut] [--setting KEY=VALUE ...]

`--setting KEY=VALUE` measures a training setting against its default (e.g. `tiles_per_side=3`,
`augment=auto`); VALUE is a TOML value, or else a string. Results are kept per (set, minutes,
settings) in docs/accuracy.json with their machine, date and command, and
the Markdown is rebuilt from all of them: sets may be measured in separate sittings, one after the
other, never two at once (they would share the cores). The runs are kept: after a change to the
calibration (`trainer calibrate RUN` sets a run's thresholds again from its own held-out images) or
to the evaluation, `--evaluate-kept` evaluates them again without training.
"""

import argparse
import json
import shutil
import subprocess
import sys
import tomllib
from datetime import datetime, timezone
from pathlib import Path

from machine import describe
from trainer.data.pose import pose_summary
from trainer.evaluate import by_head

REPO = Path(__file__).resolve().parents[1]
SETS = ("bottle", "magnetic_tile", "hazelnut")
METRICS = ("image_auroc", "pixel_auroc", "aupro", "pixel_ap", "image_f1_max")
DEFECT_METRICS = ("image_auroc", "pixel_auroc", "aupro", "pixel_ap")


def trainer(*args: str) -> None:
    """`trainer ARGS` in this environment; its output goes to the terminal."""
    subprocess.run([str(Path(sys.executable).parent / "trainer"), *args], check=True)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def steps_reached(run: Path) -> int:
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    return max(record["validation"]["step"] for record in log if "validation" in record)


def verdicts(metrics: dict) -> dict:
    """At the head's shipped threshold: false rejects of test good parts and escapes of defective ones,
    and the false-reject rate the threshold states (and whether synthetic defects capped it)."""
    counts = metrics["verdicts"]["counts"]
    return {"false_rejects": counts["false_reject"], "good": counts["false_reject"] + counts["true_pass"],
            "escapes": counts["escape"], "defective": counts["escape"] + counts["true_fail"],
            "stated_false_reject_rate": metrics["verdicts"]["stated_false_reject_rate"],
            "limited_by": metrics["verdicts"]["limited_by"]}


def head_figures(metrics: dict) -> dict:
    """A head's metrics over the whole test split and per defect type, and its verdict counts."""
    per_defect = {defect: {k: figures[k] for k in DEFECT_METRICS} for defect, figures in metrics["per_defect"].items()}
    return {**{k: metrics[k] for k in METRICS}, **verdicts(metrics), "per_defect": per_defect}


def setting(text: str) -> tuple[str, object]:
    """`KEY=VALUE` of the command line: VALUE as TOML reads it (numbers, booleans), else as a string."""
    name, sep, value = text.partition("=")
    if not (sep and name and value):
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE")
    try:
        return name, tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return name, value


def run_name(name: str, minutes: float, settings: dict) -> str:
    return f"{name}-{minutes:g}min" + "".join(f"-{k}-{v}" for k, v in sorted(settings.items()))


def measure(name: str, data: Path, minutes: float, settings: dict, runs: Path) -> dict:
    run = runs / run_name(name, minutes, settings)
    if run.exists():
        sys.exit(f"accuracy: {run} exists; remove it or pass another --runs")
    config = []
    if settings:
        config = ["--config", str(runs / f"{run.name}.toml")]
        Path(config[1]).write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in sorted(settings.items())))
    trainer("fit", str(data), "--out", str(run), "--time-limit", f"{minutes:g}m", *config)
    return {"set": name, "minutes": minutes, "settings": settings, "steps": steps_reached(run),
            "measured": f"{datetime.now(timezone.utc):%Y-%m-%d}", "machine": describe(), **evaluated(run, data)}


def evaluated(run: Path, data: Path) -> dict:
    """What `trainer eval` of a finished run gives the table."""
    trainer("eval", str(run), str(data), "--out", str(run / "eval"))
    metrics, config = read_json(run / "eval" / "metrics.json"), read_json(run / "config.json")
    selection = {"norm-guided": read_json(run / "validation.json")["selection"],
                 "radar": read_json(run / "radar.json")["validation"]["selection"]}
    return {
        "decisions": {"foreground": config["data"]["foreground"]["mode"],
                      "textures": config["data"].get("textures", {}).get("source", "none"),
                      "color": config["data"].get("color", {}).get("mode", "rgb"),
                      "pose": pose_summary(config["data"].get("pose")),
                      "precision": config.get("precision", {}).get("computed_in", "fp32")},
        "recommended_head": max(selection, key=selection.get),
        "heads": {head: head_figures(figures) for head, figures in by_head(metrics).items()},
        "evaluated": f"{datetime.now(timezone.utc):%Y-%m-%d}",
    }


def markdown(results: list[dict], command: str) -> str:
    lines = ["# Accuracy per CPU budget", "",
             "`small` profile, the product's defaults except the settings named (a config file of those alone), "
             "trained for the stated wall-clock "
             "minutes on the machine named below each set, then both heads evaluated on the set's test split "
             "(never seen in training). Verdicts are at the threshold the run shipped: 1 % false rejects on "
             "good parts targeted, the rate it states beside them (\"capped\": too few calibration images to "
             "observe 1 %, and the extrapolated threshold would have passed more than 10 % of synthetic defects; "
             "see docs/method.md). Written by `bench/accuracy.py`:", "", f"```sh\n.venv/bin/python {command}\n```", "",
             "| set | minutes | settings | steps | decisions | head | image AUROC | pixel AUROC | AUPRO (0.3) "
             "| pixel AP "
             "| image F1max | stated false-reject rate | false rejects (test good) | escapes (test defective) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        decided = ", ".join(f"{k} {v}" for k, v in r["decisions"].items())
        for head, figures in r["heads"].items():
            label = f"{head} (recommended)" if head == r["recommended_head"] else head
            cells = " | ".join(f"{100 * figures[k]:.1f}" for k in METRICS)
            stated = "—" if figures.get("stated_false_reject_rate") is None else (  # not in older records
                f"{100 * figures['stated_false_reject_rate']:.1f} %"
                + (" (capped)" if figures["limited_by"] == "synthetic_defects" else ""))
            lines.append(f"| {r['set']} | {r['minutes']:g} | {described(r) or 'defaults'} | {r['steps']} | {decided} "
                         f"| {label} | {cells} | {stated} | {figures['false_rejects']}/{figures['good']} "
                         f"| {figures['escapes']}/{figures['defective']} |")
    lines += ["", "Per defect type (each against all of the test's good images):", "",
              "| set | head | defect | image AUROC | pixel AUROC | AUPRO (0.3) | pixel AP |",
              "|---|---|---|---|---|---|---|"]
    for r in results:
        for head, figures in r["heads"].items():
            for defect, scores in figures["per_defect"].items():
                cells = " | ".join(f"{100 * scores[k]:.1f}" for k in DEFECT_METRICS)
                lines.append(f"| {r['set']}, {r['minutes']:g} min{suffix(r)} | {head} | {defect} | {cells} |")
    lines += ["", "Measured on:", ""]
    lines += [f"- {r['set']}, {r['minutes']:g} min{suffix(r)} (trained {r['measured']}, evaluated "
              f"{r.get('evaluated', r['measured'])}): {r['machine']}" for r in results]
    lines += ["", "Test images of each run as `trainer eval` drew them (input, norm-guided reconstruction, both "
              "heads' maps, ground truth; `good/...` rows show whether the reconstruction of a good part is "
              "free of noise):", ""]
    lines += [f"- [{r['set']}, {r['minutes']:g} min{suffix(r)}]({samples_picture(*key(r))})" for r in results]
    return "\n".join(lines) + "\n"


def described(result: dict) -> str:
    return ", ".join(f"`{k} = {json.dumps(v)}`" for k, v in sorted(result["settings"].items()))


def suffix(result: dict) -> str:
    return f", {described(result)}" if result["settings"] else ""


def key(result: dict) -> tuple[str, float, dict]:
    return result["set"], result["minutes"], result["settings"]


def samples_picture(name: str, minutes: float, settings: dict) -> str:
    """Where a run's samples.png is kept, relative to docs/."""
    return f"accuracy/{run_name(name, minutes, settings)}-samples.png"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, required=True, help="training wall time per set")
    parser.add_argument("--sets", nargs="+", default=list(SETS),
                        help="folders of --datasets (e.g. mosaics written by bench/mosaics.py)")
    parser.add_argument("--setting", type=setting, action="append", default=[], metavar="KEY=VALUE",
                        help="a training setting other than its default (repeatable)")
    parser.add_argument("--datasets", type=Path, default=REPO.parent / "shared" / "datasets")
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "accuracy", help="where the runs are kept")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "accuracy.md")
    parser.add_argument("--evaluate-kept", action="store_true",
                        help="no training: evaluate the kept runs again (after `trainer calibrate RUN`, or a change "
                             "to the evaluation)")
    args = parser.parse_args()
    store = args.out.with_suffix(".json")
    results = read_json(store) if store.is_file() else []
    missing = [name for name in args.sets if not (args.datasets / name).is_dir()]
    if missing:
        sys.exit(f"accuracy: no {', '.join(missing)} in {args.datasets}")
    for name in args.sets:
        run = (name, args.minutes, dict(args.setting))
        if args.evaluate_kept:
            kept = next((r for r in results if key(r) == run), None)
            if kept is None:
                sys.exit(f"accuracy: no {run_name(*run)} run in {store} to evaluate again")
            result = {**kept, **evaluated(args.runs / run_name(*run), args.datasets / name)}
        else:
            result = measure(name, args.datasets / name, args.minutes, dict(args.setting), args.runs)
        picture = args.out.parent / samples_picture(*run)
        picture.parent.mkdir(exist_ok=True)
        shutil.copyfile(args.runs / run_name(*run) / "eval" / "samples.png", picture)
        results = [r for r in results if key(r) != run] + [result]
        results.sort(key=lambda r: (SETS.index(r["set"]) if r["set"] in SETS else len(SETS), r["set"], r["minutes"],
                                    sorted(r["settings"].items())))
        store.write_text(json.dumps(results, indent=2) + "\n")  # after every set: a later failure keeps it
        args.out.write_text(markdown(results, "bench/accuracy.py --minutes M --sets SET [SET ...] "
                                              "[--setting KEY=VALUE ...] "
                                              "[--evaluate-kept]"))
        print(f"{name}: written to {args.out}", flush=True)


if __name__ == "__main__":
    main()
