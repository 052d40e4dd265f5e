"""The upload/GC protocol: what uploaders and `hookd gc` promise each other, and the bounds both enforce.

Many builders upload into one bucket while a GC deletes from it; there is no server but the bucket,
and the bucket offers no transactions. The invariant kept at every instant:

    every narinfo in the bucket has its NAR, and the narinfo of each of its references.

Terms. An uploader *writes* an object with a PUT; it *touches* one by resetting its last-modified
time without changing it (S3 copy-onto-itself, `utime`, an HTTP re-put); a touch of a missing object
fails. The *age* of an object is the GC's clock minus the object's last-modified time.

What an uploader does for a path P (`Uploader.publish` in `upload.py`, `Freshness` below):
1. Write P's NAR (its key names its bytes: narstream.py). Only a write that *created* the object
   counts as a write below: a conditional PUT that succeeded, a link(2), an HTTP 201, or a PUT after an
   existence check found the key absent. A write that replaced an object, or an identical NAR found
   there, counts as a touch (a delete decided on the earlier object may still land after it).
2. For every object P relies on but did not write, or touch *and verify* (step 4), itself within
   `grace/2` (its own clock): the narinfo of each direct reference, and the NAR of step 1 if it was
   touched or its write began more than `grace/2` ago: touch it. A failed touch means the
   reference is gone: it is queued again and P waits for it.
3. If anything was touched: wait `settle` (below) after the last touch completed.
4. Check that every touched object still exists. One that is missing goes back to step 2's queue.
5. Put P's narinfo, sent less than `grace/2` after the earliest write or verified touch it relies on
   (otherwise back to step 2), with a request timeout of `request_timeout`. Like a NAR's, this PUT is
   a write that P's referrers may rely on only if an existence check sent less than `grace/2` before
   it (the planner's, or one beside the NAR's upload) found the key absent; if a narinfo was there
   (another uploader's, maybe old, maybe being deleted by a GC), it is a touch.
A reference's NAR and its own references need no touch: a GC that spares a narinfo spares its NAR and
its closure (below), and one that deletes it does so before step 4 can pass.

What GC does (`gc.py`: `plan.py`, then `sweep.py` with its pure rules in `sweep.SweepState`):
1. Note the time, list the bucket, plan: roots are pins and narinfos younger than the retention;
   the mark is their closure; candidates are unmarked (or broken) narinfos older than the grace.
2. Sweep narinfos *referrers first*: a candidate is decided only once every candidate that refers
   to it is decided. Deciding is a stat; a narinfo found young (or changed since the listing, or
   that cannot be deleted in time, or whose delete fails) is *spared*, and a spared narinfo becomes
   a root: its closure is spared with it.
3. Then NARs: a listed NAR is a candidate only if no narinfo of the listing that is still in the
   bucket (kept or spared) points at it; each is stat'd and deleted only if old.
4. Then the listings and logs of the narinfos it deleted.
Every delete is sent at most `check_to_delete` after the stat that found the object old, with a
total timeout of `request_timeout`; otherwise the delete is given up (the object is spared). No stat
is made later than `grace/2 - R` after the listing began: past that the sweep stops and spares the rest.

Why it holds. Say an uploader starts a write or touch of object O at time t (real time) and relies
on O when it publishes P, sent before t + grace/2 and landing before t + grace/2 + R.
- A GC stat that began after the write or touch landed sees O younger than its grace: GC deletes
  only objects whose age is at least grace + max_skew by its own clock, and its clock is within
  max_skew of the bucket's, so such a stat would have to come after t + grace.
- So a delete of O can come only from a stat made (a) before the touch landed, or (b) after
  t + grace. (a): that delete is sent within `check_to_delete` and lands within R after that, so
  before the touch's completion + `settle`; the uploader's existence check comes after that, sees
  O gone and does not publish. (b): a GC run whose listing contains P marks O through P (P is young
  for a whole grace after it lands); a run whose listing began before P landed, so before
  t + grace/2 + R, makes its last stat by its start + grace/2 - R < t + grace.
- A write that created O: while the key was absent, every delete decided on an earlier object of
  the key had landed (one delete per stat, one GC at a time), and an object another uploader
  created there since the check is younger than `grace/2` when O's write is sent, so no stat before
  O's write landed can have found it old: no delete of it is pending.
- Referrers first makes "spared means the closure is spared" sound: a reference is deleted only
  after each of its referrers in the listing has been deleted; a referrer found young is a root.
- NARs are decided after every narinfo, against the narinfos that remain; a NAR of a narinfo
  published after the listing was written or touched by its uploader under the rule above.

The timing assumptions, each named and enforced:
- R, `request_timeout`: a request that has not been answered within R is abandoned by the client
  (`asyncio.timeout`), and the bucket applies a request within R of its sending or never. The first
  half is enforced here; the second is the one assumption about the server (true of S3, nginx and
  a local file system, which apply a request as it arrives).
- `check_to_delete`: GC gives up a delete whose stat is older than this when it would be sent.
- `settle` = (check_to_delete + R) * 1.1: how long an uploader waits between its touches and its
  existence check.
- `max_skew`: GC measures the bucket's clock against its own when it takes its lease (the lease
  object's last-modified time) and refuses to run if they differ by more.
- `grace/2` (uploader) and `grace/2 - R` (GC): the windows above; `Bounds.check` refuses settings under
  which they do not leave room for the requests (R < grace/4, settle + 3R < grace/2: a touch, the
  existence check and the publish).
Uploaders never compare the bucket's clock with theirs: an object someone else wrote is touched
before it is relied on.
"""

from __future__ import annotations

from dataclasses import dataclass

SETTLE_MARGIN = 1.1


class BoundsError(ValueError):
    """Timing settings under which the protocol cannot hold."""


@dataclass(frozen=True)
class Bounds:
    """The protocol's timing bounds (seconds). Uploaders and GC of one cache must use the same ones."""

    grace: float = 3600.0
    check_to_delete: float = 20.0
    request_timeout: float = 20.0
    max_skew: float = 30.0

    @property
    def settle(self) -> float:
        """An uploader's wait between its touches and its final existence check."""
        return (self.check_to_delete + self.request_timeout) * SETTLE_MARGIN

    @property
    def fresh_for(self) -> float:
        """How long an uploader relies on an object after writing it or touching and verifying it."""
        return self.grace / 2

    @property
    def sweep_window(self) -> float:
        """How long after its listing began a GC may still decide to delete something."""
        return self.grace / 2 - self.request_timeout

    def young(self, mtime: float, now: float) -> bool:
        """GC: whether an object modified at `mtime` (the bucket's clock) must be spared at `now` (GC's)."""
        return now - mtime < self.grace + self.max_skew

    def check(self) -> Bounds:
        if min(self.grace, self.check_to_delete, self.request_timeout) <= 0 or self.max_skew < 0:
            raise BoundsError("gc_grace, gc_check_to_delete and gc_request_timeout must be positive")
        if self.request_timeout >= self.sweep_window:
            raise BoundsError(
                f"gc_request_timeout {self.request_timeout:g}s must be shorter than a quarter of the grace "
                f"period ({self.grace:g}s)"
            )
        if self.settle + 3 * self.request_timeout >= self.fresh_for:
            raise BoundsError(
                f"the grace period {self.grace:g}s is too short for gc_check_to_delete {self.check_to_delete:g}s "
                f"and gc_request_timeout {self.request_timeout:g}s: an uploader's touches would expire before "
                f"it could publish (needs grace > 2 x ({self.settle:g}s + 3 x {self.request_timeout:g}s))"
            )
        return self
