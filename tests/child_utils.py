"""Running a snippet of Python in a child process that can import the test helpers: for tests
whose failure mode is a crash or a hang, which must not take the test runner down with it."""

import os
import subprocess
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))


def run_python(code: str, timeout: float):
    """Run ``code`` with this interpreter from the tests folder; the CompletedProcess (text
    stdout/stderr captured), or None if it did not finish within ``timeout`` seconds (then it
    has been killed)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([_HERE] + sys.path))
    try:
        return subprocess.run(
            [sys.executable, "-c", code],
            cwd=_HERE,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return None
