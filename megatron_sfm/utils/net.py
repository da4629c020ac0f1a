"""Small networking helpers (no torch import)."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago (for a local rendezvous or store).

    The port is released before it is returned, so another process may take it first;
    callers use it at once (``torch.distributed.run --master-port``, ``tcp://`` init).
    """
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
