# Runs the MPI suite (tests/mpi) under mpiexec from the ordinary single-process pytest run.
"""``mpiexec -n 2 python -m pytest tests/mpi`` (everything) and ``mpiexec -n 4`` (collectives
and expert parallelism; the fault scenarios are timing-bound and run at -n 2 only).

Skipped unless ``mpiexec``, mpi4py and ``pyswitch._mpi`` are all available. The child processes
import the same pyswitch as this process: they run from the tests directory (never from a
source tree whose unbuilt ``pyswitch/`` could shadow an installed wheel), and this process's
pyswitch directory goes on PYTHONPATH only when they would not find it otherwise (a source
checkout); an installed pyswitch is used as installed. The tests directory is found from
``__file__``, so a copy of tests/ outside the source tree works too.
"""

import importlib.util
import os
import re
import signal
import subprocess
import sys

import pytest

import pyswitch

TESTS = os.path.dirname(os.path.abspath(__file__))
MPI_TESTS = os.path.join(TESTS, "mpi")
TIMEOUT = 600
# Launcher variables of an enclosing MPI job, which must not leak into the child job.
_LAUNCHER_PREFIXES = ("PMI_", "PMIX_", "OMPI_", "HYDRA_", "MPI_LOCALNRANKS", "MPI_LOCALRANKID")


def _mpiexec():
    """The mpiexec beside this interpreter (the mpich wheel's, in a venv), else on PATH."""
    import shutil

    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.path.isfile(beside) and os.access(beside, os.X_OK):
        return beside
    return shutil.which("mpiexec")


def _why_skip():
    if _mpiexec() is None:
        return "mpiexec is not on PATH"
    if importlib.util.find_spec("mpi4py") is None:
        return "mpi4py is not installed"
    try:
        from pyswitch import _mpi  # noqa: F401  (loads libmpi; does not initialise MPI)
    except ImportError as exc:
        return f"pyswitch._mpi cannot be imported ({exc})"
    return None


_SKIP = _why_skip()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=str(_SKIP))


def _child_env():
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_PREFIXES)}
    env["MPIR_CVAR_CH4_PROGRESS_THROTTLE"] = "1"  # yield while polling: ranks may share cores
    env["UCX_LOG_LEVEL"] = "error"  # abandoned requests after fault tests warn at exit
    here = os.path.realpath(pyswitch.__file__)
    probe = subprocess.run(
        [sys.executable, "-c", "import pyswitch; print(pyswitch.__file__)"],
        cwd=TESTS,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = probe.stdout.strip().splitlines()
    if probe.returncode != 0 or not lines or os.path.realpath(lines[-1]) != here:
        parent = os.path.dirname(os.path.dirname(here))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [parent, env.get("PYTHONPATH")]))
    return env


def _run_mpi_pytest(nprocs, paths):
    cmd = [_mpiexec(), "-n", str(nprocs), sys.executable, "-m", "pytest", *paths]
    cmd += ["-q", "-p", "no:cacheprovider", "-x"]
    proc = subprocess.Popen(
        cmd,
        cwd=TESTS,
        env=_child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # so that a timeout can end mpiexec and every rank
    )
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"ran past {TIMEOUT} s: " + _summary(cmd, "killed", out))
    return cmd, proc.returncode, out


_KEY_LINE = re.compile(
    r"Fatal Python error|BAD TERMINATION|EXIT STRING|MPI_Abort|^(FAILED|ERROR) |"
    r"\d+ (passed|failed|errors?|skipped)|File \".*(/tests/|/pyswitch/).*line \d+"
)


def _summary(cmd, rc, out):
    """The command, its status, the lines that say what went wrong, and the output's tail."""
    key = [line for line in out.splitlines() if _KEY_LINE.search(line)]
    return (
        f"{' '.join(cmd)} (exit status {rc})\n--- key lines:\n"
        + "\n".join(key[-60:])
        + f"\n--- output tail:\n{out[-6000:]}"
    )


def _check(cmd, rc, out, nprocs):
    what = _summary(cmd, rc, out)
    assert rc == 0, what
    passed = [int(n) for n in re.findall(r"(\d+) passed", out)]
    assert passed and min(passed) > 0, "no test passed (all skipped?): " + what
    # Every rank prints its own summary line (lines of different ranks may run together).
    assert len(passed) >= nprocs, f"expected {nprocs} summaries: " + what
    assert not re.search(r"\d+ (failed|errors?)\b", out), what
    assert "FAILED" not in out and "ERROR" not in out, what


def test_mpi_suite_on_2_ranks():
    cmd, rc, out = _run_mpi_pytest(2, [MPI_TESTS])
    _check(cmd, rc, out, 2)


def test_mpi_collectives_and_expert_parallel_on_4_ranks():
    paths = [
        os.path.join(MPI_TESTS, "test_mpi_collectives.py"),
        os.path.join(MPI_TESTS, "test_mpi_expert_parallel.py"),
    ]
    cmd, rc, out = _run_mpi_pytest(4, paths)
    _check(cmd, rc, out, 4)
