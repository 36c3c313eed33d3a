"""Runs a list of tasks on one model: lm-eval's through `simple_evaluate` with the `maxmodel` backend (one
call per task, so a failing task loses only itself), native ones directly. The result is lm-eval's own
structure (results, versions, n-shot, configs, higher_is_better, n-samples, samples with --log-samples)
with the native tasks' metrics beside lm-eval's in `results`, and `maxmodel.failed` naming each task that
failed and why. Task names are checked before anything runs: an unknown one is an error naming it.
"""
from __future__ import annotations

import difflib
import logging
import traceback

from maxmodel.config.errors import ConfigError

from .native import native_task, run_native

log = logging.getLogger("maxmodel.eval")
MERGED = ("results", "versions", "n-shot", "configs", "higher_is_better", "n-samples", "samples", "group_subtasks")


class TaskPlan:
    """The tasks of one evaluation: native specs, and lm-eval names with the TaskManager that knows them."""

    def __init__(self, names: list[str], include_path: str | None = None, lm_eval_catalog: bool = True):
        if not names:
            raise ConfigError("--tasks", "no tasks given")
        self.names, self.include_path = list(names), include_path
        self.native = {n: t for n in names if (t := native_task(n, include_path)) is not None}
        lm_names = [n for n in names if n not in self.native]
        self.task_manager = _task_manager(lm_names, include_path, lm_eval_catalog) if lm_names else None

    @property
    def lm_eval_names(self) -> list[str]:
        return [n for n in self.names if n not in self.native]


def _task_manager(names: list[str], include_path: str | None, catalog: bool):
    """A TaskManager that knows every name (the include path alone when it does: indexing lm-eval's own
    catalogue of some 15,000 tasks takes tens of seconds); an unknown name is a ConfigError naming it."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError("--tasks", f"{names[0]} is not a native task, and lm-eval tasks need the eval extra "
                                     f"(pip install 'maxmodel[eval]')") from None
    tm = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    known = set(tm.all_tasks) if tm else set()
    if catalog and not set(names) <= known:
        tm = TaskManager(include_path=include_path)
        known = set(tm.all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known) + ["perplexity", "choice:FILE", "completion:FILE"],
                                              n=3)
            where = f"in {include_path}" + (" or lm-eval's catalogue" if catalog else "") if include_path \
                else "in lm-eval's catalogue"
            raise ConfigError("--tasks", f"unknown task '{name}': not a native task and not found {where}"
                                         + (f" (closest: {', '.join(close)})" if close else ""))
    return tm


def evaluate(model, plan: TaskPlan, num_fewshot: int | None = None, limit: int | None = None,
             log_samples: bool = False, bootstrap_iters: int = 1000, seed: int = 1234) -> dict:
    """Every task of `plan` on `model` (an EvalModel); a task that raises is logged and named in
    maxmodel.failed (and in maxmodel.bad_input when its input was at fault), the others' results are kept."""
    out: dict = {"results": {}, "maxmodel": {"model": model.name, "failed": {}, "bad_input": [], "native": {}}}
    lm = None
    for name in plan.names:
        try:
            if name in plan.native:
                res = run_native(plan.native[name], model, int(limit or 0), num_fewshot, log_samples)
                if "samples" in res:
                    out.setdefault("samples", {})[name] = res.pop("samples")
                out["maxmodel"]["native"][name] = {"kind": plan.native[name].kind, "path": plan.native[name].path}
                out["results"][name] = res
                continue
            import lm_eval

            from .lm_backend import MaxModelLM
            lm = lm or MaxModelLM(model=model)
            res = lm_eval.simple_evaluate(model=lm, tasks=[name], num_fewshot=num_fewshot, limit=limit,
                                          log_samples=log_samples, bootstrap_iters=bootstrap_iters,
                                          task_manager=plan.task_manager, random_seed=seed, numpy_random_seed=seed,
                                          fewshot_random_seed=seed)
            _merge(out, res)
        except Exception as e:  # noqa: BLE001 - one task's failure must not lose the others' results
            log.error("task %s failed: %s", name, e)
            log.debug("%s", traceback.format_exc())
            out["maxmodel"]["failed"][name] = f"{type(e).__name__}: {e}"
            if isinstance(e, ConfigError):  # a bad task file or setting (the message names it), not a crash
                out["maxmodel"]["bad_input"].append(name)
    return out


def _merge(out: dict, res: dict | None) -> None:
    if not res:
        return
    for key in MERGED:
        if key in res:
            out.setdefault(key, {}).update(res[key])
    for key, value in res.items():  # config, git_hash, date, ...: the first task's
        if key not in MERGED:
            out.setdefault(key, value)


def flat_metrics(results: dict) -> dict[str, float]:
    """{"task/metric": value} of a results dict's numbers (lm-eval's "acc,none" becomes "acc"; standard
    errors and counts of records are left out): what training logs and reports plot."""
    flat = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            metric = key.split(",")[0]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or metric.endswith("_stderr") \
                    or metric in ("n", "alias"):
                continue
            flat[f"{task}/{metric}"] = float(value)
    return flat
