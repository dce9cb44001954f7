import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pytest


@pytest.fixture
def record_bars(monkeypatch):
    """``record_bars(module)`` -> the list that collects every tqdm bar ``module`` makes from then on."""

    def record(module) -> list:
        bars = []

        class Recorded(module.tqdm):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                bars.append(self)

        monkeypatch.setattr(module, "tqdm", Recorded)
        return bars

    return record


@pytest.fixture
def interrupted(monkeypatch):
    """``interrupted(owner, name, on_call, run)``: calls ``run()`` while ``owner.name`` raises
    KeyboardInterrupt on its ``on_call``-th call (a training run stopped by Ctrl-C mid-way), asserts
    that the interrupt came through, then restores ``owner.name``."""

    def interrupt(owner, name, on_call, run):
        real, calls = getattr(owner, name), []

        def failing(*args, **kwargs):
            calls.append(1)
            if len(calls) == on_call:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, failing)
        with pytest.raises(KeyboardInterrupt):
            run()
        monkeypatch.setattr(owner, name, real)

    return interrupt
