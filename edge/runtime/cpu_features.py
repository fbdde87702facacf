"""The instruction-set extensions of the station's CPU, as Linux names them (the `flags` line of
/proc/cpuinfo). A bundle file compiled for an extension the CPU lacks would die with SIGILL, so the
loader never starts one whose `cpu_features` are not all here."""

import functools
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


def parse_cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The first processor's flags (every core of a station has the same)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


@functools.cache
def station_cpu_features() -> frozenset[str]:
    """Empty where /proc/cpuinfo cannot be read: then only files that need nothing load."""
    try:
        return parse_cpu_flags(CPUINFO.read_text())
    except OSError:
        return frozenset()
