"""The `maxmodel` lm-eval backend against lm-eval's own `hf` backend on the same tiny model (a random
transformers LLaMA with a byte-level BPE tokenizer, converted with `maxmodel convert from-hf`): per-request
log-likelihoods and is_greedy flags within 1e-4 (float32) on a local multiple-choice task and a rolling
perplexity task, the same accuracies; `local-completions` through a `maxmodel serve` app gives the same
log-likelihoods. The transformers side runs out of process in .venv-hf (tests/hf_lm_eval.py)."""
from __future__ import annotations

import json

import hf_lm_eval
import hf_oracle
import pytest

pytestmark = pytest.mark.xdist_group("eval_hf")

MAX_LENGTH = 32  # shorter than the perplexity documents: several rolling windows each, and left truncation
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "small", "models",
         "score", "every", "choice", "they", "are", "given", "by", "the", "harness"]


def _docs(greedy: list[str]):
    """Multiple-choice documents (the last ones' first choices are `greedy`, the model's own greedy
    continuations of their questions, so that is_greedy is true for some requests) and perplexity ones."""
    import random
    rng = random.Random(0)
    mc = [{"question": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6))),
           "choices": [" " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3))) for _ in range(3)],
           "answer": rng.randint(0, 2)} for _ in range(8)]
    mc.append({"question": " ".join(WORDS), "choices": [" fox", " dog"], "answer": 0})  # cut from the left
    for i, text in enumerate(greedy):
        mc[i]["choices"][0] = text
    ppl = [{"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 40)))} for _ in range(4)]
    return mc, ppl


def _prompt(doc: dict) -> str:
    return f"Question: {doc['question']}\nAnswer:"  # what doc_to_text below renders


def write_tasks(root, greedy: list[str]) -> None:
    """A multiple-choice and a rolling-perplexity task read from local JSONL (dataset_path: json); choices
    carry their own leading space (target_delimiter '')."""
    mc, ppl = _docs(greedy)
    (root / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in mc))
    (root / "ppl.jsonl").write_text("".join(json.dumps(d) + "\n" for d in ppl))
    (root / "mc_tiny.yaml").write_text(
        f"task: mc_tiny\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / 'mc.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
        "target_delimiter: ''\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (root / "gen_tiny.yaml").write_text(
        f"task: gen_tiny\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / 'mc.jsonl'}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
        "doc_to_target: '{{choices[answer]}}'\ngeneration_kwargs:\n  until: [\"\\n\\n\"]\n  max_gen_toks: 5\n"
        "  do_sample: false\nmetric_list:\n  - metric: exact_match\n")
    (root / "ppl_tiny.yaml").write_text(
        f"task: ppl_tiny\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / 'ppl.jsonl'}\n"
        "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(transformers directory with tokenizer, converted maxmodel directory, task directory)."""
    hf_oracle.require()
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from maxmodel.interop import convert
    root = tmp_path_factory.mktemp("eval_hf")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([" ".join(WORDS)] * 4, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_dir, mm_dir = root / "hf", root / "mm"
    hf_oracle.run("build", json.dumps({
        "config": "LlamaConfig", "dir": str(hf_dir), "seed": 0, "std": 0.3,
        "kwargs": {"vocab_size": tok.get_vocab_size(), "hidden_size": 32, "intermediate_size": 48,
                   "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                   "max_position_embeddings": 64, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
                   "tie_word_embeddings": False}}))
    tok.save(str(hf_dir / "tokenizer.json"))
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
        "model_max_length": 64}))
    convert.from_hf(str(hf_dir), str(mm_dir))
    return hf_dir, mm_dir, root / "tasks"


@pytest.fixture(scope="module")
def eval_model(models):
    """The converted model on the 8 emulated devices (rows over data=8); writes the task files, whose first
    three questions get the model's greedy next token as a choice."""
    from maxmodel.eval.model import EvalModel
    from maxmodel.inference.sampling import SamplingOptions
    model = EvalModel.load(models[1], max_length=MAX_LENGTH, batch_rows=8, row_len=32, max_batch=8)
    assert model.scorer.mesh.shape["data"] == 8
    questions = [_prompt(d) for d in _docs([])[0][:3]]
    greedy = model.generate([model.encode(q) for q in questions],
                            [SamplingOptions(max_new_tokens=1, temperature=0.0)] * 3)
    models[2].mkdir()
    write_tasks(models[2], greedy)
    return model


@pytest.fixture(scope="module")
def reference(models, eval_model):  # eval_model writes the task files
    hf_dir, _, tasks = models
    return hf_lm_eval.run({"pretrained": str(hf_dir), "tasks": ["mc_tiny", "ppl_tiny", "gen_tiny"],
                           "include_path": str(tasks),
                           "max_length": MAX_LENGTH, "batch_size": 4})


def _compare(ours: dict, theirs: dict, task: str) -> int:
    """Asserts the same responses; returns how many requests were greedy."""
    assert [r[:2] for r in ours] == [r[:2] for r in theirs], task  # the same requests
    greedy = 0
    for (doc, i, a), (_, _, b) in zip(ours, theirs):
        if isinstance(b, list):  # [loglikelihood, is_greedy]
            assert a[0] == pytest.approx(b[0], abs=1e-4), (task, doc, i, a, b)
            assert bool(a[1]) == bool(b[1]), (task, doc, i, a, b)
            greedy += bool(b[1])
        elif isinstance(b, str):  # a greedy generation
            assert a == b, (task, doc, a, b)
        else:  # a rolling document's total
            assert a == pytest.approx(b, abs=1e-4), (task, doc, a, b)
    return greedy


def test_maxmodel_backend_equals_the_hf_backend(models, eval_model, reference):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from maxmodel.eval.lm_backend import MaxModelLM
    out = lm_eval.simple_evaluate(model=MaxModelLM(model=eval_model), tasks=["mc_tiny", "ppl_tiny", "gen_tiny"],
                                  log_samples=True, bootstrap_iters=0,
                                  task_manager=TaskManager(include_path=str(models[2]), include_defaults=False))
    ours = hf_lm_eval.requests_of(out["samples"])
    assert len(ours["mc_tiny"]) == 9 * 3 - 1 and len(ours["ppl_tiny"]) == 4  # 8 x 3 choices + 1 x 2; 4 documents
    greedy = _compare(ours["mc_tiny"], reference["requests"]["mc_tiny"], "mc_tiny")
    assert 0 < greedy < len(ours["mc_tiny"]), greedy  # both flags occur, so the comparison covers them
    _compare(ours["ppl_tiny"], reference["requests"]["ppl_tiny"], "ppl_tiny")
    # generate_until through the engine: transformers' greedy generate makes the same text
    _compare(ours["gen_tiny"], reference["requests"]["gen_tiny"], "gen_tiny")
    assert sum(len(r[2]) for r in ours["gen_tiny"]) > 10  # not a comparison of empty strings
    for metric in ("acc,none", "acc_norm,none"):
        assert out["results"]["mc_tiny"][metric] == reference["results"]["mc_tiny"][metric]
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert out["results"]["ppl_tiny"][metric] == pytest.approx(reference["results"]["ppl_tiny"][metric], rel=1e-5)
    # the packing did its work: every request of a task shared a handful of forward passes
    assert eval_model.scorer.forward_passes < 10


def test_the_backend_by_name_with_model_args(models, reference):
    """What `simple_evaluate(model="maxmodel", model_args=...)` builds from the registry (a string of
    arguments, as lm-eval's own CLI passes them)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    import maxmodel.eval.lm_backend  # noqa: F401 - registers "maxmodel"
    out = lm_eval.simple_evaluate(model="maxmodel", model_args=f"pretrained={models[1]},max_length={MAX_LENGTH},"
                                  "batch_rows=8,row_len=32,overrides=run.cpu_devices=8", tasks=["mc_tiny"],
                                  log_samples=True, bootstrap_iters=0,
                                  task_manager=TaskManager(include_path=str(models[2]), include_defaults=False))
    _compare(hf_lm_eval.requests_of(out["samples"])["mc_tiny"], reference["requests"]["mc_tiny"], "mc_tiny")
    assert out["results"]["mc_tiny"]["acc,none"] == reference["results"]["mc_tiny"]["acc,none"]


def test_local_completions_through_maxmodel_serve_gives_the_same_loglikelihoods(models, eval_model, reference):
    import lm_eval
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    from maxmodel.inference.server import ServerThread, create_app
    generator = eval_model.generator
    generator.start()
    try:
        with ServerThread(create_app(generator)) as server:  # 127.0.0.1, a free port; stopped on exit
            assert server.host == "127.0.0.1"
            # it keeps max_length - 1 tokens of context + continuation (room for the one token it asks the
            # server to generate); the hf backend keeps max_length + 1: the same cut needs max_length + 2
            lm = get_model("local-completions")(model=generator.model_name, base_url=server.url + "/v1/completions",
                                                max_length=MAX_LENGTH + 2, max_retries=1, num_concurrent=1)
            out = lm_eval.simple_evaluate(model=lm, tasks=["mc_tiny"], log_samples=True, bootstrap_iters=0,
                                          task_manager=TaskManager(include_path=str(models[2]),
                                                                   include_defaults=False))
    finally:
        generator.stop()
    theirs = reference["requests"]["mc_tiny"]
    ours = hf_lm_eval.requests_of(out["samples"])["mc_tiny"]
    assert [r[:2] for r in ours] == [r[:2] for r in theirs]
    for (doc, i, a), (_, _, b) in zip(ours, theirs):
        assert a[0] == pytest.approx(b[0], abs=1e-4), (doc, i, a, b)
    assert out["results"]["mc_tiny"]["acc,none"] == reference["results"]["mc_tiny"]["acc,none"]

