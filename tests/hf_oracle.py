"""The Hugging Face side of the interop tests, run with the Python of `.venv-hf` (torch + transformers, made by
`make setup-hf`), so that maxmodel's own venv never imports torch.

  python hf_oracle.py build SPEC_JSON        a seeded random model from a transformers config class and its
                                             kwargs, saved with save_pretrained; with "tokens", its logits
  python hf_oracle.py load DIR [ORIGINAL]    load DIR with transformers; report its class, its parameters'
                                             dtypes, loading problems and, given ORIGINAL, the tensors that differ
  python hf_oracle.py generate DIR IDS N     transformers' greedy generate: N new ids per prompt of IDS (JSON)
  python hf_oracle.py peft SPEC_JSON          logits of a transformers model with a PEFT adapter loaded
  python hf_oracle.py chat SPECS_JSON_FILE   apply_chat_template per spec: renderings, assistant masks

Each prints one JSON line. The tests call them through `run` below, which imports neither torch nor
transformers (this module imports them only in its modes): it sends them to one long-lived `serve` process
per test process, so torch and transformers load once, not once per call.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENV_VAR = "MAXMODEL_HF_PYTHON"


def _candidate() -> str:
    return os.environ.get(ENV_VAR) or str(REPO / ".venv-hf" / "bin" / "python")


def require() -> str:
    """The oracle's Python: $MAXMODEL_HF_PYTHON, else the repository's .venv-hf; skips the test without one."""
    import pytest
    python = _candidate()
    if not Path(python).is_file():
        pytest.skip(f"no Hugging Face oracle Python at {python}: run `make setup-hf` (creates .venv-hf) "
                    f"or set {ENV_VAR}")
    return python


_ORACLE: dict = {}  # the one oracle process of this test process: torch and transformers are imported once


def _oracle():
    proc = _ORACLE.get("proc")
    if proc is None or proc.poll() is not None:
        import atexit
        import tempfile
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of maxmodel's venv
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS="1")
        stderr = tempfile.TemporaryFile("w+")
        proc = subprocess.Popen([require(), __file__, "serve"], env=env, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=stderr, text=True)
        _ORACLE.update(proc=proc, stderr=stderr)
        atexit.register(proc.kill)
    return proc


def run(mode: str, *args: str, timeout: float = 300) -> dict:
    """One request to the oracle process (started on first use, kept for the rest of the test session)."""
    import select
    proc = _oracle()
    proc.stdin.write(json.dumps([mode, *args]) + "\n")
    proc.stdin.flush()
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    reply = json.loads(line) if line else None
    if reply is None or "error" in reply:
        if reply is None:
            proc.kill()  # dead or stuck: the next request starts a fresh one
        stderr = _ORACLE["stderr"]
        stderr.seek(0)
        detail = reply["error"] if reply else stderr.read()[-4000:] or f"no reply within {timeout} s"
        raise RuntimeError(f"hf_oracle {mode} failed:\n{detail}")
    return reply["result"]


def build(spec: dict) -> dict:
    """spec: config (a transformers config class name), kwargs, dir; optional auto (the Auto class,
    AutoModelForCausalLM by default), seed, std (draw every parameter,
    norm scales and biases too, from N(0, std) instead of the structured init), max_shard_size,
    original_format (False: save_original_format=False, e.g. Mixtral's fused experts), tokens (.npy in) and
    logits (.npy out)."""
    import numpy as np
    import torch
    import transformers
    config = getattr(transformers, spec["config"])(**spec["kwargs"])
    torch.manual_seed(spec.get("seed", 0))
    auto = getattr(transformers, spec.get("auto", "AutoModelForCausalLM"))
    model = auto.from_config(config, attn_implementation="eager").float().eval()
    if spec.get("std"):
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, spec["std"])
    save = {"max_shard_size": spec["max_shard_size"]} if spec.get("max_shard_size") else {}
    if not spec.get("original_format", True):
        save["save_original_format"] = False
    model.save_pretrained(spec["dir"], **save)
    if spec.get("tokens"):
        with torch.no_grad():
            out = model(torch.from_numpy(np.load(spec["tokens"])))
            logits = out.prediction_logits if hasattr(out, "prediction_logits") else out.logits  # BertForPreTraining
        np.save(spec["logits"], logits.numpy())
    return {"class": type(model).__name__, "files": sorted(os.listdir(spec["dir"]))}


def _model_class(directory: str):
    """The class config.json names (its `architectures`), as from_pretrained users pick it."""
    import transformers
    return getattr(transformers, transformers.AutoConfig.from_pretrained(directory).architectures[0])


def load(directory: str, original: str | None = None) -> dict:
    import torch
    model, info = _model_class(directory).from_pretrained(directory, output_loading_info=True)
    params = model.state_dict()
    out = {"class": type(model).__name__, "dtypes": sorted({str(t.dtype) for t in params.values()}),
           "loading": {k: sorted(map(str, v)) for k, v in info.items() if v}}
    if original:
        ref_model = _model_class(original).from_pretrained(original)
        reference = ref_model.state_dict()
        out["original_class"] = type(ref_model).__name__
        out["only_original"] = sorted(set(reference) - set(params))
        out["only_loaded"] = sorted(set(params) - set(reference))
        out["different"] = sorted(name for name, t in reference.items() if name in params
                                  and not (t.dtype == params[name].dtype and torch.equal(t, params[name])))
        out["compared"] = len(set(reference) & set(params))
    return out


def generate(directory: str, prompts_json: str, new_tokens: str) -> dict:
    """transformers' greedy `generate` (its own KV cache) for each prompt of a JSON list of id lists, alone."""
    import torch
    model = _model_class(directory).from_pretrained(directory, attn_implementation="eager").float().eval()
    out = []
    with torch.inference_mode():
        for prompt in json.loads(prompts_json):
            ids = torch.tensor([prompt], dtype=torch.long)
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=int(new_tokens),
                                 min_new_tokens=int(new_tokens), do_sample=False, pad_token_id=0)
            out.append(gen[0, ids.shape[1]:].tolist())
    return {"tokens": out}


def chat(spec: dict) -> dict:
    """transformers' apply_chat_template on spec["messages"] with spec["template"] and spec["special"]
    (bos_token, eos_token, ...): the rendering without and with the generation prompt and, with
    return_assistant_tokens_mask, the assistant mask per character (a tokenizer with one token per character,
    besides the special tokens, whose mask entry covers their characters). An error the template raises comes back as {"error": message}."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    messages, special = spec["messages"], spec.get("special", {})
    text = json.dumps(messages, ensure_ascii=False) + "".join(special.values()) + spec["template"]
    vocab = {c: i for i, c in enumerate(sorted(set(text) | {"<unk>"}))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", **special)
    try:
        rendered = tok.apply_chat_template(messages, chat_template=spec["template"], tokenize=False)
        prompt = tok.apply_chat_template(messages, chat_template=spec["template"], tokenize=False,
                                         add_generation_prompt=True)
        out = {"text": rendered, "prompt": prompt}
        if spec.get("mask"):
            enc = tok.apply_chat_template(messages, chat_template=spec["template"], tokenize=True, return_dict=True,
                                          return_assistant_tokens_mask=True)
            pieces = tok.convert_ids_to_tokens(enc["input_ids"])  # characters, or a whole special token
            assert "".join(pieces) == rendered, "the tokens do not spell the rendering"
            out["mask"] = [int(m) for m, p in zip(enc["assistant_masks"], pieces) for _ in p]
        return out
    except Exception as e:  # noqa: BLE001 - the template's raise_exception surfaces as jinja's TemplateError
        return {"error": str(e)}


def peft_logits(spec: dict) -> dict:
    """spec: base (a transformers model directory), adapter (a PEFT directory), tokens (.npy in), logits
    (.npy out): the logits of PeftModel.from_pretrained(base model, adapter)."""
    import numpy as np
    import torch
    import transformers
    from peft import PeftModel
    model = transformers.AutoModelForCausalLM.from_pretrained(spec["base"], attn_implementation="eager").float()
    model = PeftModel.from_pretrained(model, spec["adapter"]).eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(np.load(spec["tokens"])).long()).logits
    np.save(spec["logits"], logits.numpy())
    return {"class": type(model.base_model.model).__name__,
            "lora_modules": sum(1 for n, _ in model.named_modules() if n.endswith("lora_A.default"))}


def handle(argv: list[str]):
    if argv[0] == "build":
        return build(json.loads(argv[1]))
    if argv[0] == "load":
        return load(*argv[1:3])
    if argv[0] == "generate":
        return generate(*argv[1:4])
    if argv[0] == "peft":
        return peft_logits(json.loads(argv[1]))
    if argv[0] == "chat":
        return [chat(spec) for spec in json.loads(Path(argv[1]).read_text())]
    raise ValueError(f"unknown mode {argv[0]!r}: build | load | generate | chat | peft")


def serve() -> int:
    """Requests (a JSON list: mode, then its arguments) on stdin, one JSON reply line each on stdout; whatever
    the modes print goes to stderr, so the replies stay parseable."""
    import contextlib
    import traceback
    out = sys.stdout
    for line in sys.stdin:
        try:
            with contextlib.redirect_stdout(sys.stderr):
                reply = {"result": handle(json.loads(line))}
        except Exception:  # reported to the test that asked; the oracle keeps serving
            reply = {"error": traceback.format_exc()[-4000:]}
        out.write(json.dumps(reply) + "\n")
        out.flush()
    return 0


def main(argv: list[str]) -> int:
    import torch
    torch.set_num_threads(1)  # tiny models; the test machines' cores are shared with the JAX side
    if argv[0] == "serve":
        return serve()
    print(json.dumps(handle(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
