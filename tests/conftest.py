"""Shared test set-up: Hypothesis profiles, the gpu marker, plugin isolation, `device`."""

import os

import pytest
from hypothesis import HealthCheck, settings

from tinylm import backend, plugins

# `ci`: reproducible and bounded (selected when CI is set, as .ci/run does);
# `dev`: a few more random examples. Override with --hypothesis-profile=NAME.
settings.register_profile(
    "ci", derandomize=True, max_examples=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=50, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


def pytest_collection_modifyitems(config, items):
    """Skip @pytest.mark.gpu tests unless CuPy sees a GPU (`pytest -m gpu` runs them)."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if gpu_items and not backend.cuda_available():
        skip = pytest.mark.skip(reason="needs CuPy and a CUDA GPU: pip install -e '.[cuda]' "
                                       "on a GPU machine, then run pytest -m gpu")
        for item in gpu_items:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolate_plugins(monkeypatch):
    """Every test starts with only the built-in plugins: none installed are loaded."""
    monkeypatch.setenv(plugins.ALLOW_ENV, "")
    plugins.reset()
    yield
    plugins.reset()


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    """Run a test once per backend: "cpu" always, "cuda" where a GPU is available."""
    return request.param
