"""Each test starts from tinylm's built-ins plus this plugin, registered programmatically
(installed or not: no other installed plugin loads by accident)."""

import pytest
from hypothesis import settings

from tinylm import plugins

import tinylm_rope_scaling

settings.register_profile("rope-scaling", max_examples=20, deadline=None, derandomize=True)
settings.load_profile("rope-scaling")


@pytest.fixture(autouse=True)
def rope_scaling(monkeypatch):
    monkeypatch.setenv(plugins.ALLOW_ENV, "")
    plugins.reset()
    plugins.register_plugin(tinylm_rope_scaling, name="rope-scaling")
    yield
    plugins.reset()
