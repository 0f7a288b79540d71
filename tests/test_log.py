# The C++ core's log messages as Python sees them: stderr only (never stdout), filtered by
# pyswitch.set_log_level; checked in subprocesses, whose stderr is the core's sink.
import subprocess
import sys

import pytest

import pyswitch


def run(code: str, **env) -> subprocess.CompletedProcess:
    import os
    import tempfile

    # The child imports the pyswitch this process imported (installed, or a built checkout),
    # and runs outside the source tree so that an unbuilt checkout cannot shadow it.
    here = os.path.dirname(os.path.dirname(os.path.abspath(pyswitch.__file__)))
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": path, **env},
        cwd=tempfile.gettempdir(),
    )


POISON = """
import pyswitch
from pyswitch.comm import LocalGroup
pyswitch.set_log_level({level!r})
group = LocalGroup(2, timeout=5)
def body(c):
    if c.rank == 1:
        raise RuntimeError("rank one gives up")
    c.barrier()
try:
    group.run(body)
except Exception as exc:
    print("raised", type(exc).__name__)
"""


def test_info_messages_go_to_stderr_when_enabled():
    proc = run(POISON.format(level="info"))
    assert proc.returncode == 0, proc.stderr
    assert "pyswitch: info: thread-rank group poisoned" in proc.stderr, proc.stderr
    assert "rank one gives up" in proc.stderr
    assert "poisoned" not in proc.stdout  # never stdout
    assert "raised" in proc.stdout


def test_default_level_hides_info_and_off_hides_everything():
    assert "poisoned" not in run(POISON.format(level="warning")).stderr
    # Messages of the import itself are controlled by the environment variable.
    quiet = run(
        "import pyswitch; print(pyswitch.get_log_level())",
        PYSWITCH_CPU_ISA="no-such-isa",
        PYSWITCH_LOG_LEVEL="off",
    )
    assert "pyswitch:" not in quiet.stderr and quiet.stdout.strip() == "off", quiet


def test_bad_isa_value_is_a_warning_not_an_error():
    proc = run("import pyswitch; print(pyswitch.cpu_isa())", PYSWITCH_CPU_ISA="no-such-isa")
    assert proc.returncode == 0, proc.stderr
    assert "pyswitch: warning: PYSWITCH_CPU_ISA ignored" in proc.stderr, proc.stderr
    assert proc.stdout.strip() in pyswitch.supported_isas()


def test_level_round_trip_and_errors():
    before = pyswitch.get_log_level()
    try:
        for level in ("debug", "info", "warning", "error", "off"):
            pyswitch.set_log_level(level)
            assert pyswitch.get_log_level() == level
    finally:
        pyswitch.set_log_level(before)
    with pytest.raises(ValueError, match="level must be one of"):
        pyswitch.set_log_level("loud")
    with pytest.raises(TypeError, match="level must be a str"):
        pyswitch.set_log_level(3)
