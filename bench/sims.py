"""A1111 simulators in a process of their own, as real WebUIs are: their HTTP handling then
does not share charforge's interpreter (and its lock) in the fleet benchmark.

``python -m bench.sims NAME=MODEL,MODEL ...`` prints one JSON line ``{NAME: url}`` and serves
until its standard input closes. The benchmark reads their counters over HTTP
(``/_simulator/state``) and sets their speed with ``/_simulator/faults``.
"""

from __future__ import annotations

import json
import sys
from contextlib import ExitStack

from charforge.simulator import A1111Simulator, SimulatorSettings


def main() -> None:
    with ExitStack() as stack:
        urls = {}
        for spec in sys.argv[1:]:
            name, _, models = spec.partition("=")
            sim = A1111Simulator(SimulatorSettings(models=models.split(","), name=name))
            stack.enter_context(sim)
            urls[name] = sim.url
        print(json.dumps(urls), flush=True)
        sys.stdin.read()  # until the benchmark closes our stdin


if __name__ == "__main__":
    main()
