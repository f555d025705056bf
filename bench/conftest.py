import pytest

from workloads import MAX_SIZE, MIN_SIZE, make_workload  # noqa: F401  (the benchmarks import them from here)

NUM_BAGS = 100_000
ENUMERATE_BAGS = 2_000  # the enumeration baseline is too slow for all bags


@pytest.fixture(scope="session")
def workload():
    return make_workload(NUM_BAGS)
