"""sd_notify without C dependencies: READY=1, WATCHDOG=1, STOPPING=1 over $NOTIFY_SOCKET."""

import os
import socket


class SystemdNotifier:
    """No-op outside systemd (NOTIFY_SOCKET unset), so the daemon runs the same by hand."""

    def __init__(self) -> None:
        address = os.environ.get("NOTIFY_SOCKET")
        if address and address.startswith("@"):
            address = "\0" + address[1:]  # abstract namespace
        self.address = address
        watchdog_usec = os.environ.get("WATCHDOG_USEC")
        self.watchdog_interval_s = int(watchdog_usec) / 2e6 if watchdog_usec else None

    def notify(self, state: str) -> None:
        if not self.address:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(self.address)
            sock.sendall(state.encode())

    def ready(self, status: str) -> None:
        self.notify(f"READY=1\nSTATUS={status}")

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")

    def stopping(self) -> None:
        self.notify("STOPPING=1")
