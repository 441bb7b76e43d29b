"""Optuna storages for searches: where trials live, and how trials of dead workers come back.

* ``None`` with a run directory: an SQLite file ``optuna.db`` in it (one machine).
* ``"journal:PATH"`` or a path ending in ``.log`` / ``.journal``: a Journal file (many processes,
  or machines sharing a file system).
* any other URL (``sqlite:///x.db``, ``postgresql://...``, ``mysql://...``): an RDB storage for
  many machines.

A trial left RUNNING by a process that died is failed after ``grace_period_s`` without a
heartbeat and re-enqueued once with the same parameters (Optuna's
``RetryHeartbeatStaleTrialCallback``).
RDB storages have Optuna's own heartbeat; Journal storages have none in Optuna, so a
:class:`TrialLease` thread records one as a user attribute and :func:`fail_stale_leases` plays
Optuna's ``fail_stale_trials`` part.
"""

from __future__ import annotations

import threading
import time
import warnings
from pathlib import Path
from types import TracebackType

import optuna
import sqlalchemy
from optuna.exceptions import ExperimentalWarning
from optuna.storages import BaseStorage, InMemoryStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.trial import TrialState

from search_space import NMSearchError

LEASE_ATTR = "nmsearch.heartbeat"
_JOURNAL_SUFFIXES = (".log", ".journal")


class StorageError(NMSearchError):
    """An Optuna storage that cannot be opened or does not fit the search."""


def resolve_storage(storage: str | None, run_dir: Path | None) -> str | None:
    """The storage URL a search uses.

    Args:
        storage: The configured storage, or ``None``.
        run_dir: The run directory, or ``None``.

    Returns:
        ``storage`` when given; else ``sqlite:///RUN_DIR/optuna.db``; ``None`` (in memory) when
        there is neither.
    """
    if storage:
        return storage
    if run_dir is None:
        return None
    return f"sqlite:///{(Path(run_dir) / 'optuna.db').resolve()}"


def journal_path(url: str | None) -> Path | None:
    """The Journal file a storage URL names.

    Args:
        url: A storage URL, ``journal:PATH``, a path ending in ``.log``, or ``None``.

    Returns:
        The file's path for a Journal storage, else ``None``.
    """
    if url is None:
        return None
    if url.startswith("journal:"):
        return Path(url[len("journal:") :])
    if "://" not in url and url.endswith(_JOURNAL_SUFFIXES):
        return Path(url)
    return None


def open_storage(
    url: str | None, *, heartbeat_interval_s: int = 10, grace_period_s: int = 30, max_retry: int = 3
) -> BaseStorage:
    """Open the storage at ``url``, creating it (and its folder) when needed.

    Args:
        url: ``None`` (in memory), ``journal:PATH`` or a path ending in ``.log`` (a Journal file),
            or an RDB URL (``sqlite:///...`` in WAL mode, ``postgresql://...``, ``mysql://...``).
        heartbeat_interval_s: RDB storages: seconds between a running trial's heartbeats.
        grace_period_s: RDB storages: a trial without a heartbeat this long is failed.
        max_retry: How often a failed stale trial is enqueued again.

    Returns:
        The Optuna storage.

    Raises:
        StorageError: If the storage cannot be opened (bad URL, missing driver, unreachable server).
    """
    if url is None:
        return InMemoryStorage()
    path = journal_path(url)
    try:
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            # The open() lock works on NFS, where symlink locks may not.
            return JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
        if url.startswith("sqlite:///"):
            Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)  # heartbeats are stable in practice
            storage = RDBStorage(
                url,
                heartbeat_interval=heartbeat_interval_s,
                grace_period=grace_period_s,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=max_retry),
            )
        if url.startswith("sqlite"):
            _use_write_ahead_log(storage)
        return storage
    except Exception as error:  # SQLAlchemy, drivers and the OS raise many kinds
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise StorageError(
            f"cannot open Optuna storage {url!r}: {detail}; use an SQLite/PostgreSQL/MySQL URL or 'journal:PATH'"
        ) from None


def _use_write_ahead_log(storage: RDBStorage) -> None:
    """SQLite in WAL mode with ``synchronous=NORMAL`` commits without an fsync each: a trial's
    ~30 small writes cost milliseconds instead of most of a second. A crashed process loses
    nothing (only a power cut can drop the last commits); the file stays consistent."""

    def pragmas(connection: object, _: object) -> None:
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    sqlalchemy.event.listen(storage.engine, "connect", pragmas)
    storage.engine.dispose()  # connections opened while creating the tables had no pragmas


def has_native_heartbeat(storage: BaseStorage) -> bool:
    """Whether Optuna heartbeats the storage's trials itself (RDB storages do; Journal files do not)."""
    return isinstance(storage, RDBStorage)


class TrialLease:
    """While a trial runs, record a heartbeat in its user attributes every ``interval_s``.

    A context manager, for storages without Optuna's own heartbeat (Journal files); see
    :func:`fail_stale_leases`.

    Args:
        trial: The running trial.
        interval_s: Seconds between heartbeats.
    """

    def __init__(self, trial: optuna.Trial, interval_s: float) -> None:
        self.trial, self.interval_s = trial, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while True:
            self.trial.set_user_attr(LEASE_ATTR, time.time())
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> TrialLease:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()


def fail_stale_leases(study: optuna.Study, grace_period_s: float, max_retry: int) -> list[int]:
    """Fail RUNNING trials whose last heartbeat (or start) is older than the grace period, and re-enqueue them.

    Only the worker whose state change succeeds re-enqueues, so a trial comes back once.

    Args:
        study: The study.
        grace_period_s: Seconds without a heartbeat after which a running trial counts as dead.
        max_retry: How often one scheme is enqueued again at most.

    Returns:
        The numbers of the trials this call failed.
    """
    storage = study._storage  # Optuna's own fail_stale_trials works on the storage the same way
    now = time.time()
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        started = trial.datetime_start.timestamp() if trial.datetime_start else now
        last_seen = max(started, float(trial.user_attrs.get(LEASE_ATTR, 0.0)))
        if now - last_seen <= grace_period_s:
            continue
        try:
            changed = storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        except RuntimeError:  # another worker finished or failed it first
            continue
        if changed:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
            retry(study, storage.get_trial(trial._trial_id))
            failed.append(trial.number)
    return failed
