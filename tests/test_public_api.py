"""The public surface: the names zpar exports, its error types, and an import with no side effects."""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
import textwrap

import pytest

import zpar

PUBLIC = [
    "AuthenticationError",
    "BrokenCluster",
    "BrokerUnavailable",
    "Channel",
    "Client",
    "ConfigError",
    "DependencyError",
    "Executor",
    "Future",
    "MemoryLimitExceeded",
    "PayloadTooLarge",
    "Pool",
    "Process",
    "ProtocolError",
    "QuotaExceeded",
    "Ref",
    "RemoteTraceback",
    "ResourceUnavailable",
    "ResultTimeout",
    "SerializationError",
    "TaskError",
    "TaskOptions",
    "TaskTimeout",
    "WorkerLost",
    "ZparError",
    "__version__",
    "as_completed_async",
    "progress",
]


def test_public_names_are_pinned():
    assert sorted(zpar.__all__) == PUBLIC
    for name in PUBLIC:
        assert getattr(zpar, name) is not None
    namespace: dict = {}
    exec("from zpar import *", namespace)  # noqa: S102 - the star import is what __all__ pins
    assert set(namespace) - {"__builtins__"} == set(PUBLIC)


@pytest.mark.parametrize("error,bases", [
    (zpar.TaskError, (zpar.ZparError,)),
    (zpar.WorkerLost, (zpar.ZparError,)),
    (zpar.TaskTimeout, (zpar.ZparError, concurrent.futures.TimeoutError, TimeoutError)),
    (zpar.BrokerUnavailable, (zpar.ZparError, ConnectionError)),
    (zpar.AuthenticationError, (zpar.ZparError, PermissionError)),
    (zpar.SerializationError, (zpar.ZparError, TypeError)),
    (zpar.PayloadTooLarge, (zpar.SerializationError, TypeError)),
    (zpar.ConfigError, (zpar.ZparError, ValueError)),
    (zpar.ProtocolError, (zpar.ZparError,)),
    (zpar.QuotaExceeded, (zpar.ZparError,)),
    (zpar.BrokenCluster, (zpar.BrokerUnavailable, concurrent.futures.BrokenExecutor)),
    (zpar.ResultTimeout, (zpar.ZparError, TimeoutError)),
])
def test_errors_subclass_the_root_and_the_standard_errors_they_mean(error, bases):
    assert all(issubclass(error, base) for base in bases)


def test_future_is_a_concurrent_futures_future():
    assert issubclass(zpar.Future, concurrent.futures.Future)


def test_task_error_keeps_its_fields_across_pickling():
    import pickle

    err = pickle.loads(pickle.dumps(zpar.TaskError("boom", "mod.Kind", "Traceback ...")))
    assert (str(err), err.remote_type, err.remote_traceback) == ("boom", "mod.Kind", "Traceback ...")


IMPORT_PROBE = textwrap.dedent("""
    import json, logging, os, sys, threading

    events = []
    WATCHED = ("os.mkdir", "os.makedirs", "_thread.start_new_thread", "subprocess.Popen", "socket.bind",
               "socket.connect", "os.putenv")

    def hook(event, args):
        if event in WATCHED:
            events.append([event, repr(args)[:200]])

    def native_threads():
        return len(os.listdir("/proc/self/task"))

    sys.addaudithook(hook)
    py_before, native_before = threading.active_count(), native_threads()
    import zpar, zpar.testing, zpar.agent, zpar_broker, zpar.cli  # noqa: F401
    print(json.dumps({
        "events": events,
        "python_threads": threading.active_count() - py_before,
        "native_threads": native_threads() - native_before,
        "root_handlers": len(logging.getLogger().handlers),
        "zpar_handlers": len(logging.getLogger("zpar").handlers),
    }))
""")


def test_importing_zpar_starts_no_thread_makes_no_directory_and_configures_no_logging(tmp_path):
    proc = subprocess.run([sys.executable, "-c", IMPORT_PROBE], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "TMPDIR": str(tmp_path), "HOME": str(tmp_path),
                               "PYTHONDONTWRITEBYTECODE": "1"},  # __pycache__ is the importer's, not ours
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["events"] == []
    assert report["python_threads"] == 0 and report["native_threads"] == 0
    assert report["root_handlers"] == 0 and report["zpar_handlers"] == 0
    assert list(tmp_path.iterdir()) == []
