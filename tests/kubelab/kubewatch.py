"""The API side of the load-balancer controller: raw JSON responses, and ``ObjectWatch``, a cache of one kind of
object kept by list and watch in a thread (its Services)."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)

Obj = dict[str, Any]

API_TIMEOUT_S = 15.0  # one API request
WATCH_WINDOW_S = 5  # server-side length of one watch request: how often resyncs run
RETRY_S = 1.0  # after a failed list or watch


def read_json(response: Any) -> Obj:
    """The body of a raw (``_preload_content=False``) response, which is released."""
    try:
        return dict(json.loads(response.data))
    finally:
        response.release_conn()


def key_of(obj: Obj) -> str:
    """``namespace/name`` of an object, for logs."""
    meta = obj.get("metadata", {})
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


def _lines(response: Any) -> Iterator[bytes]:
    """The newline-separated events of a watch response, as they arrive."""
    buffer = b""
    for chunk in response.stream(amt=None, decode_content=False):
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            if line.strip():
                yield line


class ObjectWatch:
    """A cache of one kind of object in all namespaces (raw dicts by uid), kept by list and watch in a thread.

    ``on_change(old, new)`` runs in that thread for every object that appears (old None), changes, or goes (new
    None), including the differences a relist finds. ``on_resync()`` runs after the first list and after every
    watch window (``WATCH_WINDOW_S``), for retries. An expired watch (410 Gone) and errors lead to a relist.
    """

    def __init__(
        self,
        kind: str,
        list_all: Callable[..., Any],
        on_change: Callable[[Obj | None, Obj | None], None],
        on_resync: Callable[[], None] = lambda: None,
    ) -> None:
        self.kind = kind
        self.cache: dict[str, Obj] = {}
        self.synced = threading.Event()
        self._list_all = list_all
        self._on_change = on_change
        self._on_resync = on_resync
        self._stopping = threading.Event()
        self._response: Any = None
        self._thread = threading.Thread(target=self._run, name=f"watch-{kind}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to end; a watch request in flight is cut at once."""
        self._stopping.set()
        response = self._response
        if response is not None:
            with contextlib.suppress(Exception):
                response.shutdown()

    def join(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for the thread; True once it has ended (or never started)."""
        if self._thread.ident is not None:
            self._thread.join(max(timeout, 0.0))
        return not self._thread.is_alive()

    def _run(self) -> None:
        version: str | None = None
        while not self._stopping.is_set():
            try:
                if version is None:
                    version = self._relist()
                    self.synced.set()
                    self._on_resync()
                version = self._watch(version)
                self._on_resync()
            except ApiException as exc:
                version = None
                if exc.status == 410:
                    log.info("%s: watch expired (410 Gone); relisting", self.kind)
                elif not self._stopping.is_set():
                    log.warning("%s: API error %s %s; relisting in %g s", self.kind, exc.status, exc.reason, RETRY_S)
                    self._stopping.wait(RETRY_S)
            except Exception as exc:  # the loop outlives API server restarts and its own callbacks' bugs
                version = None
                if not self._stopping.is_set():
                    log.warning("%s: list/watch failed: %r; relisting in %g s", self.kind, exc, RETRY_S, exc_info=True)
                    self._stopping.wait(RETRY_S)

    def _relist(self) -> str:
        listing = read_json(self._list_all(_preload_content=False, _request_timeout=API_TIMEOUT_S))
        fresh = {str(o["metadata"]["uid"]): o for o in listing.get("items") or []}
        for uid in set(self.cache) - set(fresh):
            self._change(uid, None)
        for uid, obj in fresh.items():
            self._change(uid, obj)
        return str(listing["metadata"]["resourceVersion"])

    def _watch(self, version: str) -> str:
        response = self._list_all(
            watch=True,
            resource_version=version,
            allow_watch_bookmarks=True,
            timeout_seconds=WATCH_WINDOW_S,
            _preload_content=False,
            _request_timeout=(API_TIMEOUT_S, WATCH_WINDOW_S + API_TIMEOUT_S),
        )
        self._response = response
        try:
            if self._stopping.is_set():
                return version
            for line in _lines(response):
                version = self._event(json.loads(line), version)
                if self._stopping.is_set():
                    break
        finally:
            self._response = None
            with contextlib.suppress(Exception):
                response.release_conn()
        return version

    def _event(self, event: Obj, version: str) -> str:
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            raise ApiException(status=obj.get("code"), reason=f"{obj.get('reason')}: {obj.get('message')}")
        version = str(obj.get("metadata", {}).get("resourceVersion") or version)
        if kind in ("ADDED", "MODIFIED", "DELETED"):
            self._change(str(obj["metadata"]["uid"]), None if kind == "DELETED" else obj)
        return version

    def _change(self, uid: str, obj: Obj | None) -> None:
        old = self.cache.pop(uid, None) if obj is None else self.cache.get(uid)
        if obj is not None:
            self.cache[uid] = obj
        if old is not None or obj is not None:
            try:
                self._on_change(old, obj)
            except Exception:  # one object's trouble must not stop the others; resyncs retry
                log.exception("%s: handling %s failed", self.kind, key_of(obj or old or {}))
