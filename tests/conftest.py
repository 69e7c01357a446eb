import pytest

from tests.checkpoints import CONFIGS, build_reference, save_checkpoint


@pytest.fixture(scope="session", params=sorted(CONFIGS))
def ref_and_ckpt(request, tmp_path_factory):
    model = build_reference(request.param, seed=sorted(CONFIGS).index(request.param))
    path = save_checkpoint(model, tmp_path_factory.mktemp(f"ckpt-{request.param}"))
    return request.param, model, path


@pytest.fixture(scope="session")
def small_ckpt(tmp_path_factory):
    """One small random checkpoint for unit tests."""
    model = build_reference("sliding", seed=11)
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt-unit"))
