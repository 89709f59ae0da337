"""The engine's KV-cache row table on its own: no model, no MLX, no thread.

Random schedules of arrivals, prompts completing over several prefill forwards, cancellations and
finishes drive a `SlotTable` the way the engine does (first-come first-served prefill with a
token budget, one row more than the batch limit); after every change the invariants are checked:
rows 0..B-1 are exactly the running sequences at every decode, no row is leaked or shared, an
unfinished prefill never sits below B, and rows move only when a hole must be closed, each with
its cache contents.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from nanogpt_mlx.server.engine.slots import SlotTable


class Item:
    """A sequence as the table sees it: any hashable object. `remaining`: prompt tokens to prefill."""

    def __init__(self, name: int, prompt_len: int):
        self.name = name
        self.remaining = prompt_len

    def __repr__(self) -> str:
        return f"Item({self.name})"


class Schedule:
    """One random schedule; `cache[row]` is what the runner's row holds (follows the moves)."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.max_batch = int(self.rng.integers(1, 7))
        self.chunk = int(self.rng.integers(1, 12))  # prompt tokens a step
        self.forward = int(self.rng.integers(1, self.chunk + 1))  # prompt tokens a forward
        self.table: SlotTable[Item] = SlotTable(self.max_batch + 1)
        self.cache: list[Item | None] = [None] * self.table.size
        self.waiting: deque[Item] = deque()
        self.prefilling: list[Item] = []
        self.running: set[Item] = set()
        self.moves = 0
        self.decodes = 0
        self.names = 0

    # --- the checks --------------------------------------------------------------------------------------
    def check_rows(self) -> None:
        """No row leaked or shared: the rows held are exactly the running sequences and the
        prefills that started, each in the row the table says, its cache there."""
        t = self.table
        holders = self.running | {p for p in self.prefilling if t.row(p) >= 0}
        assert set(t.items()) == holders and len(t.items()) == t.used == len(holders)
        for item in holders:
            assert t.occupant(t.row(item)) is item and self.cache[t.row(item)] is item
        assert t.running == len(self.running) and all(t.is_running(r) for r in self.running)
        for p in self.prefilling:
            assert not t.is_running(p)

    def check_prefill_not_below_B(self) -> None:
        """At most one unfinished prefill holds a row, and it is at or above B."""
        started = [p for p in self.prefilling if self.table.row(p) >= 0]
        assert len(started) <= 1, started
        for p in started:
            assert self.table.row(p) >= self.table.running, (self.table.row(p), self.table.running)

    def compact(self) -> None:
        t = self.table
        B = t.running
        above = [r for r in range(B, t.size) if t.occupant(r) in self.running]
        holes = [r for r in range(B) if t.occupant(r) is None]
        moves = t.compact()
        # Only when needed, and as few as needed: each running row above B into a hole below B.
        assert len(moves) == len(above)
        assert sorted(src for src, _ in moves) == above and sorted(dst for _, dst in moves) == holes[: len(above)]
        for src, dst in moves:  # the runner copies the rows in this order
            self.cache[dst] = self.cache[src]
        self.moves += len(moves)
        assert {t.occupant(r) for r in range(B)} == self.running
        self.check_rows()
        self.check_prefill_not_below_B()

    # --- what the engine does -------------------------------------------------------------------------
    def release(self, item: Item) -> None:
        self.table.release(item)
        self.running.discard(item)
        if item in self.prefilling:
            self.prefilling.remove(item)

    def prefill_forward(self, budget: int) -> int:
        planned = []
        for item in list(self.prefilling):
            if budget <= 0:
                break
            take = min(budget, item.remaining)
            budget -= take
            if self.table.row(item) < 0:
                row = self.table.assign(item, completes_now=take == item.remaining)
                self.cache[row] = item  # the prefill writes the row
            planned.append((item, take))
        for item, take in planned:
            item.remaining -= take
            if item.remaining == 0:
                self.prefilling.remove(item)
                if self.rng.random() < 0.15:  # finished at its first token (EOT, max_tokens 1, a stop string)
                    self.table.release(item)
                else:
                    self.table.start_running(item)
                    self.running.add(item)
        self.check_rows()
        self.check_prefill_not_below_B()
        return sum(take for _, take in planned)

    def step(self, arrivals: bool = True) -> None:
        rng = self.rng
        for _ in range(int(rng.poisson(0.9)) if arrivals else 0):
            self.names += 1
            self.waiting.append(Item(self.names, int(rng.integers(1, 3 * self.chunk + 2))))
        for item in list(self.running) + list(self.prefilling):  # cancellations
            if rng.random() < 0.04:
                self.release(item)
        self.check_rows()
        while self.waiting and len(self.running) + len(self.prefilling) < self.max_batch:
            self.prefilling.append(self.waiting.popleft())
        budget = self.chunk
        while budget > 0 and self.prefilling:
            budget -= self.prefill_forward(min(budget, self.forward))
            self.compact()
        self.compact()
        if self.table.running:
            batch = self.table.running_rows()
            assert set(batch) == self.running and len(batch) == self.table.running
            assert [self.cache[b] for b in range(len(batch))] == batch  # each row decodes its own cache
            self.decodes += 1
            for item in batch:
                if rng.random() < 0.2:
                    self.release(item)
        self.check_rows()


@pytest.mark.parametrize("seed", range(200))
def test_random_schedules_keep_every_invariant(seed):
    s = Schedule(seed)
    for _ in range(150):
        s.step()
    for _ in range(2000):  # no more arrivals: everything finishes
        if not (s.waiting or s.prefilling or s.running):
            break
        s.step(arrivals=False)
    assert not (s.waiting or s.prefilling or s.running)
    assert s.table.used == 0 and s.table.running == 0 and s.table.items() == []


def test_the_schedules_exercise_moves_holes_and_long_prefills():
    """The random schedules above are not trivially easy: rows move, and prefills span forwards."""
    moves = decodes = 0
    for seed in range(40):
        s = Schedule(seed)
        for _ in range(150):
            s.step()
        moves += s.moves
        decodes += s.decodes
    assert moves > 50 and decodes > 1000


def test_a_completing_prompt_takes_the_lowest_free_row_and_a_long_one_the_highest():
    t: SlotTable[str] = SlotTable(5)
    assert t.assign("a", completes_now=True) == 0
    assert t.assign("long", completes_now=False) == 4
    assert t.assign("b", completes_now=True) == 1
    t.start_running("a")
    t.start_running("b")
    assert t.compact() == []  # nothing to close: no moves
    assert t.running_rows() == ["a", "b"]
    t.release("a")  # a hole at row 0, "b" above B = 1
    assert t.assign("c", completes_now=True) == 0  # the hole is reused, no move needed
    t.start_running("c")
    assert t.compact() == [] and t.running_rows() == ["c", "b"]
    t.release("c")
    assert t.compact() == [(1, 0)] and t.row("b") == 0 and t.occupant(1) is None
    assert t.row("long") == 4 and not t.is_running("long")
    t.release("long")
    t.release("long")  # releasing twice is harmless
    assert t.used == 1 and t.items() == ["b"]


def test_broken_layouts_are_refused_not_repaired():
    t: SlotTable[str] = SlotTable(3)
    t.assign("a", completes_now=True)
    with pytest.raises(RuntimeError, match="already holds"):
        t.assign("a", completes_now=True)
    t.assign("prefill", completes_now=True)  # row 1: an unfinished prefill below B once B = 2
    t.assign("b", completes_now=True)
    t.start_running("a")
    t.start_running("b")
    with pytest.raises(RuntimeError, match="no free row"):
        t.assign("d", completes_now=False)
    with pytest.raises(RuntimeError, match="unfinished prefill"):
        t.compact()
    with pytest.raises(RuntimeError, match="rows 0..B-1"):
        t.running_rows()
    with pytest.raises(RuntimeError, match="holding a row"):
        t.start_running("nobody")
    t.clear()
    assert t.used == 0 and t.running == 0
    with pytest.raises(ValueError):
        SlotTable(0)
