# The GPU suite: every test here runs on a CUDA device against the CPU reference, and the whole
# folder is skipped (cleanly, with the reason) where pyswitch.cuda.is_available() is False.
from pathlib import Path

import pytest

import pyswitch

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    if pyswitch.cuda.is_available():
        return
    reason = "no CUDA device (pyswitch.cuda.is_available() is False)"
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.skip(reason=reason))
