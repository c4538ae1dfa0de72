"""A server-streaming gRPC call seen as an iterator that ``with`` (or :meth:`close`) ends."""

from __future__ import annotations

from collections.abc import Iterator
from types import TracebackType
from typing import Generic, TypeVar

import grpc

T = TypeVar("T")


class CallStream(Generic[T]):
    """Subclasses turn the call's responses into items in :meth:`_iterate` (a generator)."""

    def __init__(self, call: grpc.Call):
        self._call = call
        self._closed = False
        self._items = self._iterate()

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        return next(self._items)

    def close(self) -> None:
        self._closed = True
        self._call.cancel()

    def __enter__(self):
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _iterate(self) -> Iterator[T]:
        raise NotImplementedError
