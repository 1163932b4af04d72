import os

import pytest
from hypothesis import HealthCheck, settings

# Hypothesis budgets are set per profile so the whole suite stays within minutes on 2 cores.
settings.register_profile("default", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")


@pytest.fixture
def splitter():
    """The simulator's split helper (rustane/mil/split.py), active as during a training step."""
    from rustane.mil.split import Splitter

    sp = Splitter()
    sp.active = True
    yield sp
    sp.close()
