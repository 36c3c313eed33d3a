"""Peer (b) of vs_peers.sh: Hugging Face LlamaForCausalLM of the bench-50m shape, float32 parameters,
torch.compile, torch.optim.AdamW, 2 CPU threads; `--dtype bfloat16` runs the forward (and so its backward)
under torch.autocast("cpu", torch.bfloat16): mixed precision, parameters and optimizer in float32. Prints
one JSON line: per-step times and the median tokens/s after the warm-up steps. Runs in its own venv
(torch + transformers), not the repository's."""
import argparse
import json
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=8)
parser.add_argument("--warmup", type=int, default=3)
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
args = parser.parse_args()

torch.set_num_threads(args.threads)
torch.manual_seed(0)
BATCH, SEQ = 8, 512
config = LlamaConfig(vocab_size=32768, hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                     num_attention_heads=8, num_key_value_heads=8, head_dim=64, max_position_embeddings=SEQ,
                     tie_word_embeddings=False, hidden_act="silu", torch_dtype=torch.float32)
model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", torch_dtype=torch.float32)
model.train()
compiled = torch.compile(model)
opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
tokens = torch.randint(0, config.vocab_size, (BATCH, SEQ))
autocast = torch.autocast("cpu", torch.bfloat16, enabled=args.dtype == "bfloat16")

times, losses = [], []
for i in range(args.warmup + args.steps):
    t0 = time.perf_counter()
    with autocast:
        loss = compiled(input_ids=tokens, labels=tokens).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    losses.append(float(loss))
    times.append(time.perf_counter() - t0)
timed = times[args.warmup:]
print(json.dumps({"peer": "hf_torch_compile", "dtype": args.dtype, "torch": torch.__version__, "step_times": timed,
                  "tokens_per_sec": BATCH * SEQ / statistics.median(timed), "first_step_seconds": times[0],
                  "final_loss": losses[-1]}))
