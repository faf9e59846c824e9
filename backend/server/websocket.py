"""The websocket server: a thin asyncio adapter around ``shared.session``.

Security, checked before any protocol byte is read:
- bind 127.0.0.1 by default; another host only when the user passes ``--host``;
- a handshake with an ``Origin`` header is refused (403): browsers always send
  one, editors never do, so no web page can drive this server;
- the ``Host`` header must name a loopback address unless LAN use was chosen
  (defeats DNS rebinding);
- the first message must be ``hello`` with the token, within ``hello_timeout``;
- per peer (see ``peers``): connections that have not shown the token have their own
  few slots (``max_unauthenticated``), never a client's, and may send one small text
  frame (``max_hello_bytes``) until then; a client that sends its token in the
  handshake (``Authorization: Bearer``) goes straight to a client slot;
- each client's outbox is bounded (reading from it stops while it is full), its
  messages are handled one at a time with a turn for everyone else in between, and
  its queued jobs are capped;
- frame size, text size, image side, pixel count, pixels x batch, queue length,
  result bytes held and the number of clients are capped; compression is off (raw
  images, no zip bombs).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
from http import HTTPStatus
from typing import Callable, List, Optional, Tuple

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

import backend
from shared.errors import (AuthError, ControlCanvasError, EngineError, Expired, LimitError,
                           ProtocolError)
from shared.images import Image
from shared.messages import (Ack, Cancel, ModelsRequest, Progress, Queued, Resume, Status,
                             StatusRequest)
from shared import tokens
from shared.session import Authenticated, ServerSession, Submit, Violation
from shared.tokens import QuietTokenLogger, same_token, token_from_header

from ..engines.base import Engine, engine_info
from .config import ServerConfig, is_loopback_host
from .jobs import DONE, Job, JobManager
from .peers import CLIENT, WAITING, Outbox, Slots, result_due
from .store import open_store

log = logging.getLogger(__name__)

CLOSE_POLICY = 1008
CLOSE_BUSY = 1013
CLOSE_REASON_BYTES = 120  # a close frame holds at most 123 bytes of reason


class Connection:
    """One client: its session, its bounded outbox and the job callbacks that feed it."""

    _ids = itertools.count(1)

    def __init__(self, ws: ServerConnection, session: ServerSession, outbox: Outbox,
                 held_more: Callable[[], object]) -> None:
        """``held_more()`` is called when a result starts on its way to the client: its
        frames now count as held bytes too (see ``JobManager.held_bytes``)."""
        self.ws = ws
        self.session = session
        self.key = f"conn-{next(self._ids)}"
        self.label = self.key  # + the client's name once authenticated (the log's)
        self.outbox = outbox
        self._held_more = held_more

    # Job callbacks (loop thread): turn job events into frames.
    def job_queued(self, job: Job, position: int) -> None:
        self.session.send(Queued(job_id=job.job_id, position=position))
        self.outbox.put_event(self.session.data_to_send())

    def job_progress(self, job: Job, step: int, total: int, stage: str) -> None:
        self.session.send(Progress(job_id=job.job_id, step=step, total=total, stage=stage))
        self.outbox.put_event(self.session.data_to_send())

    def job_preview(self, job: Job, step: int, image: Image) -> None:
        self.session.send_preview(job.job_id, step, image)
        self.outbox.put_event(self.session.data_to_send())

    def job_finished(self, job: Job) -> None:
        self.flush()
        if job.state == DONE:
            self.outbox.put_result(job)  # expanded by the writer: see peers.Outbox
        else:
            self.session.send_error(job.error, job_id=job.job_id)
            self.flush()

    def flush(self) -> None:
        self.outbox.put(self.session.data_to_send())

    def _result_frames(self, job: Job) -> list:
        if job.dropped == "acked":  # collected meanwhile (through another connection)
            return []
        if job.dropped:  # expired while waiting in the outbox
            self.session.send_error(Expired(
                f"Job {job.job_id} finished, but its result waited unread longer than the "
                f"server keeps results (retention time or bytes); it is gone. Read results "
                f"as they come, or acknowledge them sooner.", job_id=job.job_id))
        else:
            self.session.send_result(job.job_id, job.result, elapsed=round(job.elapsed, 4),
                                     info=job.info)
        return self.session.data_to_send()

    async def write_loop(self) -> None:
        try:
            await self._write_all()
        finally:  # closed, or the socket failed: nothing may wait on this outbox now
            self.outbox.abandon()

    async def _write_all(self) -> None:
        outbox = self.outbox
        while True:
            item, _ = await outbox.get()
            if item is None:
                return
            job = result_due(item)
            try:
                if job is None:
                    await self._write(item)
                    continue
                frames = collections.deque(self._result_frames(job))
                outbox.result_bytes = sum(len(f[1]) for f in frames if isinstance(f, tuple))
                self._held_more()
                while frames:
                    frame = frames.popleft()  # written frames are not pinned any longer
                    await self._write(frame)
                    if isinstance(frame, tuple):
                        outbox.result_bytes -= len(frame[1])
            finally:
                outbox.result_bytes = 0
                outbox.sent()

    async def _write(self, frame) -> None:
        # a tuple is (header, pixels): one message in two fragments, no copy
        await self.ws.send(frame if isinstance(frame, (str, bytes)) else iter(frame))

    async def drain(self) -> None:
        """Write everything queued so far, then stop the writer."""
        self.outbox.close()


async def _receive(ws: ServerConnection):
    """One message: text as str; binary as its fragments (a one-element tuple when it
    was not fragmented), so the pixels of a (header, pixels) message are not copied."""
    parts = [fragment async for fragment in ws.recv_streaming()]
    if parts and isinstance(parts[0], str):
        return "".join(parts)
    return tuple(parts)


async def _discard_incoming(ws: ServerConnection) -> None:
    try:
        while True:
            await ws.recv()
    except ConnectionClosed:
        pass


class Server:
    def __init__(self, config: ServerConfig, engine: Engine, token: str) -> None:
        self.config = config
        self.engine = engine
        self.token = token
        self.limits = config.limits()
        self.connections: set = set()
        self.slots = Slots(config.max_clients, config.max_unauthenticated,
                           alive=lambda ws: ws.state is not State.CLOSED)
        self.manager: Optional[JobManager] = None
        self._server = None
        self._expiry_task: Optional[asyncio.Task] = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.config
        store = open_store(cfg.store_dir) if cfg.store_dir is not None else None
        self.manager = JobManager(self.engine, loop, max_queue=cfg.max_queue,
                                  max_jobs_per_client=cfg.max_jobs_per_client,
                                  retention_seconds=cfg.retention_seconds,
                                  retention_bytes=cfg.retention_bytes,
                                  retention_bytes_per_client=cfg.retention_bytes_per_client,
                                  held_outside=self._results_in_flight, store=store,
                                  training=cfg.training_roots())
        try:
            self._server = await serve(
                self._handle, cfg.host, cfg.port,
                process_request=self._check_handshake,
                max_size=cfg.max_hello_bytes,  # raised once the client has shown the token
                max_queue=4,
                compression=None,
                close_timeout=2,
                server_header=f"ControlCanvas/{backend.__version__}",
                logger=QuietTokenLogger(logging.getLogger("websockets.server")),
                ping_interval=20, ping_timeout=60,
            )
        except BaseException:  # the port is taken...: let go of the worker and the store
            await loop.run_in_executor(None, self.manager.close)
            raise
        self._expiry_task = asyncio.create_task(self._expire_periodically())

    @property
    def port(self) -> int:
        return self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        host = self._server.sockets[0].getsockname()[0]
        host = f"[{host}]" if ":" in host else host
        return f"ws://{host}:{self.port}"

    async def close(self) -> None:
        if self._expiry_task:
            self._expiry_task.cancel()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self.manager is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.manager.close)
        self.engine.close()

    def _results_in_flight(self) -> dict:
        """Result bytes being written to each client (for honest retention accounting)."""
        return {c.key: c.outbox.result_bytes for c in self.connections
                if c.outbox.result_bytes}

    def peer_stats(self) -> dict:
        """Per-peer figures (for tests and benchmarks): slots, outboxes, held bytes."""
        total, per_client = self.manager.held_bytes()
        return {"clients": self.slots.count(CLIENT), "waiting": self.slots.count(WAITING),
                "refused": dict(self.slots.refused), "held_bytes": total,
                "held_bytes_per_client": dict(per_client),
                "outboxes": {c.key: c.outbox.stats() for c in self.connections}}

    async def _expire_periodically(self) -> None:
        while True:
            await asyncio.sleep(min(60.0, max(1.0, self.config.retention_seconds / 4)))
            self.manager.expire()

    # -- handshake ---------------------------------------------------------------

    def _check_handshake(self, connection: ServerConnection, request):
        headers = request.headers
        if "Origin" in headers:
            log.warning("refused a handshake with Origin %r (a web page?)",
                        headers.get_all("Origin"))
            return connection.respond(
                HTTPStatus.FORBIDDEN,
                "ControlCanvas does not accept connections from web pages (the request carried "
                "an Origin header). Editors' plug-ins connect without one.\n")
        hosts = headers.get_all("Host")
        if len(hosts) != 1 or (not self.config.remote_allowed
                               and not is_loopback_host(hosts[0])):
            log.warning("refused a handshake for Host %r", hosts)
            return connection.respond(
                HTTPStatus.FORBIDDEN,
                "This ControlCanvas server only answers to localhost / 127.0.0.1. To use it "
                "from another machine, start it with --host 0.0.0.0 and use its token.\n")
        return self._take_slot(connection, headers.get(tokens.HEADER))

    def _take_slot(self, connection: ServerConnection, authorization: Optional[str]):
        """A client that shows the token in the handshake takes a client slot at once;
        any other connection one of the few slots for those still to send ``hello``."""
        if authorization is not None:
            given = token_from_header(authorization)
            if given is None or not same_token(given, self.token):
                log.warning("refused a handshake with a wrong token")
                return connection.respond(HTTPStatus.UNAUTHORIZED, AuthError().message + "\n")
            if not self.slots.take(connection, CLIENT):
                return connection.respond(
                    HTTPStatus.SERVICE_UNAVAILABLE,
                    f"Too many ControlCanvas clients are connected (the limit is "
                    f"{self.config.max_clients}); close one, or raise max_clients.\n")
            return None
        if not self.slots.take(connection, WAITING):
            return connection.respond(
                HTTPStatus.SERVICE_UNAVAILABLE,
                "Too many connections are waiting to send their token; try again in a "
                "moment.\n")
        return None

    def _admit(self, conn: "Connection") -> None:
        """The token was right: a waiting connection becomes a client (if one fits), and
        may send frames as large as an image from now on."""
        if not self.slots.promote(conn.ws):
            raise LimitError(f"Too many ControlCanvas clients are connected (the limit is "
                             f"{self.config.max_clients}); close one, or start the server "
                             f"with a larger max_clients.")
        _set_frame_limit(conn.ws, self.config.max_frame_bytes)

    # -- one connection ------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        cfg = self.config
        outbox = Outbox(cfg.max_outbox_bytes, cfg.max_outbox_frames)
        conn: Connection
        session = ServerSession(token=self.token, limits=self.limits,
                                server=f"controlcanvas {backend.__version__}",
                                engine=getattr(self.engine, "name", "unknown"),
                                max_job_pixels=cfg.max_job_pixels,
                                admit=lambda client: self._admit(conn),
                                engine_info=engine_info(self.engine))
        conn = Connection(ws, session, outbox, held_more=self.manager.expire)
        self.connections.add(conn)
        writer = asyncio.create_task(conn.write_loop())
        close_code, close_reason = 1000, ""
        try:
            close_code, close_reason = await self._serve(conn)
        except ConnectionClosed:
            pass
        finally:
            self.connections.discard(conn)
            self.slots.release(ws)
            self.manager.detach(conn)
            conn.flush()
            await conn.drain()
            try:
                await asyncio.wait_for(writer, 10)
            except (ConnectionClosed, asyncio.TimeoutError):
                writer.cancel()
            except Exception:  # a write failed on a dead socket
                log.debug("writer ended with an error", exc_info=True)
            # Keep reading (and discarding) while closing: a client that sent more than
            # the receive queue holds would otherwise never see our close frame.
            drain = asyncio.create_task(_discard_incoming(ws))
            await ws.close(close_code, _close_reason(close_reason))
            drain.cancel()

    async def _serve(self, conn: Connection) -> Tuple[int, str]:
        """Read and handle the client's messages until one side closes: (code, reason).
        One message at a time, waiting while the client's outbox is full, with a turn for
        every other connection between two messages."""
        session, ws = conn.session, conn.ws
        try:
            frame = await asyncio.wait_for(_receive(ws), self.config.hello_timeout)
        except asyncio.TimeoutError:
            session.send_error(LimitError(
                f"No 'hello' within {self.config.hello_timeout:g} s; closing."))
            return CLOSE_POLICY, "hello timeout"
        while True:
            try:
                events = session.receive(frame)
            except Exception as err:  # a bug must cost this connection, never the server
                log.exception("%s: failed to read a message", conn.key)
                session.send_error(ProtocolError(
                    f"The server could not read that message ({type(err).__name__}); see "
                    f"its log."))
                return CLOSE_POLICY, "unreadable message"
            self._dispatch(conn, events)
            conn.flush()
            if session.closed:
                return CLOSE_POLICY, session.close_reason
            await asyncio.sleep(0)  # everyone else's turn
            await conn.outbox.wait_for_room()
            frame = await _receive(ws)

    def _dispatch(self, conn: Connection, events: List[object]) -> None:
        manager = self.manager
        for event in events:
            try:
                if isinstance(event, Submit):
                    manager.submit(event.message, event.images, conn)
                elif isinstance(event, Cancel):
                    manager.cancel(event.job_id, conn)
                elif isinstance(event, Ack):
                    manager.ack(event.job_ids, conn)
                elif isinstance(event, Resume):
                    for problem in manager.resume(event.job_ids, conn):
                        conn.session.send_error(problem)
                elif isinstance(event, StatusRequest):
                    queue_length, jobs = manager.status(conn)
                    conn.session.send(Status(queue_length=queue_length, jobs=jobs))
                elif isinstance(event, ModelsRequest):
                    conn.session.send(self.engine.models())
                elif isinstance(event, Violation):
                    log.info("%s: refused: %s (%s)", conn.key, event.error.code,
                             event.error.message)
                elif isinstance(event, Authenticated):
                    conn.label = f"{conn.key} ({event.client})"
                    log.info("%s: client %r authenticated", conn.key, event.client)
            except ControlCanvasError as err:
                conn.session.send_error(err)
            except Exception as err:  # a bug must cost one reply, not the connection
                log.exception("%s: failed to handle %r", conn.key, type(event).__name__)
                conn.session.send_error(EngineError(
                    f"The server failed to handle that request ({type(err).__name__}); see "
                    f"its log."))


def _close_reason(text: str) -> str:
    """At most ``CLOSE_REASON_BYTES`` of UTF-8, cut on a character boundary."""
    return text.encode("utf-8", "replace")[:CLOSE_REASON_BYTES].decode("utf-8", "ignore")


def _set_frame_limit(ws: ServerConnection, max_bytes: int) -> None:
    """Raise the largest message this connection accepts (checked on each frame's
    header, before its payload is read). websockets >= 14 calls it max_message_size."""
    protocol = ws.protocol
    if hasattr(protocol, "max_message_size"):
        protocol.max_message_size = max_bytes
    else:  # pragma: no cover - websockets 13
        protocol.max_size = max_bytes


async def run_server(config: ServerConfig, engine: Engine, token: str,
                     ready=None) -> None:
    """Serve until cancelled. ``ready(server)`` is called once listening."""
    server = Server(config, engine, token)
    await server.start()
    try:
        if ready is not None:
            ready(server)
        await asyncio.Future()
    finally:
        await server.close()

