"""A trained reward model as a scorer: a model directory (`maxmodel export` of a train.objective=reward run) or
a run directory, loaded like the generation engine loads models (inference/load.py), scoring documents the
way training read them: BOS + prompt + response, the score at the last position.

`RewardScorer(model_dir)(prompt_ids, completion)` is the best-of-N scorer the batcher takes
(`Generator.submit(..., scorer=...)`): the generator's prompt ids and a CompletionOutput, in the shared
tokenizer's ids (a trailing stop token is dropped: training scored the response before its EOS).
`score_texts(prompts, responses)` tokenizes text with the reward model's own tokenizer instead. Rows are padded
to a power-of-two length, so a few compiled shapes serve every request.
"""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from maxmodel.config import ConfigError
from maxmodel.models.score_head import document_scores, token_scores


class RewardScorer:
    def __init__(self, model_path, overrides=(), batch_size: int = 8):
        from maxmodel.inference.load import _restore, model_config, model_tokenizer
        from maxmodel.parallel.mesh import build_mesh
        from maxmodel.parallel.rules import mesh_rules
        from maxmodel.train.step import abstract_state, concrete_shardings
        path = Path(model_path)
        cfg = model_config(path, overrides)
        if not cfg.model.score_head:
            raise ConfigError("MODEL", f"{path} has no scalar head (model.score_head): train it with "
                                       f"train.objective=reward")
        self.cfg, self.batch_size = cfg, batch_size
        self.tokenizer = model_tokenizer(path, cfg)
        devices = jax.devices()
        if devices[0].platform == "cpu" and jax.process_count() == 1:
            devices = devices[:cfg.run.cpu_devices]
        self.mesh = build_mesh(cfg.mesh, devices[:1])  # rows of one request at a time: one device suffices
        self.rules = mesh_rules(cfg.mesh, self.mesh)
        with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
            graphdef, abstract = abstract_state(cfg)
            params = _restore(path, cfg, abstract, concrete_shardings(abstract, self.mesh))

        def scores(params, inputs, segment_ids, positions):
            model = nnx.merge(graphdef, params)
            batch = {"inputs": inputs, "segment_ids": segment_ids, "positions": positions}
            return document_scores(token_scores(model, batch), segment_ids, positions, 1)[:, 0]
        self.params, self._scores = params, jax.jit(scores)

    def score_ids(self, documents: list[list[int]]) -> np.ndarray:
        """Scores of token-id documents (each BOS + prompt + response, no EOS)."""
        out = []
        for start in range(0, len(documents), self.batch_size):
            chunk = documents[start:start + self.batch_size]
            longest = max(len(d) for d in chunk)
            if longest > self.cfg.model.max_seq_len:
                raise ValueError(f"a document of {longest} tokens exceeds model.max_seq_len="
                                 f"{self.cfg.model.max_seq_len}")
            length = min(1 << max(longest - 1, 1).bit_length(), self.cfg.model.max_seq_len)
            rows = np.full((self.batch_size, length), self.tokenizer.pad_id, np.int32)
            seg = np.zeros_like(rows)
            for i, d in enumerate(chunk):
                rows[i, :len(d)], seg[i, :len(d)] = d, 1
            pos = np.broadcast_to(np.arange(length, dtype=np.int32), rows.shape)
            with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
                s = self._scores(self.params, jnp.asarray(rows), jnp.asarray(seg), jnp.asarray(pos))
            out.extend(np.asarray(s)[:len(chunk)].tolist())
        return np.asarray(out, np.float32)

    def score_texts(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        """Scores of (prompt, response) texts, encoded as preference training encodes them."""
        from maxmodel.data.supervised import encode_document
        docs = [encode_document({"prompt": p, "completion": r}, "prompt_completion", self.tokenizer)[0][:-1].tolist()
                for p, r in zip(prompts, responses)]
        return self.score_ids(docs)

    def score_records(self, docs: list[dict]) -> list[np.ndarray]:
        """Scores of every response of normalised preference records (data/preference.py's take_record)."""
        from maxmodel.data.preference import encode_response
        flat = [encode_response(d, r, self.tokenizer, self.cfg.data.chat_template)[0][:-1].tolist()
                for d in docs for r in d["responses"]]
        scores, out, at = self.score_ids(flat), [], 0
        for d in docs:
            out.append(scores[at:at + len(d["responses"])])
            at += len(d["responses"])
        return out

    def report(self, path) -> dict:
        """Held-out figures of a preference JSONL file: the accuracy on pairs and ranked lists (the share of
        (better, worse) pairs scored in order) and the Pearson correlation of scores with scored responses."""
        from maxmodel.data.sources import BadRecords, read_documents
        docs = [d for d, _ in read_documents("jsonl", str(path), "preference", "text", BadRecords())]
        scores = self.score_records(docs)
        ordered = [float(s[i] > s[j]) for d, s in zip(docs, scores) if d["kind"] in ("pair", "ranked")
                   for i in range(len(s)) for j in range(i + 1, len(s))]
        scored = [(float(s[0]), d["value"]) for d, s in zip(docs, scores) if d["kind"] == "scored"]
        out = {"ordered_pairs": len(ordered), "accuracy": float(np.mean(ordered)) if ordered else None,
               "scored": len(scored), "pearson": None}
        if len(scored) > 1:
            out["pearson"] = float(np.corrcoef(np.asarray(scored).T)[0, 1])
        return out

    def __call__(self, prompt_ids, completion) -> float:
        ids = list(completion.token_ids)
        if ids and ids[-1] == self.tokenizer.eos_id:
            ids = ids[:-1]
        return float(self.score_ids([list(prompt_ids) + ids])[0])
