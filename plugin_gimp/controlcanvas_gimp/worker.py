"""Network I/O on a worker thread; everything else on the caller's (GIMP's main) thread.

GIMP's libraries are not thread-safe, so the rule is strict: the worker only
talks to the server, and hands each event to the main thread through a queue;
the main thread calls ``on_event`` (progress bar updates) and, once the work is
done, gets its return value or its exception.  When the user presses Cancel on
GIMP's progress bar, GIMP ends the plug-in process; the server notices the
dropped connection and cancels the job (jobs are submitted with
``cancel_on_disconnect``).
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, TypeVar

T = TypeVar("T")
_DONE = object()


def run(work: Callable[[Callable[[Any], None]], T], on_event: Callable[[Any], None]) -> T:
    """Run ``work(emit)`` on a worker thread; call ``on_event`` here for each emitted event."""
    events: "queue.Queue[Any]" = queue.Queue()
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["value"] = work(events.put)
        except BaseException as err:  # handed to the main thread, raised there
            outcome["error"] = err
        finally:
            events.put(_DONE)

    thread = threading.Thread(target=target, name="controlcanvas-network", daemon=True)
    thread.start()
    while True:  # an exception from on_event leaves the (daemon) worker behind
        event = events.get()
        if event is _DONE:
            break
        on_event(event)
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
