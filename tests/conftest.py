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
