"""The job spec's former home, kept for importers outside the trainer (the registry's UI tests, ``bench/``).

The spec lives in :mod:`services.trainer.jobs.schemas`; nothing inside ``services.trainer`` imports this.
"""

from services.trainer.jobs.schemas import *  # noqa: F403
