"""Routes from the seed's env vars and from a TOML file."""

from __future__ import annotations

from pathlib import Path

import pytest

from charforge.config import SettingsError, load_settings
from charforge.domain.routes import build_route_table, split_credentials
from charforge.errors import InvalidInput


def test_seed_env_vars_configure_the_two_backends(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNPOD_REALISTIC_URL", "https://pod-7860.proxy.runpod.net/")
    monkeypatch.setenv("RUNPOD_ANIME_CARTOON_FANTASY_URL", "https://pod-7861.proxy.runpod.net/")
    table = build_route_table(load_settings())
    assert table.backends["realistic"].url == "https://pod-7860.proxy.runpod.net"
    assert table.backends["anime-cartoon-fantasy"].url == "https://pod-7861.proxy.runpod.net"
    assert table.backends["realistic"].source == "RUNPOD_REALISTIC_URL"
    assert table.route("realistic").backends == ("realistic",)
    assert table.route("fantasy").backends == ("anime-cartoon-fantasy",)


def test_defaults_are_the_local_webui_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RUNPOD_REALISTIC_URL", raising=False)
    monkeypatch.delenv("RUNPOD_ANIME_CARTOON_FANTASY_URL", raising=False)
    table = build_route_table(load_settings())
    assert table.backends["realistic"].url == "http://127.0.0.1:7860"
    assert table.backends["anime-cartoon-fantasy"].url == "http://127.0.0.1:7861"


def test_comma_separated_urls_make_a_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNPOD_REALISTIC_URL", "http://a:7860, http://b:7860")
    table = build_route_table(load_settings())
    assert table.route("realistic").backends == ("realistic", "realistic-2")
    assert table.backends["realistic-2"].url == "http://b:7860"


def test_credentials_come_from_auth_var_or_url_and_never_show(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RUNPOD_REALISTIC_URL", "http://alice:s3cret@gpu:7860/")
    monkeypatch.setenv("RUNPOD_ANIME_CARTOON_FANTASY_URL", "http://gpu:7861")
    monkeypatch.setenv("RUNPOD_ANIME_CARTOON_FANTASY_AUTH", "bob:hunter2")
    table = build_route_table(load_settings())
    realistic, anime = table.backends["realistic"], table.backends["anime-cartoon-fantasy"]
    assert realistic.auth == ("alice", "s3cret") and realistic.url == "http://gpu:7860"
    assert anime.auth == ("bob", "hunter2")
    assert "s3cret" not in repr(realistic) and "hunter2" not in repr(anime)


def test_toml_file_adds_backends_and_routes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "charforge.toml"
    config.write_text(
        """
data_dir = "/srv/charforge"
[backends.forge-box]
url = "http://forge:7861"
auth = "u:p"
timeout_seconds = 42
[routes.anime]
checkpoint = "ponyDiffusion.safetensors"
backends = ["forge-box"]
[routes.watercolor]
checkpoint = "watercolor.safetensors"
backends = ["forge-box"]
label = "Watercolor"
emoji = "🎨"
[defaults]
steps = 30
"""
    )
    monkeypatch.setenv("CHARFORGE_CONFIG", str(config))
    settings = load_settings()
    table = build_route_table(settings)
    assert str(settings.data_dir) == "/srv/charforge"
    assert settings.defaults.steps == 30 and settings.defaults.cfg_scale == 8
    assert table.route("anime").checkpoint == "ponyDiffusion.safetensors"
    assert table.route("anime").backends == ("forge-box",)
    assert table.backends["forge-box"].timeout == 42
    assert table.backends["forge-box"].auth == ("u", "p")
    assert (
        table.route("watercolor").indicator == "🎨 Using Watercolor Style (watercolor.safetensors)"
    )
    assert table.normalize_style("WaterColor", field="artStyle") == "watercolor"
    # env still beats the file
    monkeypatch.setenv("CHARFORGE_DATA_DIR", "/elsewhere")
    assert str(load_settings().data_dir) == "/elsewhere"


def test_route_naming_an_unknown_backend_says_which(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[routes.anime]\nbackends = ["nope"]\n')
    monkeypatch.setenv("CHARFORGE_CONFIG", str(config))
    with pytest.raises(ValueError, match=r"\[routes.anime\].*'nope'"):
        build_route_table(load_settings())


def test_missing_config_file_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHARFORGE_CONFIG", "/no/such/file.toml")
    with pytest.raises(SettingsError, match="CHARFORGE_CONFIG"):
        load_settings()


def test_unknown_style_lists_the_known_ones() -> None:
    table = build_route_table(load_settings())
    assert table.normalize_style(" Realistic ", field="artStyle") == "realistic"
    with pytest.raises(InvalidInput) as caught:
        table.normalize_style("watercolor", field="artStyle")
    assert caught.value.field == "artStyle"
    assert "anime, cartoon, fantasy, realistic" in caught.value.message


@pytest.mark.parametrize("bad", ["ftp://x", "not a url", "http://"])
def test_bad_backend_url_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="not an http"):
        split_credentials(bad)


def test_bad_url_error_hides_the_password() -> None:
    with pytest.raises(ValueError, match="not an http") as caught:
        split_credentials("htps://admin:s3cret@pod-7860.proxy.runpod.net/")
    assert "s3cret" not in str(caught.value)


def test_runpod_proxy_backends_stay_under_its_100s_cutoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNPOD_REALISTIC_URL", "https://pod-7860.proxy.runpod.net/")
    monkeypatch.setenv("RUNPOD_ANIME_CARTOON_FANTASY_URL", "http://gpu-box:7861/")
    table = build_route_table(load_settings())
    assert table.backends["realistic"].timeout == 90
    assert table.backends["anime-cartoon-fantasy"].timeout == 300
    monkeypatch.setenv("CHARFORGE_BACKEND_TIMEOUT", "150")  # an explicit choice is kept
    assert build_route_table(load_settings()).backends["realistic"].timeout == 150


def test_misspelt_toml_key_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[default]\nsteps = 40\n")
    monkeypatch.setenv("CHARFORGE_CONFIG", str(config))
    with pytest.raises(SettingsError, match="default"):
        load_settings()


# -- one server, one backend -----------------------------------------------------------------


def test_one_webui_named_by_both_env_vars_is_one_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    # The same server however it is written: case, default port, trailing slash.
    monkeypatch.setenv("RUNPOD_REALISTIC_URL", "http://GPU.example:80/")
    monkeypatch.setenv("RUNPOD_ANIME_CARTOON_FANTASY_URL", "http://gpu.example")
    table = build_route_table(load_settings())

    assert list(table.backends) == ["realistic"]
    assert table.backends["realistic"].aliases == ("anime-cartoon-fantasy",)
    assert table.names["anime-cartoon-fantasy"] == "realistic"
    assert all(table.route(s).backends == ("realistic",) for s in ("anime", "realistic"))
    assert table.routes_of("realistic") == ["anime", "cartoon", "fantasy", "realistic"]


def test_a_pool_named_in_both_env_vars_is_each_server_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    urls = "http://a:7860,http://b:7860,http://c:7860,http://d:7860"
    monkeypatch.setenv("RUNPOD_REALISTIC_URL", urls)
    monkeypatch.setenv("RUNPOD_ANIME_CARTOON_FANTASY_URL", urls.replace(",", ", "))
    table = build_route_table(load_settings())

    names = ("realistic", "realistic-2", "realistic-3", "realistic-4")
    assert tuple(table.backends) == names
    assert table.route("anime").backends == table.route("realistic").backends == names
    assert len({spec.key for spec in table.backends.values()}) == 4


def test_other_credentials_or_paths_make_other_backends(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNPOD_REALISTIC_URL", "http://alice:one@gpu:7860")
    monkeypatch.setenv("RUNPOD_ANIME_CARTOON_FANTASY_URL", "http://bob:two@gpu:7860")
    assert len(build_route_table(load_settings()).backends) == 2
    monkeypatch.setenv("RUNPOD_REALISTIC_URL", "http://gpu:7860/webui-a")
    monkeypatch.setenv("RUNPOD_ANIME_CARTOON_FANTASY_URL", "http://gpu:7860/webui-b")
    assert len(build_route_table(load_settings()).backends) == 2


def test_a_toml_backend_on_an_env_var_server_is_that_backend(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUNPOD_REALISTIC_URL", "http://gpu:7860")
    monkeypatch.setenv("RUNPOD_ANIME_CARTOON_FANTASY_URL", "http://other:7861")
    config = tmp_path / "c.toml"
    config.write_text(
        '[backends.big]\nurl = "http://gpu:7860/"\n'
        '[routes.fantasy]\nbackends = ["big", "anime-cartoon-fantasy"]\n'
    )
    monkeypatch.setenv("CHARFORGE_CONFIG", str(config))
    table = build_route_table(load_settings())

    assert "big" not in table.backends and table.names["big"] == "realistic"
    assert table.route("fantasy").backends == ("realistic", "anime-cartoon-fantasy")
    assert table.routes_of("realistic") == ["fantasy", "realistic"]


def test_one_server_cannot_have_two_kinds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "c.toml"
    config.write_text(
        '[backends.a]\nurl = "http://gpu:8188"\nkind = "comfyui"\n'
        '[backends.b]\nurl = "http://gpu:8188"\nkind = "a1111"\n'
    )
    monkeypatch.setenv("CHARFORGE_CONFIG", str(config))
    with pytest.raises(ValueError, match="same server") as error:
        build_route_table(load_settings())
    assert "[backends.a]" in str(error.value) and "[backends.b]" in str(error.value)


def test_two_names_of_one_server_must_agree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    workflow = tmp_path / "a.json"
    workflow.write_text("{}")
    config = tmp_path / "c.toml"
    config.write_text(
        '[backends.comfy-a]\nurl = "http://gpu:8188"\nkind = "comfyui"\n'
        f'workflow = "{workflow}"\n'
        '[backends.comfy-b]\nurl = "http://gpu:8188/"\nkind = "comfyui"\n'
    )
    monkeypatch.setenv("CHARFORGE_CONFIG", str(config))
    with pytest.raises(ValueError, match="different workflow") as error:
        build_route_table(load_settings())
    assert "[backends.comfy-a]" in str(error.value) and "define it once" in str(error.value)
