"""A synchronous ControlCanvas client for plug-ins and scripts.

Needs only the standard library and the pure-Python ``websockets`` package
(>= 13, Python >= 3.10), which packaging bundles into both plug-ins.  Run it on a
worker thread, never on an editor's GUI thread: ``next_event`` blocks.  ``cancel``
may be called from another thread while one thread waits in ``next_event``.

    with Client.connect("ws://127.0.0.1:7351", token) as client:
        job = client.submit(request, {0: line_art})
        result = client.wait(job, on_event=print)   # acks the result
"""

from __future__ import annotations

import collections
import inspect
import logging
import threading
import time
from typing import Callable, Iterator, Mapping, Optional

from .errors import (AuthError, ConnectionLost, ControlCanvasError, LimitError, ProtocolError,
                     ServerUnavailable, error_from_code)
from .images import Image
from .messages import Error, GenerateRequest, Models, Status, Welcome
from .session import ClientSession, ResultReady
from .tokens import QuietTokenLogger, handshake_headers

DEFAULT_URL = "ws://127.0.0.1:7351"
# Big enough for the largest result a server may send (its own limits still apply).
MAX_FRAME = 1 << 31


def raise_error(message: Error) -> None:
    raise error_from_code(message.code, message.message, field=message.field,
                          job_id=message.job_id)


class Client:
    def __init__(self, ws, session: ClientSession, url: str) -> None:
        self._ws = ws
        self.session = session
        self.url = url
        self._lock = threading.Lock()
        self._pending: collections.deque = collections.deque()
        self.welcome: Optional[Welcome] = session.welcome

    @classmethod
    def connect(cls, url: str = DEFAULT_URL, token: str = "", *, client: str = "",
                timeout: float = 10.0) -> "Client":
        """Open a connection and authenticate; typed errors say what to fix."""
        try:
            from websockets.exceptions import (ConnectionClosed, InvalidHandshake, InvalidStatus,
                                               InvalidURI)
            from websockets.sync.client import connect
        except ImportError as err:  # a plug-in built without its bundled copy
            raise ServerUnavailable(f"The websockets package is missing ({err}); reinstall "
                                    f"the ControlCanvas plug-in.") from None
        try:
            options = dict(open_timeout=timeout, close_timeout=2, max_size=MAX_FRAME,
                           compression=None, user_agent_header=f"ControlCanvas-client {client}")
            # The token in the handshake too: the server then gives this connection a
            # client slot at once, so strangers flooding it cannot lock us out.
            options["additional_headers"] = handshake_headers(token)
            options["logger"] = QuietTokenLogger(logging.getLogger("websockets.client"))
            if "legacy" in inspect.signature(connect).parameters:  # websockets >= 17
                options["legacy"] = True  # we manage the connection's lifetime ourselves
            ws = connect(url, **options)
        except InvalidURI as err:
            raise ServerUnavailable(f"{url!r} is not a websocket address ({err}); use "
                                    f"ws://HOST:PORT, e.g. {DEFAULT_URL}.") from None
        except InvalidStatus as err:
            body = err.response.body.decode("utf-8", "replace").strip()
            if err.response.status_code == 401:
                raise AuthError(body or None) from None
            raise ProtocolError(f"The server at {url} refused the connection "
                                f"({err.response.status_code}): {body}") from None
        except InvalidHandshake as err:
            raise ServerUnavailable(f"Something at {url} answered, but it is not a ControlCanvas "
                                    f"server ({err}). Check the port.") from None
        except ConnectionClosed as err:  # the server went away mid-handshake (restarting?)
            raise ServerUnavailable(f"The server at {url} closed the connection while it was "
                                    f"being opened ({err}); it may be restarting: try again "
                                    f"in a moment.") from None
        except (OSError, TimeoutError) as err:
            raise ServerUnavailable(f"No ControlCanvas server answers at {url} ({err}). Start it "
                                    f"with `controlcanvas serve` and check the address and "
                                    f"port.") from None
        session = ClientSession(token=token, client=client)
        self = cls(ws, session, url)
        try:
            self._flush()
            self._until(lambda e: isinstance(e, Welcome), timeout, None, "The server's welcome")
        except BaseException:
            ws.close()
            raise
        self.welcome = session.welcome
        return self

    # -- sending -----------------------------------------------------------------

    def _flush(self) -> None:
        try:
            for frame in self.session.data_to_send():
                # a tuple is (header, pixels): one message in two fragments, no copy
                self._ws.send(frame if isinstance(frame, (str, bytes)) else list(frame))
        except Exception as err:
            raise self._lost(err) from None

    def submit(self, request: GenerateRequest, images: Mapping[int, Image], *,
               cancel_on_disconnect: bool = False, preview_every: int = 0,
               job_id: Optional[str] = None) -> str:
        with self._lock:
            job = self.session.generate(request, images, job_id=job_id,
                                        cancel_on_disconnect=cancel_on_disconnect,
                                        preview_every=preview_every)
            self._flush()
        return job

    def preprocess(self, annotator: str, image: Image, *, params: Optional[dict] = None,
                   width: int = 0, height: int = 0, cancel_on_disconnect: bool = False,
                   job_id: Optional[str] = None) -> str:
        with self._lock:
            job = self.session.preprocess(annotator, image, params=params, width=width,
                                          height=height,
                                          cancel_on_disconnect=cancel_on_disconnect,
                                          job_id=job_id)
            self._flush()
        return job

    def train(self, **fields) -> str:
        """Start training a ControlNet on the server (fields of ``messages.Train``)."""
        with self._lock:
            job = self.session.train(**fields)
            self._flush()
        return job

    def _send(self, method: str, *args) -> None:
        with self._lock:
            getattr(self.session, method)(*args)
            self._flush()

    def cancel(self, job_id: str) -> None:
        """Thread-safe: may be called while another thread waits for events."""
        self._send("cancel", job_id)

    def ack(self, *job_ids: str) -> None:
        self._send("ack", *job_ids)

    def resume(self, *job_ids: str) -> None:
        self._send("resume", *job_ids)

    # -- receiving -----------------------------------------------------------------

    def _lost(self, err: Exception) -> ControlCanvasError:
        rcvd = getattr(err, "rcvd", None)
        if rcvd is not None and rcvd.code == 1009:
            return LimitError(f"The server at {self.url} closed the connection because a "
                              f"message was larger than its limit ({rcvd.reason}). Send a "
                              f"smaller image, or start the server with a larger --max-pixels.")
        return ConnectionLost(f"The connection to {self.url} was lost ({err}). Jobs keep "
                              f"running on the server; reconnect and resume them.")

    def _next(self, timeout: Optional[float]) -> Optional[object]:
        """The next event, or None when ``timeout`` passes first."""
        if self._pending:
            return self._pending.popleft()
        from websockets.exceptions import ConnectionClosed
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                frame = self._ws.recv(left)
            except TimeoutError:
                return None
            except ConnectionClosed as err:
                raise self._lost(err) from None
            with self._lock:
                self._pending.extend(self.session.receive(frame))
        return self._pending.popleft()

    def next_event(self, timeout: Optional[float] = None) -> Optional[object]:
        """The next event (queued, progress, preview, result, error...), None on timeout."""
        return self._next(timeout)

    def events(self, timeout: Optional[float] = None) -> Iterator[object]:
        """Yield events until ``timeout`` passes without one (or forever with None)."""
        while True:
            event = self._next(timeout)
            if event is None:
                return
            yield event

    def _until(self, match: Callable[[object], bool], timeout: Optional[float],
               on_event: Optional[Callable[[object], None]], what: str):
        """Read events until ``match`` picks one; others go to on_event or stay queued."""
        deadline = None if timeout is None else time.monotonic() + timeout
        skipped: list = []
        try:
            while True:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"{what} did not happen within {timeout} s.")
                event = self._next(left)
                if event is None:
                    continue
                if match(event):
                    return event
                if isinstance(event, Error) and event.job_id is None:
                    raise_error(event)
                if on_event is not None:
                    on_event(event)
                else:
                    skipped.append(event)  # other jobs' events wait for their reader
        finally:
            self._pending.extendleft(reversed(skipped))

    def wait(self, job_id: str, *, on_event: Optional[Callable[[object], None]] = None,
             timeout: Optional[float] = None, ack: bool = True) -> ResultReady:
        """Block until ``job_id`` finishes; return its result or raise its typed error.

        Other events (this job's progress and previews, other jobs' events) go to
        ``on_event``; without one they stay queued for the next reader.  With ``ack``
        the outcome is acknowledged, so the server forgets it.
        """
        event = self._until(lambda e: isinstance(e, (ResultReady, Error))
                            and e.job_id == job_id, timeout, on_event, f"Job {job_id}")
        if ack:
            self.ack(job_id)
        if isinstance(event, Error):
            raise_error(event)
        return event

    def _request(self, method: str, reply_type: type, timeout: float):
        self._send(method)
        return self._until(lambda e: isinstance(e, reply_type), timeout, None,
                           f"The reply to {method!r}")

    def status(self, timeout: float = 10.0) -> Status:
        return self._request("status", Status, timeout)

    def models(self, timeout: float = 30.0) -> Models:
        return self._request("models", Models, timeout)

    def close(self) -> None:
        self._ws.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
