"""Tunix's LoRA SFT (google-tunix PeftTrainer, LoRA through qwix) on the ~50M LLaMA shape of
configs/experiments/bench-50m.yaml: float32, one CPU device, B 8 x L 512, AdamW, synthetic tokens, LoRA on
q k v o gate up down. Run with a venv that has google-tunix (its own: it pins its own jax / flax):

  /tmp/venvs/tunix/bin/python benchmarks/peers/tunix_lora.py --steps 8 --rank 16

Prints one JSON line: per-step wall times (the trainer's hook at each step's end, after the loss is on the
host), the median of the steps after the first two (compile and warm-up) and tokens/s."""
import argparse
import json
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import qwix  # noqa: E402
from flax import nnx  # noqa: E402
from importlib.metadata import version  # noqa: E402
from tunix.models.llama3 import model as llama3  # noqa: E402
from tunix.sft import hooks, peft_trainer  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--steps", type=int, default=8, help="training steps (the first two are not timed)")
parser.add_argument("--rank", type=int, default=16)
parser.add_argument("--batch", type=int, default=8)
parser.add_argument("--seq", type=int, default=512)
args = parser.parse_args()

config = llama3.ModelConfig(num_layers=4, vocab_size=32768, embed_dim=512, hidden_dim=2048, num_heads=8,
                            head_dim=64, num_kv_heads=8, rope_theta=500_000, norm_eps=1e-5, weight_tying=False)
base = llama3.Llama3(config, rngs=nnx.Rngs(0))
provider = qwix.LoraProvider(module_path=".*q_proj|.*k_proj|.*v_proj|.*o_proj|.*gate_proj|.*up_proj|.*down_proj",
                             rank=args.rank, alpha=2.0 * args.rank)
model = qwix.apply_lora_to_model(base, provider, rngs=nnx.Rngs(params=1), **base.get_model_input())


def model_input(x):
    n = x["input_tokens"].shape[1]
    causal = jnp.tril(jnp.ones((n, n), dtype=jnp.bool_))[None]
    return {"input_tokens": x["input_tokens"], "input_mask": x["input_mask"],
            "positions": jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), x["input_tokens"].shape),
            "attention_mask": jnp.broadcast_to(causal, (x["input_tokens"].shape[0], n, n))}


class StepTimes(hooks.TrainingHooks):
    def __init__(self):
        self.ends, self.losses = [], []

    def on_train_start(self, ctx):
        self.ends.append(time.perf_counter())

    def on_train_end(self, ctx):
        pass

    def on_train_step_start(self, ctx):
        pass

    def on_train_step_end(self, ctx, train_step, train_loss):
        self.losses.append(float(train_loss))  # waits for the step
        self.ends.append(time.perf_counter())

    def on_eval_step_start(self, ctx):
        pass

    def on_eval_step_end(self, ctx, eval_loss):
        pass


rng = np.random.default_rng(3)
data = [{"input_tokens": rng.integers(0, config.vocab_size, (args.batch, args.seq)).astype(np.int32),
         "input_mask": np.ones((args.batch, args.seq), np.int32)} for _ in range(args.steps)]
timer = StepTimes()
trainer = peft_trainer.PeftTrainer(model, optax.adamw(1e-4),
                                   peft_trainer.TrainingConfig(eval_every_n_steps=10 ** 6, max_steps=args.steps))
trainer = trainer.with_gen_model_input_fn(model_input)
trainer.training_hooks = timer
mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tp"))
with mesh:
    trainer.train(data, None)
steps = [b - a for a, b in zip(timer.ends, timer.ends[1:])]
timed = steps[2:]
median = statistics.median(timed)
lora = nnx.state(model, nnx.LoRAParam)
print(json.dumps({"peer": "tunix", "tunix": version("google-tunix"), "qwix": version("qwix"), "jax": jax.__version__,
                  "flax": version("flax"), "rank": args.rank, "steps": len(steps),
                  "trainable_params": int(sum(x.size for x in jax.tree.leaves(lora))),
                  "step_times_s": [round(s, 3) for s in steps], "step_time_s": median,
                  "tokens_per_s": args.batch * args.seq / median, "loss": timer.losses[-1]}))
