"""`make demo`: the whole station on one machine, end to end, in one command.

Starts an MQTT broker (the system's mosquitto, else amqtt embedded in this process), runs
`edge serve` as a subprocess, replays a labelled test folder (MVTec layout: test/good/*,
test/<defect>/*) over ZeroMQ, prints each verdict live next to its ground truth, then writes an
overlay picture per frame and a summary (accuracy, AUROC, throughput, latency) to --out.
Everything listens on 127.0.0.1 only, and every wait is bounded.

    python -m harness.demo --bundle demo/bundle --images demo/hazelnut/test --out demo-output
"""

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

from edge.replay import positive_float, positive_int
from edge.runtime.bundle import BundleError
from harness import HarnessError
from harness.broker import Broker, choose_broker
from harness.feed import Feed
from harness.overlays import write_overlays
from harness.replay import Run, replay_and_collect
from harness.samples import Sample, list_samples
from harness.station import StationProcess, wait_until_online
from harness.summary import print_summary, summarise
from protocols.bundle import MANIFEST_NAME

STATION_ID = "demo"


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m harness.demo",
                                     description="broker + daemon + replay of a labelled folder, with a summary")
    parser.add_argument("--bundle", type=Path, required=True, help="model bundle directory")
    parser.add_argument("--images", type=Path, required=True,
                        help="labelled test folder: good/* and <defect>/* (MVTec layout)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the overlay pictures and summary.json")
    parser.add_argument("--fps", type=positive_float,
                        help="frames per second (default: as fast as the daemon takes them)")
    parser.add_argument("--limit", type=positive_int, metavar="N", help="only the first N images")
    parser.add_argument("--broker", choices=("auto", "mosquitto", "embedded"), default="auto",
                        help="auto (default): mosquitto when installed, else amqtt embedded in this process")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Exit code 0 when every frame got a verdict, 1 if not, 2 when the demo could not run,
    130 on Ctrl-C."""
    args = parse_arguments(argv)
    started = time.monotonic()
    try:
        samples = _check_inputs(args)
        args.out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="demo-") as workdir:
            broker = choose_broker(args.broker, Path(workdir))
            run = _serve_and_replay(args, samples, broker, Path(workdir))
        # After the daemon has stopped: running the model here meanwhile would slow it down and
        # spoil the latency and throughput figures.
        print(f"writing overlay pictures to {args.out}/ ...", flush=True)
        write_overlays(samples, run.results, args.bundle, args.out)
    except (HarnessError, BundleError) as err:
        print(f"demo: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("demo: interrupted", file=sys.stderr)
        return 130
    summary = summarise(samples, run, broker.name, args.out)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary, time.monotonic() - started)
    return 0 if summary["results"] == summary["frames"] == summary["frames_sent"] else 1


def _check_inputs(args: argparse.Namespace) -> list[Sample]:
    if not (args.bundle / MANIFEST_NAME).is_file():
        raise HarnessError(f"no model bundle at {args.bundle} (make demo-model builds one)")
    if not args.images.is_dir():
        raise HarnessError(f"no such folder: {args.images}")
    samples = list_samples(args.images, args.limit)
    if not samples:
        raise HarnessError(f"no images in {args.images}")
    return samples


def _serve_and_replay(args: argparse.Namespace, samples: list[Sample], broker: Broker, workdir: Path) -> Run:
    """Broker, subscriber and daemon up; replay; everything stopped again, in reverse order."""
    with contextlib.ExitStack() as running:
        print(f"starting {broker.name}", flush=True)
        running.enter_context(broker)
        (args.out / "daemon.log").unlink(missing_ok=True)  # this run's log only
        station = StationProcess(STATION_ID, args.bundle.resolve(), broker, workdir,
                                 (args.out / "daemon.log").resolve())
        feed = Feed(broker.port, station.prefix)
        feed.start()
        running.callback(feed.stop)
        print(f"starting edge serve (log: {station.log_path}); waiting for the model to load", flush=True)
        station.start()
        running.callback(station.stop)
        wait_until_online(feed, station)
        print(f"replaying {len(samples)} images from {args.images} to {station.endpoint}", flush=True)
        run = replay_and_collect(samples, args.images, station, feed, args.fps)
        print("stopping edge serve (SIGTERM: it drains) and the broker", flush=True)
    return run


if __name__ == "__main__":
    sys.exit(main())
