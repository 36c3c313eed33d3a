"""RLAIF: a judge model labels pairs of completions, writing preference JSONL for a reward model or DPO.

`maxmodel label-preferences JUDGE --input IN.jsonl --output OUT.jsonl [--template FILE] [--on-bad-record skip]
 [key=value ...]`

JUDGE is any maxmodel model or run directory (loaded with inference.load_engine). Each input record is
{"prompt", "responses": [x, y]}; the judge reads the template filled with the prompt and the two responses
and answers "A" or "B", greedily. It is asked twice, the responses swapped the second time, so its position
bias cancels: a pair is labelled only when both answers pick the same response; disagreements are counted
(`inconsistent`) and left out. An answer that does not parse is a bad record: an error naming the file and
line, or a counted skip with --on-bad-record skip. Output lines ({"prompt", "chosen", "rejected"}) are
written and flushed as they are decided, so a stopped run keeps what it labelled.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from maxmodel import jsonio
from maxmodel.data.sources import BadRecords, DataError, json_lines

TEMPLATE = ("Which response answers the prompt better?\nPrompt: {prompt}\nResponse A: {a}\nResponse B: {b}\n"
            "Answer with A or B.\nAnswer:")
ANSWER = re.compile(r"^\W*([AB])\b")


def parse_answer(text: str) -> str | None:
    """'A' or 'B' from the start of the judge's answer, else None."""
    m = ANSWER.match(text.strip())
    return m.group(1) if m else None


def _records(path: Path, bad: BadRecords):
    for rec, where in json_lines(path, bad):
        responses = rec.get("responses") if isinstance(rec, dict) else None
        if not (isinstance(rec, dict) and isinstance(rec.get("prompt"), str) and isinstance(responses, list)
                and len(responses) == 2 and all(isinstance(r, str) for r in responses)):
            bad(where, "expected {\"prompt\": str, \"responses\": [str, str]}", "not a pair to judge")
            continue
        yield where, rec["prompt"], responses


def label_pairs(judge, input_path, output_path, template: str = TEMPLATE, on_bad_record: str = "error",
                batch_size: int = 16, max_new_tokens: int = 4) -> dict:
    """Label every pair of `input_path` with `judge` (a Generator: `generate(prompts, options)`); returns the
    counts (labelled, inconsistent, skipped bad records)."""
    from maxmodel.inference.sampling import SamplingOptions
    bad = BadRecords(on_bad_record)
    options = SamplingOptions(max_new_tokens=max_new_tokens, temperature=0.0, seed=0)
    counts = {"labelled": 0, "inconsistent": 0}
    records = list(_records(Path(input_path), bad))
    with open(output_path, "w") as out:
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            asks = [template.format(prompt=p, a=x, b=y) for _, p, (x, y) in chunk] + \
                   [template.format(prompt=p, a=y, b=x) for _, p, (x, y) in chunk]
            texts = [o.completions[0].text for o in judge.generate(asks, options)]
            answers = [parse_answer(t) for t in texts]
            for i, (where, prompt, (x, y)) in enumerate(chunk):
                first, second = answers[i], answers[i + len(chunk)]
                if first is None or second is None:
                    said = texts[i] if first is None else texts[i + len(chunk)]
                    bad(where, f"the judge's answer {said!r} does not parse as A or B", "unparsable judge answer")
                    continue
                if (first == "A") != (second == "B"):  # it preferred a position, not a response
                    counts["inconsistent"] += 1
                    continue
                chosen, rejected = (x, y) if first == "A" else (y, x)
                out.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
                out.flush()
                counts["labelled"] += 1
    return counts | {"bad_records": bad.report()}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="maxmodel label-preferences", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("judge", help="the judge: a model directory or a run directory")
    parser.add_argument("--input", required=True, help='JSONL of {"prompt", "responses": [x, y]}')
    parser.add_argument("--output", required=True, help="preference JSONL to write")
    parser.add_argument("--template", default=None, help="a file with the judge prompt ({prompt}, {a}, {b})")
    parser.add_argument("--on-bad-record", choices=("error", "skip"), default="error")
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the judge's config")
    args = parser.parse_intermixed_args(argv)
    template = Path(args.template).read_text() if args.template else TEMPLATE
    for field in ("{prompt}", "{a}", "{b}"):
        if field not in template:
            raise DataError(f"{args.template}: the template has no {field}", "--template")
    from maxmodel.inference.load import load_engine
    judge = load_engine(args.judge, args.overrides)
    counts = label_pairs(judge, args.input, args.output, template, args.on_bad_record,
                         max_new_tokens=args.max_new_tokens)
    print(jsonio.dumps(counts))
    return 0
