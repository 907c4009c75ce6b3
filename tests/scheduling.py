"""pytest-xdist's ``loadscope`` with a few groups of modules as one unit of work (``make test``).

``loadscope`` sends each module to one worker, so that its module-scoped fixtures start once. The
modules of :data:`SHARED_STACKS` share a package-scoped fixture that starts a whole stack (tests/e2e's
``stack_platform`` and ``deployed``, tests/pipelines' ``pipeline_stack``); split over two workers they
start it twice, and they were written to take turns on it. :class:`SharedStackScopes` wraps xdist's
public ``LoadScopeScheduling`` (it does not subclass it) and shows it each group's tests under one
scope: ``loadscope`` groups a test by what comes before the last ``::`` of its id, and workers are sent
indices into their own collection, never ids, so only the grouping changes.
"""

from __future__ import annotations

from collections.abc import Sequence

from xdist.scheduler import LoadScopeScheduling
from xdist.workermanage import WorkerController

# Groups of test modules that share a package-scoped stack; tests/test_scheduling.py keeps this true.
SHARED_STACKS: tuple[tuple[str, ...], ...] = (
    ("tests/e2e/test_loop.py", "tests/e2e/test_observability.py", "tests/e2e/test_retraining.py"),
    ("tests/pipelines/test_deployments.py", "tests/pipelines/test_flows.py"),
)


def scoped_id(nodeid: str, groups: Sequence[Sequence[str]] = SHARED_STACKS) -> str:
    """``nodeid`` as ``loadscope`` should see it: a grouped module's tests under the group's scope."""
    module = nodeid.split("::", 1)[0]
    for group in groups:
        if module in group:
            return f"{'+'.join(group)}::{nodeid.replace('::', '|')}"
    return nodeid


class SharedStackScopes:
    """A ``LoadScopeScheduling`` that sees the tests of each of :data:`SHARED_STACKS` as one scope."""

    def __init__(self, inner: LoadScopeScheduling) -> None:
        self.inner = inner
        self.original: dict[str, str] = {}

    @property
    def nodes(self) -> list[WorkerController]:
        return self.inner.nodes

    @property
    def collection_is_completed(self) -> bool:
        return self.inner.collection_is_completed

    @property
    def tests_finished(self) -> bool:
        return self.inner.tests_finished

    @property
    def has_pending(self) -> bool:
        return self.inner.has_pending

    def add_node(self, node: WorkerController) -> None:
        self.inner.add_node(node)

    def add_node_collection(self, node: WorkerController, collection: Sequence[str]) -> None:
        scoped = [scoped_id(nodeid) for nodeid in collection]
        self.original.update(zip(scoped, collection, strict=True))
        self.inner.add_node_collection(node, scoped)

    def mark_test_complete(self, node: WorkerController, item_index: int, duration: float = 0) -> None:
        self.inner.mark_test_complete(node, item_index, duration)

    def mark_test_pending(self, item: str) -> None:
        self.inner.mark_test_pending(item)

    def remove_pending_tests_from_node(self, node: WorkerController, indices: Sequence[int]) -> None:
        self.inner.remove_pending_tests_from_node(node, indices)

    def remove_node(self, node: WorkerController) -> str | None:
        """The test a crashed worker was running, by its real id."""
        crashed = self.inner.remove_node(node)
        return self.original.get(crashed, crashed) if crashed is not None else None

    def schedule(self) -> None:
        self.inner.schedule()
