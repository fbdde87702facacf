"""`edge watch`: print a station's verdicts, status changes and frame errors as they arrive on the
MQTT broker, one line each. It connects as the daemon does (TLS, mutual TLS, a login)."""

import argparse
import collections
import queue
import ssl
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import ValidationError

from edge.mqtt.link import configure_security, read_password_file
from edge.settings import SettingsError, TlsSettings
from protocols.messages import ErrorReport, Result, Status, error_topic, result_topic, status_topic

GREEN, RED, RESET = "\033[32m", "\033[31m", "\033[0m"


class WatchError(Exception):
    """The broker would not let `edge watch` in (refused the login, closed the connection)."""


def format_result_line(result: Result, color: bool = False) -> str:
    """time, camera, frame, part, verdict, score / threshold, regions, total latency, model version."""
    verdict = result.verdict.upper()
    if color:
        verdict = f"{GREEN if result.verdict == 'pass' else RED}{verdict}{RESET}"
    score = "n/a" if result.score is None else f"{result.score:.3f}"
    flags = f"  flags {','.join(result.flags)}" if result.flags else ""
    return (f"{_clock(result.ts_result_ns)}  {result.camera_id:<8} {result.frame_id:<8} {result.part_id or '-':<10} "
            f"{verdict}  score {score} / {result.threshold:.3f}  regions {len(result.regions)}  "
            f"total {result.latency_ms.total:.1f} ms  model {result.model.version}{flags}")


def format_status_line(status: Status) -> str:
    model = f"  model {status.model.name} {status.model.version}" if status.model else ""
    backend = f"  backend {status.backend}" if status.backend else ""
    reason = f"  ({status.reason})" if status.reason else ""
    return f"{_clock(status.ts_ns)}  STATUS   {status.station_id} {status.state}{reason}{model}{backend}"


def format_error_line(error: ErrorReport) -> str:
    return (f"{_clock(error.ts_ns)}  ERROR    {error.camera_id or '-'} {error.frame_id or '-'} "
            f"{error.kind}: {error.reason}")


def format_message(prefix: str, topic: str, payload: bytes, color: bool = False) -> tuple[str, bool]:
    """The line for one message received under `prefix`, and whether it is a (decodable) result.
    A payload that does not decode gets a line saying so."""
    if topic == status_topic(prefix):
        kind = Status
    elif topic == error_topic(prefix):
        kind = ErrorReport
    else:  # the only other subscription: <prefix>/+/result
        kind = Result
    try:
        message = kind.model_validate_json(payload)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "payload"
        return f"{_clock(time.time_ns())}  UNDECODABLE {kind.__name__} on {topic}: {where}: {first['msg']}", False
    if isinstance(message, Result):
        return format_result_line(message, color), True
    if isinstance(message, Status):
        return format_status_line(message), False
    return format_error_line(message), False


def _clock(ts_ns: int) -> str:
    """Local wall-clock time with milliseconds."""
    return datetime.fromtimestamp(ts_ns / 1e9).strftime("%H:%M:%S.%f")[:-3]


def add_watch_arguments(parser: argparse.ArgumentParser) -> None:
    # Defaults are the daemon's (edge/settings.py).
    parser.add_argument("--host", default="127.0.0.1", help="MQTT broker host (default: %(default)s)")
    parser.add_argument("--port", type=int, default=1883, help="MQTT broker port (default: %(default)s)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--prefix", help="topic prefix (default: inspection/<station>)")
    which.add_argument("--station", default="station", help="station id (default: %(default)s)")
    parser.add_argument("--count", type=int, metavar="N", help="exit after N results")
    parser.add_argument("--timeout", type=float, metavar="S", help="exit after S seconds")
    parser.add_argument("--json", action="store_true", help="print the payloads as they are")
    security = parser.add_argument_group("TLS and login (as the daemon's mqtt.tls, mqtt.username, mqtt.password_file)")
    security.add_argument("--tls", action="store_true", help="TLS, verifying the broker with the system's CAs "
                          "(implied by the file options below)")
    security.add_argument("--ca-certs", type=Path, metavar="FILE", help="CA bundle to verify the broker")
    security.add_argument("--certfile", type=Path, metavar="FILE", help="client certificate (mutual TLS)")
    security.add_argument("--keyfile", type=Path, metavar="FILE", help="client key, unless it is in --certfile")
    security.add_argument("--username", help="broker user name")
    security.add_argument("--password-file", type=Path, metavar="FILE",
                          help="file holding the password (never on the command line: `ps` shows it)")


def run_watch(args: argparse.Namespace) -> int:
    """`edge watch`: exit code 0; 1 if the broker is unreachable, fails the TLS handshake, refuses
    the login or closes the first connection, or --timeout came before --count results; 2 for
    unusable options or files; 130 on Ctrl-C."""
    prefix = args.prefix or f"inspection/{args.station}"
    # The MQTT network thread hands messages, connection notices and a WatchError to this thread,
    # which prints.
    inbox: queue.Queue[mqtt.MQTTMessage | str | WatchError] = queue.Queue()
    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    try:
        _configure_security(client, args)
    except SettingsError as err:
        print(f"edge watch: error: {err}", file=sys.stderr)
        return 2
    # Until the broker has let the watch in once, a refusal means wrong options: end with one line
    # rather than retrying for ever. Afterwards (a broker restart) it reconnects and says so.
    accepted = threading.Event()
    # paho says why it dropped a connection only in its log: keep the last error line.
    paho_error: collections.deque[str] = collections.deque(maxlen=1)

    def on_log(client: mqtt.Client, userdata: None, level: int, message: str) -> None:
        if level == mqtt.MQTT_LOG_ERR:
            paho_error.append(message)

    def on_connect(client: mqtt.Client, userdata: None, flags: mqtt.ConnectFlags, reason_code: ReasonCode,
                   properties: Properties | None) -> None:
        if reason_code.is_failure:
            refused = f"the broker refused the connection: {reason_code}"
            inbox.put(f"edge watch: {refused}" if accepted.is_set() else WatchError(refused))
            return
        accepted.set()
        # (Re)subscribe on every connect: a clean session forgets subscriptions.
        client.subscribe([(result_topic(prefix, "+"), 1), (status_topic(prefix), 1), (error_topic(prefix), 1)])

    def on_disconnect(client: mqtt.Client, userdata: None, flags: mqtt.DisconnectFlags, reason_code: ReasonCode,
                      properties: Properties | None) -> None:
        if not reason_code.is_failure:
            return
        if accepted.is_set():
            inbox.put(f"edge watch: lost the broker ({reason_code}); reconnecting")
        else:  # e.g. a broker that wants a client certificate says so after the TLS handshake
            inbox.put(WatchError("the broker closed the connection before accepting it: "
                                 f"{paho_error[0] if paho_error else reason_code}"))

    client.on_log = on_log
    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.on_message = lambda client, userdata, message: inbox.put(message)
    try:
        client.connect(args.host, args.port)
    except ssl.SSLError as err:  # e.g. "certificate verify failed": a wrong CA, or not the broker's name
        print(f"edge watch: error: TLS handshake with {args.host}:{args.port} failed: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"edge watch: error: cannot reach the broker at {args.host}:{args.port}: {err}", file=sys.stderr)
        return 1
    client.loop_start()
    try:
        results = _print_messages(inbox, prefix, args)
    except WatchError as err:
        print(f"edge watch: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        client.disconnect()
        client.loop_stop()
    return 0 if args.count is None or results >= args.count else 1


def _configure_security(client: mqtt.Client, args: argparse.Namespace) -> None:
    """TLS and login from the options, as the daemon does from its settings; SettingsError if unusable."""
    if args.keyfile and not args.certfile:
        raise SettingsError("--keyfile needs --certfile")
    if args.password_file and args.username is None:
        raise SettingsError("--password-file needs --username")
    tls = None
    if args.tls or args.ca_certs or args.certfile:
        tls = TlsSettings(ca_certs=args.ca_certs, certfile=args.certfile, keyfile=args.keyfile)
    password = read_password_file(args.password_file) if args.password_file else None
    configure_security(client, tls, args.username, password)


def _print_messages(inbox: "queue.Queue[mqtt.MQTTMessage | str | WatchError]", prefix: str,
                    args: argparse.Namespace) -> int:
    """Print until --count results or --timeout; return the number of results."""
    color = sys.stdout.isatty()
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    results = 0
    while args.count is None or results < args.count:
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            break
        try:
            item = inbox.get(timeout=remaining)
        except queue.Empty:
            break
        if isinstance(item, WatchError):
            raise item
        if isinstance(item, str):
            print(item, file=sys.stderr)
            continue
        line, is_result = format_message(prefix, item.topic, item.payload, color)
        print(item.payload.decode(errors="replace") if args.json else line, flush=True)
        results += is_result
    return results
