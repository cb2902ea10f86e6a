import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _compiled_train_step(monkeypatch):
    """train_step's tests test its program: on the CPU path="auto" would switch to the eager step after
    timing both (tests/test_train_step_path.py tests that, and the eager step, by name)."""
    from mbcompile import backend
    monkeypatch.setattr(backend, "DEFAULT_PATH", "compiled")
    yield
