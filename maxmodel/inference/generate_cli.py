"""`maxmodel generate MODEL [--prompt TEXT ... | --prompts FILE.jsonl] [sampling flags] [--json] [key=value ...]`

MODEL is a run directory (its latest checkpoint) or a model directory (`maxmodel export`, `maxmodel convert
from-hf`). Prompts are tokenized as the model's own tokenizer does. One prompt streams its tokens to the
terminal as they come; `--json` prints one object per prompt instead: {"prompt", "completions": [{"text",
"tokens", "logprobs", "finish_reason"}], "prompt_tokens", "ttft"}. Logprobs are the raw model's
(log_softmax of the logits, before temperature or filters). `--interactive` is a chat REPL using the model's
chat template. On a host without an accelerator one CPU device is used (`run.cpu_devices=N` for more).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from maxmodel.config import ConfigError


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Flags shared with `maxmodel serve`: how the model is loaded and the engine sized."""
    parser.add_argument("model", help="run directory or model directory")
    parser.add_argument("--max-batch", type=int, default=16, help="decode slots (concurrent sequences)")
    parser.add_argument("--max-len", type=int, default=0, help="longest prompt + completion (0 = model.max_seq_len)")
    parser.add_argument("--quantize", choices=("int8", "int4"), default=None, help="weight-only quantization")
    parser.add_argument("--kv-cache-dtype", choices=("float", "int8"), default="float")
    parser.add_argument("--draft", default=None, help="draft model directory for speculative decoding")
    parser.add_argument("--draft-tokens", type=int, default=4, help="tokens the drafter proposes per step")
    parser.add_argument("--draft-vocab", type=int, default=0,
                        help="> 0: the draft proposes over the first N token ids only (its head pruned: cheaper "
                             "proposals when the tokenizer has fewer pieces than the padded vocabulary)")
    parser.add_argument("--ngram", type=int, default=0, help="> 0: prompt-lookup drafting with n-grams of this size")
    parser.add_argument("--prefix-cache-gb", type=float, default=0.0, help="> 0: keep prompt-prefix KV blocks")
    parser.add_argument("overrides", nargs="*", help="key.sub=value config overrides")


def engine_kwargs(args) -> dict:
    kwargs = dict(max_slots=args.max_batch, max_len=args.max_len, kv_int8=args.kv_cache_dtype == "int8")
    if args.quantize:
        kwargs["quantize"] = args.quantize
    if args.draft or args.ngram:
        kwargs.update(draft=args.draft, draft_tokens=args.draft_tokens, ngram=args.ngram, draft_vocab=args.draft_vocab)
    if args.prefix_cache_gb:
        kwargs["prefix_cache_gb"] = args.prefix_cache_gb
    return kwargs


def open_model(args):
    """The Generator for the parsed flags (one CPU device unless run.cpu_devices is given)."""
    from .load import load_engine
    overrides = list(args.overrides)
    if not any(o.startswith("run.cpu_devices=") for o in overrides):
        overrides.append("run.cpu_devices=1")
    if not any(o.startswith("mesh.") for o in overrides):  # the training layout need not fit these devices
        overrides += ["mesh.data=-1", "mesh.fsdp=1", "mesh.tensor=1", "mesh.expert=1"]
    return load_engine(args.model, overrides, **engine_kwargs(args))


def read_prompts(path: str) -> list[str]:
    prompts = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError("--prompts", f"{path}:{i}: not JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise ConfigError("--prompts", f"{path}:{i}: expected an object with a string 'prompt'")
        prompts.append(record["prompt"])
    if not prompts:
        raise ConfigError("--prompts", f"{path} holds no prompts")
    return prompts


def sampling_options(args):
    from .sampling import SamplingOptions
    opts = SamplingOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                           presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                           seed=args.seed, stop=args.stop or [], n=args.n, best_of=args.best_of,
                           logprobs=args.logprobs, ignore_eos=args.ignore_eos)
    try:
        return opts.validate()
    except ValueError as e:
        key = str(e).split(":")[0].replace("_", "-")
        raise ConfigError(f"--{key}", str(e)) from None


def _record(prompt: str, out) -> dict:
    return {"prompt": prompt, "prompt_tokens": len(out.prompt_ids), "ttft": out.ttft,
            "completions": [{"text": c.text, "tokens": c.token_ids, "logprobs": c.logprobs,
                             "finish_reason": c.finish_reason} for c in out.completions]}


def _stream(gen, prompt_ids, opts) -> None:
    """Print the text of sample 0 as it comes."""
    def on_event(ev):
        if ev.kind == "token" and ev.index == 0 and ev.text:
            sys.stdout.write(ev.text)
            sys.stdout.flush()
    handle = gen.submit(prompt_ids, opts, on_event=on_event)
    gen.batcher.run_until_idle()
    out = handle.result()
    print()
    for c in out.completions[1:]:
        print(f"--- sample {c.index}\n{c.text}")
    return out


def interactive(gen, opts) -> None:
    messages = []
    print("chat with the model; an empty line or Ctrl-D ends", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        out = _stream(gen, gen.encode_chat(messages), opts)
        messages.append({"role": "assistant", "content": out.completions[0].text})


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="maxmodel generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(parser)
    parser.add_argument("--prompt", action="append", default=None, help="prompt text (repeatable)")
    parser.add_argument("--prompts", default=None, help="JSONL file, one {\"prompt\": ...} per line")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--presence-penalty", type=float, default=0.0)
    parser.add_argument("--frequency-penalty", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    parser.add_argument("--n", type=int, default=1, help="samples per prompt")
    parser.add_argument("--best-of", type=int, default=None, help="sample this many, keep the best n")
    parser.add_argument("--beam", type=int, default=0, help="> 0: beam search with this many beams")
    parser.add_argument("--length-penalty", type=float, default=1.0, help="beam score = logprob / len ** this")
    parser.add_argument("--logprobs", type=int, default=None, help="top-N alternatives per token (--json)")
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument("--json", action="store_true", help="one JSON object per prompt")
    parser.add_argument("--interactive", action="store_true", help="chat REPL with the model's chat template")
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except ValueError as e:  # a request the engine refuses (e.g. n beyond --max-batch): the field is named
        raise ConfigError(f"--{str(e).split(':')[0].replace('_', '-')}", str(e)) from None


def _run(args) -> int:
    if sum(x is not None and x is not False for x in (args.prompt, args.prompts, args.interactive or None)) != 1:
        raise ConfigError("--prompt", "give --prompt TEXT, --prompts FILE.jsonl or --interactive")
    prompts = read_prompts(args.prompts) if args.prompts else args.prompt
    opts = sampling_options(args)
    from maxmodel.logs import setup_logging
    setup_logging()
    gen = open_model(args)
    if args.interactive:
        interactive(gen, opts)
        return 0
    ids = [gen.encode_prompt(p) for p in prompts]
    for p, i in zip(prompts, ids):
        if len(i) >= gen.max_len:
            raise ConfigError("--prompt", f"{len(i)} prompt tokens leave no room within max_len {gen.max_len}: "
                                          f"{p[:40]!r}...")
    if args.beam:
        from .beam import beam_search
        for p, i in zip(prompts, ids):
            beams = beam_search(gen, i, args.beam, args.max_new_tokens, length_penalty=args.length_penalty)
            record = {"prompt": p, "beams": [{"text": gen.tokenizer.decode(t), "tokens": t, "score": s}
                                             for t, s in beams]}
            print(json.dumps(record) if args.json else f"{p}{record['beams'][0]['text']}")
        return 0
    if len(ids) == 1 and not args.json:
        sys.stdout.write(prompts[0])
        _stream(gen, ids[0], opts)
        return 0
    for p, out in zip(prompts, gen.batcher.generate(ids, opts)):
        print(json.dumps(_record(p, out)) if args.json else f"{p}{out.completions[0].text}")
    return 0
