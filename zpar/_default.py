"""The default cluster of the drop-in layers: one per program, started on first need.

``zpar.Process`` and ``zpar.pprocess`` take no cluster argument in their
familiar APIs, so they share this one client: a private embedded cluster
unless ``zpar.pprocess.use(...)`` or ``zpar.process.set_default_client(...)``
points it elsewhere. One program then starts at most one embedded cluster,
whichever layers it uses.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from .client import Client

log = logging.getLogger(__name__)


class DefaultClient:
    """A client chosen by ``use()`` and started on first ``get()``; closed here only if started here."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.target: Client | str | None = None  # None: a private embedded cluster
        self.options: dict[str, Any] = {}  # for the zpar.Client we start
        self.client: Client | None = None
        self.owned = False  # we started self.client, so we close it

    def use(self, target: Client | str | None = None, **options: Any) -> None:
        """From now on: ``target`` (a Client, an address, or None for the embedded cluster)."""
        self.drop()
        with self.lock:
            self.target, self.options = target, options

    def get(self) -> Client:
        """The client, started now if it was not yet (or was closed)."""
        with self.lock:
            if self.client is None or self.client.closed:
                if isinstance(self.target, Client):
                    self.client, self.owned = self.target, False
                else:
                    log.debug("default client: starting one for %s", self.target or "an embedded cluster")
                    self.client, self.owned = Client(self.target, **self.options), True
            return self.client

    def drop(self) -> None:
        """Forget the client; close it if it was started here."""
        with self.lock:
            client, owned = self.client, self.owned
            self.client, self.owned = None, False
        self.lock = threading.Lock()  # another thread of the parent may have held it at the fork
        if client is not None and owned:
            client.close()

    def forget(self) -> None:
        """In a forked child: the parent's client is not ours to use, nor to close."""
        self.client, self.owned = None, False
        self.lock = threading.Lock()  # another thread of the parent may have held it at the fork


#: The one default of this program (made at import, started only by ``get()``).
shared = DefaultClient()
