"""A recorder that records nothing: the same calls as `Run`, for switching recording off (and for measuring
the recorder's overhead against the identical loop)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class NullRun:
    """Accepts every `Run` call and does nothing."""

    run_id = None
    name = "disabled"

    def register_samples(self, *args: Any, **kwargs: Any) -> None:
        return None

    def annotate_samples(self, *args: Any, **kwargs: Any) -> None:
        return None

    def log_transform(self, *args: Any, **kwargs: Any) -> None:
        return None

    def watch(self, *args: Any, **kwargs: Any) -> None:
        return None

    @contextmanager
    def stage(self, *args: Any, **kwargs: Any) -> Iterator[NullRun]:
        yield self

    def log_batch(self, *args: Any, **kwargs: Any) -> None:
        return None

    def checkpoint(self, *args: Any, **kwargs: Any) -> None:
        return None

    def flush(self) -> None:
        return None

    def publish(self) -> None:
        return None

    def close(self) -> None:
        return None
