"""The server under the conditions of a public port: loading, slow and vanishing clients, failures, SIGTERM."""

import http.client
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import random_model, tiny_config
from neoxko import load_model, load_tokenizer, save_model
from neoxko.serve.engine import Engine
from neoxko.serve.server import Limits, ServeSettings, serve


def post(port, body, path="/v1/completions"):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    return response.status, response.read()


def get(port, path):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", path)
    response = conn.getresponse()
    return response.status, response.read()


def send_raw(port, body: dict, stream: bool) -> socket.socket:
    data = json.dumps(body | {"stream": stream}).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def wait_for(condition, seconds: float) -> float:
    start = time.monotonic()
    while not condition() and time.monotonic() - start < seconds:
        time.sleep(0.01)
    return time.monotonic() - start


def slowed(model, seconds: float):
    real = model.forward

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return real(*args, **kwargs)

    model.forward = slow
    return model


def test_health_is_503_until_the_model_is_loaded(model_dir):
    server = serve(None, None, ServeSettings(model_name="tiny"))
    try:
        status, payload = get(server.port, "/health")
        assert status == 503 and json.loads(payload) == {"status": "loading"}
        status, payload = post(server.port, {"prompt": "가", "max_tokens": 2})
        assert status == 503 and "still loading" in json.loads(payload)["error"]["message"]
        assert get(server.port, "/metrics")[0] == 200 and get(server.port, "/version")[0] == 200
        tokenizer = load_tokenizer(model_dir)
        server.state.tokenizer = tokenizer
        server.state.engine = Engine(load_model(model_dir), tokenizer.eos_id, max_batch=2)
        assert get(server.port, "/health") == (200, b'{"status":"ok"}')
        assert post(server.port, {"prompt": "가", "max_tokens": 2})[0] == 200
    finally:
        server.close()


def test_slow_headers_are_cut_off_and_a_slow_body_gets_408(model_dir):
    tokenizer = load_tokenizer(model_dir)
    engine = Engine(load_model(model_dir), tokenizer.eos_id, max_batch=2)
    server = serve(engine, tokenizer, ServeSettings(model_name="tiny", body_timeout_s=0.5),
                   limits=Limits(header_timeout_s=0.5))
    try:
        slow = socket.create_connection(("127.0.0.1", server.port))
        slow.settimeout(5)
        opened, closed = time.monotonic(), None
        try:
            for byte in b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n":  # a byte every 0.1 s: never done
                slow.sendall(bytes([byte]))
                time.sleep(0.1)
        except OSError:
            closed = time.monotonic()
        if closed is None:
            assert slow.recv(100) == b""  # closed by the server
            closed = time.monotonic()
        assert closed - opened < 2.5  # about 0.5 s, not the 4 s the headers would take
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"prompt\":")  # and then nothing
        sock.settimeout(5)
        answer = b""
        while chunk := sock.recv(4096):  # until the server closes (it says Connection: close)
            answer += chunk
        answer = answer.decode()
        assert answer.startswith("HTTP/1.1 408") and "did not arrive within 0.5 s" in answer
        assert get(server.port, "/health")[0] == 200
    finally:
        server.close()


def test_forty_clients_that_leave_free_their_rows_within_a_second(model_dir):
    """20 streaming and 20 non-streaming clients close early; every row is free within one second."""
    tokenizer = load_tokenizer(model_dir)
    engine = Engine(slowed(load_model(model_dir), 0.01), tokenizer.eos_id, max_batch=40)
    server = serve(engine, tokenizer, ServeSettings(model_name="tiny"))
    try:
        body = {"prompt": "가", "max_tokens": 100, "temperature": 1.0, "seed": 1}
        socks = [send_raw(server.port, body, stream=i % 2 == 0) for i in range(40)]
        assert wait_for(lambda: engine.busy_rows == 40, 20) < 20
        for sock in socks:
            sock.close()
        assert wait_for(lambda: engine.busy_rows == 0, 5) < 1.0
        assert engine.stats["finished_cancelled"] == 40
        assert post(server.port, {"prompt": "가", "max_tokens": 3})[0] == 200
    finally:
        server.close()


def test_a_failing_prefill_ends_its_request_and_the_next_succeeds(model_dir):
    tokenizer, model = load_tokenizer(model_dir), load_model(model_dir)
    real, failures = model.hidden_states, {"left": 0}

    def flaky(*args, **kwargs):
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("simulated prefill failure")
        return real(*args, **kwargs)

    model.hidden_states = flaky
    server = serve(Engine(model, tokenizer.eos_id, max_batch=2), tokenizer, ServeSettings(model_name="tiny"))
    try:
        failures["left"] = 1
        status, payload = post(server.port, {"prompt": "가나다", "max_tokens": 4})
        assert status == 500 and "simulated prefill failure" in json.loads(payload)["error"]["message"]
        status, payload = post(server.port, {"prompt": "가나다", "max_tokens": 4})
        assert status == 200 and json.loads(payload)["usage"]["completion_tokens"] == 4
        assert b"neoxko_engine_engine_errors_total 1.0" in get(server.port, "/metrics")[1]
    finally:
        server.close()


def test_sigterm_ends_every_stream_with_a_final_event_and_exits_0(tmp_path, tokenizer_dir):
    folder = tmp_path / "m"
    save_model(random_model(tiny_config(max_position_embeddings=2048)), folder)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, folder / f.name)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "neoxko", "serve", "--model", str(folder), "--port", str(port),
                             "--max-batch", "16", "--shutdown-timeout", "1"], stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: _healthy(port), 60) < 60
        results = [None] * 16

        def stream(i):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            body = {"prompt": "가", "max_tokens": 2000, "stream": True, "temperature": 0}  # greedy: no end of text
            conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
            results[i] = conn.getresponse().read().decode()

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        time.sleep(1.5)  # all 16 streaming
        proc.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        time.sleep(0.3)  # (draining: the port stays open and says so)
        status, payload = get(port, "/health")
        assert status == 503 and json.loads(payload)["status"] == "stopping"
        status, payload = post(port, {"prompt": "가", "max_tokens": 2})
        assert status == 503 and "shutting down" in json.loads(payload)["error"]["message"]
        assert proc.wait(timeout=30) == 0 and time.monotonic() - stopped < 10
        for t in threads:
            t.join(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    for text in results:
        frames = [f for f in text.split("\n\n") if f.startswith("data: ")]
        assert frames[-1] == "data: [DONE]"
        assert json.loads(frames[-2][6:])["choices"][0]["finish_reason"] in ("abort", "length")
    assert sum('"finish_reason":"abort"' in text for text in results) == 16  # 2,000 tokens take longer than 1 s


def _healthy(port) -> bool:
    try:
        return get(port, "/health")[0] == 200
    except OSError:
        return False


@pytest.mark.parametrize("path", ["/metrics", "/v1/models", "/tokenizer_info", "/version"])
def test_every_route_but_health_needs_the_key(model_dir, path):
    tokenizer = load_tokenizer(model_dir)
    server = serve(Engine(load_model(model_dir), tokenizer.eos_id, max_batch=1), tokenizer,
                   ServeSettings(model_name="tiny", api_key="s3cret"))
    try:
        assert get(server.port, path)[0] == 401 and get(server.port, "/health")[0] == 200
    finally:
        server.close()


def _half_closed(port, body: dict) -> bytes:
    """Send one request, shut the socket's sending side, read until the server closes."""
    sock = socket.create_connection(("127.0.0.1", port))
    raw = json.dumps(body).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(raw), raw))
    sock.shutdown(socket.SHUT_WR)
    sock.settimeout(60)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    return data


@pytest.mark.parametrize("allow", [False, True])
def test_a_client_that_half_closes_gets_its_response(tokenizer_dir, allow):
    """Streams are served to a half-closed client either way (a write tells whether it is there); a whole response
    with --allow-half-close; without it such a client is taken for gone, as nginx takes it: its row is freed and it
    gets 499."""
    model = random_model(tiny_config(max_position_embeddings=2048))  # (1,500 tokens take longer than a look at it)
    tokenizer = load_tokenizer(tokenizer_dir)
    server = serve(Engine(model, tokenizer.eos_id, max_batch=2), tokenizer,
                   ServeSettings(model_name="tiny", allow_half_close=allow))
    try:
        long = {"prompt": "가", "max_tokens": 1500, "ignore_eos": True}
        streamed = _half_closed(server.port, long | {"stream": True, "max_tokens": 300})
        assert streamed.startswith(b"HTTP/1.1 200") and b"data: [DONE]" in streamed
        whole = _half_closed(server.port, long)
        if allow:
            assert whole.startswith(b"HTTP/1.1 200")
            assert json.loads(whole.split(b"\r\n\r\n", 1)[1])["usage"]["completion_tokens"] == 1500
        else:
            assert whole.startswith(b"HTTP/1.1 499")  # (nginx's "client closed request")
            assert wait_for(lambda: server.engine.idle, 10) < 10  # (its row is freed)
    finally:
        server.close()
