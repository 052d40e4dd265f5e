"""The life of a queued path: its states, what each means to an operator, and which moves are allowed.

    pending ──start──► uploading ──uploaded──► done ──gone from the cache──► pending
       ▲                   │ ├─transient failure (backoff)──► pending
       │                   │ └─refused / permanent error────► failed ──retry──► pending
       │                   └─killed (daemon restart)────────► pending
       ├── a reference failed or was dropped ──► blocked ──the reference retried──► pending
       └── a new request ◄── failed, dropped, blocked
    upstream: left to an upstream cache.      dropped: the operator gave up on it (and its referrers).

A stale plan never moves a path that is `uploading`, nor one that became `done` after the plan's
existence checks began: those are what the plan could not have seen.
"""

from __future__ import annotations

PENDING = "pending"
UPLOADING = "uploading"
DONE = "done"
FAILED = "failed"
BLOCKED = "blocked"
UPSTREAM = "upstream"
DROPPED = "dropped"

STATES = (PENDING, UPLOADING, DONE, FAILED, BLOCKED, UPSTREAM, DROPPED)

MEANING = {
    PENDING: "waiting for its references, its retry time or a free upload slot",
    UPLOADING: "being uploaded now",
    DONE: "in the cache",
    FAILED: "cannot be uploaded as it is; see its error, then `hookd queue retry`",
    BLOCKED: "waits for a reference that failed or was dropped",
    UPSTREAM: "left to an upstream cache",
    DROPPED: "dropped by the operator",
}

SATISFIED = (DONE, UPSTREAM)
"""A referrer may be published once each of its references is in one of these states."""

FINAL = (DONE, UPSTREAM, FAILED, BLOCKED, DROPPED)
"""States a request's path can end in: `push --wait` stops waiting for it there."""

UNSUCCESSFUL = (FAILED, BLOCKED, DROPPED)

BLOCKING = (FAILED, DROPPED, BLOCKED)
"""A reference in one of these states blocks its referrers."""

EVENT_OF = {DONE: "uploaded", FAILED: "failed", PENDING: "retry", BLOCKED: "blocked"}
"""The history event recorded when an upload attempt ends in a state."""


# A request (what the hook, the spool or `hookd push` handed over) is new until the planner has turned it
# into the paths of its closure (planned), or has given up on it (failed: its .drv or paths are not valid).
REQUEST_NEW = "new"
REQUEST_PLANNED = "planned"
REQUEST_FAILED = "failed"


def sql_list(states: tuple[str, ...]) -> str:
    """States as an SQL list literal (they are constants, never input)."""
    return "(" + ", ".join(f"'{s}'" for s in states) + ")"
