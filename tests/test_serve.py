"""The OpenAI-compatible server and its continuous-batching engine, on tiny models, over real sockets."""

import http.client
import json
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from conftest import random_model, tiny_config
from neoxko import load_model, load_tokenizer, save_model
from neoxko.errors import NeoxkoError
from neoxko.generate import Sampling, generate_tokens
from neoxko.model import GPTNeoX
from neoxko.pii.replace import replace_pii
from neoxko.serve.engine import Engine, Finished, Request
from neoxko.serve.server import ServeSettings, serve

PII_TEXT = "상담은 010-2345-6789 로 전화 주시고, 입금은 국민은행 123456-78-901234 계좌로 해 주세요."


def start(model, tokenizer, **settings):
    engine_options = {k: settings.pop(k) for k in ("max_batch", "max_queue") if k in settings}
    engine = Engine(model, tokenizer.eos_id, **engine_options)
    server = serve(engine, tokenizer, ServeSettings(**settings), port=0)
    return server, server.port


def post(port, body, path="/v1/completions", headers=None, raw=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    data = raw if raw is not None else json.dumps(body).encode()
    conn.request("POST", path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    return response.status, response.headers, payload  # case-insensitive


def get(port, path):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", path)
    response = conn.getresponse()
    return response.status, response.read()


def events(payload: bytes) -> list:
    lines = [line for line in payload.decode().split("\n\n") if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


@pytest.fixture(scope="module")
def served(model_dir):
    server, port = start(load_model(model_dir), load_tokenizer(model_dir), model_name="tiny", max_batch=4)
    yield port
    server.close()


def test_engine_batches_give_each_request_what_it_gets_alone():
    model = random_model(tiny_config()).eval()
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18, 19], [20]]
    samplings = [Sampling(temperature=0.9, top_k=40, seed=3), Sampling(),
                 Sampling(temperature=1.0, top_p=0.9, repetition_penalty=1.3, seed=7), Sampling(temperature=1, seed=1)]
    lengths = [20, 5, 12, 17]  # requests leave at different steps, so rows move
    alone = [[int(t[0]) for t in generate_tokens(model, [p], n, s)]
             for p, s, n in zip(prompts, samplings, lengths, strict=True)]
    engine = Engine(model, eos_id=None, max_batch=2)  # 4 requests for 2 rows: two wait and join later
    requests = [engine.submit(Request(p, n, s)) for p, s, n in zip(prompts, samplings, lengths, strict=True)]
    try:
        for request, expected in zip(requests, alone, strict=True):
            got = []
            while not isinstance(event := request.events.get(timeout=30), Finished):
                got.append(event.id)
            assert got == expected and event.reason == "length"
        assert engine.stats["decode_rows"] > engine.stats["decode_steps"]  # steps were shared
    finally:
        engine.close()


def _collect(request):
    got = []
    while not isinstance(event := request.events.get(timeout=60), Finished):
        got.append(event.id)
    return got, event


def test_chunked_batched_prefill_and_prefix_reuse_give_what_each_request_gets_alone():
    """Prompts longer than a chunk, several prefilled together, and prompts that reuse a kept prefix: the same
    tokens as `generate` alone and the same prompt log-probabilities as one plain forward."""
    model = random_model(tiny_config()).eval()
    header = list(range(30, 60))  # a shared few-shot header
    prompts = [header + [5, 6, 7], header + [8, 9], list(range(100, 123)), header + [10], [3, 4]]
    sampling = Sampling(temperature=1.0, top_k=20, seed=5)
    alone = [[int(t[0]) for t in generate_tokens(model, [p], 6, sampling)] for p in prompts]
    engine = Engine(model, eos_id=None, max_batch=3, prefill_chunk=7, prefix_rows=2, prefix_min=8)
    try:
        first = engine.submit(Request(prompts[0], 6, sampling, logprobs=2, prompt_logprobs=True))
        assert _collect(first)[0] == alone[0]  # its prompt is now kept
        requests = [engine.submit(Request(p, 6, sampling, logprobs=2, prompt_logprobs=True)) for p in prompts[1:]]
        for request, expected in zip(requests, alone[1:], strict=True):
            got, end = _collect(request)
            assert got == expected and end.reason == "length"
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor([request.prompt]))[0].float(), dim=-1)
            want = [None] + [lp[i - 1, t].item() for i, t in enumerate(request.prompt) if i]
            assert end.prompt_logprobs[0] is None and len(end.prompt_logprobs) == len(want)
            assert end.prompt_logprobs[1:] == pytest.approx(want[1:], abs=1e-4)
            assert [top[0][0] for top in end.prompt_top[1:]] == lp[:-1].argmax(-1).tolist()
        assert engine.stats["prefix_hits"] >= 2 and engine.stats["prefix_cached_tokens"] >= 2 * 29
        assert engine.stats["prefill_chunks"] < sum(-(-len(p) // 7) for p in prompts)  # prompts shared chunks
    finally:
        engine.close()


def test_completions_equal_neoxko_generate(served, model_dir):
    cli = subprocess.run([sys.executable, "-m", "neoxko", "generate", "--model", str(model_dir), "--max-new-tokens",
                          "24", "--temperature", "0.8", "--top-k", "40", "--top-p", "0.95", "--seed", "11", "오늘은"],
                         capture_output=True)  # bytes: text mode would turn a generated \r into \n
    assert cli.returncode == 0, cli.stderr
    expected = cli.stdout.decode()
    body = {"prompt": "오늘은", "max_tokens": 24, "temperature": 0.8, "top_k": 40, "top_p": 0.95, "seed": 11}
    status, _, payload = post(served, body)
    assert status == 200
    result = json.loads(payload)
    assert result["choices"][0]["text"] + "\n" == expected
    assert result["usage"]["completion_tokens"] == 24 and result["choices"][0]["finish_reason"] == "length"
    status, headers, payload = post(served, body | {"stream": True})
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    chunks = events(payload)
    assert "".join(c["choices"][0]["text"] for c in chunks) + "\n" == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_several_prompts_n_echo_stop_and_logprobs(served):
    body = {"prompt": ["하나", "둘"], "max_tokens": 6, "n": 2, "seed": 3, "temperature": 1.0, "echo": True,
            "logprobs": 2}
    status, _, payload = post(served, body)
    result = json.loads(payload)
    assert status == 200 and [c["index"] for c in result["choices"]] == [0, 1, 2, 3]
    assert result["choices"][0]["text"].startswith("하나") and result["choices"][2]["text"].startswith("둘")
    logprobs = result["choices"][0]["logprobs"]
    assert logprobs["token_logprobs"][0] is None  # the first prompt token has no context
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["text_offset"])
    assert all(len(top) == 2 for top in logprobs["top_logprobs"][-6:])
    # a stop string cuts the text and ends the choice with "stop"
    plain = json.loads(post(served, {"prompt": "하나", "max_tokens": 12, "temperature": 0})[2])["choices"][0]["text"]
    stop = plain[3:5]
    cut = json.loads(post(served, {"prompt": "하나", "max_tokens": 12, "temperature": 0, "stop": [stop]})[2])
    assert cut["choices"][0]["text"] == plain[: plain.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"


def test_prompt_positions_carry_top_logprobs_as_lm_eval_local_completions_reads_them(served, model_dir):
    """lm-eval sends token ids with echo, logprobs 1, max_tokens 1 and reads token_logprobs[ctxlen:-1] and
    top_logprobs[ctxlen:-1] (it crashed on the nulls the server used to send for prompt positions)."""
    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    context, continuation = tokenizer.encode("오늘은"), tokenizer.encode(" 날씨가 좋다")
    ids = context + continuation
    body = {"prompt": [ids], "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 1}
    status, _, payload = post(served, body)
    assert status == 200, payload
    lp = json.loads(payload)["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 1 and lp["top_logprobs"][0] is None
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)  # (T, vocab)
    for i in range(len(context), len(ids)):  # the slice lm-eval scores
        top = lp["top_logprobs"][i]
        assert isinstance(top, dict) and len(top) == 1
        assert lp["token_logprobs"][i] == pytest.approx(expected[i - 1, ids[i]].item(), abs=1e-4)
        assert next(iter(top.values())) == pytest.approx(expected[i - 1].max().item(), abs=1e-4)
        is_greedy = next(iter(top)) == lp["tokens"][i]
        assert is_greedy == (expected[i - 1].argmax().item() == ids[i])


def test_tokenizer_endpoints_as_lm_eval_s_remote_tokenizer_uses_them(served, model_dir):
    """lm-eval's check_remote_tokenizer_support: GET /tokenizer_info with an eos_token, POST /tokenize
    {"prompt", "add_special_tokens": false} -> {"tokens": [...]}, POST /detokenize {"tokens"} -> {"prompt"}."""
    tokenizer = load_tokenizer(model_dir)
    status, payload = get(served, "/tokenizer_info")
    info = json.loads(payload)
    assert status == 200 and info["eos_token"] == tokenizer.eos_token and info["model_max_length"] == 128
    status, _, payload = post(served, {"prompt": "오늘은 날씨가", "add_special_tokens": False}, path="/tokenize")
    tokens = json.loads(payload)
    assert status == 200 and tokens["tokens"] == tokenizer.encode("오늘은 날씨가") and tokens["count"] == len(tokens["tokens"])
    status, _, payload = post(served, {"tokens": tokens["tokens"]}, path="/detokenize")
    assert status == 200 and json.loads(payload)["prompt"] == "오늘은 날씨가"
    for path, body, field in (("/tokenize", {"prompt": 3}, "prompt"), ("/detokenize", {"tokens": [1, -2]}, "tokens"),
                              ("/detokenize", {"tokens": "12"}, "tokens")):
        status, _, payload = post(served, body, path=path)
        assert status == 400 and json.loads(payload)["error"]["param"] == field


def test_openai_client(served):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{served}/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["tiny"]
    completion = client.completions.create(model="tiny", prompt="서울은", max_tokens=5, temperature=0)
    assert completion.choices[0].finish_reason == "length" and completion.usage.completion_tokens == 5
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="서울은", max_tokens=5, temperature=0, stream=True) if c.choices)
    assert streamed == completion.choices[0].text
    with pytest.raises(openai.BadRequestError, match="temperature must be between 0 and 2"):
        client.completions.create(model="tiny", prompt="서울은", max_tokens=5, temperature=-1)


@pytest.mark.parametrize("body, status, message", [
    ({"prompt": "가", "max_tokens": 10_000}, 400, "maximum context length is 128 tokens"),
    ({"prompt": "가" * 300, "max_tokens": 1}, 400, "this model's context is 128 tokens"),
    ({"prompt": "가", "temperature": -1}, 400, "temperature must be between 0 and 2"),
    ({"prompt": "가", "max_tokens": "ten"}, 400, "max_tokens must be an integer"),
    ({"prompt": "가", "n": 0}, 400, "n must be between 1 and 8"),
    ({"prompt": "가", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop must be a string or a list of up to 4"),
    ({"prompt": 5}, 400, "prompt must be a string"),
    ({"prompt": [[1, 99999]]}, 400, "prompt token ids must be in [0, 384)"),
    ({"prompt": "가", "stream": "yes"}, 400, "stream must be true or false"),
    ({"prompt": "가", "presence_penalty": 0.5}, 400, "presence_penalty is not supported"),
    ({"prompt": "가", "model": "gpt-4"}, 404, "model 'gpt-4' is not served here"),
    ({"prompt": [[-1]]}, 400, "prompt token ids must be in [0, 384)"),
    ({"prompt": [5, -1, 7]}, 400, "prompt token ids must be in [0, 384)"),
    ({"prompt": "가", "seed": 1 << 63}, 400,
     "seed must be between -9223372036854775808 and 9223372036854775807, got 9223372036854775808"),
    ({"prompt": "가", "seed": 1 << 70}, 400, "seed must be between -9223372036854775808 and 9223372036854775807"),
    ({"prompt": "가", "logprobs": 9}, 400, "logprobs must be between 0 and 5, got 9"),
    ({"prompt": "가", "max_tokens": 0}, 400, "max_tokens must be at least 1, got 0"),
    ({"prompt": ["가"] * 9, "n": 8}, 400, "this request asks for 72 completions (9 prompt(s) x n 8); this server "
                                          "queues at most 64 at once (--max-queue)"),
])
def test_invalid_requests_get_openai_errors(served, body, status, message):
    got, _, payload = post(served, body)
    error = json.loads(payload)["error"]
    assert got == status and message in error["message"] and error["type"]


def test_malformed_bodies_and_routes(served):
    status, _, payload = post(served, None, raw=b"{not json")
    assert status == 400 and "not valid JSON" in json.loads(payload)["error"]["message"]
    status, _, payload = post(served, None, raw=b"[1, 2]")
    assert status == 400 and "must be a JSON object" in json.loads(payload)["error"]["message"]
    status, _, payload = post(served, None, raw=b"x", headers={"Content-Type": "text/plain"})
    assert status == 415 and "application/json" in json.loads(payload)["error"]["message"]
    status, _, payload = post(served, None, raw=b"{}", headers={"Content-Length": str(2 << 20)})
    assert status == 413 and "limit is 1,048,576" in json.loads(payload)["error"]["message"]
    assert get(served, "/v1/nothing")[0] == 404
    assert get(served, "/v1/completions")[0] == 405
    status, payload = get(served, "/health")
    assert status == 200 and json.loads(payload) == {"status": "ok"}  # still up after all of that
    status, payload = get(served, "/metrics")
    assert status == 200 and b'neoxko_http_responses_total{path="/v1/completions",status="413"}' in payload


def test_api_key(model_dir):
    server, port = start(load_model(model_dir), load_tokenizer(model_dir), model_name="tiny", api_key="s3cret")
    try:
        status, _, payload = post(port, {"prompt": "가", "max_tokens": 2})
        assert status == 401 and "Authorization: Bearer" in json.loads(payload)["error"]["message"]
        assert post(port, {"prompt": "가", "max_tokens": 2}, headers={"Authorization": "Bearer nope"})[0] == 401
        assert post(port, {"prompt": "가", "max_tokens": 2}, headers={"Authorization": "Bearer s3cret"})[0] == 200
        assert post(port, {"prompt": "가"}, path="/tokenize")[0] == 401  # the tokenizer routes too
        assert post(port, {"prompt": "가"}, path="/tokenize", headers={"Authorization": "Bearer s3cret"})[0] == 200
        assert get(port, "/health")[0] == 200  # health checks need no key
    finally:
        server.close()


def test_full_queue_is_429_with_retry_after(model_dir):
    """A queue that is full now is a 429 (retry later); a request the queue could never hold is a 400."""
    import threading

    model = random_model(tiny_config(max_position_embeddings=4096))  # (4,000 tokens keep the one row busy)
    server, port = start(model, load_tokenizer(model_dir), model_name="tiny", max_batch=1, max_queue=1)
    try:
        sock = socket.create_connection(("127.0.0.1", port))
        body = json.dumps({"prompt": "가", "max_tokens": 4000, "stream": True, "ignore_eos": True}).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        assert sock.recv(64)  # (streaming: the row is taken)
        waiting = threading.Thread(target=post, args=(port, {"prompt": "가", "max_tokens": 2}))
        waiting.start()
        time.sleep(0.5)  # (it waits in the queue of one)
        status, headers, payload = post(port, {"prompt": "가", "max_tokens": 2})
        assert status == 429 and headers["Retry-After"] == "1"
        assert "busy" in json.loads(payload)["error"]["message"]
        status, _, payload = post(port, {"prompt": "가", "max_tokens": 2, "n": 2})
        assert status == 400 and "asks for 2 completions (1 prompt(s) x n 2); this server queues at most 1" in \
            json.loads(payload)["error"]["message"]
        sock.close()  # (the stream's row is freed, and the waiting request runs)
        waiting.join(timeout=60)
        assert not waiting.is_alive()
    finally:
        server.close()


def test_a_client_that_disconnects_mid_stream_frees_its_row(model_dir):
    model = random_model(tiny_config(max_position_embeddings=4096))  # 4,000 tokens take seconds, not milliseconds
    server, port = start(model, load_tokenizer(model_dir), model_name="tiny", max_batch=1)
    try:
        sock = socket.create_connection(("127.0.0.1", port))
        body = json.dumps({"prompt": "가", "max_tokens": 4000, "stream": True}).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        received = b""
        while b"data: " not in received:
            received += sock.recv(4096)
        sock.close()
        deadline = time.time() + 10
        while server.engine.busy_rows and time.time() < deadline:
            time.sleep(0.01)
        assert server.engine.busy_rows == 0
        assert server.engine.stats["finished_cancelled"] == 1 and server.engine.stats["generated_tokens"] < 4000
        status, _, _ = post(port, {"prompt": "가", "max_tokens": 2})  # the one row is free again
        assert status == 200
    finally:
        server.close()


@pytest.fixture(scope="module")
def parrot(tokenizer_dir):
    """A tiny model trained until it recites PII_TEXT: the memorisation the card's privacy section warns of."""
    tokenizer = load_tokenizer(tokenizer_dir)
    ids = torch.tensor([tokenizer.encode(PII_TEXT) + [tokenizer.eos_id]])  # it learns to stop after it
    torch.manual_seed(0)
    model = GPTNeoX(tiny_config(vocab_size=tokenizer.vocab_size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        loss = F.cross_entropy(model(ids[:, :-1])[0], ids[0, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), tokenizer, tokenizer.decode(ids[0, :3].tolist()), tokenizer_dir


def test_mask_pii_streams_tokens_and_never_a_digit(parrot):
    model, tokenizer, prompt, _ = parrot
    server, port = start(model, tokenizer, model_name="parrot")
    try:
        body = {"prompt": prompt, "max_tokens": 120, "temperature": 0, "stream": True}
        plain = "".join(c["choices"][0]["text"] for c in events(post(port, body)[2]))
        assert PII_TEXT.endswith(plain) and "010-2345-6789" in plain  # it does recite them
        chunks = events(post(port, body | {"mask_pii": True})[2])
        texts = [c["choices"][0]["text"] for c in chunks]
        assert "".join(texts) == replace_pii(plain)
        assert "<|tel|>" in "".join(texts) and "<|acc|>" in "".join(texts)
        assert not any(ch.isdigit() for t in texts for ch in t)
        assert chunks[-1]["choices"][0]["pii_masked"] == {"tel": 1, "acc": 1}
        whole = json.loads(post(port, {k: v for k, v in body.items() if k != "stream"} | {"mask_pii": True})[2])
        assert whole["choices"][0]["text"] == replace_pii(plain)
        assert whole["choices"][0]["pii_masked"] == {"tel": 1, "acc": 1}
    finally:
        server.close()


def test_mask_pii_masks_other_digits_and_invisible_characters(served):
    """An echoed prompt with a phone number in Arabic-Indic digits and one with zero-width spaces between its
    digits: the server's guard masks both, streamed and not."""
    prompt = "연락처 ٠١٠-١٢٣٤-٥٦٧٨ 또는 010\u200b9876\u200b5432 입니다"
    body = {"prompt": prompt, "max_tokens": 2, "temperature": 0, "echo": True, "mask_pii": True}
    choice = json.loads(post(served, body)[2])["choices"][0]
    assert choice["text"].startswith("연락처 <|tel|> 또는 <|tel|> 입니다"), choice["text"]
    assert choice["pii_masked"]["tel"] >= 2
    chunks = [c["choices"][0]["text"] for c in events(post(served, body | {"stream": True})[2])]
    assert "".join(chunks).startswith("연락처 <|tel|> 또는 <|tel|> 입니다")  # (no digit of either sent first)


def test_generate_mask_pii(parrot, tmp_path):
    model, _, prompt, tokenizer_dir = parrot
    save_model(model, tmp_path)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    args = [sys.executable, "-m", "neoxko", "generate", "--model", str(tmp_path), "--temperature", "0",
            "--max-new-tokens", "120", "--mask-pii", prompt]
    out = subprocess.run(args, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "<|tel|>" in out.stdout and "<|acc|>" in out.stdout and "2345" not in out.stdout
    assert "masked 2 PII value(s): acc 1, tel 1" in out.stderr


def test_serve_command_starts_stops_and_reports_a_busy_port(model_dir):
    import signal

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "neoxko", "serve", "--model", str(model_dir), "--port", str(port)],
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if get(port, "/health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        assert get(port, "/v1/models")[0] == 200
        busy = subprocess.run([sys.executable, "-m", "neoxko", "serve", "--model", str(model_dir), "--port",
                               str(port)], capture_output=True, text=True, timeout=120)
        assert busy.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in busy.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    assert f"serving '{model_dir}' on http://127.0.0.1:{port}/v1" in proc.stderr.read()


def test_a_failing_forward_ends_its_requests_not_the_server(model_dir):
    model = load_model(model_dir)
    real_forward, failures = model.forward, {"left": 0}

    def flaky(*args, **kwargs):
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("simulated device failure")
        return real_forward(*args, **kwargs)

    model.forward = flaky
    server, port = start(model, load_tokenizer(model_dir), model_name="tiny")
    try:
        failures["left"] = 1
        status, _, payload = post(port, {"prompt": "가", "max_tokens": 4})
        assert status == 500 and "simulated device failure" in json.loads(payload)["error"]["message"]
        failures["left"] = 1
        status, _, payload = post(port, {"prompt": "가", "max_tokens": 4, "stream": True})
        last = events(payload)[-1]["choices"][0]
        assert status == 200 and last["finish_reason"] == "error"  # the 200 went out before the failure
        assert "simulated device failure" in last["error"]["message"]
        status, _, payload = post(port, {"prompt": "가", "max_tokens": 4})
        assert status == 200 and json.loads(payload)["usage"]["completion_tokens"] == 4
    finally:
        server.close()


def test_an_error_outside_a_step_ends_the_running_requests_and_the_engine_goes_on(model_dir):
    """Before, only a failing decode step was caught; anything else killed the engine thread and clients hung."""
    engine = Engine(load_model(model_dir), eos_id=None, max_batch=2)
    real, failures = engine._drop_cancelled, {"left": 0}

    def flaky():
        if failures["left"] and engine.running:
            failures["left"] -= 1
            raise RuntimeError("simulated bookkeeping failure")
        return real()

    engine._drop_cancelled = flaky
    try:
        failures["left"] = 1
        request = engine.submit(Request(prompt=[5, 6, 7], max_tokens=8))
        event = request.events.get(timeout=30)
        while not isinstance(event, Finished):
            event = request.events.get(timeout=30)
        assert event.reason == "error: simulated bookkeeping failure"
        assert engine.thread.is_alive() and engine.stats["engine_errors"] == 1
        again = engine.submit(Request(prompt=[5, 6, 7], max_tokens=3))
        tokens = []
        while not isinstance(event := again.events.get(timeout=30), Finished):
            tokens.append(event.id)
        assert event.reason == "length" and len(tokens) == 3
    finally:
        engine.close()


def test_a_non_streaming_client_that_leaves_frees_its_row_while_tokens_keep_coming(model_dir):
    model = load_model(model_dir)
    real_forward = model.forward

    def slow(*args, **kwargs):  # 20 ms a step: 100 tokens would take 2 s
        time.sleep(0.02)
        return real_forward(*args, **kwargs)

    model.forward = slow
    server, port = start(model, load_tokenizer(model_dir), model_name="tiny")
    try:
        body = json.dumps({"prompt": "가", "max_tokens": 100, "temperature": 1.0, "seed": 0}).encode()
        client = socket.create_connection(("127.0.0.1", port))
        client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        engine = server.engine
        deadline = time.time() + 10
        while engine.busy_rows == 0 and time.time() < deadline:
            time.sleep(0.01)
        assert engine.busy_rows == 1
        client.close()  # gone after a few tokens
        left = time.time()
        while engine.busy_rows and time.time() - left < 5:
            time.sleep(0.02)
        assert engine.busy_rows == 0 and time.time() - left < 1.0  # freed, well before its 2 s of tokens
        assert engine.stats["generated_tokens"] < 60
    finally:
        server.close()


def test_a_burst_of_concurrent_clients_is_all_served(served):
    import threading

    statuses = []

    def client():
        statuses.append(post(served, {"prompt": "가", "max_tokens": 3})[0])

    threads = [threading.Thread(target=client) for _ in range(48)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [200] * 48  # a 5-deep listen backlog would refuse some of them


def test_engine_and_serve_refuse_bad_settings(model_dir):
    with pytest.raises(NeoxkoError, match="prefill_chunk must be at least 1, got 0"):
        Engine(random_model(tiny_config()), eos_id=None, max_batch=1, prefill_chunk=0)
    engine = Engine(random_model(tiny_config()), eos_id=None, max_batch=1)
    try:
        with pytest.raises(NeoxkoError, match=r"prompt \(120 tokens\) \+ max_tokens \(20\) is more than the 128-token"):
            engine.submit(Request(list(range(120)), 20))
    finally:
        engine.close()
    out = subprocess.run([sys.executable, "-m", "neoxko", "serve", "--model", str(model_dir), "--max-batch", "0"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--max-batch must be at least 1" in out.stderr


@pytest.mark.parametrize("body, message", [
    ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs may not set messages: send them as the "
                                                 "request's own fields"),
    ({"chat_template_kwargs": {"add_generation_prompt": False, "x": 1}}, "may not set add_generation_prompt"),
    ({"top_logprobs": 30, "logprobs": True}, "top_logprobs must be between 0 and 5, got 30"),
])
def test_chat_requests_that_cannot_be_served_are_400s_naming_the_bound(served, body, message):
    status, _, payload = post(served, {"messages": [{"role": "user", "content": "안녕"}]} | body,
                              path="/v1/chat/completions")
    assert status == 400 and message in json.loads(payload)["error"]["message"]


def test_tokenizing_runs_off_the_event_loop(model_dir):
    """While a big /tokenize body is being tokenized (held there by the test), /health and a completion answer: the
    tokenizing runs in a worker thread, not on the event loop."""
    import threading

    tokenizer = load_tokenizer(model_dir)
    entered, release = threading.Event(), threading.Event()
    real = tokenizer.encode

    def encode(text, *args, **kwargs):
        if len(text) > 100_000:
            entered.set()
            release.wait(timeout=60)
        return real(text, *args, **kwargs)

    tokenizer.encode = encode
    server, port = start(load_model(model_dir), tokenizer, model_name="tiny")
    try:
        done = []
        text = "대한민국의 수도는 서울이고 인구는 약 구백만 명이다. " * 9_500  # (0.7 MB, under the 1 MiB limit)
        raw = json.dumps({"prompt": text}, ensure_ascii=False).encode()
        worker = threading.Thread(target=lambda: done.append(post(port, None, path="/tokenize", raw=raw)))
        worker.start()
        assert entered.wait(timeout=30)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)  # (a loop held by the tokenizing: timeout)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
        assert post(port, {"prompt": "가", "max_tokens": 2})[0] == 200
        assert not done  # (still tokenizing)
        release.set()
        worker.join(timeout=60)
        assert done[0][0] == 200 and json.loads(done[0][2])["count"] > 100_000
    finally:
        release.set()
        server.close()
