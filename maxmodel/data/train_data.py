"""What the trainer gets from a data pipeline (pipeline.py's grain pipeline, seqio_bridge.py's seqio task, the
RL prompt iterator): its tokenizer, the train iterator (whose state the checkpoints save) and the held-out rows."""
from __future__ import annotations

from dataclasses import dataclass, field

import grain
import numpy as np


@dataclass
class TrainData:
    tokenizer: object | None
    train: grain.DatasetIterator
    eval_source: object | None
    local_batch: int
    process_index: int
    process_count: int
    stats: dict = field(default_factory=dict)
    records: list | None = None   # data.format=prompt: the RL prompt records the iterator indexes

    def eval_batches(self, num_batches: int):
        """The first `num_batches` global batches of held-out rows, in order (this process's rows)."""
        if self.eval_source is None:
            return
        global_batch = self.local_batch * self.process_count
        num_batches = min(num_batches, len(self.eval_source) // global_batch)
        for b in range(num_batches):
            rows = [self.eval_source[b * global_batch + self.process_index + self.process_count * j]
                    for j in range(self.local_batch)]
            yield {k: np.stack([r[k] for r in rows]) for k in rows[0]}
