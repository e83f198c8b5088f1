"""What a run survives without a person.

- **A dead loader worker** (the OOM killer, a signal): ``RestartingLoader`` rebuilds the loader at the position
  of the last batch it yielded (``state_dict()`` -> ``state=``), so the batches that follow are the ones the
  unbroken run sees; at most ``run.max_loader_restarts`` times per epoch.
- **A crashed rank** (a signal, a lost node, a collective time-out, a CUDA or NCCL error): a rank that survives
  the crash records it in the run folder (``restarts/``) and asks Slurm to requeue the job (``scontrol
  requeue``, as submitit does on a time-out); the requeued job resumes from the newest checkpoint
  (``run.resume=auto``). At most ``run.max_restarts`` times. A deterministic failure is not retried: a
  configuration or checkpoint error, a non-finite loss, the bad-image cap, or the same error at the same step as
  the restart before. ``slurm.submit.TrainJob`` applies the rule; ``Restarts`` keeps the count.
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
    """A loader (``contract.ViewPairLoader``) that is rebuilt where it was when one of its worker processes
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
        del self.loader  # its DataLoader iterator shuts the other workers down
        self.loader = self.build(state)
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


class Restarts:
    """The restarts of one run, in ``run_dir/restarts/``: one JSON file per restart, named by the job and its
    Slurm restart count, so that the ranks that survive one crash record it once."""

    def __init__(self, run_dir: str | Path, limit: int):
        self.folder, self.limit = Path(run_dir) / "restarts", limit

    def done(self) -> list[dict]:
        if not self.folder.is_dir():
            return []
        records = [json.loads(p.read_text()) for p in self.folder.glob("*.json")]
        return sorted(records, key=lambda r: r["time"])

    def verdict(self, err: BaseException, step: int | None) -> str | None:
        """Why ``err`` must not be retried (``None``: requeue). Deterministic causes, or the retries used up."""
        cause = first_line(err)
        if type(err).__name__ in DETERMINISTIC or "max_bad_images" in cause:
            return f"not restarted: a deterministic failure ({cause})"
        done = self.done()
        if done and done[-1]["step"] == step and _shape(done[-1]["cause"]) == _shape(cause):
            return (f"not restarted: the same error at the same step {step} as before restart {len(done)} "
                    f"({cause})")
        if len(done) >= self.limit:
            return (f"gave up after {len(done)} restart(s) (run.max_restarts={self.limit}); last cause at step "
                    f"{step}: {cause}")
        return None

    def claim(self, job: str, attempt: str, rank: int, err: BaseException, step: int | None) -> int | None:
        """Record this crash once per job attempt; the restart's number for the rank that recorded it, ``None``
        for the others."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"job{job}.{attempt}.json"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return None
        with os.fdopen(fd, "w") as f:
            json.dump({"job": job, "attempt": attempt, "rank": rank, "step": step, "cause": first_line(err),
                       "time": time.time()}, f)
        return len(self.done())


def _shape(cause: str) -> str:
    """A cause with its numbers blanked: the same failure reads the same whatever the pids, ranks and times."""
    return re.sub(r"\d+(\.\d+)?", "#", cause)
