"""How many CPU threads each process's torch operations get (dist.threads), from the environment read once."""

import pytest

from launcher.distributed import env
from launcher.distributed.env import DistEnv, cpu_threads

TORCHRUN_OF_TWO = {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}


@pytest.mark.parametrize("environ, cores, requested, threads", [
    ({}, 2, 0, 1),  # all but one core: OpenMP's threads must not wait for one the machine took away
    ({}, 16, 0, 15),
    ({}, 1, 0, 1),
    (TORCHRUN_OF_TWO, 16, 0, 7),  # shared by the node's processes
    ({**TORCHRUN_OF_TWO, "OMP_NUM_THREADS": "1"}, 16, 0, 1),  # torchrun's own choice for several processes
    ({"OMP_NUM_THREADS": "4,2"}, 16, 0, 4),  # the first level of a nested setting
    ({"OMP_NUM_THREADS": "nonsense"}, 16, 0, 15),
    ({"OMP_NUM_THREADS": "1"}, 16, 3, 3),  # dist.threads wins
])
def test_threads_per_process(monkeypatch, environ, cores, requested, threads):
    monkeypatch.setattr(env, "usable_cores", lambda: cores)
    assert cpu_threads(DistEnv.from_environ(environ), requested) == threads
