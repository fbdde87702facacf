"""`trainer fit | eval | export | calibrate | sign | keygen | synth | pretrain`: thin wrappers over the library with
one-line errors."""

import argparse
import re
import sys
from pathlib import Path

from trainer.config import ConfigError


def parse_duration(text: str) -> float:
    """'90s', '45m', '2h' or plain seconds → seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use e.g. 90s, 45m, 2h)")
    return float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[match[2]]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    fit = sub.add_parser("fit", help="train on a folder of good parts (MVTec layout)")
    fit.add_argument("data_dir", type=Path)
    fit.add_argument("--out", type=Path, required=True, help="run directory to create (or resume)")
    fit.add_argument("--config", type=Path, help="TOML training config (see configs/)")
    fit.add_argument("--profile", choices=["tiny", "small", "paper"])
    fit.add_argument("--textures", help="anomaly texture source: a folder of texture images, procedural, none or auto")
    fit.add_argument("--seed", type=int)
    fit.add_argument("--max-steps", type=int)
    fit.add_argument("--epochs", type=int)
    fit.add_argument("--time-limit", type=parse_duration, help="e.g. 60m: stop training after this long")
    fit.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")

    ev = sub.add_parser("eval", help="metrics and a picture report on a labelled test folder")
    ev.add_argument("run_dir", type=Path)
    ev.add_argument("data_dir", type=Path)
    ev.add_argument("--out", type=Path, help="report directory (default RUN_DIR/eval)")

    export = sub.add_parser("export", help="compile a run into a model bundle for stations")
    export.add_argument("run_dir", type=Path)
    export.add_argument("--out", type=Path, required=True, help="bundle directory to create")
    export.add_argument("--target", choices=["portable", "cpu", "tensorrt", "all"], default="cpu",
                        help="portable: the torch.export program only; cpu: + AOTInductor package and OpenVINO IR "
                             "(fp32, and INT8 and bf16 within their parity limits); tensorrt: + TensorRT engines (on the GPU); "
                             "all")
    export.add_argument("--head", choices=["norm-guided", "radar", "both"], default="both",
                        help="the inference head(s) to ship; both: those the run has (default)")
    export.add_argument("--max-batch", type=int, default=8)
    export.add_argument("--sign-key", type=Path, metavar="FILE",
                        help="Ed25519 private key (trainer keygen): sign the bundle for stations with trusted_keys_dir")

    cal = sub.add_parser("calibrate", help="new thresholds from good parts taken on the line (a run or a bundle)")
    cal.add_argument("source", type=Path, metavar="RUN_OR_BUNDLE")
    cal.add_argument("good_dir", type=Path, nargs="?", help="folder of good images (searched recursively); "
                     "without it, a run's own calibration split again")
    cal.add_argument("--defects", type=Path, metavar="DIR", help="defective images: escape rates before and after")
    cal.add_argument("--false-reject-rate", type=float, default=0.01, help="target (default: %(default)s)")
    cal.add_argument("--out", type=Path, help="for a bundle: where to write the recalibrated copy")
    cal.add_argument("--sign-key", type=Path, metavar="FILE", help="sign the new bundle")

    sign = sub.add_parser("sign", help="(re-)sign a bundle, e.g. after its thresholds were changed")
    sign.add_argument("bundle", type=Path)
    sign.add_argument("--sign-key", type=Path, metavar="FILE", required=True, help="Ed25519 private key")

    keygen = sub.add_parser("keygen", help="write a bundle-signing key pair")
    keygen.add_argument("--out", type=Path, required=True, help="directory for NAME.key (private) and NAME.pub")
    keygen.add_argument("--name", default="bundle-signing", help="file name stem (default: %(default)s)")

    synth = sub.add_parser("synth", help="write sample synthetic anomalies as pictures")
    synth.add_argument("data_dir", type=Path)
    synth.add_argument("--out", type=Path, required=True)
    synth.add_argument("-n", type=int, default=16)
    synth.add_argument("--profile", choices=["tiny", "small", "paper"], default="small")
    synth.add_argument("--textures", default="auto", help="a folder of texture images, procedural, none or auto")
    synth.add_argument("--foreground", choices=["object", "texture"], default="object")
    synth.add_argument("--seed", type=int, default=0)

    pre = sub.add_parser("pretrain", help="learn the shipped denoiser on procedural pictures (the product's own)")
    pre.add_argument("--profile", choices=["tiny", "small", "paper"], default="small")
    pre.add_argument("--color", choices=["rgb", "gray"], default="rgb")
    pre.add_argument("--time-limit", type=parse_duration, required=True, help="e.g. 30m")
    pre.add_argument("--out", type=Path, help="default: the shipped file of the profile and colour (trainer/weights/)")
    pre.add_argument("--seed", type=int, default=0)
    return parser


def run_fit(args: argparse.Namespace) -> None:
    from trainer import run_dir as files
    from trainer.config import TrainConfig, load_train_config
    from trainer.training import RunLimits, fit

    if args.resume:
        if not (args.out / files.CHECKPOINT).is_file():
            raise ConfigError(f"{args.out}: nothing to resume (no {files.CHECKPOINT})")
        cfg = TrainConfig.model_validate(files.read_json(args.out / files.CONFIG)["train"])
    else:
        if args.out.exists() and any(args.out.iterdir()):
            raise ConfigError(f"{args.out}: run directory exists and is not empty (use --resume or a new --out)")
        cfg = load_train_config(args.config, profile=args.profile, textures=args.textures, seed=args.seed)
    result = fit(args.data_dir, args.out, cfg, RunLimits(args.max_steps, args.epochs, args.time_limit), args.resume)
    if "thresholds" in result:
        print(f"best validation at step {result['step']}: image AUROC {result['image_auroc']:.4f}, "
              f"pixel AP {result['pixel_ap']:.4f}; run in {args.out}")
        print_thresholds(result["thresholds"]["false_reject_rate"])
        print_radar(result["radar"])


def print_radar(radar: dict) -> None:
    constants, chosen = radar["constants"], radar["validation"]
    print(f"RADAR head: t {constants['t']}, {constants['discrepancy']} discrepancy; validation image AUROC "
          f"{chosen['image_auroc']:.4f}, pixel AP {chosen['pixel_ap']:.4f}")
    print_thresholds(radar["thresholds"]["false_reject_rate"], "RADAR thresholds")


def print_thresholds(calibrated: dict, label: str = "thresholds") -> None:
    """The false-reject promise of calibrated thresholds, and a warning when it rests on few images."""
    from trainer.evaluation.calibration import Thresholds

    thresholds = Thresholds.from_dict(calibrated)
    print(f"{label}: image {thresholds.image:.4f}, pixel {thresholds.pixel:.4f}; expected false rejects "
          f"{thresholds.expected_false_reject_rate:.2%} (at most {thresholds.false_reject_rate_upper:.2%} with 90 % "
          f"confidence) from {thresholds.calibration_images} good images ({thresholds.estimator})")
    if warning := thresholds.too_few_images():
        print(f"warning: {warning}", file=sys.stderr)


def run_eval(args: argparse.Namespace) -> None:
    from trainer.evaluate import evaluate
    from trainer.evaluation.report import verdict_line

    out = args.out or args.run_dir / "eval"
    m = evaluate(args.run_dir, args.data_dir, out)
    for head, figures in (("norm-guided", m), ("RADAR", m["radar"])):
        print(f"{head}: image AUROC {figures['image_auroc']:.4f}  pixel AUROC {figures['pixel_auroc']:.4f}  "
              f"AUPRO {figures['aupro']:.4f}  pixel AP {figures['pixel_ap']:.4f}  "
              f"image F1max {figures['image_f1_max']:.4f}")
        print(f"  {verdict_line(figures['verdicts'])}")
    print(f"→ {out / 'metrics.json'}")


def run_export(args: argparse.Namespace) -> None:
    from trainer import run_dir as files
    from trainer.export.bundle import export_bundle

    manifest = export_bundle(args.run_dir, args.out, args.target, args.max_batch, args.sign_key, args.head)
    signed = f", signed with {args.sign_key}" if args.sign_key else ""
    print(f"bundle {manifest.model.name} {manifest.model.version} → {args.out}{signed}")
    for head in manifest.heads:
        recommended = " (recommended)" if head.name == manifest.recommended_head else ""
        print(f"  {head.name}{recommended}: {', '.join(f.path for f in head.files)}; validation selection "
              f"{head.metrics['validation_selection']:.4f}")
    if args.head == "both" and len(manifest.heads) == 1:
        print(f"  the run has no {files.RADAR}: norm-guided head only")


def run_calibrate(args: argparse.Namespace) -> None:
    from trainer.recalibration import recalibrate

    if not 0 < args.false_reject_rate < 1:
        raise ConfigError(f"--false-reject-rate must be in (0, 1), got {args.false_reject_rate}")
    if args.sign_key is not None and args.out is None:
        raise ConfigError("--sign-key signs the new bundle: give --out too")
    for done in recalibrate(args.source, args.good_dir, args.defects, args.false_reject_rate, args.out):
        before = done.before
        print(f"{done.head}: before: image {before.image:.4f}: rejects {done.good_rejected_before:.1%} of these "
              "good images" + (f"; expected false rejects {before.expected_false_reject_rate:.2%}"
                               if before.expected_false_reject_rate is not None else ""))
        print_thresholds(done.after.to_dict(), label=f"{done.head}: after")
        if done.escapes is not None:
            print(f"{done.head}: escapes on the defective images: {done.escapes[0]:.1%} before, "
                  f"{done.escapes[1]:.1%} after")
    if args.out is not None:
        if args.sign_key is not None:
            from trainer.export.signing import sign_bundle

            sign_bundle(args.out, args.sign_key)
        print(f"bundle with the new thresholds → {args.out}{' (signed)' if args.sign_key else ' (unsigned)'}")
    else:
        print(f"thresholds → {args.source / 'thresholds.json'}, and the RADAR head's into "
              f"{args.source / 'radar.json'} if the run has one (trainer export to ship them)")


def run_sign(args: argparse.Namespace) -> None:
    from trainer.export.signing import sign_bundle

    signature = sign_bundle(args.bundle, args.sign_key)
    print(f"signed {args.bundle} with key {signature.key_id}")


def run_keygen(args: argparse.Namespace) -> None:
    from protocols.signing import write_key_pair

    private_path, public_path = write_key_pair(args.out, args.name)
    print(f"private key {private_path} (keep it off the stations)\n"
          f"public key  {public_path} (copy into each station's trusted_keys_dir)")


def run_synth(args: argparse.Namespace) -> None:
    from trainer.data.samples import write_synthetic_samples
    from trainer.profiles import get_profile

    written = write_synthetic_samples(args.data_dir, args.out, args.n, get_profile(args.profile).image_size,
                                      args.textures, args.foreground, args.seed)
    print(f"wrote {len(written)} pictures to {args.out}")


def run_pretrain(args: argparse.Namespace) -> None:
    from trainer.pretrain import pretrain, shipped_denoiser

    out = args.out or shipped_denoiser(args.profile, args.color)
    metadata = pretrain(args.profile, args.color, args.time_limit, out, args.seed)
    print(f"wrote {out}: {metadata['steps']} steps, {metadata['images']} pictures, "
          f"final noise loss {metadata['final_noise_loss']}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from trainer.data.mvtec import DataError
    from protocols.signing import SignatureError
    from trainer.export.tensorrt import TensorRTUnavailable

    commands = {"fit": run_fit, "eval": run_eval, "export": run_export, "calibrate": run_calibrate, "sign": run_sign,
                "keygen": run_keygen, "synth": run_synth, "pretrain": run_pretrain}
    try:
        commands[args.command](args)
    except (ConfigError, DataError, FloatingPointError, TensorRTUnavailable, SignatureError) as err:
        print(f"trainer {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"trainer {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0
