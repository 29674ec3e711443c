"""The relay's embedded state: an SQLite database under ``--data-dir``.

It keeps what must outlive a restart: node connection timestamps (for ``/_relay/health``), client
keys (hashed, never in clear), and the secret that signs browser session cookies. Every call is a
short synchronous transaction on a local file, cheap enough to make from the event loop.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError

#: Node names whose latest connect and disconnect the history keeps.
NODES_KEPT = 256

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY,          -- public prefix, shown in listings
    hash TEXT NOT NULL UNIQUE,    -- sha256 of the whole key
    label TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    revoked REAL
);
CREATE TABLE IF NOT EXISTS node_events (
    at REAL NOT NULL,
    node TEXT NOT NULL,
    event TEXT NOT NULL           -- 'connected' or 'disconnected'
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    key_id TEXT NOT NULL,         -- the client key that owns it: nobody else sees it
    created REAL NOT NULL,
    finished REAL,
    state TEXT NOT NULL,          -- 'running', 'done' or 'failed'
    request TEXT NOT NULL,        -- JSON: route, method, path
    status INTEGER,
    headers TEXT,                 -- JSON [[name, value], ...]
    body BLOB,
    error TEXT
);
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,          -- named in the browser's signed cookie
    key_id TEXT NOT NULL,         -- the client key that logged in
    created REAL NOT NULL,
    expires REAL NOT NULL,
    ended REAL                    -- unused: a session that ends (logout, revocation) is deleted
);
-- A key's sessions, oldest first (the cap per key, `--key` revocation); expired ones (the sweep).
-- Created on every open, so a database made before they existed gains them.
CREATE INDEX IF NOT EXISTS sessions_by_key ON sessions(key_id, created);
CREATE INDEX IF NOT EXISTS sessions_by_expiry ON sessions(expires);
"""


@dataclass(frozen=True, slots=True)
class JobRecord:
    id: str
    key_id: str
    created: float
    finished: float | None
    state: str
    request: dict[str, Any]
    status: int | None
    headers: list[list[str]]
    body: bytes
    error: str | None


@dataclass(frozen=True, slots=True)
class SessionRecord:
    id: str
    key_id: str
    created: float
    expires: float
    ended: float | None


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: str
    label: str
    created: float
    revoked: float | None


class Store:
    """Thin wrapper over one SQLite file (``relay.sqlite3`` in the data directory)."""

    def __init__(self, data_dir: Path) -> None:
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
            self.path = data_dir / "relay.sqlite3"
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.executescript(SCHEMA)
            # Sessions ended by an older relay, which kept them for a week: no cookie needs them.
            self.db.execute("DELETE FROM sessions WHERE ended IS NOT NULL")
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"cannot use data directory {data_dir}: {exc}") from None
        self.path.chmod(0o600)

    def close(self) -> None:
        self.db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """Statements that go together: one commit (one WAL sync), all or nothing."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # meta ----------------------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute(
            "INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def secret(self, key: str) -> str:
        """A random secret created on first use and kept (e.g. the cookie-signing key)."""
        value = self.get_meta(key)
        if value is None:
            value = secrets.token_urlsafe(32)
            self.set_meta(key, value)
        return value

    # node events ---------------------------------------------------------------------------------
    def record_node(self, node: str, event: str, at: float | None = None) -> None:
        """Record a node's connection or disconnection; the history keeps only the latest connect
        and disconnect of the NODES_KEPT node names seen last (all that health and
        :meth:`close_dangling` read), so bridges that come and go cannot grow it."""
        self.db.execute(
            "INSERT INTO node_events(at, node, event) VALUES(?, ?, ?)",
            (time.time() if at is None else at, node, event),
        )
        self.db.execute(
            "DELETE FROM node_events WHERE rowid NOT IN (SELECT MAX(rowid) FROM node_events WHERE node IN"
            " (SELECT node FROM node_events GROUP BY node ORDER BY MAX(rowid) DESC LIMIT ?)"
            " GROUP BY node, event)",
            (NODES_KEPT,),
        )

    def close_dangling(self, at: float) -> int:
        """Record a disconnection at ``at`` for every node whose last event is a connection: the
        relay stopped (or was killed) under it without the chance to record one."""
        rows = self.db.execute(
            "SELECT n.node, n.at FROM node_events n JOIN (SELECT node, MAX(rowid) AS last FROM node_events"
            " GROUP BY node) m ON n.rowid = m.last WHERE n.event = 'connected'"
        ).fetchall()
        for node, connected in rows:
            self.record_node(str(node), "disconnected", max(at, float(connected)))
        return len(rows)

    def last_node_event(self, event: str) -> tuple[float, str] | None:
        row = self.db.execute(
            "SELECT at, node FROM node_events WHERE event = ? ORDER BY at DESC LIMIT 1", (event,)
        ).fetchone()
        return None if row is None else (float(row[0]), str(row[1]))

    # keys ----------------------------------------------------------------------------------------
    def add_key(self, key_id: str, key_hash: str, label: str) -> None:
        self.db.execute(
            "INSERT INTO keys(id, hash, label, created) VALUES(?, ?, ?, ?)",
            (key_id, key_hash, label, time.time()),
        )

    def key_hashes(self) -> dict[str, str]:
        """hash -> id of every key not revoked."""
        rows = self.db.execute("SELECT hash, id FROM keys WHERE revoked IS NULL").fetchall()
        return {str(h): str(i) for h, i in rows}

    def list_keys(self) -> list[KeyRecord]:
        rows = self.db.execute("SELECT id, label, created, revoked FROM keys ORDER BY created").fetchall()
        return [
            KeyRecord(str(r[0]), str(r[1]), float(r[2]), None if r[3] is None else float(r[3])) for r in rows
        ]

    def revoke_key(self, key_id: str) -> bool:
        cur = self.db.execute(
            "UPDATE keys SET revoked = ? WHERE id = ? AND revoked IS NULL", (time.time(), key_id)
        )
        return cur.rowcount > 0

    # browser sessions ----------------------------------------------------------------------------
    def add_session(self, session_id: str, key_id: str, expires: float, keep: int = 100) -> list[str]:
        """A new live session of ``key_id``; the key's oldest sessions past ``keep`` end (deleted:
        the ids returned), and expired sessions are deleted. The table holds live sessions only, at
        most ``keep`` per key, so a login costs the same after thousands of them."""
        now = time.time()
        with self._transaction():
            self.db.execute("DELETE FROM sessions WHERE expires <= ?", (now,))
            self.db.execute(
                "INSERT INTO sessions(id, key_id, created, expires) VALUES(?, ?, ?, ?)",
                (session_id, key_id, now, expires),
            )
            (count,) = self.db.execute("SELECT COUNT(*) FROM sessions WHERE key_id = ?", (key_id,)).fetchone()
            if count <= keep:
                return []
            rows = self.db.execute(
                "SELECT id FROM sessions WHERE key_id = ? ORDER BY created, rowid LIMIT ?",
                (key_id, count - keep),
            ).fetchall()
            displaced = [str(r[0]) for r in rows]
            self.db.executemany("DELETE FROM sessions WHERE id = ?", [(i,) for i in displaced])
            return displaced

    def live_sessions(self) -> dict[str, str]:
        """session id -> key id of every session neither ended nor expired."""
        rows = self.db.execute(
            "SELECT id, key_id FROM sessions WHERE ended IS NULL AND expires > ?", (time.time(),)
        ).fetchall()
        return {str(i): str(k) for i, k in rows}

    def list_sessions(self) -> list[SessionRecord]:
        rows = self.db.execute(
            "SELECT id, key_id, created, expires, ended FROM sessions WHERE ended IS NULL AND expires > ?"
            " ORDER BY created",
            (time.time(),),
        ).fetchall()
        return [
            SessionRecord(
                str(r[0]), str(r[1]), float(r[2]), float(r[3]), None if r[4] is None else float(r[4])
            )
            for r in rows
        ]

    def end_sessions(self, *, session_id: str | None = None, key_id: str | None = None) -> int:
        """End one session, every session of a key, or (neither given) every session: how many.
        An ended session is deleted: a cookie naming a session the table lacks is refused, so
        nothing of it needs keeping."""
        where = "1"
        args: list[str] = []
        if session_id is not None:
            where += " AND id = ?"
            args.append(session_id)
        if key_id is not None:
            where += " AND key_id = ?"
            args.append(key_id)
        with self._transaction():
            self.db.execute("DELETE FROM sessions WHERE expires <= ?", (time.time(),))  # not counted
            return int(self.db.execute(f"DELETE FROM sessions WHERE {where}", args).rowcount)

    # jobs ----------------------------------------------------------------------------------------
    def add_job(self, job_id: str, key_id: str, request: dict[str, Any]) -> None:
        self.db.execute(
            "INSERT INTO jobs(id, key_id, created, state, request) VALUES(?, ?, ?, 'running', ?)",
            (job_id, key_id, time.time(), json.dumps(request)),
        )

    def finish_job(
        self,
        job_id: str,
        state: str,
        status: int,
        headers: list[tuple[str, str]],
        body: bytes,
        error: str | None,
    ) -> None:
        self.db.execute(
            "UPDATE jobs SET finished = ?, state = ?, status = ?, headers = ?, body = ?, error = ?"
            " WHERE id = ?",
            (time.time(), state, status, json.dumps([list(h) for h in headers]), body, error, job_id),
        )

    def get_job(self, job_id: str, key_id: str) -> JobRecord | None:
        row = self.db.execute(
            "SELECT id, key_id, created, finished, state, request, status, headers, body, error"
            " FROM jobs WHERE id = ? AND key_id = ?",
            (job_id, key_id),
        ).fetchone()
        if row is None:
            return None
        return JobRecord(
            str(row[0]),
            str(row[1]),
            float(row[2]),
            None if row[3] is None else float(row[3]),
            str(row[4]),
            json.loads(row[5]),
            None if row[6] is None else int(row[6]),
            json.loads(row[7]) if row[7] else [],
            bytes(row[8] or b""),
            row[9],
        )

    def list_jobs(self, key_id: str, limit: int = 100) -> list[tuple[str, str, float]]:
        rows = self.db.execute(
            "SELECT id, state, created FROM jobs WHERE key_id = ? ORDER BY created DESC LIMIT ?",
            (key_id, limit),
        ).fetchall()
        return [(str(r[0]), str(r[1]), float(r[2])) for r in rows]

    def delete_job(self, job_id: str, key_id: str) -> bool:
        return self.db.execute("DELETE FROM jobs WHERE id = ? AND key_id = ?", (job_id, key_id)).rowcount > 0

    def expire_jobs(self, older_than: float) -> None:
        """Forget jobs that finished before ``older_than`` (a running job never expires)."""
        self.db.execute("DELETE FROM jobs WHERE finished IS NOT NULL AND finished < ?", (older_than,))

    def job_usage(self, key_id: str) -> tuple[int, int]:
        """How many jobs ``key_id`` keeps (running or finished), and the bytes of their results."""
        row = self.db.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(body)), 0) FROM jobs WHERE key_id = ?", (key_id,)
        ).fetchone()
        return int(row[0]), int(row[1])

    def abandon_running_jobs(self) -> int:
        cur = self.db.execute(
            "UPDATE jobs SET state = 'failed', finished = ?,"
            " error = 'the relay restarted before the job finished' WHERE state = 'running'",
            (time.time(),),
        )
        return cur.rowcount
