"""`neoxko serve`: the ASGI app on uvicorn, with the limits a public port needs and a graceful stop.

- header timeout: a connection must finish its request line and headers within header_timeout_s of
  opening (or of its previous response), or it is closed; uvicorn's own keep-alive timer restarts on
  every byte, so a client trickling headers would otherwise hold its socket for ever. The body has
  its own timeout (408, in the app).
- limit_concurrency: connections and requests beyond it get 503 from uvicorn at once.
- SIGTERM or Ctrl-C: /health says "stopping" (503) and new requests get 503 while the port stays open, so a load
  balancer sees the stop; running requests may finish for shutdown_timeout_s, then the engine ends them, each
  stream with a final chunk whose finish_reason is "abort"; then the port closes and the process exits 0. A second
  Ctrl-C stops at once.
"""

import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from neoxko.errors import NeoxkoError
from neoxko.serve.app import State, build_app
from neoxko.serve.engine import Engine
from neoxko.serve.protocol import ServeSettings
from neoxko.tokenizer import Tokenizer


@dataclass(frozen=True)
class Limits:
    header_timeout_s: float = 10.0
    keep_alive_s: int = 5
    limit_concurrency: int = 1024
    shutdown_timeout_s: float = 30.0


class _HeaderTimeout(H11Protocol):
    header_timeout_s = 10.0
    _header_timer = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the request line and headers are in
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._half_closed and not self.transport.is_closing():
            self.transport.close()  # (the client sent its last request and said so)
        elif not self.transport.is_closing():
            self._arm()  # the next request's headers get the same time

    _half_closed = False

    def eof_received(self) -> bool | None:
        """A client that sent a whole request and then shut its side (`shutdown(SHUT_WR)`) may still want the
        response, or may have left: TCP tells the two apart only once the server writes. So the socket stays open
        for writing, and the request is marked half-closed (ASGI scope extension "neoxko.half_closed"): a stream's
        next write finds out whether the client is there; a whole response is awaited only with
        --allow-half-close (else the client is taken for gone, as nginx takes it, and its row is freed).
        uvicorn's own answer (None) closes the socket at once."""
        if self.cycle is not None and not self.cycle.response_complete and self.conn.their_state is h11.DONE:
            self._half_closed = True
            self.cycle.scope.setdefault("extensions", {})["neoxko.half_closed"] = {}
            return True
        return None

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._expired)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _expired(self) -> None:
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: State, limits: Limits):
        super().__init__(config)
        self.neoxko, self.limits = state, limits

    # not uvicorn's own handler: it raises the signal again once stopped (the process would end by SIGTERM, not 0),
    # and it closes the port at once, before /health could tell anyone the server is stopping
    def handle_exit(self, sig, frame) -> None:
        if not self.neoxko.stopping:
            self.neoxko.stopping = True
            threading.Thread(target=self._drain, name="neoxko-drain", daemon=True).start()
            return
        if sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: stop waiting
        self.should_exit = True

    def _drain(self) -> None:
        """Let the running requests finish (or end them at the deadline) with the port open, then close it."""
        try:
            engine = self.neoxko.engine
            if engine is None:
                return
            engine.stop_accepting()
            deadline = time.monotonic() + self.limits.shutdown_timeout_s
            while not engine.idle and time.monotonic() < deadline:
                time.sleep(0.05)
            if not engine.idle:
                engine.abort_all("abort")
        finally:
            self.should_exit = True


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads: a busy port is reported at once."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family = infos[0][0] if infos else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        raise NeoxkoError(f"cannot listen on {host}:{port}: {e.strerror}; pick another --port") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def make_server(state: State, limits: Limits = Limits()) -> _Server:
    protocol = type("HeaderTimeoutProtocol", (_HeaderTimeout,), {"header_timeout_s": limits.header_timeout_s})
    config = uvicorn.Config(build_app(state), http=protocol, lifespan="off", log_config=None, log_level="warning",
                            access_log=False, limit_concurrency=limits.limit_concurrency,
                            timeout_keep_alive=limits.keep_alive_s,
                            timeout_graceful_shutdown=int(limits.shutdown_timeout_s) + 5, server_header=False)
    return _Server(config, state, limits)


class Served:
    """A server running in a background thread (tests, notebooks): .port, .engine, .close()."""

    def __init__(self, server: _Server, sock: socket.socket, thread: threading.Thread):
        self.server, self.sock, self.thread = server, sock, thread
        self.port = sock.getsockname()[1]

    @property
    def state(self) -> State:
        return self.server.neoxko

    @property
    def engine(self) -> Engine:
        return self.state.engine

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        if self.engine is not None:
            self.engine.close()


def serve(engine: Engine | None, tokenizer: Tokenizer | None, settings: ServeSettings, host: str = "127.0.0.1",
          port: int = 0, limits: Limits = Limits()) -> Served:
    """Start serving in a background thread; returns once it accepts connections. With engine None it answers
    503 (loading) until .state.tokenizer and then .state.engine are set."""
    state = State(settings, engine, tokenizer)
    sock = bind(host, port)
    server = make_server(state, limits)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="neoxko-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    if not server.started:
        raise NeoxkoError(f"the server on {host}:{port} did not start")
    return Served(server, sock, thread)


def run(state: State, sock: socket.socket, load, limits: Limits, ready_message) -> None:
    """Serve in this (the main) thread until SIGTERM or Ctrl-C; `load()` returns (engine, tokenizer) and runs
    meanwhile, so /health answers 503 "loading" until it is done. A failed load stops the server and is raised."""
    server = make_server(state, limits)
    failure = []

    def loading():
        try:
            engine, tokenizer = load()
            state.tokenizer = tokenizer
            state.engine = engine  # last: routes take a set engine to mean ready
            print(ready_message(), file=sys.stderr, flush=True)
        except BaseException as e:  # noqa: B036 - handed to the main thread
            failure.append(e)
            server.should_exit = True

    threading.Thread(target=loading, name="neoxko-load", daemon=True).start()
    try:
        server.run(sockets=[sock])
    finally:
        if state.engine is not None:
            state.engine.close()
    if failure:
        raise failure[0]
