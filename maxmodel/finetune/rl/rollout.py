"""Rollouts: the Preparer of the RL objectives. Before every step it pushes the policy's current weights into
the generation engine (same mesh, same shardings: `set_params`, nothing recompiles), samples G completions
of each of the step's prompts, scores them, and lays them out as the step's batch: one row per completion,
prompt + completion padded to train.seq_len, the loss on the completion tokens, beside them the sampler's
log-probs (`old_logps`), the reference model's (`ref_logps`) and each token's advantage.

The log-probs are the raw model distribution's (temperature 1, no top-k / top-p), which is what the trainer
recomputes: the importance ratio of the first update is exactly 1 up to float rounding (tests check the two
agree). Every request's seed is derived from (train.seed, step, its place in the step), so a resumed run
samples the same completions.
"""
from __future__ import annotations

import time

import numpy as np

from maxmodel.config.errors import ConfigError
from maxmodel.finetune.reference import Reference
from maxmodel.inference.engine import Engine, EngineOptions
from maxmodel.inference.generator import Generator
from maxmodel.inference.sampling import SamplingOptions
from maxmodel.parallel.rules import mesh_rules
from maxmodel.train.step import global_batch

from .rewards import combine, group_advantages, load_rewards, reward_model_scorer, score


def request_seed(seed: int, step: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, step, index]).generate_state(1)[0])


class PolicySampler:
    """The policy's completions of a step's prompts, as the step's rows (shared by GRPO, PPO and GKD)."""

    def __init__(self, cfg, ts, mesh, data):
        rl, t = cfg.rl, cfg.train
        if t.batch_size % rl.group_size:
            raise ConfigError("train.batch_size", f"{t.batch_size} completions are not whole groups of "
                                                  f"rl.group_size={rl.group_size}")
        self.cfg, self.ts, self.mesh = cfg, ts, mesh
        self.records, self.tokenizer = data.records, data.tokenizer
        self.process_index, self.process_count = data.process_index, data.process_count
        self.generator: Generator | None = None
        self.metrics: dict = {}

    def _generator(self, params) -> Generator:
        if self.generator is None:
            cfg = self.cfg
            engine = Engine(cfg, self.ts.graphdef, params, self.mesh, mesh_rules(cfg.mesh, self.mesh),
                            EngineOptions(max_slots=cfg.train.batch_size, max_len=cfg.train.seq_len + 1))
            self.generator = Generator(engine, self.tokenizer)
        else:
            self.generator.set_params(params)
        return self.generator

    def _encode(self, gen: Generator, record: dict, index: int) -> list[int]:
        p = record["prompt"]
        ids = gen.encode_prompt(p) if isinstance(p, str) else gen.encode_chat(p)
        room = self.cfg.train.seq_len + 1 - self.cfg.rl.max_new_tokens
        if len(ids) > room:
            raise ConfigError("data.path", f"prompt record {index} has {len(ids)} tokens; with rl.max_new_tokens="
                                           f"{self.cfg.rl.max_new_tokens} it must have at most {room} "
                                           f"(raise train.seq_len)")
        return ids

    def generate(self, step: int, params, records: list[dict], indices) -> tuple[list, list]:
        """(prompt ids per prompt, [G completions (CompletionOutput)] per prompt)."""
        rl = self.cfg.rl
        gen = self._generator(params)
        prompts = [self._encode(gen, r, int(i)) for r, i in zip(records, indices)]
        options = [SamplingOptions(max_new_tokens=rl.max_new_tokens, temperature=rl.temperature, top_p=rl.top_p,
                                   top_k=rl.top_k, stop=list(rl.stop), n=rl.group_size,
                                   seed=request_seed(self.cfg.train.seed, step, j)).validate(gen.vocab_size)
                   for j in range(len(records))]
        outs = gen.generate(prompts, options)
        return prompts, [o.completions for o in outs]

    def rows(self, prompts: list, completions: list, advantages=None) -> dict[str, np.ndarray]:
        """The global batch as numpy rows: one per completion (prompt-major, samples in order)."""
        n, length = sum(len(g) for g in completions), self.cfg.train.seq_len
        pad = self.tokenizer.pad_id
        out = {k: np.zeros((n, length), np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
        out["inputs"][:], out["targets"][:] = pad, pad
        for k in ("loss_mask", "old_logps", "advantages"):
            out[k] = np.zeros((n, length), np.float32)
        row = 0
        for ids, group in zip(prompts, completions):
            for c in group:
                tokens = np.asarray(ids + c.token_ids, np.int32)
                m, p = len(tokens) - 1, len(ids)
                out["inputs"][row, :m], out["targets"][row, :m] = tokens[:-1], tokens[1:]
                out["segment_ids"][row, :m] = 1
                out["positions"][row, :m] = np.arange(m)
                out["loss_mask"][row, p - 1:m] = 1.0     # targets p-1 .. m-1 are the completion's tokens
                out["old_logps"][row, p - 1:m] = c.logprobs
                out["advantages"][row, p - 1:m] = 0.0 if advantages is None else advantages[row]
                row += 1
        return out

    def sample(self, step, params, local) -> tuple[list, list, list[dict]]:
        """(prompt ids, completions, records) of the step's prompts; timing and lengths into self.metrics."""
        if step is None:
            raise ValueError("RL runs have no held-out rows to evaluate")
        indices = local["index"]
        records = [self.records[int(i)] for i in indices]
        t0 = time.perf_counter()
        prompts, completions = self.generate(step, params, records, indices)
        seconds = time.perf_counter() - t0
        lengths = np.array([len(c.token_ids) for group in completions for c in group])
        truncated = np.mean([c.finish_reason == "length" for group in completions for c in group])
        self.metrics = {"completion_length": float(lengths.mean()), "completion_length_max": int(lengths.max()),
                        "truncated": float(truncated), "rollout_seconds": seconds,
                        "rollout_tokens_per_sec": float(lengths.sum() / seconds)}
        return prompts, completions, records

    def global_rows(self, rows: dict):
        """This process's share of the global rows, assembled into the step's sharded batch."""
        return global_batch({k: v[self.process_index::self.process_count] for k, v in rows.items()}, self.mesh)


class Rollouts(PolicySampler):
    """GRPO's Preparer: sampled completions, their rewards and group advantages, the reference log-probs."""

    def __init__(self, cfg, ts, mesh, data):
        super().__init__(cfg, ts, mesh, data)
        rl = cfg.rl
        self.rewards = load_rewards(rl.rewards)
        if not self.rewards and not rl.reward_model:
            raise ConfigError("rl.rewards", "give reward functions (dotted paths) or rl.reward_model")
        self.reward_model = None
        if rl.reward_model:
            self.reward_model = reward_model_scorer(rl.reward_model, "rl.reward_model")
        self.reference = Reference(cfg, ts, mesh) if rl.beta > 0 else None

    def rewards_of(self, records: list[dict], completions: list) -> tuple[np.ndarray, dict]:
        g = self.cfg.rl.group_size
        prompts = [r["prompt"] for r in records for _ in range(g)]
        texts = [c.text for group in completions for c in group]
        columns = {k: [r.get(k) for r in records for _ in range(g)]
                   for k in sorted({k for r in records for k in r} - {"prompt"})}
        per_fn, failures = score(self.rewards, prompts, texts, columns, self.cfg.data.on_bad_record == "skip")
        extra = self.reward_model(prompts, texts) if self.reward_model is not None else None
        total = combine(self.rewards, per_fn, extra)
        stats = {}
        for name, v in per_fn.items():
            short = f"reward/{name.replace(':', '.').rsplit('.', 1)[-1]}"
            stats[short], stats[f"{short}_std"] = float(np.nanmean(v)), float(np.nanstd(v))
        if extra is not None:
            stats["reward/model"] = float(np.mean(extra))
        stats.update(reward=float(np.nanmean(total)), reward_std=float(np.nanstd(total)),
                     reward_failures=failures)
        return total, stats

    def __call__(self, step, params, local):
        t0 = time.perf_counter()
        prompts, completions, records = self.sample(step, params, local)
        rewards, stats = self.rewards_of(records, completions)
        advantages, group_stats = group_advantages(rewards, self.cfg.rl.group_size, self.cfg.rl.scale_rewards)
        self.metrics.update(stats, **group_stats)
        self.last_rollout = (prompts, completions, rewards, advantages)
        batch = self.global_rows(self.rows(prompts, completions, advantages))
        ref = self.reference(params, batch) if self.reference is not None else batch["old_logps"] * 0
        ref.block_until_ready()
        self.metrics["prepare_seconds"] = time.perf_counter() - t0  # rollout + rewards + reference: not training
        return {**batch, "ref_logps": ref}
