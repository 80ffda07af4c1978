"""One trainer per workdir, on local disk and on Cloud Storage.

Two trainers writing one workdir overwrite each other's config and checkpoints, so `train()`
holds the workdir for the run (only the primary process; the other hosts of a pod run are
the same trainer). A second trainer gets `WorkdirInUseError` naming the holder.

- **Local disk**: an exclusive `flock` on `WORKDIR/.lock`. The kernel releases it when the
  process ends, however it ends, so a killed run never leaves a stale lock.
- **gs:// / s3://**: object stores have no advisory locks, so the holder keeps a *lease*: a
  claim object `WORKDIR/.lock/<id>.json` that a heartbeat thread rewrites every `lease_s / 4`
  seconds. Acquiring writes the claim first and lists `.lock/` second; any other claim renewed
  within `lease_s` (both ages on the store's clock, the objects' mtimes) means the workdir is
  in use: the newcomer deletes its own claim and raises. Each trainer writes before it lists
  and GCS / S3 listings are strongly consistent, so of two trainers starting together the
  one that lists later sees the other's claim: at most one holds the workdir (when both
  list within one round trip, both refuse and neither writes anything). A run that ends
  without releasing its claim (SIGKILL, a lost VM) blocks the workdir for at most `lease_s`
  seconds; the next holder deletes such expired claims.

    >>> import tempfile
    >>> run = tempfile.mkdtemp()
    >>> with WorkdirLock(run):
    ...     WorkdirLock(run).__enter__()  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    genieblue_jax.train.workdir_lock.WorkdirInUseError: ... is in use by another trainer (pid ...): wait for it, ...
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

import jax

from genieblue_jax import paths

log = logging.getLogger(__name__)

LEASE_S = 120.0  # a remote claim not renewed for this long is a dead run's


class WorkdirInUseError(RuntimeError):
    """Another trainer holds the workdir; the message names it (pid, host, since when)."""


def _holder() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"


def _refuse(workdir: str, holder: str) -> WorkdirInUseError:
    return WorkdirInUseError(f"{workdir} is in use by another trainer ({holder}): wait for it, stop it, or use "
                             f"another --workdir")


class WorkdirLock:
    """Context manager holding `workdir` for one trainer (see the module docstring).

    Args:
      workdir: a local path or a gs:// / s3:// URL.
      lease_s: remote workdirs only: seconds after which an unrenewed claim is ignored (and
        deleted by the next holder); the heartbeat renews every lease_s / 4.

    Raises WorkdirInUseError on entry, naming the holder, when another trainer holds it.
    """

    def __init__(self, workdir: str, *, lease_s: float = LEASE_S):
        self.workdir, self.lease_s = workdir, lease_s
        self._fd = self._claim = self._thread = None
        self._stop = threading.Event()

    def __enter__(self):
        if jax.process_index() != 0:
            return self
        if paths.is_remote(self.workdir):
            self._acquire_lease()
        else:
            self._acquire_flock()
        return self

    def __exit__(self, *exc):
        if self._fd is not None:
            os.close(self._fd)  # releases the flock
            self._fd = None
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        if self._claim is not None:
            self._claim.unlink(missing_ok=True)
            self._claim = None

    # -- local disk ------------------------------------------------------------------------
    def _acquire_flock(self):
        import fcntl
        path = os.path.join(paths.path(self.workdir), ".lock")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise _refuse(self.workdir, holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, _holder().encode(), 0)
        self._fd = fd

    # -- object stores: a lease --------------------------------------------------------------
    def write_claim(self):
        """Step 1 of acquiring: this trainer's claim object (the holder's text, renewed by the
        heartbeat). Public for tests that interleave two trainers' steps."""
        self._claim = paths.path(self.workdir) / ".lock" / f"{uuid.uuid4().hex}.json"
        self._claim_text = json.dumps({"holder": _holder()})
        self._claim.write_text(self._claim_text)

    def live_claims(self) -> list[str]:
        """Step 2: the holders of the other claims renewed within lease_s of this trainer's own
        claim (store clock); expired ones are logged and skipped."""
        mine = self._claim.stat().mtime
        live = []
        for other in self._claim.parent.iterdir():
            if other.name == self._claim.name:
                continue
            try:
                age = mine - other.stat().mtime
                holder = json.loads(other.read_text()).get("holder", "unknown")
            except (FileNotFoundError, ValueError):  # released meanwhile, or a half-written claim
                continue
            if age <= self.lease_s:
                live.append(f"{holder}; lease renewed {max(age, 0):.0f} s ago, expires {self.lease_s:.0f} s "
                            f"after its last renewal")
            else:
                log.warning("%s: an expired claim (%s, not renewed for %.0f s > %.0f s): a run that was killed; "
                            "deleting it", other, holder, age, self.lease_s)
                other.unlink(missing_ok=True)
        return live

    def _acquire_lease(self):
        self.write_claim()
        live = self.live_claims()
        if live:
            self._claim.unlink(missing_ok=True)
            self._claim = None
            raise _refuse(self.workdir, " | ".join(live))
        self._thread = threading.Thread(target=self._heartbeat, name="workdir-lease", daemon=True)
        self._thread.start()

    def _heartbeat(self):
        while not self._stop.wait(self.lease_s / 4):
            try:
                self._claim.write_text(self._claim_text)  # a rewrite renews the object's mtime
            except Exception as e:  # a storage blip: the next beat retries, the lease has 3 more
                log.warning("%s: could not renew the workdir lease (%s); retrying in %.0f s", self._claim, e,
                            self.lease_s / 4)
