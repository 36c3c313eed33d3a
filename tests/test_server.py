"""The OpenAI-compatible server against the real engine on a tiny model: the official `openai` client
(completions, chat, streaming) gets the engine's own greedy output, 32 concurrent clients share the
continuous batch, bad input gets a 4xx naming the field while the server keeps serving, --api-key, /metrics,
a disconnecting stream frees its slot, an engine failure fails alone, and lm-eval's `local-completions`
backend scores a task with the loglikelihoods of the plain forward pass.

One tiny model (1 training step; a byte-level BPE tokenizer) and one server for the whole module."""
from __future__ import annotations

import json
import threading
import time

import numpy as np
import openai
import pytest
import requests
from conftest import TINY

pytestmark = pytest.mark.xdist_group("server")  # one worker builds the model, the engine and the server

KEY = "test-key-123"
MAX_LEN = 256  # room for a long stream to be cut off (the disconnect test)
PROMPTS = ["the quick brown fox", "a tiny model", "hello world, answer me"]


def _set(overrides: list[str], **values) -> list[str]:
    keep = [o for o in overrides if o.split("=", 1)[0] not in values]
    return keep + [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A run directory (what `maxmodel train` writes; `load_engine` takes its latest checkpoint)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from maxmodel.cli import main as cli_main
    from maxmodel.data.builtin import builtin_documents
    root = tmp_path_factory.mktemp("served")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(builtin_documents()[:20], trainers.BpeTrainer(
        vocab_size=384, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    assert tok.get_vocab_size() == 384
    tok.save(str(root / "tokenizer.json"))
    overrides = _set(TINY, **{"model.vocab_size": 384, "model.max_seq_len": MAX_LEN, "train.steps": 1,
                              "data.source": "synthetic", "data.tokenizer": root / "tokenizer.json",
                              "run.output_dir": root, "run.name": "tiny", "run.eval_batches": 0})
    assert cli_main(["train", *overrides]) == 0
    return root / "tiny"


@pytest.fixture(scope="module")
def engine(model_dir):
    from maxmodel.inference.load import load_engine
    engine = load_engine(str(model_dir), max_slots=8)
    engine.start()
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def server(engine):
    from maxmodel.inference.server import ServerThread, create_app
    with ServerThread(create_app(engine, api_key=KEY)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def greedy(engine, prompt: str, max_tokens: int, **kw):
    from maxmodel.inference.sampling import SamplingOptions
    (out,) = engine.generate([prompt], SamplingOptions(max_new_tokens=max_tokens, temperature=0.0, **kw))
    return out.completions[0]


def forward_logprobs(engine, rows: list[list[int]]) -> np.ndarray:
    """log_softmax of the engine's plain forward pass (no KV cache) over rows padded at the end (causal:
    padding after a position does not change it), at least 8 rows (one per emulated device)."""
    tokens = np.zeros((max(8, len(rows)), max(map(len, rows))), np.int32)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = r
    logits = np.asarray(engine.engine.logits_of(tokens), np.float64)[:len(rows)]
    return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)


def post(server, path, body, key=KEY, **kw):
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    data = body if isinstance(body, str) else json.dumps(body)
    return requests.post(server.url + path, data=data, headers=headers, **{"timeout": 60} | kw)


def assert_serving(server, engine):
    r = post(server, "/v1/completions", {"model": engine.model_name, "prompt": "ok", "max_tokens": 2,
                                         "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


# ---------------------------------------------------------------- the openai client

def test_openai_client_completions_equal_engine_greedy(client, engine):
    assert [m.id for m in client.models.list().data] == [engine.model_name]
    want = [greedy(engine, p, 8) for p in PROMPTS]
    assert sum(len(w.text) for w in want) > 5  # the comparison below is not between empty strings
    r = client.completions.create(model=engine.model_name, prompt=PROMPTS, max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert [c.text for c in r.choices] == [w.text for w in want]
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.finish_reason for c in r.choices] == [w.finish_reason for w in want]
    prompt_tokens = sum(len(engine.encode_prompt(p)) for p in PROMPTS)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (prompt_tokens, sum(len(w.token_ids) for w in want))

    chunks = list(client.completions.create(model=engine.model_name, prompt=PROMPTS[0], max_tokens=8,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want[0].finish_reason
    assert chunks[-1].usage.completion_tokens == len(want[0].token_ids)

    # logprobs: the engine's raw log-probabilities of the tokens it chose, one token string per id
    r = client.completions.create(model=engine.model_name, prompt=PROMPTS[1], max_tokens=8, temperature=0,
                                  logprobs=3)
    lp = r.choices[0].logprobs
    np.testing.assert_allclose(lp.token_logprobs, want[1].logprobs, atol=1e-5)
    assert lp.tokens == [engine.tokenizer.decode([t]) for t in want[1].token_ids]
    assert all(len(top) <= 4 and max(top.values()) == pytest.approx(tl, abs=1e-5)  # greedy: the best one
               for top, tl in zip(lp.top_logprobs, lp.token_logprobs))

    # n seeded samples: the engine's, in order; echo puts the prompt in front
    from maxmodel.inference.sampling import SamplingOptions
    (want_n,) = engine.generate([PROMPTS[2]], SamplingOptions(max_new_tokens=6, temperature=1.0, n=2, seed=7))
    r = client.completions.create(model=engine.model_name, prompt=PROMPTS[2], max_tokens=6, n=2, seed=7, echo=True)
    assert [c.text for c in r.choices] == [PROMPTS[2] + w.text for w in want_n.completions]
    assert want_n.completions[0].token_ids != want_n.completions[1].token_ids


def test_openai_client_chat_equal_engine_greedy(client, engine):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "name a fox"}]
    want = greedy(engine, engine.render_chat(messages), 8)
    r = client.chat.completions.create(model=engine.model_name, messages=messages, max_tokens=8, temperature=0,
                                       logprobs=True, top_logprobs=2)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.text and r.choices[0].finish_reason == want.finish_reason
    content = r.choices[0].logprobs.content
    np.testing.assert_allclose([c.logprob for c in content], want.logprobs, atol=1e-5)
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob == pytest.approx(c.logprob, abs=1e-5)
               for c in content)

    chunks = list(client.chat.completions.create(model=engine.model_name, messages=messages, max_tokens=8,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == want.finish_reason


def test_32_concurrent_clients_share_the_batch(client, engine):
    want = {p: greedy(engine, p, 6).text for p in PROMPTS}
    before = engine.stats()
    results, errors = {}, []

    def one(i):
        try:
            prompt = PROMPTS[i % len(PROMPTS)]
            if i % 2:
                r = client.completions.create(model=engine.model_name, prompt=prompt, max_tokens=6, temperature=0)
                results[i] = (prompt, r.choices[0].text)
            else:
                s = client.completions.create(model=engine.model_name, prompt=prompt, max_tokens=6, temperature=0,
                                              stream=True)
                results[i] = (prompt, "".join(c.choices[0].text for c in s))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(results) == 32
    assert all(text == want[prompt] for prompt, text in results.values())
    after = engine.stats()
    steps = after["steps"] - before["steps"]
    occupied = after["occupied_slot_steps"] - before["occupied_slot_steps"]
    assert occupied / steps > 2  # requests decoded together, not one after another


# ---------------------------------------------------------------- bad input

LONG = list(range(3, 3 + MAX_LEN))
BAD = [
    ("/v1/completions", '{"prompt": "x", "max_tokens": 3', 400, None),        # malformed JSON
    ("/v1/completions", '["prompt"]', 400, None),                             # not an object
    ("/v1/completions", {"prompt": "x", "max_tokens": "3"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "echo": 1}, 400, "echo"),
    ("/v1/completions", {"prompt": 7}, 400, "prompt"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokenz": 3}, 400, "max_tokenz"),
    ("/v1/completions", {"prompt": "x", "model": "no-such-model"}, 404, "model"),
    ("/v1/completions", {"prompt": LONG, "max_tokens": 1}, 400, "prompt"),
    ("/v1/completions", {"prompt": LONG[:MAX_LEN - 4], "max_tokens": 10}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": [5, 100000]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "n": 1000}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "n": 2, "best_of": 1}, 400, "best_of"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10 ** 6}, 400,
     "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                              "top_logprobs": 21}, 400, "top_logprobs"),
]


@pytest.mark.parametrize("path,body,status,param", BAD, ids=[f"{i}-{b[3]}" for i, b in enumerate(BAD)])
def test_bad_input_is_a_4xx_naming_the_field(server, engine, path, body, status, param):
    r = post(server, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]
    if param:
        assert err["message"].startswith(param)
    assert_serving(server, engine)


def test_api_key(server, engine):
    body = {"model": engine.model_name, "prompt": "x", "max_tokens": 1}
    for key in (None, "wrong"):
        r = post(server, "/v1/completions", body, key=key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert requests.get(server.url + "/v1/models", timeout=10,
                            headers={"Authorization": f"Bearer {key}"} if key else {}).status_code == 401
    assert requests.get(server.url + "/health", timeout=10).json()["status"] == "ok"  # open, for probes
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert_serving(server, engine)


# ---------------------------------------------------------------- metrics, disconnects, engine failures

def scrape(server) -> dict:
    from prometheus_client.parser import text_string_to_metric_families
    r = requests.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def test_metrics_count_requests_tokens_and_latencies(server, engine):
    ep = (("endpoint", "/v1/completions"),)
    before = scrape(server)
    for _ in range(3):
        assert_serving(server, engine)
    assert post(server, "/v1/completions", {"prompt": "x", "n": 0}).status_code == 400
    after = scrape(server)

    def delta(name, labels=()):
        key = (name, tuple(sorted(labels)))
        return after.get(key, 0) - before.get(key, 0)

    assert delta("maxmodel_http_requests_total", ep + (("status", "200"),)) == 3
    assert delta("maxmodel_http_requests_total", ep + (("status", "400"),)) == 1
    assert delta("maxmodel_prompt_tokens_total", ep) == 3 * len(engine.encode_prompt("ok"))
    generated = delta("maxmodel_generated_tokens_total", ep)
    assert 3 <= generated <= 6
    assert delta("maxmodel_time_to_first_token_seconds_count", ep) == 3
    assert delta("maxmodel_inter_token_latency_seconds_count", ep) == generated - 3  # gaps after each first token
    assert delta("maxmodel_request_duration_seconds_count", ep) == 3
    assert after[("maxmodel_max_slots", ())] == engine.max_slots
    assert after[("maxmodel_active_slots", ())] == 0 and after[("maxmodel_queue_depth", ())] == 0
    assert delta("maxmodel_engine_generated_tokens_total") >= 3


def test_a_client_that_disconnects_frees_its_slot(client, server, engine):
    before = engine.stats().get("generated_tokens", 0)
    stream = client.completions.create(model=engine.model_name, prompt="the", max_tokens=MAX_LEN - 4,
                                       temperature=0, stream=True, extra_body={"ignore_eos": True})
    it = iter(stream)
    next(it)
    assert engine.stats()["active_slots"] == 1
    stream.close()
    deadline = time.monotonic() + 10
    while engine.stats()["active_slots"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats()["active_slots"] == 0
    assert engine.stats().get("generated_tokens", 0) - before < MAX_LEN - 4  # cancelled, not run to the end

    # a non-streaming client that gives up (its read timeout closes the connection) too
    def answered():  # requests the server has finished (answered or abandoned) on /v1/completions
        return sum(v for (name, labels), v in scrape(server).items() if name == "maxmodel_http_requests_total"
                   and ("endpoint", "/v1/completions") in labels)

    before, done = engine.stats().get("generated_tokens", 0), answered()
    with pytest.raises(requests.exceptions.ReadTimeout):
        post(server, "/v1/completions", {"prompt": "the", "max_tokens": MAX_LEN - 4, "ignore_eos": True,
                                         "temperature": 0}, timeout=0.3)
    deadline = time.monotonic() + 10
    while answered() == done and time.monotonic() < deadline:  # its handler has returned
        time.sleep(0.02)
    assert answered() == done + 1 and engine.stats()["active_slots"] == 0
    assert engine.stats().get("generated_tokens", 0) - before < MAX_LEN - 4


def test_an_engine_failure_fails_only_its_request(server, engine, monkeypatch):
    poison = engine.encode_prompt("poison")
    real = engine.batcher.prefill

    def prefill(prompt_ids, *args, **kw):
        if list(prompt_ids) == poison:
            raise RuntimeError("injected prefill failure")
        return real(prompt_ids, *args, **kw)

    monkeypatch.setattr(engine.batcher, "prefill", prefill)
    r = post(server, "/v1/completions", {"prompt": "poison", "max_tokens": 2})
    assert r.status_code == 500 and "injected prefill failure" in r.json()["error"]["message"]
    assert_serving(server, engine)


# ---------------------------------------------------------------- lm-eval

def test_lm_eval_local_completions_scores_with_the_forward_pass_loglikelihoods(server, engine, tmp_path):
    import lm_eval
    from lm_eval.api.registry import get_model
    docs = [{"question": "the quick brown", "choices": ["fox", "dog"], "answer": 0},
            {"question": "hello", "choices": ["world", "there, model"], "answer": 1}]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "serve_tiny.yaml").write_text(
        "task: serve_tiny\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'docs.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
    lm = get_model("local-completions")(model=engine.model_name, base_url=server.url + "/v1/completions",
                                        auth_token=KEY, header={"Authorization": f"Bearer {KEY}"},
                                        max_length=MAX_LEN, max_retries=1)
    assert lm.tokenizer_backend == "remote"  # tokenized by the server's own tokenizer (/tokenize)
    out = lm_eval.simple_evaluate(model=lm, tasks=["serve_tiny"], log_samples=True,
                                  task_manager=lm_eval.tasks.TaskManager(include_path=str(tmp_path),
                                                                         include_defaults=False))
    samples = out["samples"]["serve_tiny"]
    assert len(samples) == 2
    pairs = [(lm._encode_pair(*args), ll) for s in samples for args, (ll, _) in zip(s["arguments"],
                                                                                   s["filtered_resps"])]
    logp = forward_logprobs(engine, [ctx + cont for (ctx, cont), _ in pairs])
    for row, ((ctx, cont), ll) in zip(logp, pairs):
        want = sum(row[len(ctx) + j - 1, t] for j, t in enumerate(cont))
        assert ll == pytest.approx(want, abs=1e-4)
    assert 0 <= out["results"]["serve_tiny"]["acc,none"] <= 1


# ---------------------------------------------------------------- the command

def test_serve_command_on_a_directory_that_is_not_a_model_exits_2_naming_it(tmp_path, capsys):
    from maxmodel.cli import main as cli_main
    from maxmodel.inference.generate_cli import engine_kwargs
    from maxmodel.inference.serve_cli import parse_args
    assert cli_main(["serve", str(tmp_path)]) == 2
    assert str(tmp_path) in capsys.readouterr().err
    args = parse_args(["m", "--max-batch", "4", "--max-len", "128", "--kv-cache-dtype", "int8", "--quantize", "int4",
                       "model.rope_theta=1e4", "--prefix-cache-gb", "0.5", "--port", "9000"])
    assert (args.model, args.host, args.port, args.api_key, args.overrides) == \
        ("m", "127.0.0.1", 9000, None, ["model.rope_theta=1e4"])
    assert engine_kwargs(args) == {"max_slots": 4, "max_len": 128, "kv_int8": True, "quantize": "int4",
                                   "prefix_cache_gb": 0.5}
    assert cli_main(["serve", str(tmp_path), "--max-batch", "0"]) == 2
