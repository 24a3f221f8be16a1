"""The local engine has no IP-Adapter yet: identity asked for explicitly is refused before
anything is loaded, asked for by default the image is rendered without it and says so."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from charforge.backends.base import BackendRequest, CheckpointInfo, IdentityUse
from charforge.backends.local import LocalBackend
from charforge.errors import IdentityUnavailable
from tests.backends.test_comfyui_identity import RED
from tests.backends.test_local import params, spec_for

pytestmark = [
    # diffusers hands torch tensors to NumPy (see test_local): not charforge's code.
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning"),
]
WHY = "the local engine cannot condition on reference images yet"


def ask(*, strength: float = 0.6, required: bool = False) -> BackendRequest:
    p = replace(params(hires=False), identity_strength=strength, identity_required=required)
    tiny = CheckpointInfo("tiny-a", "tiny-a", None)
    return BackendRequest("anime", tiny, p, 1, task_id="t-1", references=(RED,))


def test_required_identity_is_refused_before_anything_is_loaded(tmp_path: Path) -> None:
    backend = LocalBackend(spec_for(tmp_path))  # an empty models folder: nothing to load
    try:
        with pytest.raises(IdentityUnavailable) as refused:
            backend.generate(ask(required=True))
    finally:
        backend.close()
    assert refused.value.backend_specific and WHY in refused.value.message
    assert refused.value.extra == {"capability": "reference_image", "backends": ["loc"]}
    assert backend.loads == 0


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBackend]:
    for name in ("torch", "diffusers", "transformers", "accelerate"):
        pytest.importorskip(name)
    from tests.backends import tiny_sd

    root = tmp_path_factory.mktemp("local-identity")
    tokenizer = tiny_sd.tokenizer_folder(root)
    tiny_sd.build_tiny_pipeline(root / "models" / "tiny-a", seed=1, tokenizer=tokenizer)
    backend = LocalBackend(spec_for(root / "models"))
    yield backend
    backend.close()


def test_default_identity_renders_without_and_says_why(engine: LocalBackend) -> None:
    result = engine.generate(ask())
    assert len(result.images) == 1
    # Named like every backend's reason: which backend went without, and why.
    assert result.identity == IdentityUse(False, reason=f"backend '{engine.spec.name}': {WHY}")

    assert engine.generate(ask(strength=0.0)).identity is None  # nothing asked
