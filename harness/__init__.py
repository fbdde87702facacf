"""Runs a whole station on one machine: for the demo, the tests and the benchmarks.

It starts brokers and `edge serve` processes and talks to them as cameras and subscribers do;
`edge/`, `trainer/` and `protocols/` never import it.
"""


class HarnessError(Exception):
    """Something a run on this machine cannot go on without; the message says what."""
