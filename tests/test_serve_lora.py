"""Many LoRA adapters served unmerged over one base model: adapters written by peft itself, every reply checked
against `neoxko generate` on the merged model, whatever shares its batch; vLLM's load and unload routes; the openai
package and lm-eval's local-completions selecting adapters by model name."""

import http.client
import json
import threading

import pytest
import torch

from neoxko import load_model, load_tokenizer
from neoxko.generate import Sampling, generate_tokens
from neoxko.serve.adapters import AdapterSlots
from neoxko.serve.engine import Engine, Finished, Request
from neoxko.serve.server import ServeSettings, serve

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

ADAPTERS = {  # three shapes of adapter: one layer kind, all four kinds, per-layer ranks with rsLoRA
    "qkv": dict(r=4, lora_alpha=8, target_modules=["query_key_value"]),
    "all": dict(r=8, lora_alpha=16, target_modules=["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]),
    "mlp": dict(r=2, lora_alpha=4, use_rslora=True, target_modules=["dense_4h_to_h"], rank_pattern={"dense_4h_to_h": 6}),
}


def peft_adapter(base, folder, seed=0, **settings):
    """An adapter peft writes, with random (not zero) B, so that it changes what the model says."""
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = peft.get_peft_model(hf, peft.LoraConfig(init_lora_weights=False, task_type="CAUSAL_LM", **settings))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapters(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {name: peft_adapter(model_dir, root / name, seed=i + 1, **settings)
            for i, (name, settings) in enumerate(ADAPTERS.items())}


@pytest.fixture(scope="module")
def merged(model_dir, adapters):
    return {None: load_model(model_dir)} | {name: load_model(model_dir, adapter=folder)
                                            for name, folder in adapters.items()}


def expected(merged, name, prompt, n, sampling):
    return [int(t[0]) for t in generate_tokens(merged[name], [prompt], n, sampling)]


def collect(request):
    got = []
    while not isinstance(event := request.events.get(timeout=60), Finished):
        got.append(event.id)
    return got, event.reason


def test_rows_of_one_batch_each_run_their_own_adapter(model_dir, adapters, merged):
    """Six requests, three adapters and the base, four rows and two adapter slots: adapters are evicted and placed
    again while others run, and every request gets the tokens of the merged model."""
    model = load_model(model_dir)
    slots = AdapterSlots(model, max_loras=2)
    known = {name: slots.register(name, folder) for name, folder in adapters.items()}
    engine = Engine(model, eos_id=None, max_batch=4, adapters=slots)
    cases = [([5, 6, 7, 8, 9], "qkv", Sampling(temperature=0.9, top_k=40, seed=3), 20),
             ([10, 11], "all", Sampling(), 5),
             ([12, 13, 14, 15, 16, 17, 18, 19], None, Sampling(temperature=1.0, seed=7), 12),
             ([20], "mlp", Sampling(temperature=1, seed=1), 17),
             ([30, 31, 32], "all", Sampling(temperature=0.7, seed=5), 9),
             ([40, 41], "qkv", Sampling(), 14)]
    try:
        requests = [engine.submit(Request(p, n, s, adapter=known.get(name))) for p, name, s, n in cases]
        for request, (prompt, name, sampling, n) in zip(requests, cases, strict=True):
            assert collect(request) == (expected(merged, name, prompt, n, sampling), "length"), name
    finally:
        engine.close()
    assert slots.evictions > 0 and engine.stats["decode_rows"] > engine.stats["decode_steps"]
    for name in ADAPTERS:  # each adapter changes what the model says, so the equality above means something
        assert expected(merged, name, [5, 6, 7], 12, Sampling()) != expected(merged, None, [5, 6, 7], 12, Sampling())


def test_the_prefix_cache_keeps_adapters_apart(model_dir, adapters, merged):
    model = load_model(model_dir)
    slots = AdapterSlots(model)
    qkv = slots.register("qkv", adapters["qkv"])
    engine = Engine(model, eos_id=None, max_batch=2, adapters=slots, prefix_min=4)
    prompt = list(range(40, 70))
    try:
        for adapter, name in ((qkv, "qkv"), (None, None), (qkv, "qkv")):
            got, _ = collect(engine.submit(Request(prompt + [7], 6, Sampling(), adapter=adapter)))
            assert got == expected(merged, name, prompt + [7], 6, Sampling()), name
    finally:
        engine.close()
    assert engine.stats["prefix_hits"] == 1  # the third request reuses the first's slots; the second reuses none


def post(port, path, body, key=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    conn.request("POST", path, body=json.dumps(body), headers=headers)
    response = conn.getresponse()
    payload = response.read().decode()
    conn.close()
    return response.status, payload


def start(model_dir, adapters=(), max_loras=4, **settings):
    model = load_model(model_dir)
    slots = AdapterSlots(model, max_loras=max_loras, max_rank=settings.pop("max_rank", 64))
    for name in adapters:
        slots.register(name, adapters[name])
    tokenizer = load_tokenizer(model_dir)
    engine = Engine(model, tokenizer.eos_id, max_batch=4, max_queue=256, adapters=slots)
    return serve(engine, tokenizer, ServeSettings(model_name="tiny", **settings))


def test_openai_clients_pick_adapters_by_model_while_adapters_load_and_unload(model_dir, adapters, merged):
    """12 concurrent openai clients over the base and three adapters (two slots); meanwhile a fourth adapter is
    loaded, used and unloaded. Every reply is the merged model's."""
    openai = pytest.importorskip("openai")
    tokenizer = load_tokenizer(model_dir)
    server = start(model_dir, {"qkv": adapters["qkv"], "all": adapters["all"]}, max_loras=2, api_key="k",
                   allow_runtime_lora=True)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="k", max_retries=0)
    prompts = ["대한민국은", "오늘 아침에는", "서울에서 부산까지", "인공지능 언어 모델은"]
    names = ["tiny", "qkv", "all", "mlp"]
    cases = [(names[i % 4], prompts[i % len(prompts)], i) for i in range(12)]
    want = [tokenizer.decode(expected(merged, None if model == "tiny" else model, tokenizer.encode(prompt), 8,
                                      Sampling(temperature=0.8, seed=seed))) for model, prompt, seed in cases]
    failures, lock = [], threading.Lock()

    def ask(i):
        model, prompt, seed = cases[i]
        try:
            reply = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0.8, seed=seed,
                                              extra_body={"ignore_eos": True})
            assert reply.model == model and reply.choices[0].text == want[i], (model, reply.choices[0].text, want[i])
        except Exception as e:  # noqa: BLE001 - gathered for the main thread
            with lock:
                failures.append(f"{model}: {e!r}")

    try:
        assert post(server.port, "/v1/load_lora_adapter", {"lora_name": "mlp", "lora_path": str(adapters["mlp"])},
                    key="k") == (200, "Success: LoRA adapter 'mlp' added successfully.")
        listed = {m.id: m.model_extra for m in client.models.list().data}
        assert set(listed) == {"tiny", "qkv", "all", "mlp"}
        assert listed["mlp"]["parent"] == "tiny" and listed["mlp"]["root"] == str(adapters["mlp"])
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for _ in range(3):  # an adapter no client asks for comes and goes while they run
            assert post(server.port, "/v1/load_lora_adapter", {"lora_name": "spare", "lora_path": str(adapters["all"])},
                        key="k")[0] == 200
            assert post(server.port, "/v1/unload_lora_adapter", {"lora_name": "spare"}, key="k")[0] == 200
        for t in threads:
            t.join()
        assert not failures, "\n".join(failures)
        assert post(server.port, "/v1/unload_lora_adapter", {"lora_name": "mlp"}, key="k")[0] == 200
        with pytest.raises(openai.NotFoundError, match="'mlp' is not served here; this server serves 'tiny', "):
            client.completions.create(model="mlp", prompt="대한민국은", max_tokens=4)
    finally:
        server.close()
    assert server.engine.adapters.evictions > 0


def test_lm_eval_scores_an_adapter_served_by_name_as_neoxko_eval_scores_the_merged_model(long_model_dir, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager
    from lm_eval_tasks import FIXTURE, TASKS
    from lm_eval_tasks import lm_eval_tasks as _lm_eval_tasks

    from neoxko.evaluate.kobest import EvalSettings, evaluate
    from neoxko.evaluate.scoring import NeoxkoScorer

    folder = peft_adapter(long_model_dir, tmp_path / "adapter", seed=5, **ADAPTERS["all"])
    scorer = NeoxkoScorer(load_model(long_model_dir, adapter=folder), load_tokenizer(long_model_dir))
    ours, _ = evaluate(scorer, EvalSettings(tasks=TASKS, shots=[1], data_dir=str(FIXTURE)), progress=False)
    server = start(long_model_dir, {"koalpaca": folder})
    try:
        url = f"http://127.0.0.1:{server.port}/v1/completions"
        result = lm_eval.simple_evaluate(
            model="local-completions", model_args=f"base_url={url},model=koalpaca,num_concurrent=4,max_retries=1",
            tasks=[f"neoxko_{t}" for t in TASKS], num_fewshot=1,
            task_manager=TaskManager(include_path=str(_lm_eval_tasks(tmp_path / "tasks"))))
    finally:
        server.close()
    for task in TASKS:
        theirs = result["results"][f"neoxko_{task}"]
        assert theirs["acc,none"] == pytest.approx(ours[task]["1"]["acc"], abs=1e-6), task
        assert theirs["f1,none"] == pytest.approx(ours[task]["1"]["macro_f1"], abs=1e-6), task


def test_echoed_logprobs_of_an_adapter_are_the_merged_models(model_dir, adapters, merged):
    tokenizer = load_tokenizer(model_dir)
    server = start(model_dir, {"all": adapters["all"]})
    prompt = "서울에서 부산까지 기차로 두 시간 반이 걸린다."
    ids = tokenizer.encode(prompt)
    try:
        status, body = post(server.port, "/v1/completions", {"model": "all", "prompt": prompt, "max_tokens": 1,
                                                             "echo": True, "logprobs": 0, "temperature": 0})
    finally:
        server.close()
    assert status == 200
    got = json.loads(body)["choices"][0]["logprobs"]["token_logprobs"][1:len(ids)]
    with torch.no_grad():
        for name, close in (("all", True), (None, False)):
            lp = torch.log_softmax(merged[name](torch.tensor([ids]))[0, :-1].float(), -1)
            want = lp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
            assert (got == pytest.approx(want, abs=1e-5)) is close, name


@pytest.mark.parametrize("path,body,status,message", [
    ("/v1/load_lora_adapter", {"lora_name": "qkv", "lora_path": "ADAPTER"}, 400,
     "an adapter named 'qkv' is already loaded; unload it first, pick another name, or send load_inplace: true"),
    ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "ADAPTER/adapter_config.json"}, 400,
     "is a file; give the adapter's folder (the one holding adapter_config.json)"),
    ("/v1/load_lora_adapter", {"lora_name": "x\ny", "lora_path": "ADAPTER"}, 400,
     "an adapter name must be a non-empty name without surrounding spaces or control characters"),
    ("/v1/load_lora_adapter", {"lora_name": "tiny", "lora_path": "ADAPTER"}, 400,
     "'tiny' is the served model's own name; give the adapter another"),
    ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/nowhere/adapter"}, 400,
     "cannot load the adapter in /nowhere/adapter"),
    ("/v1/load_lora_adapter", {"lora_name": "x"}, 400, "lora_path"),
    ("/v1/unload_lora_adapter", {"lora_name": "nope"}, 404,
     "no adapter named 'nope' is loaded; GET /v1/models lists the adapters served"),
])
def test_adapter_route_errors_name_the_problem(model_dir, adapters, path, body, status, message):
    server = start(model_dir, {"qkv": adapters["qkv"]}, allow_runtime_lora=True)
    body = {k: v.replace("ADAPTER", str(adapters["qkv"])) if isinstance(v, str) else v for k, v in body.items()}
    try:
        got_status, payload = post(server.port, path, body)
    finally:
        server.close()
    assert got_status == status and message in json.loads(payload)["error"]["message"]


def test_load_inplace_replaces_an_adapter_of_that_name(model_dir, adapters, merged):
    server = start(model_dir, {"x": adapters["qkv"]}, allow_runtime_lora=True)
    try:
        assert post(server.port, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(adapters["all"]),
                                                           "load_inplace": True})[0] == 200
        status, body = post(server.port, "/v1/completions", {"model": "x", "prompt": [[5, 6, 7]], "max_tokens": 8,
                                                             "temperature": 0, "logprobs": 0, "ignore_eos": True})
    finally:
        server.close()
    tokenizer = load_tokenizer(model_dir)
    assert json.loads(body)["choices"][0]["text"] == tokenizer.decode(expected(merged, "all", [5, 6, 7], 8, Sampling()))


def test_runtime_loading_is_off_unless_allowed_and_needs_the_key(model_dir, adapters):
    server = start(model_dir, api_key="k")
    try:
        assert post(server.port, "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "x"})[0] == 401
        status, payload = post(server.port, "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "x"}, key="k")
        assert status == 403 and "restart the server with --allow-runtime-lora" in payload
    finally:
        server.close()


@pytest.mark.parametrize("settings,message", [
    (dict(r=4, lora_alpha=8, target_modules=["dense"], use_dora=True), "is a DoRA adapter, which rescales whole "
     "weight rows and cannot be served unmerged; serve it merged on its own: neoxko serve --model"),
    (dict(r=4, lora_alpha=8, target_modules=["dense"], modules_to_save=["embed_in"]), "replaces whole modules "
     "(gpt_neox.embed_in.weight: peft's modules_to_save)"),
    (dict(r=16, lora_alpha=8, target_modules=["dense"]), "has rank 16; this server serves adapters of rank at most 8 "
     "(--max-lora-rank)"),
])
def test_adapters_that_cannot_be_served_unmerged_are_refused_by_name(model_dir, tmp_path, settings, message):
    folder = peft_adapter(model_dir, tmp_path / "a", **settings)
    slots = AdapterSlots(load_model(model_dir), max_rank=8)
    with pytest.raises(Exception, match=".*" + message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        slots.register("a", folder)


def test_an_adapter_of_another_base_is_refused(model_dir, tmp_path, tokenizer_dir):
    from conftest import model_folder, tiny_config

    other = model_folder(tmp_path / "wide", tokenizer_dir, tiny_config(hidden_size=96, num_attention_heads=4))
    folder = peft_adapter(other, tmp_path / "a", **ADAPTERS["qkv"])
    slots = AdapterSlots(load_model(model_dir))
    with pytest.raises(Exception, match="was it trained on another base model"):
        slots.register("a", folder)


def test_serve_command_line_lora_options(model_dir, adapters):
    from neoxko.cli.models import _lora_option
    from neoxko.errors import NeoxkoError

    assert _lora_option(f"ko={adapters['qkv']}") == ("ko", str(adapters["qkv"]))
    assert _lora_option(f"{adapters['qkv']}/") == ("qkv", f"{adapters['qkv']}/")
    with pytest.raises(NeoxkoError, match="write NAME=FOLDER"):
        _lora_option("=x")


def test_with_one_slot_a_second_adapter_waits_without_holding_up_the_others(model_dir, adapters, merged):
    """The second adapter waits for the one slot; the base request behind it does not wait with it; a later request
    for the resident adapter waits behind the second (the slot drains for it); an adapter unloaded while its requests
    run finishes them."""
    import queue
    import time

    model = load_model(model_dir)
    slots = AdapterSlots(model, max_loras=1)
    qkv, mlp = slots.register("qkv", adapters["qkv"]), slots.register("mlp", adapters["mlp"])
    engine = Engine(model, eos_id=None, max_batch=4, adapters=slots)
    started, ended = {}, {}

    class Log(queue.Queue):  # the events of one request, with when its first token and its end arrived
        def __init__(self, name):
            super().__init__()
            self.name = name

        def put(self, event, *args, **kwargs):
            (ended if isinstance(event, Finished) else started).setdefault(self.name, time.perf_counter())
            super().put(event, *args, **kwargs)

    cases = {"first": ([5, 6, 7], 60, "qkv"), "second": ([8, 9], 10, "mlp"), "base": ([10, 11], 5, None),
             "late": ([12, 13], 5, "qkv")}
    known = {"qkv": qkv, "mlp": mlp}
    try:
        requests = {name: engine.submit(Request(p, n, Sampling(), adapter=known.get(a), events=Log(name)))
                    for name, (p, n, a) in cases.items()}
        slots.unregister("qkv")  # while its requests run or wait: they finish with it
        for name, (prompt, n, adapter) in cases.items():
            assert collect(requests[name]) == (expected(merged, adapter, prompt, n, Sampling()), "length"), name
    finally:
        engine.close()
    assert ended["base"] < ended["first"] < started["second"] < ended["second"] < started["late"]
    assert slots.names() == ["mlp"] and slots.holders == [0] and not slots.reserved
