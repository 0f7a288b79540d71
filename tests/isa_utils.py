# Helpers to run a test body under each compiled-in CPU ISA and thread count.
# Only selects what pyswitch offers; never emulates an ISA.
import contextlib

import pyswitch

#: ISAs compiled in and supported by this CPU ("scalar" is always first: it is the oracle).
SUPPORTED_ISAS = list(pyswitch.supported_isas())
assert "scalar" in SUPPORTED_ISAS, SUPPORTED_ISAS
SUPPORTED_ISAS.sort(key=lambda name: name != "scalar")

#: Thread counts every kernel must agree across.
THREAD_COUNTS = (1, 2)


@contextlib.contextmanager
def cpu_config(isa=None, threads=None):
    """Temporarily select a CPU ISA and/or an intra-op thread count."""
    prev_isa = pyswitch.cpu_isa()
    prev_threads = pyswitch.get_num_threads()
    try:
        if isa is not None:
            pyswitch.set_cpu_isa(isa)
        if threads is not None:
            pyswitch.set_num_threads(threads)
        yield
    finally:
        pyswitch.set_cpu_isa(prev_isa)
        pyswitch.set_num_threads(prev_threads)


def all_configs():
    """Every (isa, threads) pair; the first one is ("scalar", 1)."""
    return [(isa, n) for isa in SUPPORTED_ISAS for n in THREAD_COUNTS]
