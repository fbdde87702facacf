"""`edge serve | replay | watch | keys`: thin wrappers with one-line errors."""

import argparse
import os
import re
import sys
from pathlib import Path

KEY_NAME_PATTERN = r"[A-Za-z0-9_.-]{1,64}"


def build_parser() -> argparse.ArgumentParser:
    from edge.replay import add_replay_arguments
    from edge.watch import add_watch_arguments

    parser = argparse.ArgumentParser(prog="edge", description="DiffusionAD inspection station")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the inspection daemon")
    serve.add_argument("--config", type=Path, help="TOML settings (EDGE_* environment variables override)")
    add_replay_arguments(sub.add_parser("replay", help="send a folder of images or a video as camera frames"))
    add_watch_arguments(sub.add_parser("watch", help="print verdicts live from the MQTT broker"))
    keys = sub.add_parser("keys", help="write a CURVE certificate pair for a station or a camera (zmq.curve)")
    keys.add_argument("--out", type=Path, required=True, metavar="DIR", help="where to write the pair")
    keys.add_argument("--name", type=_key_name, required=True,
                      help="the pair's name: writes NAME.key (public) and NAME.key_secret (secret, mode 0600)")
    return parser


def run_serve(args: argparse.Namespace) -> int:
    from edge.daemon import Daemon, StartupError
    from edge.logs import configure_logging
    from edge.mqtt.outbox import OutboxError
    from edge.runtime.bundle import BundleError
    from edge.settings import SettingsError, load_settings

    try:
        settings = load_settings(args.config)
        log = configure_logging(settings.log_level)
        daemon = Daemon(settings, log)
    except (SettingsError, BundleError, OutboxError, StartupError) as err:
        print(f"edge serve: error: {err}", file=sys.stderr)
        return 2
    daemon.install_signal_handlers()
    return daemon.run()


def run_keys(args: argparse.Namespace) -> int:
    """`edge keys`: a CURVE certificate pair in ZeroMQ's format; existing files are never overwritten."""
    import zmq.auth

    public, secret = args.out / f"{args.name}.key", args.out / f"{args.name}.key_secret"
    if existing := next((p for p in (public, secret) if p.exists()), None):
        print(f"edge keys: error: {existing} exists: not overwritten (choose another --name or --out)",
              file=sys.stderr)
        return 1
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        old_umask = os.umask(0o077)  # the secret file is never readable by others, not even for a moment
        try:
            zmq.auth.create_certificates(args.out, args.name)
        finally:
            os.umask(old_umask)
    except OSError as err:
        print(f"edge keys: error: {err}", file=sys.stderr)
        return 1
    public.chmod(0o644)  # the public certificate is meant to be copied around
    name = args.name
    print(f"public certificate: {public.resolve()}\n"
          f"secret certificate: {secret.resolve()} (mode 0600: it stays on the device it names)\n"
          f"\n"
          f"If {name} is a station: zmq.curve.secret_key_file = {name}.key_secret; each camera's .key goes\n"
          f"  into zmq.curve.authorized_keys_dir; each camera gets a copy of {name}.key.\n"
          f"If {name} is a camera: it keeps {name}.key_secret and gets the station's .key (edge replay\n"
          f"  --camera-key {name}.key_secret --server-key STATION.key); {name}.key goes into the station's\n"
          f"  zmq.curve.authorized_keys_dir (then SIGHUP or restart the station).")
    return 0


def _key_name(text: str) -> str:
    if not re.fullmatch(KEY_NAME_PATTERN, text):
        raise argparse.ArgumentTypeError(f"{text!r}: 1-64 of letters, digits and _.- (a file name)")
    return text


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return run_serve(args)
    if args.command == "keys":
        return run_keys(args)
    if args.command == "replay":
        from edge.replay import run_replay

        return run_replay(args)
    from edge.watch import run_watch

    return run_watch(args)
