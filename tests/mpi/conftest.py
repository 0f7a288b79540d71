# pytest configuration for the MPI suite (tests/mpi): runs only under mpiexec with >= 2 ranks.
"""The MPI suite runs as ``mpiexec -n N python -m pytest tests/mpi`` (N >= 2; every process is
one rank and runs the same tests in the same order). Anywhere else (a plain ``pytest`` run,
``mpiexec -n 1``, no mpi4py, no ``pyswitch._mpi``) every test here is skipped, and MPI is not
even initialised unless an MPI launcher started this process.

Rules that keep the ranks in step (so that a failure can never turn into a hang):

* Every rank makes the same collective-constructing calls (``MPIComm(...)`` is collective over
  ``MPI.COMM_WORLD``) in the same order, whatever its tests' outcomes: the fixtures construct
  one per test, fault tests one per repetition, always.
* Every collective has a timeout; tests record their check failures in a :class:`Failures`
  (mpi_utils.py) and raise them together on every rank at the end of the test.
* After each test, the ``_resync`` fixture passes a barrier on a fresh ``MPIComm``.
* At the end the ranks meet at a barrier; a rank that waits there in vain (a peer stopped
  early, e.g. ``-x``, or lost count) aborts the MPI job once its report is printed, so that no
  rank waits forever.
"""

import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
# The helpers (array_utils.py, test_comm_local.py, ...) are imported by plain name, also when
# tests/mpi is run on its own outside the source tree (tests/conftest.py may then not load).
for _path in (TESTS, HERE):
    if _path not in sys.path:
        sys.path.insert(0, _path)

# Set by the launchers a process started by mpiexec / srun / mpirun sees (MPICH's Hydra sets
# PMI_*; Open MPI OMPI_*; PMIx launchers PMIX_*). Without any, this process is a singleton.
_LAUNCHER_VARS = ("PMI_SIZE", "PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")

#: Seconds the default ``comm`` fixture and the resynchronising barrier may wait.
DEFAULT_TIMEOUT = 60.0
#: Seconds a rank that finished waits at the end for the others before aborting the job.
FINAL_TIMEOUT = 60.0


def _mpi_world():
    """(MPI module, None) when this process is one rank of >= 2; else (None, why to skip)."""
    if not any(os.environ.get(v) for v in _LAUNCHER_VARS):
        return None, "not started by an MPI launcher (world size 1): run under mpiexec -n 2"
    try:
        from mpi4py import MPI  # initialises MPI
    except ImportError as exc:
        return None, f"mpi4py is not installed ({exc})"
    try:
        from pyswitch import _mpi  # noqa: F401
    except ImportError as exc:
        return None, f"pyswitch._mpi (the MPI backend) cannot be imported ({exc})"
    if MPI.COMM_WORLD.Get_size() < 2:
        return None, "MPI world size is 1: run under mpiexec -n 2 (or more)"
    return MPI, None


MPI, SKIP_REASON = _mpi_world()


def pytest_report_header(config):
    if MPI is None:
        return f"pyswitch MPI suite: skipped ({SKIP_REASON})"
    import pyswitch

    world = MPI.COMM_WORLD
    return (
        f"pyswitch MPI suite: rank {world.Get_rank()} of {world.Get_size()}, "
        f"pyswitch from {os.path.dirname(pyswitch.__file__)}, "
        f"{MPI.Get_library_version().splitlines()[0].strip()}"
    )


def pytest_collection_modifyitems(config, items):
    if MPI is not None:
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if os.path.dirname(os.path.abspath(str(item.path))) == HERE:
            item.add_marker(skip)


def pytest_configure(config):
    if MPI is not None:
        from pyswitch.comm import MPIComm

        # Made here, at the same point on every rank, for the closing barrier.
        config._pyswitch_mpi_final = MPIComm(timeout=FINAL_TIMEOUT)


def pytest_sessionfinish(session, exitstatus):
    session.config._pyswitch_mpi_exitstatus = int(exitstatus)


def pytest_unconfigure(config):
    # After the terminal summary: the ranks meet once more. If one does not come (it stopped
    # early, e.g. -x, or lost count of the communicator constructions and is blocked in one),
    # this rank takes the job down rather than leave the others blocked in MPI forever.
    final = getattr(config, "_pyswitch_mpi_final", None)
    if final is None:
        return
    import pyswitch

    status = getattr(config, "_pyswitch_mpi_exitstatus", 1)
    try:
        final.barrier()
    except pyswitch.CommError as exc:
        print(f"\nrank {final.rank}: the ranks did not finish together ({exc}); MPI_Abort")
        sys.stdout.flush()
        sys.stderr.flush()
        MPI.COMM_WORLD.Abort(status or 1)


@pytest.fixture
def make_comm():
    """``make_comm(timeout)`` -> a fresh ``pyswitch.comm.MPIComm`` over ``MPI.COMM_WORLD``.

    Collective: every rank must call it the same number of times, in the same order."""
    from pyswitch.comm import MPIComm

    def make(timeout=DEFAULT_TIMEOUT):
        return MPIComm(timeout=timeout)

    return make


@pytest.fixture
def comm(make_comm):
    """A fresh ``MPIComm(timeout=60)`` for this test."""
    return make_comm()


@pytest.fixture(autouse=True)
def _resync(make_comm):
    """Every test ends with a barrier on a fresh MPIComm, so the ranks start the next together."""
    yield
    make_comm().barrier()
