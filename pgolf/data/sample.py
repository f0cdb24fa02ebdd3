"""The embedded smoke corpus: CPython's documentation topics (`pydoc_data.topics`).

Every CPython ships this dict (it backs `help('topic')`), so `make run` needs no download.
79 documents, about 0.47 MB of English prose and code on Python 3.11.
"""
from __future__ import annotations

SOURCE = "pydoc_data.topics"


def sample_documents() -> list[str]:
    """The topics as documents, sorted by topic name so every build is the same."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics) if topics[k].strip()]
