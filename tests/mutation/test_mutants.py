"""The mutation check: every catalogued one-line bug in the core is caught by its kill tests.

Each mutant runs its kill tests on a mutated copy of the tree, against the suite's services
(each test still gets its own database and prefix). A surviving mutant fails here, naming the
guarantee it breaks. Equivalent mutants are listed in the catalogue with the reason, not run.
The mutants run two at a time (most of a kill test is waiting on the services); the first
parametrized case starts them all, and each case then reads its own verdict.
"""

from __future__ import annotations

import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from delivery.testing.env import environment_without_settings
from delivery.testing.services import ENV_AMQP_URL, ENV_DATABASE_URL, Services
from tests.mutation import mutate
from tests.mutation.catalogue import MUTANTS, Mutant

# The first case runs every mutant (a few minutes), well past the suite's per-test timeout.
pytestmark = [pytest.mark.integration, pytest.mark.mutation, pytest.mark.timeout(1800)]

RUN = [m for m in MUTANTS if m.equivalent is None]
JOBS = int(os.environ.get("MUTATION_JOBS", "2"))
VERDICTS = mutate.VERDICTS


def test_every_edit_applies_once_and_every_mutant_names_its_kill_tests(tmp_path: Path):
    root = mutate.copy_tree(tmp_path)
    for mutant in MUTANTS:
        mutate.apply(mutant, root)  # raises CatalogueError when the code moved under an entry
        assert mutant.kill or mutant.equivalent, f"{mutant.id}: no kill tests"
        for node in mutant.kill:
            assert (mutate.ROOT / node.split("::")[0]).is_file(), f"{mutant.id}: {node}"


@pytest.fixture(scope="module")
def verdicts(services: Services) -> dict[str, mutate.Verdict]:
    env = environment_without_settings("COV_")
    env[ENV_DATABASE_URL] = services.database_url
    env[ENV_AMQP_URL] = services.amqp_url
    with (
        tempfile.TemporaryDirectory(prefix="mutants-") as workdir,
        ThreadPoolExecutor(max_workers=JOBS) as pool,
    ):
        for verdict in pool.map(lambda m: mutate.run(m, Path(workdir), env), RUN):
            VERDICTS[verdict.mutant.id] = verdict
    return VERDICTS


@pytest.mark.parametrize("mutant", RUN, ids=[m.id for m in RUN])
def test_mutant_is_killed(mutant: Mutant, verdicts: dict[str, mutate.Verdict]):
    verdict = verdicts[mutant.id]
    what = f"guarantee '{mutant.guarantee}'" if mutant.guarantee else "not a README guarantee"
    assert verdict.killed, f"{mutant.id} survived ({what}): {mutant.what}; {verdict.how}"
