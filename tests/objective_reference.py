"""Losses of short runs, one per objective, recorded as exact floats (hex) before the objectives moved onto
`maxmodel.finetune.objectives`; tests/test_objectives.py checks that today's code reproduces them bit for bit.

Record (only ever from the code the references describe):  python tests/objective_reference.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

REFERENCE = Path(__file__).parent / "data" / "objective_losses.json"
TINY = ["model.d_model=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2", "model.d_ff=128",
        "model.vocab_size=512", "train.seq_len=32", "train.batch_size=8", "optimizer.warmup_steps=2",
        "run.progress=false", "run.sample_tokens=0"]
SHORT = ["train.steps=3", "run.log_every=1", "run.eval_every=1000", "checkpoint.enabled=false", "run.eval_batches=1"]
CASES = {
    # the default run (`maxmodel train`: tiny model, built-in corpus, 8 emulated devices), first steps
    "default": SHORT,
    "causal_lm_zloss_chunked": TINY + SHORT + ["data.source=synthetic", "train.z_loss=1e-4", "train.loss_chunk=8"],
    "moe": TINY + SHORT + ["model.name=moe-tiny", "data.source=synthetic", "model.vocab_size=512"],
    "masked_lm": SHORT + ["model.name=bert-tiny", "train.seq_len=32", "train.batch_size=8", "run.progress=false",
                          "data.tokenizer=bytes", "model.vocab_size=512"],
    "prefix_lm": TINY + SHORT + ["train.objective=prefix_lm", "data.tokenizer=bytes"],
    "seq2seq": SHORT + ["model.name=transformer-tiny", "train.objective=seq2seq", "data.source=synthetic",
                        "train.seq_len=32", "train.batch_size=8", "run.progress=false"],
}


def run(name: str, output_dir: str) -> dict:
    from maxmodel.config import load_config
    from maxmodel.train.loop import train
    cfg = load_config(overrides=CASES[name] + [f"run.output_dir={output_dir}", f"run.name={name}"])
    result = train(cfg)
    return {"losses": {str(k): float(v).hex() for k, v in sorted(result.losses.items())},
            "eval_loss": None if result.eval_loss is None else float(result.eval_loss).hex()}  # None: no held-out batch


if __name__ == "__main__":
    import tempfile

    from maxmodel import distributed
    distributed.initialize(cpu_devices=8)
    with tempfile.TemporaryDirectory() as tmp:
        out = {name: run(name, tmp) for name in (sys.argv[1:] or CASES)}
    REFERENCE.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))
