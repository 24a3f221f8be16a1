"""``charforge serve --demo``: two A1111 simulators on the default routes, so anyone can try
charforge without a GPU. Everything they make is a labelled placeholder marked simulated."""

from __future__ import annotations

from dataclasses import dataclass

from charforge.simulator import A1111Simulator, SimulatorSettings


@dataclass
class DemoBackends:
    realistic: A1111Simulator
    anime: A1111Simulator

    def settings_overrides(self) -> dict[str, object]:
        return {
            "runpod_realistic_url": self.realistic.url,
            "runpod_anime_cartoon_fantasy_url": self.anime.url,
            "demo": True,
        }

    def stop(self) -> None:
        self.realistic.stop()
        self.anime.stop()


def start_demo_backends(host: str = "127.0.0.1") -> DemoBackends:
    realistic = A1111Simulator(
        SimulatorSettings(models=["cyberrealistic.safetensors"], name="demo-realistic")
    )
    anime = A1111Simulator(
        SimulatorSettings(models=["diving.safetensors"], name="demo-anime-cartoon-fantasy")
    )
    realistic.start(host)
    try:
        anime.start(host)
    except BaseException:
        realistic.stop()
        raise
    return DemoBackends(realistic, anime)
