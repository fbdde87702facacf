"""`make bench`: every benchmark, one after the other in fresh processes on this machine; prints
their tables as they come and writes them all to docs/benchmarks.md with the machine and the
command.

    .venv/bin/python bench/run_all.py [--run RUN] [--soak-minutes N] [--out docs/benchmarks.md]
"""

import argparse
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from machine import describe

BENCH = Path(__file__).resolve().parent
# (script, arguments): the daemon benchmark once per head.
SCRIPTS = (("model_cost.py", []), ("backends.py", []), ("one_step_vs_iterative.py", []),
           ("daemon_vs_bare.py", ["--head", "norm-guided"]), ("daemon_vs_bare.py", ["--head", "radar"]),
           ("train_throughput.py", []))


def run_script(script: str, extra: list[str]) -> str:
    """The script's stdout (its tables), echoed as it comes; its stderr goes to the terminal."""
    process = subprocess.Popen([sys.executable, str(BENCH / script), *extra], stdout=subprocess.PIPE, text=True)
    lines = []
    for line in process.stdout:
        print(line, end="", flush=True)
        lines.append(line)
    if process.wait() != 0:
        sys.exit(f"bench: {script} failed with exit code {process.returncode}")
    return "".join(lines).strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="trained run for the daemon benchmark (default: a 2-step model)")
    parser.add_argument("--soak-minutes", type=float, default=0.0,
                        help="also run bench/soak.py for this long (default: not)")
    parser.add_argument("--out", type=Path, default=BENCH.parent / "docs" / "benchmarks.md")
    args = parser.parse_args()
    started = time.monotonic()
    machine = describe()
    print(f"# {machine}\n", flush=True)
    sections = [run_script(script, extra + (["--run", str(args.run)] if script == "daemon_vs_bare.py" and args.run
                                            else [])) for script, extra in SCRIPTS]
    if args.soak_minutes > 0:
        sections.append(run_script("soak.py", ["--minutes", f"{args.soak_minutes:g}"]))
    command = shlex.join(["bench/run_all.py", *sys.argv[1:]])
    minutes = (time.monotonic() - started) / 60
    args.out.write_text(
        "# Benchmarks\n\n"
        f"Measured on {datetime.now(timezone.utc):%Y-%m-%d} by `make bench` (`{command}`; {minutes:.0f} min), "
        "every figure in one run on one machine:\n\n"
        f"{machine}.\n\n"
        "Each section ran in its own process, one after the other. Timings on a shared virtual machine "
        "move by several percent between runs; ratios within a section are the figures to compare.\n\n"
        + "\n\n".join(sections) + "\n")
    print(f"\nwritten to {args.out} ({minutes:.0f} min)")


if __name__ == "__main__":
    main()
