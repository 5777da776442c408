"""pprocess's exchanges that keep what calls send: ``Map`` (one result per call, in call order) and ``Queue``."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from ._channels import Channel, Failure, MakeParallel
from ._exchange import Exchange


class Undefined:
    """The place of a ``Map`` result not in yet (pprocess's marker)."""


class Map(Exchange):
    """An exchange that keeps one result per call, in the order the calls were started.

    ``results[i]`` and ``results[i:j]`` wait for those results; iterating
    yields each in order as soon as it and those before it are in. A call's
    exception is raised where its result is read.
    """

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.init()

    def init(self) -> None:
        """Forget previous results."""
        self.channel_number = 0
        self.channels: dict[Channel, int] = {}  # where each channel's next result goes
        self.results: list[Any] = []
        self.current_index = 0

    def add(self, channel: Channel) -> None:
        super().add(channel)
        self.channels[channel] = self.channel_number  # places follow the order calls get channels, as pprocess's
        self.channel_number += 1
        if len(self.results) < self.channel_number:  # a channel added by hand
            self.results.append(Undefined)

    def start(self, callable: Callable[..., Any], *args: Any, **kw: Any) -> None:
        self.results.append(Undefined)
        super().start(callable, *args, **kw)

    def create(self) -> Channel | None:
        self.results.append(Undefined)
        return super().create()

    def remove(self, channel: Channel) -> None:
        place = self.channels.pop(channel, None)
        super().remove(channel)
        if place is not None and self.results[place] is Undefined:
            self.results[place] = Failure(EOFError(f"call {place} ended without sending a result"))

    def __call__(self, callable: Callable[..., Any], sequence: Iterable[Any]) -> Map:
        """Start ``callable(item)`` for each item (wrapped in MakeParallel unless it is one); returns self."""
        wrapped = callable if isinstance(callable, MakeParallel) else MakeParallel(callable)
        self.init()
        for item in sequence:
            self.start(wrapped, item)
        return self

    def store_data(self, channel: Channel) -> None:
        place = self.channels.pop(channel, None)
        if place is None:
            raise RuntimeError(f"{channel!r} sent a second message, but a Map keeps one result per call; "
                               "collect continuous calls with a Queue")
        try:
            self.results[place] = channel.receive()
        except Exception as exc:  # noqa: BLE001 - the call's own exception, kept for whoever reads this result
            self.results[place] = Failure(exc)

    def __iter__(self) -> Map:
        return self

    def __next__(self) -> Any:
        while True:
            if self.current_index < len(self.results) and self.results[self.current_index] is not Undefined:
                self.current_index += 1
                return _deliver_result(self.results[self.current_index - 1])
            if not self.unfinished():
                raise StopIteration
            self.store()

    next = __next__  # pprocess programs written for Python 2 call it by this name

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, int) and not -len(self.results) <= i < len(self.results):
            raise IndexError(i)
        while True:
            values = self.results[i]
            if not (values is Undefined or (isinstance(i, slice) and any(v is Undefined for v in values))):
                if isinstance(i, slice):
                    return [_deliver_result(v) for v in values]
                return _deliver_result(values)
            if not self.unfinished():
                raise IndexError(i)
            self.store()


def _deliver_result(value: Any) -> Any:
    if isinstance(value, Failure):
        raise value.exc
    return value


class Queue(Exchange):
    """An exchange whose messages are read in the order they arrive: iterate over it."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.queue: deque[Any] = deque()  # the oldest at the right end, as in pprocess's list

    def store_data(self, channel: Channel) -> None:
        self.queue.appendleft(channel.receive())

    def __iter__(self) -> Queue:
        return self

    def __next__(self) -> Any:
        while not self.queue:
            if not self.unfinished():
                raise StopIteration
            self.store()
        return self.queue.pop()

    next = __next__

    def __len__(self) -> int:
        """How many messages have arrived and are not read yet."""
        return len(self.queue)
