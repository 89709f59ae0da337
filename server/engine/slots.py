"""The KV-cache row table: which sequence holds which row, and which of them are running.

Plain Python (no MLX, no model): the engine asks it where a sequence goes and which rows to
move, then tells the runner to do the copies.

The runner's `decode` advances rows 0..B-1, so at every decode the B running sequences must
occupy exactly rows 0..B-1. Finished sequences leave holes; moving a row costs a copy of its
whole cache, so holes are first offered to sequences whose prompt completes in the prefill
forward that assigns their row (`assign(..., completes_now=True)` takes the lowest free row: a
hole they can run in without a move), and only the holes left after that are filled by moving
the highest running rows down (`compact`).

A prompt that does not complete in its first forward holds a row while it is not running; it
takes the highest free row (`completes_now=False`), where it is least in the way. The engine
prefills first-come first-served and the first prompt that does not fit a forward's budget takes
the rest of it, so at most one such unfinished prefill holds a row at a time; with one row more
than the engine's batch limit, that row stays at or above B (no other sequence can start
running while it is unfinished, so B cannot grow past it) and `compact` never has to move a
prefill out of the way. The table checks that: a sequence that is not running below B is an
error, not something it repairs.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

T = TypeVar("T", bound=Hashable)


class SlotTable(Generic[T]):
    """`size` rows, each free or held by one item (a sequence); B of the items are running."""

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"a slot table needs at least one row, got {size}")
        self._rows: list[T | None] = [None] * size
        self._row_of: dict[T, int] = {}
        self._running: set[T] = set()

    # --- reading -------------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return len(self._rows)

    @property
    def running(self) -> int:
        """B: the number of running items (after `compact`, they hold rows 0..B-1)."""
        return len(self._running)

    @property
    def used(self) -> int:
        """Rows held, running or not."""
        return len(self._row_of)

    def row(self, item: T) -> int:
        """The item's row, or -1 if it holds none."""
        return self._row_of.get(item, -1)

    def occupant(self, row: int) -> T | None:
        return self._rows[row]

    def is_running(self, item: T) -> bool:
        return item in self._running

    def items(self) -> list[T]:
        """Every item holding a row, in row order."""
        return [item for item in self._rows if item is not None]

    def running_rows(self) -> list[T]:
        """The running items in row order 0..B-1, what the next decode advances."""
        B = len(self._running)
        batch = self._rows[:B]
        if any(item is None or item not in self._running for item in batch):
            raise RuntimeError("rows 0..B-1 must be the running sequences (compact first)")
        return batch

    # --- changing --------------------------------------------------------------------------------------
    def assign(self, item: T, completes_now: bool) -> int:
        """Give `item` a free row: the lowest if its prompt completes in the forward about to run
        (a hole it can run in without a move), else the highest (least in the way)."""
        if item in self._row_of:
            raise RuntimeError(f"already holds row {self._row_of[item]}")
        rows = range(len(self._rows)) if completes_now else range(len(self._rows) - 1, -1, -1)
        row = next((r for r in rows if self._rows[r] is None), None)
        if row is None:
            raise RuntimeError(f"no free row: all {len(self._rows)} are held")
        self._rows[row] = item
        self._row_of[item] = row
        return row

    def start_running(self, item: T) -> None:
        """The item's prompt is in its row: it decodes from the next `compact` on."""
        if item not in self._row_of:
            raise RuntimeError("only an item holding a row can run")
        self._running.add(item)

    def release(self, item: T) -> None:
        """Free the item's row, if it holds one (the next `compact` closes the hole)."""
        row = self._row_of.pop(item, None)
        if row is not None:
            self._rows[row] = None
        self._running.discard(item)

    def clear(self) -> None:
        self._rows = [None] * len(self._rows)
        self._row_of.clear()
        self._running.clear()

    def compact(self) -> list[tuple[int, int]]:
        """Make rows 0..B-1 exactly the running items; returns the moves (src, dst) made, in order,
        for the caller to copy the cache rows the same way.

        Only running items above B move, each into a hole below B, the lowest hole first: the
        fewest moves that reach the layout, none when there is nothing to close.
        """
        B = len(self._running)
        movers = [row for row in range(B, len(self._rows)) if self._rows[row] in self._running]
        if not movers:
            return []
        holes = [row for row in range(B) if self._rows[row] is None]
        # As many holes as movers, unless an item that is not running sits below B (module doc).
        if len(holes) != len(movers):
            raise RuntimeError("an unfinished prefill holds a row below B")
        moves = list(zip(movers, holes))
        for src, dst in moves:
            item = self._rows[src]
            self._rows[src] = None
            self._rows[dst] = item
            self._row_of[item] = dst
        return moves
