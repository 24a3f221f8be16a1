"""A stand-in for the AUTOMATIC1111 / Forge WebUI HTTP API that draws placeholders.

Used by the test suite as a real HTTP server and by people without a GPU
(``charforge simulate-a1111``, ``charforge serve --demo``).
"""

from charforge.simulator.app import create_simulator_app
from charforge.simulator.config import Faults, RecordedRequest, SimulatorSettings
from charforge.simulator.engine import SimulatorEngine
from charforge.simulator.server import A1111Simulator, run_simulator

__all__ = [
    "A1111Simulator",
    "Faults",
    "RecordedRequest",
    "SimulatorEngine",
    "SimulatorSettings",
    "create_simulator_app",
    "run_simulator",
]
