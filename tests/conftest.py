# pytest configuration for the pyswitch suite: hypothesis profiles and the CPU-ISA fixture.
# Test helpers live in isa_utils.py / reference.py, not here.
import os
import sys

import pytest
from hypothesis import HealthCheck, settings

# Test modules import their helpers (reference.py, isa_utils.py) by plain name, whatever
# pytest's import mode is.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=200,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

if os.environ.get("CI", "").lower() == "true" or os.environ.get("HYPOTHESIS_PROFILE") == "ci":
    settings.load_profile("ci")
else:
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

from isa_utils import SUPPORTED_ISAS, cpu_config  # noqa: E402


@pytest.fixture(params=SUPPORTED_ISAS)
def isa(request):
    """Each CPU ISA that is compiled in and supported by this CPU; active for the test."""
    with cpu_config(isa=request.param):
        yield request.param
