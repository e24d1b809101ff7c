"""Structured outputs: JSON schemas, any JSON object, regexes, choices and grammars, through the server (OpenAI's and
vLLM's request fields, the openai package, streaming or not), the Python API and the command line. Outputs are checked
by what we did not write: json.loads, the jsonschema package, Python's re."""

import json
import re
import threading

import numpy as np
import pytest
import torch

import neoxko
from neoxko import load_model, load_tokenizer
from neoxko.errors import GenerationError
from neoxko.generate import Sampling, generate_tokens, stream
from neoxko.serve.engine import Engine
from neoxko.serve.server import ServeSettings, serve

llguidance = pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

MEMBER = {"type": "object", "properties": {
    "이름": {"type": "string", "maxLength": 6},
    "나이": {"type": "integer", "minimum": 0, "maximum": 120},
    "도시": {"enum": ["서울특별시", "부산광역시", "제주도"]},
    "취미": {"type": "array", "items": {"enum": ["등산", "독서"]}, "maxItems": 2},
    "회원": {"type": "boolean"}}, "required": ["이름", "나이", "도시", "회원"], "additionalProperties": False}


@pytest.fixture(scope="module")
def server(long_model_dir):
    from neoxko import chat_template as chat

    tokenizer = load_tokenizer(long_model_dir)
    template, stops = chat.load_template("koalpaca")
    served = serve(Engine(load_model(long_model_dir), tokenizer.eos_id, max_batch=4), tokenizer,
                   ServeSettings(model_name="tiny", chat_template=template, chat_stop=stops))
    yield served
    served.close()


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="none", max_retries=0)


def test_the_fixture_tokenizer_splits_the_korean_the_schema_asks_for(long_model_dir):
    """So the tests below cover byte-level tokens that hold part of a syllable."""
    tokenizer = load_tokenizer(long_model_dir)
    pieces = [tokenizer.decode([t]) for t in tokenizer.encode("서울특별시 부산광역시 제주도")]
    assert any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize("stream", [False, True])
def test_openai_chat_json_schema_replies_validate(client, stream):
    for seed in range(6):
        kwargs = dict(model="tiny", messages=[{"role": "user", "content": "회원 정보를 JSON으로 주세요"}],
                      max_tokens=400, temperature=1.0, seed=seed,
                      response_format={"type": "json_schema", "json_schema": {"name": "member", "schema": MEMBER}})
        if stream:
            text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True,
                                                                                                    **kwargs))
        else:
            reply = client.chat.completions.create(**kwargs)
            assert reply.choices[0].finish_reason == "stop"
            text = reply.choices[0].message.content
        jsonschema.validate(json.loads(text), MEMBER)


def any_object(text: str) -> bool:
    """Any JSON object: a random model rarely closes its free-form strings within max_tokens, so a reply cut at the
    limit is checked as the start of an object; a whole one must load."""
    return text.startswith("{") if not text.endswith("}") else isinstance(json.loads(text), dict)


@pytest.mark.parametrize("extra,check", [
    ({"response_format": {"type": "json_object"}}, any_object),
    ({"structured_outputs": {"json_object": True}}, any_object),
    ({"structured_outputs": {"json": json.dumps(MEMBER, ensure_ascii=False)}},
     lambda t: jsonschema.validate(json.loads(t), MEMBER) is None),
    ({"guided_json": MEMBER}, lambda t: jsonschema.validate(json.loads(t), MEMBER) is None),
    ({"structured_outputs": {"regex": r"01[016789]-\d{3,4}-\d{4}"}},
     lambda t: re.fullmatch(r"01[016789]-\d{3,4}-\d{4}", t)),
    ({"guided_regex": r"[가-힣]{2,4}(시|군|구)"}, lambda t: re.fullmatch(r"[가-힣]{2,4}(시|군|구)", t)),
    ({"structured_outputs": {"choice": ["긍정", "부정", "중립"]}}, lambda t: t in ("긍정", "부정", "중립")),
    ({"guided_choice": ["예", "아니오"]}, lambda t: t in ("예", "아니오")),
    ({"structured_outputs": {"grammar": 'start: "답: " ANSWER\nANSWER: "예" | "아니오" | "모르겠습니다"'}},
     lambda t: t in ("답: 예", "답: 아니오", "답: 모르겠습니다")),
    ({"guided_grammar": 'root ::= "서울" | "부산" "광역시"?'}, lambda t: t in ("서울", "부산", "부산광역시")),
])
def test_completions_follow_each_kind_of_constraint(client, extra, check):
    for seed in range(4):
        reply = client.completions.create(model="tiny", prompt="대한민국은", max_tokens=150, temperature=1.0, seed=seed,
                                          extra_body=extra)
        text = reply.choices[0].text
        assert check(text), (extra, text)
        assert reply.choices[0].finish_reason == "stop" or check is any_object


def test_n_choices_and_a_stream_each_follow_the_schema(client):
    reply = client.completions.create(model="tiny", prompt="회원:", max_tokens=400, temperature=1.0, seed=3, n=3,
                                      extra_body={"response_format": {"type": "json_schema",
                                                                      "json_schema": {"schema": MEMBER}}})
    for choice in reply.choices:
        jsonschema.validate(json.loads(choice.text), MEMBER)
    chunks = client.completions.create(model="tiny", prompt="회원:", max_tokens=400, temperature=1.0, seed=3,
                                       stream=True, extra_body={"guided_json": MEMBER})
    jsonschema.validate(json.loads("".join(c.choices[0].text for c in chunks)), MEMBER)


def test_the_server_gives_what_the_python_api_gives(server, long_model_dir):
    """Same seed, same constraint: the server's reply is neoxko.generate's; an unconstrained request sharing the
    batch gets what it gets alone."""
    import http.client

    model, tokenizer = load_model(long_model_dir), load_tokenizer(long_model_dir)
    sampling = Sampling(temperature=0.9, seed=11)
    want = neoxko.generate(model, tokenizer, "회원:", 400, sampling, json_schema=MEMBER)
    free_ids = [int(t[0]) for t in generate_tokens(model, [tokenizer.encode("오늘")], 30, Sampling(temperature=1,
                                                                                                   seed=4))]
    results = {}

    def ask(key, body):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        results[key] = json.loads(conn.getresponse().read())

    threads = [threading.Thread(target=ask, args=("json", {"prompt": "회원:", "max_tokens": 400, "temperature": 0.9,
                                                           "seed": 11, "guided_json": MEMBER})),
               threading.Thread(target=ask, args=("free", {"prompt": "오늘", "max_tokens": 30, "temperature": 1,
                                                           "seed": 4, "ignore_eos": True}))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["json"]["choices"][0]["text"] == want
    assert results["free"]["choices"][0]["text"] == tokenizer.decode(free_ids)


@pytest.mark.parametrize("extra,field,message", [
    ({"guided_grammar": 'start: "a" start'}, "structured_outputs",
     "does not fit the grammar: parser error: Too many items"),
    ({"guided_regex": "(a{1000}){1000}"}, "structured_outputs", "lexer error: too many expressions constructed"),
    ({"guided_regex": "[^\\x00-\\U0010FFFF]"}, "guided_regex", "the constraint allows no output"),
    ({"structured_outputs": {"foo": 1}}, "structured_outputs", "structured_outputs has 'foo', which is not one of"),
    ({"structured_outputs": {}}, "structured_outputs", "structured_outputs names no constraint"),
    ({"structured_outputs": {"regex": "(ab"}}, "structured_outputs", "the regex constraint is invalid"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs",
     "structured_outputs holds choice, regex; send one of them"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex",
     "this request constrains its output twice (response_format, guided_regex); send one"),
    ({"response_format": {"type": "yaml"}}, "response_format", "response_format must be {\"type\": \"text\"}"),
    ({"response_format": {"type": "json_schema"}}, "response_format",
     'response_format of type json_schema needs "json_schema": {"name": ..., "schema": {...}}'),
    ({"structured_outputs": {"json": "{\"type\":"}}, "structured_outputs",
     "structured_outputs.json: the JSON schema is not valid JSON"),
    ({"structured_outputs": {"json": {"type": "objectx"}}}, "structured_outputs", "the json constraint is invalid"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs",
     "choice must be a list of one or more non-empty strings"),
    ({"structured_outputs": {"grammar": "start: foo"}}, "structured_outputs", 'unknown name: "foo"'),
    ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs", "structural_tag is not supported"),
])
def test_bad_constraints_are_400s_that_name_the_problem(server, extra, field, message):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": "x", "max_tokens": 4} | extra),
                 {"Content-Type": "application/json"})
    response = conn.getresponse()
    error = json.loads(response.read())["error"]
    assert response.status == 400 and message in error["message"] and error["param"] == field, error


def test_a_constraint_that_fails_mid_generation_ends_its_request_only(server):
    """llguidance's limits hit while generating: that request gets a 400 (or, streamed, an error chunk); the requests
    sharing its batch finish as they would alone."""
    import http.client

    results = {}

    def ask(key, body):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        results[key] = (response.status, response.read().decode())

    bodies = {"free": {"prompt": "오늘", "max_tokens": 40, "ignore_eos": True, "temperature": 0},
              "stream": {"prompt": "오늘", "max_tokens": 40, "ignore_eos": True, "temperature": 0, "stream": True},
              "bad": {"prompt": "x", "max_tokens": 20, "guided_grammar": 'start: "a" start'}}
    threads = [threading.Thread(target=ask, args=item) for item in bodies.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["bad"][0] == 400 and "Too many items" in results["bad"][1]
    assert results["free"][0] == 200 and json.loads(results["free"][1])["choices"][0]["finish_reason"] == "length"
    assert '"finish_reason":"length"' in results["stream"][1] and "error" not in results["stream"][1]


def test_a_text_response_format_is_no_constraint(client):
    reply = client.completions.create(model="tiny", prompt="대한민국은", max_tokens=5, temperature=0,
                                      extra_body={"response_format": {"type": "text"}, "ignore_eos": True})
    assert reply.usage.completion_tokens == 5


def test_python_api_constraints(long_model_dir):
    model, tokenizer = load_model(long_model_dir), load_tokenizer(long_model_dir)
    rows = neoxko.generate(model, tokenizer, ["회원:", "대한민국은", "오늘"], 400, Sampling(temperature=1, seed=2),
                           json_schema=MEMBER)
    for text in rows:
        jsonschema.validate(json.loads(text), MEMBER)
    assert neoxko.generate(model, tokenizer, "x", 20, choice=["맞다", "틀리다"]) in ("맞다", "틀리다")
    assert isinstance(json.loads(neoxko.generate(model, tokenizer, "x", 100, Sampling(temperature=1, seed=1),
                                                 json_schema=True)), dict)
    streamed = "".join(stream(model, tokenizer, "x", 30, Sampling(temperature=1, seed=5), regex=r"\d{3}-\d{4}"))
    assert re.fullmatch(r"\d{3}-\d{4}", streamed)
    with pytest.raises(GenerationError, match="give one constraint, not choice, regex"):
        neoxko.generate(model, tokenizer, "x", 5, regex="a", choice=["b"])


def test_mask_logits_keeps_exactly_the_tokens_llguidance_allows(long_model_dir):
    from neoxko.structured import Constraint, Grammars, mask_logits

    tokenizer, vocab = load_tokenizer(long_model_dir), 384
    grammars = Grammars(tokenizer, vocab)
    guide = grammars.guide(grammars.compile(Constraint.of("json", MEMBER)))
    theirs = np.flatnonzero(np.unpackbits(np.frombuffer(guide.matcher.compute_bitmask(), np.uint8),
                                          bitorder="little"))[:vocab]
    masked, dead = mask_logits(torch.zeros(1, vocab), [guide])
    assert not dead and np.array_equal(torch.isfinite(masked[0]).nonzero()[:, 0].numpy(), theirs) and 0 < len(theirs) < vocab


def test_generate_command_line_constraints(long_model_dir, tmp_path):
    import subprocess
    import sys

    schema = tmp_path / "member.json"
    schema.write_text(json.dumps(MEMBER, ensure_ascii=False), encoding="utf-8")
    run = [sys.executable, "-m", "neoxko", "generate", "--model", str(long_model_dir), "회원:", "--max-new-tokens", "400",
           "--seed", "1"]
    out = subprocess.run(run + ["--json-schema", str(schema)], capture_output=True, text=True, check=True)
    jsonschema.validate(json.loads(out.stdout), MEMBER)
    out = subprocess.run(run + ["--choice", "예", "--choice", "아니오"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() in ("예", "아니오")
    bad = subprocess.run(run + ["--regex", "(ab"], capture_output=True, text=True)
    assert bad.returncode != 0 and "the regex constraint is invalid" in bad.stderr and "Traceback" not in bad.stderr
