"""What a run survives without a person.

- **A dead loader worker** (the OOM killer, a signal): ``RestartingLoader`` rebuilds the loader at the position
  of the last batch it yielded (``state_dict()`` -> ``state=``), so the batches that follow are the ones the
  unbroken run sees; at most ``run.max_loader_restarts`` times per epoch.
- **A crashed rank** (a signal, a lost node, a collective time-out, a CUDA or NCCL error): a rank that survives
  the crash records it in the run folder (``restarts/``) and asks Slurm to requeue the job (``scontrol
  requeue``, as submitit does on a time-out); the requeued job resumes from the newest checkpoint
  (``run.resume=auto``). At most ``run.max_restarts`` times. A deterministic failure is not retried: a
  configuration or checkpoint error, a non-finite loss, the bad-image cap, or the same error at the same step as
  the restart before, or a rank's deterministic failure that the others only see as a broken collective.
  ``Restarts`` decides and keeps the count; ``slurm.submit.TrainJob`` acts on it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import threading
import time
from pathlib import Path

_WORKER_DIED = "DataLoader worker (pid"  # torch's message when a worker process exits or is killed


class GaveUp(RuntimeError):
    """A failure that was healed as often as allowed and came back: the message says how often and why."""


def worker_died(err: BaseException) -> bool:
    return isinstance(err, RuntimeError) and str(err).startswith(_WORKER_DIED)


def first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"


class RestartingLoader:
    """A loader (``contract.ViewLoader``) that is rebuilt where it was when one of its worker processes
    dies. ``build(state)`` makes the loader (``state=None``: as first configured); every other call goes to it.

    torch's SIGCHLD handler raises a dead worker's error wherever the main thread is, which may be between a
    forward pass and its backward. It is set back to the default once the first batch has come, so the
    DataLoader's own status check raises the error inside the iteration (within its 5 s poll), at a batch
    boundary, where the loader can be rebuilt."""

    def __init__(self, build, state: dict | None, limit: int, log=print):
        self.build, self.limit, self.log = build, limit, log
        self.loader = build(state)
        self.restarts, self.restarts_epoch = 0, None

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name):  # epoch, batch, set_epoch, state_dict, ...
        if "loader" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["loader"], name)

    def __iter__(self):
        while True:
            try:
                for batch in self.loader:
                    _leave_worker_deaths_to_the_loader()
                    yield batch
                return
            except RuntimeError as err:
                if not worker_died(err):
                    raise
                self._rebuild(err)

    def _rebuild(self, err: RuntimeError) -> None:
        epoch, batch = self.loader.epoch, self.loader.batch
        if epoch != self.restarts_epoch:
            self.restarts, self.restarts_epoch = 0, epoch
        if self.restarts >= self.limit:
            raise GaveUp(f"a loader worker died {self.restarts + 1} time(s) in epoch {epoch} "
                         f"(run.max_loader_restarts={self.limit}); last: {first_line(err)}") from err
        self.restarts += 1
        state = self.loader.state_dict()
        self.loader = self.build(state)  # the old one's workers end when it is collected
        self.log(f"loader rebuilt at epoch {epoch}, batch {batch} after {first_line(err)} (restart {self.restarts} "
                 f"of at most {self.limit} this epoch)")


def _leave_worker_deaths_to_the_loader() -> None:
    handler = signal.getsignal(signal.SIGCHLD)
    if (callable(handler) and getattr(handler, "__module__", "").startswith("torch.utils.data")
            and threading.current_thread() is threading.main_thread()):
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)


# --- crashed ranks ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def failures_name_their_step(step):
    """An exception leaving the block carries the step being worked on (``step()``, 1-based) for
    ``failed_step``: the same error at the same step twice is not retried."""
    try:
        yield
    except BaseException as err:
        err.densessl_step = step()
        raise


def failed_step(err: BaseException) -> int | None:
    return getattr(err, "densessl_step", None)


DETERMINISTIC = ("ConfigError", "CheckpointError", "RefusedCheckpoint", "FloatingPointError")


def deterministic(err: BaseException) -> bool:
    """A failure a restart would meet again: the configuration, a checkpoint, a non-finite loss, the bad-image
    cap."""
    return type(err).__name__ in DETERMINISTIC or "max_bad_images" in first_line(err)


class Restarts:
    """The restarts of one run, in ``run_dir/restarts/`` (delete the folder to start counting again): one JSON
    file per requeue, named by the job and its Slurm restart count, so that the ranks that survive one crash
    record it once; and ``fatal.*`` files, written by a rank that failed deterministically, so that the ranks
    that only see their collective break do not requeue."""

    def __init__(self, run_dir: str | Path, limit: int):
        self.folder, self.limit = Path(run_dir) / "restarts", limit

    def done(self) -> list[dict]:
        """The requeues so far, oldest first."""
        if not self.folder.is_dir():
            return []
        return sorted((json.loads(p.read_text()) for p in self.folder.glob("job*.json")), key=lambda r: r["time"])

    def handle(self, job: str, attempt: str, rank: int, err: BaseException, step: int | None) -> tuple[str, object]:
        """What this rank does about ``err``: ``("fail", reason)``, ``("requeue", restart number)`` for the one
        rank that claims this job attempt's crash, or ``("defer", None)`` for the other survivors."""
        record = {"job": job, "attempt": attempt, "rank": rank, "step": step, "cause": first_line(err),
                  "time": time.time()}
        if deterministic(err):
            self._create(f"fatal.job{job}.{attempt}.json", record)
            return "fail", f"not restarted: a deterministic failure ({record['cause']})"
        claim = f"job{job}.{attempt}.json"
        if not self._create(claim, record):
            return "defer", None
        earlier = [r for r in self.done() if (r["job"], r["attempt"]) != (job, attempt)]
        fatal = self.folder / f"fatal.job{job}.{attempt}.json"
        reason = None
        if fatal.exists():
            other = json.loads(fatal.read_text())
            reason = f"not restarted: rank {other['rank']} failed deterministically ({other['cause']})"
        elif earlier and earlier[-1]["step"] == step and _shape(earlier[-1]["cause"]) == _shape(record["cause"]):
            reason = (f"not restarted: the same error at the same step {step} as before restart {len(earlier)} "
                      f"({record['cause']})")
        elif len(earlier) >= self.limit:
            reason = (f"gave up after {len(earlier)} restart(s) (run.max_restarts={self.limit}); last cause at "
                      f"step {step}: {record['cause']}")
        if reason is not None:
            self.release(job, attempt)
            return "fail", reason
        return "requeue", len(earlier) + 1

    def release(self, job: str, attempt: str) -> None:
        """Take back a claim that did not become a requeue."""
        (self.folder / f"job{job}.{attempt}.json").unlink(missing_ok=True)

    def _create(self, name: str, record: dict) -> bool:
        """Write ``name`` whole, unless it exists (a temporary file linked into place: readers never see it
        half-written, and exactly one writer wins)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{name}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(record))
        try:
            os.link(tmp, self.folder / name)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink()


def _shape(cause: str) -> str:
    """A cause with its numbers blanked: the same failure reads the same whatever the pids, ranks and times."""
    return re.sub(r"\d+(\.\d+)?", "#", cause)
