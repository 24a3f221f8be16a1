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


# Two LoRAs on each simulator so that prompts with ``<lora:detail_tweaker:0.6>`` or
# ``<lora:outline>`` work in the demo (an unknown name is ignored, as A1111 does).
DEMO_LORAS = ("detail_tweaker.safetensors", "styles/outline.safetensors")


def start_demo_backends(host: str = "127.0.0.1") -> DemoBackends:
    # With the ControlNet extension, so that a character's reference images visibly steer
    # its demo images (the stand-in blends them into the placeholder).
    realistic = A1111Simulator(
        SimulatorSettings(
            models=["cyberrealistic.safetensors"],
            name="demo-realistic",
            loras=list(DEMO_LORAS),
            controlnet=True,
        )
    )
    anime = A1111Simulator(
        SimulatorSettings(
            models=["diving.safetensors"],
            name="demo-anime-cartoon-fantasy",
            loras=list(DEMO_LORAS),
            controlnet=True,
        )
    )
    realistic.start(host)
    try:
        anime.start(host)
    except BaseException:
        realistic.stop()
        raise
    return DemoBackends(realistic, anime)
