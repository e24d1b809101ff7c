"""`neoxko serve` against clients we did not write: lm-evaluation-harness's local-completions and
local-chat-completions, and the openai package's chat client."""

import json
import shutil

import pytest
import torch
from lm_eval_tasks import FIXTURE, TASKS
from lm_eval_tasks import lm_eval_tasks as _lm_eval_tasks

from neoxko import chat_template as chat
from neoxko import load_model, load_tokenizer
from neoxko.serve.engine import Engine
from neoxko.serve.server import ServeSettings, serve


def start(folder, **settings):
    template, stops = chat.load_template(settings.pop("chat_template")) if "chat_template" in settings else (None, ())
    tokenizer = load_tokenizer(folder)
    engine = Engine(load_model(folder), tokenizer.eos_id, max_batch=4)
    return serve(engine, tokenizer, ServeSettings(model_name="tiny", chat_template=template, chat_stop=stops,
                                                  **settings))


def test_lm_eval_local_completions_scores_kobest_as_neoxko_eval_does(long_model_dir, tmp_path, caplog):
    """Two shots: lm-eval's own few-shot draws and prompts, sent as token ids with echo and logprobs."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from neoxko.evaluate.kobest import EvalSettings, evaluate
    from neoxko.evaluate.scoring import NeoxkoScorer

    shots = 2  # `neoxko eval`'s own engine, in process (its command line is tested in test_evaluate.py)
    scorer = NeoxkoScorer(load_model(long_model_dir), load_tokenizer(long_model_dir))
    ours, _ = evaluate(scorer, EvalSettings(tasks=TASKS, shots=[shots], data_dir=str(FIXTURE)), progress=False)
    server = start(long_model_dir)
    try:
        url = f"http://127.0.0.1:{server.port}/v1/completions"
        with caplog.at_level("INFO"):
            result = lm_eval.simple_evaluate(
                model="local-completions", model_args=f"base_url={url},model=tiny,num_concurrent=4,max_retries=1",
                tasks=[f"neoxko_{t}" for t in TASKS], num_fewshot=shots,
                task_manager=TaskManager(include_path=str(_lm_eval_tasks(tmp_path / "tasks"))))
        assert "Auto-detected remote tokenizer support" in caplog.text  # our /tokenizer_info, /tokenize, /detokenize
        assert server.engine.stats["prefix_hits"] > 0  # each choice shares its document's context
    finally:
        server.close()
    for task in TASKS:
        theirs = result["results"][f"neoxko_{task}"]
        assert theirs["acc,none"] == pytest.approx(ours[task][str(shots)]["acc"], abs=1e-6), task
        assert theirs["f1,none"] == pytest.approx(ours[task][str(shots)]["macro_f1"], abs=1e-6), task
    assert ours[TASKS[0]][str(shots)]["n"] == 4  # the fixture's test documents, all scored


def test_lm_eval_local_chat_completions_generates_through_the_chat_template(long_model_dir):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.api_models import JsonChatStr
    from lm_eval.models.openai_completions import LocalChatCompletion

    from neoxko.generate import Sampling, generate_tokens

    server = start(long_model_dir, chat_template="koalpaca")
    try:
        client = LocalChatCompletion(base_url=f"http://127.0.0.1:{server.port}/v1/chat/completions", model="tiny",
                                     max_retries=1)
        messages = [{"role": "system", "content": "친절하게 답하세요."}, {"role": "user", "content": "서울은 어떤 곳인가요?"}]
        context = JsonChatStr(json.dumps(messages, ensure_ascii=False))
        [text] = client.generate_until([Instance("generate_until", {}, (context, {"until": ["\n\n"], "max_gen_toks": 12}),
                                                 0)], disable_tqdm=True)
    finally:
        server.close()
    tokenizer, model = load_tokenizer(long_model_dir), load_model(long_model_dir)
    prompt = chat.render(chat.load_template("koalpaca")[0], messages)
    assert prompt == "친절하게 답하세요.\n\n### 질문: 서울은 어떤 곳인가요?\n\n### 답변:"
    ids = generate_tokens(model, [tokenizer.encode(prompt)], 12, Sampling(), eos_id=tokenizer.eos_id)
    greedy = tokenizer.decode([int(t[0]) for t in ids])
    assert text == greedy.split("\n\n")[0].split("### 질문:")[0]


def test_openai_chat_plain_streamed_n_and_logprobs(long_model_dir):
    openai = pytest.importorskip("openai")
    server = start(long_model_dir, chat_template="koalpaca")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused")
        messages = [{"role": "user", "content": "김치는 무엇인가요?"}]
        reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                               logprobs=True, top_logprobs=2)
        choice = reply.choices[0]
        assert choice.message.role == "assistant" and reply.usage.prompt_tokens > 0
        assert len(choice.logprobs.content) == reply.usage.completion_tokens
        assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.logprob for t in choice.logprobs.content)
        streamed = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                                  stream=True, stream_options={"include_usage": True})
        chunks = list(streamed)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
        assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
        several = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=1.0,
                                                 n=3, seed=5)
        assert [c.index for c in several.choices] == [0, 1, 2]
        with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs: true"):
            client.chat.completions.create(model="tiny", messages=messages, max_tokens=2, top_logprobs=2)
        with pytest.raises(openai.BadRequestError, match=r"content parts of type \['image_url'\] are not supported"):
            client.chat.completions.create(model="tiny", max_tokens=2, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])
        with pytest.raises(openai.BadRequestError, match="koalpaca template has no place for a 'tool' message"):
            client.chat.completions.create(model="tiny", messages=[{"role": "tool", "content": "x"}], max_tokens=2)
    finally:
        server.close()


def test_chat_without_a_template_names_chat_template(long_model_dir):
    openai = pytest.importorskip("openai")
    server = start(long_model_dir)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused")
        with pytest.raises(openai.BadRequestError, match="--chat-template koalpaca"):
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "안녕"}], max_tokens=2)
    finally:
        server.close()


def test_tokenizer_config_chat_template_is_used(long_model_dir, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(long_model_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    server = start(folder)
    try:
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        body = {"messages": [{"role": "user", "content": "안녕"}]}
        conn.request("POST", "/tokenize", body=json.dumps(body), headers={"Content-Type": "application/json"})
        tokens = json.loads(conn.getresponse().read())["tokens"]
        assert load_tokenizer(folder).decode(tokens) == "<user>안녕\n<assistant>"
    finally:
        server.close()


def test_an_end_of_text_token_is_scored_in_echoed_logprobs(long_model_dir):
    """lm-eval reads token_logprobs[ctxlen:-1]: the generated token must be there even when it is the end of text."""
    import http.client

    tokenizer, model = load_tokenizer(long_model_dir), load_model(long_model_dir)
    ids = tokenizer.encode("오늘은 날씨가")
    with torch.no_grad():
        greedy = int(model(torch.tensor([ids]))[0, -1].argmax())
    engine = Engine(model, eos_id=greedy, max_batch=2)  # the greedy next token ends the text
    server = serve(engine, tokenizer, ServeSettings(model_name="tiny"))
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        body = {"prompt": [ids], "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 1}
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        choice = json.loads(conn.getresponse().read())["choices"][0]
    finally:
        server.close()
    assert choice["finish_reason"] == "stop" and len(choice["logprobs"]["token_logprobs"]) == len(ids) + 1
    assert choice["text"] == tokenizer.decode(ids)  # the end of text adds no text


def test_chat_template_option_refusals(tmp_path):
    from neoxko.errors import NeoxkoError

    with pytest.raises(NeoxkoError, match="--chat-template 'nope' is neither a file nor a shipped template"):
        chat.load_template("nope")
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m['content'] }")
    with pytest.raises(NeoxkoError, match="the chat template is not valid jinja"):
        chat.load_template(str(broken))


def test_tokenize_takes_a_prompt_or_messages_not_both(long_model_dir):
    import http.client

    server = start(long_model_dir, chat_template="koalpaca")
    try:
        for body in ({}, {"prompt": "가", "messages": [{"role": "user", "content": "가"}]}):
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
            conn.request("POST", "/tokenize", body=json.dumps(body), headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            error = json.loads(response.read())["error"]
            assert response.status == 400 and "send either prompt (a string) or messages" in error["message"]
    finally:
        server.close()
