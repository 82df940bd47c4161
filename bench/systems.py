"""The systems under test, by name, in the order a comparison runs them: ours
(``bench.ours``) and the peers (``bench.peers.systems``)."""

from __future__ import annotations

from bench.ours import Ours
from bench.peers.systems import AsyncioPeer, CeleryPeer, DramatiqPeer, FastStreamPeer, TaskiqPeer
from bench.system import System

SYSTEMS: dict[str, type[System]] = {
    s.name: s for s in (Ours, AsyncioPeer, FastStreamPeer, TaskiqPeer, DramatiqPeer, CeleryPeer)
}
