"""A large task payload as a SUBMIT entry and PART messages, and back (see PARTS_FROM)."""

from __future__ import annotations

from ..errors import ProtocolError
from ._codec import payload_bytes
from ._messages import MAX_TASK_FRAMES, PART_BYTES, PARTS_FROM, Frame, Part, TaskEntry


def split(entry: TaskEntry, part_bytes: int = PART_BYTES) -> tuple[TaskEntry, list[Part]]:
    """``entry`` with its first frame only, and PARTs of about ``part_bytes`` with the others, in order.

    An entry of less than PARTS_FROM bytes, or of one frame, comes back whole
    with no parts. Parts break at frame boundaries: the receiver gets the very
    frames that were sent (``Assembly.whole``).
    """
    payload = entry.payload
    if len(payload) < 2 or entry.parts or payload_bytes(payload) < PARTS_FROM:
        return entry, []
    parts: list[Part] = []
    run: list[Frame] = []
    nbytes = total = 0
    for frame in payload[1:]:
        run.append(frame)
        nbytes += len(frame)
        if nbytes >= part_bytes:
            parts.append(Part(entry.id, len(parts), tuple(run)))
            total += nbytes
            run, nbytes = [], 0
    if run:
        parts.append(Part(entry.id, len(parts), tuple(run)))
        total += nbytes
    return entry._replace(payload=tuple(payload[:1]), parts=len(parts), part_bytes=total), parts


class Assembly:
    """The parts of one task received so far (``entry`` as its SUBMIT or TASKS carried it).

    ``add`` takes the next part in order and ignores a repeat or one out of
    order (its sender sends the task again, all its parts with it). A part past
    what the entry declared (more parts, bytes or frames) raises ProtocolError.
    """

    __slots__ = ("entry", "frames", "nbytes", "received")

    def __init__(self, entry: TaskEntry) -> None:
        self.entry = entry
        self.received: list[Part] = []
        self.nbytes = 0
        self.frames = len(entry.payload)

    @property
    def complete(self) -> bool:
        return len(self.received) == self.entry.parts

    def add(self, part: Part) -> bool:
        """Whether ``part`` was the next one (and is kept); raises ProtocolError if it breaks the declaration."""
        if part.seq != len(self.received):
            return False
        entry = self.entry
        nbytes = self.nbytes + payload_bytes(part.payload)
        frames = self.frames + len(part.payload)
        last = part.seq + 1 == entry.parts
        if (part.seq >= entry.parts or nbytes > entry.part_bytes or frames > MAX_TASK_FRAMES
                or (last and nbytes != entry.part_bytes)):
            raise ProtocolError(f"part {part.seq} of task {part.id} goes past what its entry declared "
                                f"({entry.parts} parts, {entry.part_bytes} bytes)")
        self.received.append(part)
        self.nbytes, self.frames = nbytes, frames
        return True

    def whole(self) -> TaskEntry:
        """The entry with its whole payload, as if it had come in one message (``complete`` must be True)."""
        frames = list(self.entry.payload)
        for part in self.received:
            frames.extend(part.payload)
        return self.entry._replace(payload=tuple(frames), parts=0, part_bytes=0)
