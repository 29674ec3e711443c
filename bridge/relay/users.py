"""Who the client is, told to the upstream of one route: the relay's side of the one login.

A browser logs in to the relay with a client key; the relay then tells Open WebUI (its trusted-header
sign-in, ``WEBUI_AUTH_TRUSTED_EMAIL_HEADER``) who that is, so Open WebUI opens signed in, one account
per key. The headers (:func:`bridge.httprules.with_user`) go only on the user route
(``--user-route``, default the default route) and only for a request the relay authenticated (by
its cookie or a key); whatever ``X-Bridge-User-*`` a client sends is dropped on every route.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from ..config import RelayConfig
from ..httprules import Headers, with_user
from .store import Store


class Users:
    def __init__(self, config: RelayConfig, store: Store) -> None:
        self.route = config.identity_route
        self.store = store
        self._labels: dict[str, str] = {}
        self._loaded_at = -1e9

    def label(self, key_id: str) -> str:
        """The label of a key made with ``bridge keys add`` ("" for keys from ``BRIDGE_API_KEYS``),
        read again every 2 s like the keys themselves."""
        if time.monotonic() - self._loaded_at > 2.0:
            self._labels = {k.id: k.label for k in self.store.list_keys()}
            self._loaded_at = time.monotonic()
        return self._labels.get(key_id, "")

    def headers(self, headers: Iterable[tuple[str, str]], route: str, key_id: str) -> Headers:
        """``headers`` as forwarded to ``route`` on behalf of client key ``key_id``: the client's own
        ``X-Bridge-User-*`` dropped, the relay's added on the user route."""
        if route != self.route or not key_id:
            return with_user(headers, None)
        return with_user(headers, key_id, self.label(key_id))
