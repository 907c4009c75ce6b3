"""The modules ``make test`` keeps on one worker are exactly those that share a package's stack."""

from __future__ import annotations

import re
from pathlib import Path

from tests.scheduling import SHARED_STACKS, scoped_id

ROOT = Path(__file__).resolve().parents[1]
# The package-scoped fixtures that start a whole stack, and the conftest that defines them.
STACK_FIXTURES = {"tests/e2e": ("stack_platform", "deployed"), "tests/pipelines": ("pipeline_stack",
                                                                                    "stack_platform")}


def modules_using(package: str, fixtures: tuple[str, ...]) -> set[str]:
    used = re.compile(r"\b(" + "|".join(fixtures) + r")\b")
    return {str(path.relative_to(ROOT)) for path in (ROOT / package).glob("test_*.py")
            if used.search(path.read_text())}


def test_each_group_is_every_module_that_uses_its_packages_stack():
    assert {frozenset(group) for group in SHARED_STACKS} == {
        frozenset(modules_using(package, fixtures)) for package, fixtures in STACK_FIXTURES.items()}


def test_a_grouped_test_reads_as_one_scope_and_others_keep_their_module():
    def scope(nodeid: str) -> str:  # what loadscope groups by: all before the last "::"
        return scoped_id(nodeid).rsplit("::", 1)[0]

    loop, observability = "tests/e2e/test_loop.py::test_a", "tests/e2e/test_observability.py::test_b[x::y]"
    assert scope(loop) == scope(observability) != scope("tests/pipelines/test_flows.py::test_c")
    assert scope("tests/services/serving/test_labels.py::test_d") == "tests/services/serving/test_labels.py"
    assert scope("tests/x/test_y.py::Case::test_e") == "tests/x/test_y.py::Case"
