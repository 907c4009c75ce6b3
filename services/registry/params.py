"""Query parameters the REST API and the UI both take, declared once so both check them alike.

Here, beside the settings, rather than in ``core`` (which knows nothing of FastAPI) or in ``api`` or
``ui`` (neither imports the other): both import this module, and it imports only ``core``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Query

from services.registry.core import catalog

PageToken = Annotated[str | None, Query(max_length=4096, description="next_page_token of the page before.")]
ModelSearch = Annotated[str | None, Query(
    max_length=catalog.SEARCH_MAX, pattern=catalog.SEARCH_PATTERN,
    description="Only models whose name contains this (any case): letters, digits, '_', '-' and '.'.")]
