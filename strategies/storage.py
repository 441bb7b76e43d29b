"""Optuna storages for searches: where trials live, and how trials of dead workers come back.

* ``None`` with a run directory: an SQLite file ``optuna.db`` in it (one machine).
* ``"journal:PATH"`` or a path ending in ``.log`` / ``.journal``: a Journal file (many processes,
  or machines sharing a file system).
* any other URL (``sqlite:///x.db``, ``postgresql://...``, ``mysql://...``): an RDB storage for
  many machines.

A trial left RUNNING by a process that died is failed and re-enqueued once with the same
parameters (Optuna's ``RetryHeartbeatStaleTrialCallback``): at once when its owner ran on this
machine (each trial records its process, see :func:`owner_is_gone`), otherwise after
``grace_period_s`` without a heartbeat. RDB storages have Optuna's own heartbeat; Journal storages
have none in Optuna, so a :class:`TrialLease` thread records one as a user attribute.
:func:`fail_stale_trials` does both checks.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import random
import re
import socket
import threading
import time
import uuid
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any

import optuna
import sqlalchemy
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import BaseStorage, InMemoryStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.trial import FrozenTrial, TrialState

from search_space import NMSearchError

_logger = logging.getLogger("nmsearch.storage")
LEASE_ATTR = "nmsearch.heartbeat"
OWNER_ATTR = "nmsearch.owner"
_JOURNAL_SUFFIXES = (".log", ".journal")
_CREATE_ATTEMPTS = 5


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
        driver_url = postgres_driver_url(url)
        for attempt in range(_CREATE_ATTEMPTS):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ExperimentalWarning)  # heartbeats are stable in practice
                    storage = RDBStorage(
                        driver_url,
                        heartbeat_interval=heartbeat_interval_s,
                        grace_period=grace_period_s,
                        heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=max_retry),
                        engine_kwargs=_engine_kwargs(driver_url),
                    )
                break
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError, sqlalchemy.exc.OperationalError) as e:  # noqa: E501
                # workers creating the tables of a new database at the same instant collide: in
                # PostgreSQL's catalog ("duplicate key ... pg_type_typname_nsp_index") or, in SQLite,
                # on "table ... already exists": try again (other operational errors are final)
                race = not isinstance(e, sqlalchemy.exc.OperationalError) or "already exists" in str(e)
                if not race or attempt == _CREATE_ATTEMPTS - 1:
                    raise
                time.sleep(0.2 + random.random())
        if url.startswith("sqlite"):
            _use_write_ahead_log(storage)
        return storage
    except StorageError:
        raise
    except Exception as error:  # SQLAlchemy, drivers and the OS raise many kinds
        # SQLAlchemy prefixes "(driver.ErrorClass) " and appends a background link on later lines
        detail = re.sub(r"^\([\w.]+\) ", "", str(error).splitlines()[0]) if str(error) else type(error).__name__
        raise StorageError(
            f"cannot open Optuna storage {public_url(url)!r}: {detail.strip()}; check the URL, that the server "
            "is up and the credentials (PGPASSWORD or ~/.pgpass), or use sqlite:///FILE or journal:PATH"
        ) from None


def public_url(url: str | None) -> str | None:
    """``url`` without its password (for messages and result files; libpq then reads
    ``PGPASSWORD`` or ``~/.pgpass``)."""
    if url is None or "://" not in url or "@" not in url:
        return url
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError:
        return url
    # URL.set() ignores None: rebuild the URL without the password
    bare = sqlalchemy.engine.URL.create(
        parsed.drivername, parsed.username, None, parsed.host, parsed.port, parsed.database, parsed.query
    )
    return bare.render_as_string(hide_password=False) if parsed.password else url


def postgres_driver_url(url: str) -> str:
    """``postgresql://`` (or ``postgres://``) with the driver that is installed: psycopg2 where it
    is (SQLAlchemy's default), else psycopg 3 (``postgresql+psycopg://``); other URLs unchanged.

    Raises:
        StorageError: a PostgreSQL URL and neither driver installed.
    """
    scheme, _, rest = url.partition("://")
    if scheme not in ("postgresql", "postgres"):
        return url
    for module, dialect in (("psycopg2", "postgresql"), ("psycopg", "postgresql+psycopg")):
        if importlib.util.find_spec(module) is not None:
            return f"{dialect}://{rest}"
    raise StorageError("a PostgreSQL storage needs a driver: pip install 'nmsearch[postgres]' (psycopg 3)")


def _engine_kwargs(url: str) -> dict[str, Any]:
    """A PostgreSQL server that does not answer fails in seconds, not after the OS's TCP timeout;
    connections are checked before use, since long trials outlive idle server connections."""
    if url.startswith("postgresql") and "connect_timeout" not in url:
        return {"connect_args": {"connect_timeout": 10}, "pool_pre_ping": True}
    return {"pool_pre_ping": True} if not url.startswith("sqlite") else {}


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
    """Whether Optuna itself records heartbeats for ``storage`` (its RDB storages do)."""
    return isinstance(storage, RDBStorage)


# -- who runs a trial ----------------------------------------------------------------------------
# A RUNNING trial records its owner: this machine, the process (pid and its start time, so a
# reused pid is not mistaken for the owner) and a token of the search call. A later worker on the
# same machine can then tell at once that the owner is gone, without waiting out the heartbeat
# grace period; owners on other machines are judged by their heartbeat alone.

_ACTIVE_TOKENS: set[str] = set()  # searches running in this process
HOST_ENV = "NMSEARCH_WORKER_HOST"


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def host_id() -> str:
    """This machine as dead-worker detection sees it: the hostname, the kernel's boot id and the
    pid namespace (containers sharing a kernel differ there), or ``$NMSEARCH_WORKER_HOST``."""
    override = os.environ.get(HOST_ENV)
    if override:
        return override
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return "|".join((socket.gethostname(), _read("/proc/sys/kernel/random/boot_id"), namespace))


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot, Linux), ``""`` where unknown,
    ``None`` when there is no such live process (zombies count as dead)."""
    stat = _read(f"/proc/{pid}/stat")
    if stat:
        fields = stat[stat.rindex(")") + 2 :].split()
        return None if fields[0] in ("Z", "X") else fields[19]
    if Path("/proc/self/stat").exists():
        return None  # procfs works and has no entry for pid: no such process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, another user's
    return ""


def owner_record(token: str, trial_number: int) -> dict[str, Any]:
    """What a worker writes into a trial it starts (see :func:`owner_is_gone`)."""
    pid = os.getpid()
    return {"host": host_id(), "pid": pid, "start": _process_start(pid) or "", "token": token, "trial": trial_number}


def owner_is_gone(trial: FrozenTrial) -> bool:
    """True when the trial's owner ran on this machine and has ended: its process is gone (or the
    pid now belongs to another process), or it is this process and that search call returned.
    Owners on other machines, and trials not yet claimed, are never judged here."""
    owner = trial.system_attrs.get(OWNER_ATTR)
    if not owner or owner.get("trial") != trial.number or owner.get("host") != host_id():
        return False  # a retry inherits its failed trial's attributes until a worker claims it
    pid = int(owner["pid"])
    if pid == os.getpid():
        return owner.get("token") not in _ACTIVE_TOKENS
    start = _process_start(pid)
    return start is None or bool(start and owner.get("start") and start != owner["start"])


class SearchToken:
    """Marks a search call as live in this process for as long as the ``with`` block runs."""

    def __init__(self) -> None:
        self.token = uuid.uuid4().hex

    def __enter__(self) -> str:
        _ACTIVE_TOKENS.add(self.token)
        return self.token

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        _ACTIVE_TOKENS.discard(self.token)


def claim_trial(study: optuna.Study, trial: optuna.Trial, token: str) -> None:
    """Record this process as the owner of ``trial``."""
    study._storage.set_trial_system_attr(trial._trial_id, OWNER_ATTR, owner_record(token, trial.number))


class TrialLease:
    """While a trial runs, record a heartbeat in its user attributes every ``interval_s``.

    A context manager, for storages without Optuna's own heartbeat (Journal files); see
    :func:`fail_stale_trials`.

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


def _lease_expired(trial: FrozenTrial, now: float, grace_period_s: float) -> bool:
    started = trial.datetime_start.timestamp() if trial.datetime_start else now
    return now - max(started, float(trial.user_attrs.get(LEASE_ATTR, 0.0))) > grace_period_s


def _retry_callback(max_retry: int) -> RetryHeartbeatStaleTrialCallback:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback(max_retry=max_retry)


def retry_trial(study: optuna.Study, trial: optuna.Trial, max_retry: int) -> None:
    """Queue a copy of ``trial`` (same parameters) before the search stops inside it, as if its
    worker had died, so the next run evaluates it first; not when another worker has already
    failed it (and queued its retry)."""
    frozen = study._storage.get_trial(trial._trial_id)
    if frozen.state == TrialState.RUNNING:
        _retry_callback(max_retry)(study, frozen)


def fail_stale_trials(study: optuna.Study, grace_period_s: float, max_retry: int, *, leases: bool) -> list[int]:
    """Fail the RUNNING trials whose worker is gone and re-enqueue each once with the same
    parameters (Optuna's ``RetryHeartbeatStaleTrialCallback``): owners on this machine that ended
    (:func:`owner_is_gone`, at once), Optuna's stale heartbeats (RDB storages), and, with
    ``leases``, trials whose :class:`TrialLease` is older than the grace period. Only the worker
    whose state change succeeds re-enqueues. Returns the numbers of the failed trials."""
    storage = study._storage
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        if has_native_heartbeat(storage):
            optuna.storages.fail_stale_trials(study)  # runs the storage's retry callback itself
    retry = _retry_callback(max_retry)
    now = time.time()
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        gone = owner_is_gone(trial)
        if not gone and not (leases and _lease_expired(trial, now, grace_period_s)):
            continue
        try:
            changed = storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        except (UpdateFinishedTrialError, RuntimeError):  # another worker finished or failed it first
            continue
        if changed:
            retry(study, storage.get_trial(trial._trial_id))
            failed.append(trial.number)
            why = "its process on this machine ended" if gone else f"no heartbeat for over {grace_period_s} s"
            _logger.warning(f"trial {trial.number} failed and re-enqueued: {why}")
    return failed
