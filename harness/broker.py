"""MQTT brokers on 127.0.0.1: the system's mosquitto, or amqtt embedded in this process."""

import asyncio
import os
import pwd
import random
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness import HarnessError

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0  # after SIGTERM; then SIGKILL
LOG_TAIL_CHARS = 2000


class BrokerError(HarnessError):
    """A broker could not be found or started."""


LOWEST_PORT = 10000
EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _ephemeral_range() -> tuple[int, int]:
    """The ports the kernel gives to outgoing connections (Linux's default where the file is missing)."""
    try:
        low, high = EPHEMERAL_RANGE_FILE.read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing holds right now, below the ephemeral range.

    Outside that range because brokers are stopped and restarted on their port: while one is down,
    the kernel could hand its port to any outgoing connection as a source port (then the restart
    fails with "Address already in use"; seen in CI).
    """
    low = _ephemeral_range()[0]
    for port in random.sample(range(LOWEST_PORT, low), min(200, low - LOWEST_PORT)):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise HarnessError(f"no free TCP port on 127.0.0.1 between {LOWEST_PORT} and {low}")


def find_mosquitto() -> str | None:
    """The mosquitto binary on PATH or in the sbin folders (often not on a user's PATH)."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
    return shutil.which("mosquitto", path=search)


def _mosquitto_passwd() -> str:
    """The tool that writes mosquitto's password files (installed with mosquitto, in a bin folder)."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/bin", "/usr/local/bin"])
    found = shutil.which("mosquitto_passwd", path=search)
    if found is None:
        raise BrokerError("mosquitto_passwd is not installed (it comes with mosquitto)")
    return found


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise BrokerError(f"{Path(command[0]).name} exited with code {done.returncode}: {done.stderr.strip()}")


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


class Broker:
    """What a station and its subscribers need to know of a broker; `with broker:` runs it."""
    port: int
    protocol: str  # the MQTT version a station speaks to it: "5" or "3.1.1"
    name: str

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> "Broker":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@dataclass(frozen=True)
class Listener:
    """How mosquitto's one listener is secured. The default: plain MQTT, anyone may connect."""
    certfile: Path | None = None  # the broker's certificate (with `keyfile`): the listener speaks TLS
    keyfile: Path | None = None
    cafile: Path | None = None  # the CA that signs client certificates
    require_certificate: bool = False  # mutual TLS: clients must present a certificate signed by `cafile`
    users: dict[str, str] = field(default_factory=dict)  # name -> password; any: anonymous clients are refused

    def config_lines(self, password_file: Path) -> list[str]:
        lines = []
        if self.certfile is not None:
            lines += [f"certfile {self.certfile}", f"keyfile {self.keyfile}"]
        if self.cafile is not None:
            lines.append(f"cafile {self.cafile}")
        if self.require_certificate:
            lines.append("require_certificate true")
        if self.users:
            lines.append(f"password_file {password_file}")
        lines.append(f"allow_anonymous {'false' if self.users else 'true'}")
        return lines


class MosquittoBroker(Broker):
    """The system's mosquitto on 127.0.0.1:`port`; it can be stopped and started again on the same port.

    It persists its sessions (into its own folder under `workdir`), so that a subscriber's session
    and subscriptions survive `stop()`/`start()`: without that, a station could re-deliver its
    backlog before the subscriber has re-subscribed, and outage tests would race. mosquitto 2.0.11
    restores only sessions that began with clean start off (tests/mqtt_broker.py Subscriber).
    `listener` adds TLS, mutual TLS and logins.
    """
    protocol = "5"

    def __init__(self, workdir: Path, listener: Listener = Listener()) -> None:
        binary = find_mosquitto()
        if binary is None:
            raise BrokerError("mosquitto is not installed (apt-get install mosquitto)")
        self._binary = binary
        self.port = free_port()
        self.name = f"mosquitto on 127.0.0.1:{self.port}"
        self._dir = workdir / f"mosquitto-{self.port}"
        self._dir.mkdir(parents=True)
        password_file = self._dir / "passwords"
        for i, (user, password) in enumerate(listener.users.items()):
            # mosquitto stores only salted hashes; -c creates the file with the first user.
            _run([_mosquitto_passwd(), "-b", *(["-c"] if i == 0 else []), str(password_file), user, password])
        self._config = self._dir / "mosquitto.conf"
        self._config.write_text("\n".join([f"listener {self.port} 127.0.0.1",
                                           *listener.config_lines(password_file),
                                           # Started by root, mosquitto would run as `mosquitto`, which
                                           # cannot read or write this private folder.
                                           f"user {pwd.getpwuid(os.geteuid()).pw_name}",
                                           "persistence true",
                                           f"persistence_location {self._dir}/",
                                           "log_dest stderr"]) + "\n")
        self._log_path = self._dir / "mosquitto.log"
        self._process: subprocess.Popen | None = None

    def start(self) -> None:
        # Appended to: the log keeps every run's lines, including a start that fails before logging is set up.
        with open(self._log_path, "ab") as log:
            self._process = subprocess.Popen([self._binary, "-c", str(self._config)], stdout=log, stderr=log)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _listening(self.port):
            if self._process.poll() is not None:
                code, self._process = self._process.returncode, None
                raise BrokerError(f"mosquitto exited with code {code}: {self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise BrokerError(f"mosquitto did not listen on 127.0.0.1:{self.port} within "
                                  f"{START_TIMEOUT_S:.0f} s: {self.log()}")
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM (mosquitto saves its sessions), SIGKILL if it has not exited in STOP_TIMEOUT_S."""
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None

    def log(self) -> str:
        """The end of mosquitto's log."""
        if not self._log_path.exists():
            return "(no log)"
        return self._log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]


class EmbeddedBroker(Broker):
    """amqtt's broker (MQTT 3.1.1) on its own asyncio loop in a background thread of this process."""
    protocol = "3.1.1"

    def __init__(self) -> None:
        self.port = free_port()
        self.name = f"embedded amqtt on 127.0.0.1:{self.port}"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker = None

    def start(self) -> None:
        try:
            from amqtt.broker import Broker as AmqttBroker  # the `demo` extra, needed only without mosquitto
        except ImportError:
            raise BrokerError("the embedded broker needs amqtt: pip install '.[demo]' "
                              "(or install mosquitto: apt-get install mosquitto)") from None
        config = {"listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}},
                  "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}}

        async def start_broker() -> AmqttBroker:
            broker = AmqttBroker(config)  # takes the running loop: create it there
            await broker.start()
            return broker

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="mqtt-broker", daemon=True)
        self._thread.start()
        self._broker = asyncio.run_coroutine_threadsafe(start_broker(), self._loop).result(START_TIMEOUT_S)

    def stop(self) -> None:
        if self._loop is None:
            return
        if self._broker is not None:
            asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop).result(STOP_TIMEOUT_S)
            self._broker = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(STOP_TIMEOUT_S)
        self._loop.close()
        self._loop = None


def choose_broker(choice: str, workdir: Path) -> Broker:
    """`mosquitto`, `embedded`, or `auto`: mosquitto when installed, else the embedded one."""
    if choice == "embedded" or (choice == "auto" and find_mosquitto() is None):
        return EmbeddedBroker()
    return MosquittoBroker(workdir)
