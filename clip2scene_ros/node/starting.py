"""Stop signals that reach an executable while it is still starting.

Importing the node's modules (torch, the models, rclpy) takes seconds, and until ``rclpy.init``
has run no ROS signal handler is in place: a Ctrl-C, or ``ros2 launch`` stopping its processes
right after starting them, would end the process with a ``KeyboardInterrupt`` traceback (or kill
it with SIGTERM's status). Nothing is open yet, so the executables exit at once with status 0
instead (:func:`exit_on_stop_signals_while_starting`, the first thing they do). ``run_node``
then holds SIGINT and SIGTERM back while it initialises rclpy (:func:`hold_stop_signals`) and
releases them once rclpy's handlers are in place, so a signal that came meanwhile is a normal
stop rather than lost or half-done.

Standard library only: the executables import this before anything heavy.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

#: What stops a node: Ctrl-C, and ``ros2 launch`` (or systemd, or ``kill``) stopping it.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: The console scripts (setup.py) whose process this module guards.
EXECUTABLES = frozenset({"clip2scene_node", "clip2scene_lifecycle_node"})
#: Python's own handlers, put back before rclpy installs its handlers over them.
PYTHON_DEFAULTS: dict[int, Callable[[int, FrameType | None], Any] | int] = {
    signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}


def exit_while_starting(signum: int, frame: FrameType | None) -> None:
    """The start-up handler: nothing is open yet, so a stop is an exit with status 0."""
    raise SystemExit(0)


def started_as_executable(module_name: str) -> bool:
    """Whether the module named ``module_name`` is the program being run (``python -m`` or one of
    the console scripts, as ``ros2 run`` and ``ros2 launch`` start it), not an import."""
    return module_name == "__main__" or Path(sys.argv[0]).name in EXECUTABLES


def exit_on_stop_signals_while_starting(module_name: str) -> None:
    """Make SIGINT and SIGTERM exit with status 0 until ``run_node`` takes them over, where
    ``module_name`` is the program. A signal the process was started with ignored (SIGINT to a
    background job of a script) stays ignored."""
    if not started_as_executable(module_name):
        return
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, exit_while_starting)


class HandOver:
    """The SIGINT and SIGTERM handler from just before ``rclpy.init``.

    ``rclpy.init`` installs rclpy's handlers, which chain to this one. Until :meth:`release` a
    signal is only noted (it interrupts nothing half-done); :meth:`release` then makes it a
    stop. From then on it acts as Python's own handlers do under rclpy's: SIGINT raises
    ``KeyboardInterrupt``; SIGTERM does nothing more (rclpy's handler has already shut the
    context down, which ends the spin).
    """

    def __init__(self) -> None:
        self.pending: list[int] = []
        self.released = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if not self.released:
            self.pending.append(signum)
        elif signum == signal.SIGINT:
            signal.default_int_handler(signum, frame)

    def release(self) -> None:
        """Raise ``KeyboardInterrupt`` (a normal stop) if a signal came while held."""
        self.released = True
        if self.pending:
            raise KeyboardInterrupt


def hold_stop_signals() -> HandOver:
    """Install a :class:`HandOver` for SIGINT and SIGTERM where the start-up handler or Python's
    own is in place (an ignored signal stays ignored, another handler stays as it is)."""
    handover = HandOver()
    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            if signal.getsignal(signum) in (exit_while_starting, PYTHON_DEFAULTS[signum]):
                signal.signal(signum, handover)
    return handover


def restore_python_handlers() -> None:
    """Put Python's own handlers back where a :class:`HandOver` is (once rclpy's are gone)."""
    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            if isinstance(signal.getsignal(signum), HandOver):
                signal.signal(signum, PYTHON_DEFAULTS[signum])
