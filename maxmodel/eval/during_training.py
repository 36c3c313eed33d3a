"""`run.eval_tasks` during training: every `run.eval_every` steps the trainer's live parameters (its mesh,
shardings and tokenizer; nothing is saved or reloaded) are scored on the tasks, and their metrics join the
step's record in metrics.jsonl and TensorBoard as `eval/<task>/<metric>`. A task that fails (an unknown
name, a bad file, a generative task: training has no decode engine) is logged and listed under
`eval_failed`; the run goes on.
"""
from __future__ import annotations

import logging

from .model import EvalModel
from .runner import TaskPlan, evaluate, flat_metrics
from .scoring import PackedScorer

log = logging.getLogger("maxmodel.eval")


def task_names(tasks) -> list[str]:
    return [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]


class TrainingEvaluator:
    def __init__(self, cfg, graphdef, mesh, rules, tokenizer):
        self.cfg, self.names = cfg, task_names(cfg.run.eval_tasks)
        self.include_path = cfg.run.eval_include_path or None
        # rows of the trained length, as many per pass as a training batch: one compiled program
        self.scorer = PackedScorer(cfg, graphdef, None, mesh, rules, max_len=cfg.train.seq_len,
                                   rows=cfg.train.batch_size, row_len=cfg.train.seq_len)
        self.tokenizer = tokenizer
        self.plans: dict[str, TaskPlan | Exception] = {}  # one per task: an unknown name fails alone

    def _plan(self, name: str) -> TaskPlan:
        """The task's plan, made once; a name that cannot be resolved fails the same way at every
        evaluation without searching lm-eval's catalogue again (tens of seconds)."""
        if name not in self.plans:
            try:
                self.plans[name] = TaskPlan([name], self.include_path)
            except Exception as e:  # noqa: BLE001 - kept and raised again below
                self.plans[name] = e
        plan = self.plans[name]
        if isinstance(plan, Exception):
            raise plan
        return plan

    def __call__(self, params, step: int) -> dict:
        """The step's record entries: eval/<task>/<metric> values, and eval_failed {task: why} if any."""
        self.scorer.set_params(params)
        model = EvalModel(self.scorer, self.tokenizer, None, self.cfg.run.name)
        record, failed = {}, {}
        for name in self.names:
            try:
                if self.cfg.model.arch != "decoder":
                    raise ValueError(f"evaluation tasks score a causal decoder; this run's model.arch is "
                                     f"{self.cfg.model.arch}")
                if self.tokenizer is None:
                    raise ValueError("this run has no tokenizer (data.source=synthetic): text tasks cannot run")
                results = evaluate(model, self._plan(name), limit=self.cfg.run.eval_limit or None)
                failed.update(results["maxmodel"]["failed"])
                record.update({f"eval/{k}": v for k, v in flat_metrics(results).items()})
            except Exception as e:  # noqa: BLE001 - an evaluation problem must not end the training run
                failed[name] = f"{type(e).__name__}: {e}"
        for name, why in failed.items():
            log.warning("step %d: evaluation task %s failed: %s", step, name, why)
        return record | ({"eval_failed": failed} if failed else {})
