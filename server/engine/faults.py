"""Fault injection, FOR TESTS ONLY: makes the engine fail on purpose, keyed to chosen requests.

Read once, when the engine is built, from the environment variable NANOGPT_MLX_FAULT_INJECTION;
unset (always, outside tests) the engine has no `FaultInjection` and nothing here runs. It lets a
test of a real `nanogpt-mlx serve` process (tests/test_faults.py) show that a fault stays where
it happens. Comma-separated parts:

    output=MARKER@K   a sequence whose prompt text contains MARKER raises in its output step
                      (where its logits become a token) once it has K tokens: that sequence
                      alone ends with an error
    engine=MARKER@K   the engine loop itself dies once a sequence whose prompt contains MARKER
                      has K tokens (K must be below its max_tokens)
    together=N        the engine admits nothing until N sequences wait, then all of them in one
                      step (once), so that a test's requests share a batch whatever the timing

For example NANOGPT_MLX_FAULT_INJECTION="together=4,output=<<fail>>@3".
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nanogpt_mlx.server.engine.loop import Engine, Sequence

ENV_VAR = "NANOGPT_MLX_FAULT_INJECTION"


class InjectedFault(RuntimeError):
    """Raised on purpose by NANOGPT_MLX_FAULT_INJECTION (tests only)."""


class FaultInjection:
    def __init__(self, spec: str, tokenizer):
        self._tokenizer = tokenizer
        self.faults: dict[str, tuple[str, int]] = {}  # kind (output, engine) -> (marker, K)
        self.together = 0
        self._kill = False
        for part in filter(None, (p.strip() for p in spec.split(","))):
            kind, _, value = part.partition("=")
            if kind == "together" and value.isdigit():
                self.together = int(value)
            elif kind in ("output", "engine") and value:
                marker, _, after = value.rpartition("@") if "@" in value else (value, "", "0")
                if not after.isdigit() or not marker:
                    raise ValueError(f"{ENV_VAR}: {part!r}: expected {kind}=MARKER@K")
                self.faults[kind] = (marker, int(after))
            else:
                raise ValueError(f"{ENV_VAR}: cannot read {part!r} (see server/engine/faults.py)")

    def mark(self, sequences: list[Sequence]) -> None:
        """Give each sequence of a new submission the fault its prompt asks for (or none)."""
        for seq in sequences:
            text = self._tokenizer.decode(seq.request.prompt)
            seq.fault = next((kind for kind, (marker, _) in self.faults.items() if marker in text), None)

    def on_token(self, seq: Sequence) -> None:
        """Called in a marked sequence's output step, before its next token is chosen."""
        kind = seq.fault
        if kind is None or seq.generated < self.faults[kind][1]:
            return
        if kind == "output":
            raise InjectedFault(f"injected fault in the output step of a sequence after {seq.generated} tokens (test only)")
        self._kill = True

    def before_step(self, engine: Engine) -> None:
        """Called by the engine loop before each step: hold admissions for `together`, or end the
        loop for an `engine` fault."""
        if self._kill:
            raise InjectedFault("injected fault: the engine loop dies (test only)")
        if self.together:
            while engine.waiting_count < self.together and not (engine._stop or engine._abort_all):
                time.sleep(0.001)
            self.together = 0


def from_environment(tokenizer) -> FaultInjection | None:
    spec = os.environ.get(ENV_VAR, "").strip()
    return FaultInjection(spec, tokenizer) if spec else None
