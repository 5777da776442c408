"""A ``zpar.pp`` job as the producer sees it: pp's ``_Task``, its statistics and its error."""

from __future__ import annotations

import dataclasses
import logging
import threading
import traceback
from collections.abc import Callable
from typing import Any

from ..errors import ZparError
from ._call import PPCall

log = logging.getLogger("zpar.pp")


class DestroyedServerError(ZparError, RuntimeError):
    """The Server was destroyed before this job finished, or a job was submitted after that."""


@dataclasses.dataclass(slots=True)
class Statistics:
    """One node's share, as ``Server.get_stats()`` reports it (pp's names).

    ``ncpus``: its workers; ``njobs``: jobs handed to it; ``time``: seconds
    its jobs ran in workers; ``rtime``: seconds from handing each job to the
    node to its result coming back here (queueing and transfer included).
    """

    ncpus: int
    njobs: int = 0
    time: float = 0.0
    rtime: float = 0.0


class Job:
    """A submitted job: ``job()`` waits for its result (pp's ``_Task``).

    Made by ``Server.submit``. Its outcome is settled once, by the Server;
    ``on_finish`` is told when the job has finished, callback included.
    """

    def __init__(self, tid: int, call: PPCall, frames: tuple[bytes, ...], callback: Callable[..., Any] | None,
                 callbackargs: tuple[Any, ...], group: str, *, strict: bool,
                 on_finish: Callable[[Job], None]) -> None:
        self.tid, self.group, self.callback, self.callbackargs = tid, group, callback, callbackargs
        self.call: PPCall | None = call  # what travels, until the job is settled
        self.frames = frames
        self.sent = 0.0  # when it was handed to a node (time.monotonic)
        self._strict, self._on_finish = strict, on_finish
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._settled = self._reported = self._destroyed = False
        self._value: Any = None
        self._error: BaseException | None = None
        self._output = ""

    @property
    def finished(self) -> bool:
        """True once the result is in and the callback, if any, has returned."""
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the job has finished (or its Server was destroyed); False if ``timeout`` passed first."""
        return self._done.wait(timeout)

    def __call__(self) -> Any:
        """The job's result, waiting for it; None if it raised, and its traceback is printed (as pp did).

        With ``Server(strict=True)`` the job's exception is raised instead.
        Raises DestroyedServerError if the Server was destroyed before the job finished.
        """
        self._done.wait()
        if self._destroyed:
            raise DestroyedServerError(f"the Server was destroyed before job {self.tid} finished")
        self._report()
        if self._error is not None and self._strict:
            raise self._error
        return self._value

    def settle(self, value: Any = None, error: BaseException | None = None, output: str = "",
               destroyed: bool = False) -> None:
        """Record the outcome (the first one wins); the callback, if any, runs in a thread of its own, as in pp."""
        with self._lock:
            if self._settled:
                return
            self._settled = True
            self._value, self._error, self._output, self._destroyed = value, error, output, destroyed
            self.call, self.frames = None, ()
        if destroyed:
            self._finish()
        elif error is not None and self._strict:
            if self.callback is not None:  # it will not be called: say so, for programs that only wait()
                log.error("pp job %d failed, so its callback is not called (job() raises the error): %s",
                          self.tid, describe(error).rstrip())
            self._finish()
        elif self.callback is not None:
            threading.Thread(target=self._run_callback, name=f"zpar-pp-callback-{self.tid}", daemon=True).start()
        else:
            self._finish()

    def _run_callback(self) -> None:
        callback = self.callback
        try:
            self._report()
            if callback is not None:
                callback(*self.callbackargs, self._value)
        except Exception:
            log.exception("the callback of pp job %d raised; its result is still available from job()", self.tid)
        finally:
            self._finish()

    def _finish(self) -> None:
        self._done.set()
        self._on_finish(self)

    def _report(self) -> None:
        """Print, once, what the job printed, then its error unless strict: pp's observable behaviour."""
        with self._lock:
            if self._reported:
                return
            self._reported = True
        text = self._output
        if self._error is not None and not self._strict:
            text += "An error has occurred during the function execution\n" + describe(self._error)
        if text:
            print(text, end="")

    def __repr__(self) -> str:
        state = "destroyed" if self._destroyed else "finished" if self.finished else "pending"
        return f"<zpar.pp job {self.tid} {state}>"


def describe(error: BaseException) -> str:
    """The remote traceback of a task's exception; the error line of one of zpar's own."""
    tb = getattr(error, "remote_traceback", None)
    return tb if isinstance(tb, str) and tb else "".join(traceback.format_exception_only(error))
