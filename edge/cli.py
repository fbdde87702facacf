"""`edge serve | replay | watch`: thin wrappers with one-line errors."""

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    from edge.replay import add_replay_arguments
    from edge.watch import add_watch_arguments

    parser = argparse.ArgumentParser(prog="edge", description="DiffusionAD inspection station")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the inspection daemon")
    serve.add_argument("--config", type=Path, help="TOML settings (EDGE_* environment variables override)")
    add_replay_arguments(sub.add_parser("replay", help="send a folder of images or a video as camera frames"))
    add_watch_arguments(sub.add_parser("watch", help="print verdicts live from the MQTT broker"))
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return run_serve(args)
    if args.command == "replay":
        from edge.replay import run_replay

        return run_replay(args)
    from edge.watch import run_watch

    return run_watch(args)
