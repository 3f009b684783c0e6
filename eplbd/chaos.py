"""Fault injection for tests: a message stream that is delayed, duplicated, reordered or cut.

``MessageChaos`` sits in a send path and decides, message by message, what actually goes
out. The daemon puts one in front of what it pushes to ranks (``Plan``/``Commit``/``Abort``,
per rank), the ``PlacementAgent`` one in front of what it sends back (``LayerReady``/``Ack``/
``Abort``). Everything is seeded, so a failing run can be replayed. Only tests and
``eplbd demo``'s fault options turn it on; with the defaults it passes every message through.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any, Hashable


@dataclasses.dataclass
class MessageChaos:
    """Seeded faults on outgoing messages, per destination ``key``.

    Attributes:
        dup_p: probability that a message is sent twice (the copy goes out right after it).
        reorder_p: probability that a message is held back and sent after the next message to the
            same destination (or by ``due`` once ``max_hold_s`` passed, if none follows).
        max_hold_s: longest a held message waits for a successor.
        types: class names of the messages this applies to (empty: all).
        cut: class name -> how many messages of that type each destination gets; later ones are
            dropped and counted (freezes a plan in one phase, for crash tests). Empty: none dropped.
        seed: the random seed.

    Counters: ``duplicated``, ``reordered``, ``dropped``.
    """

    dup_p: float = 0.0
    reorder_p: float = 0.0
    max_hold_s: float = 0.05
    types: tuple[str, ...] = ()
    cut: dict[str, int] = dataclasses.field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._held: dict[Hashable, tuple[float, Any]] = {}
        self._sent: dict[tuple[Hashable, str], int] = {}
        self.duplicated = self.reordered = self.dropped = 0

    @property
    def active(self) -> bool:
        return bool(self.dup_p or self.reorder_p or self.cut)

    def process(self, key: Hashable, msg: Any, now: float) -> list[Any]:
        """What to send to ``key`` now, in order, given that ``msg`` is to be sent at time ``now``."""
        name = type(msg).__name__
        if name in self.cut:
            n = self._sent.get((key, name), 0)
            self._sent[(key, name)] = n + 1
            if n >= self.cut[name]:
                self.dropped += 1
                return []
        if self.types and name not in self.types:
            return self._release(key) + [msg]
        out = [msg]
        if self._rng.random() < self.dup_p:
            self.duplicated += 1
            out.append(msg)
        if key not in self._held and self._rng.random() < self.reorder_p:
            self.reordered += 1
            self._held[key] = (now + self.max_hold_s, msg)
            return out[1:]  # its duplicate (if any) goes now: the copies arrive out of order too
        return out + self._release(key)

    def _release(self, key: Hashable) -> list[Any]:
        held = self._held.pop(key, None)
        return [] if held is None else [held[1]]

    def due(self, now: float) -> list[tuple[Hashable, Any]]:
        """Held messages whose time is up, as ``(key, msg)``; call this periodically."""
        keys = [k for k, (t, _) in self._held.items() if t <= now]
        return [(k, self._held.pop(k)[1]) for k in keys]
