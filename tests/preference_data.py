"""A synthetic preference set with a learnable rule, for the preference tests and benchmarks/rl.py: the prompt
is random letters, the chosen response is random vowels, the rejected one random consonants (of the same
length). Held-out records are new random draws, so high held-out accuracy means the rule was learned."""
from __future__ import annotations

import json
import random
from pathlib import Path

VOWELS, CONSONANTS = "aeiou", "bcdfghklmnprstvz"


def _word(rng, letters, n):
    return "".join(rng.choice(letters) for _ in range(n))


def write(path: Path, n: int, seed: int, kind: str = "pair", length: int = 4) -> Path:
    """`n` records of one kind: pair | unpaired (KTO) | ranked (3 responses: vowels, mixed, consonants) |
    scored (score = the response's share of vowels)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            prompt = _word(rng, VOWELS + CONSONANTS, 3) + "="
            good, bad = _word(rng, VOWELS, length), _word(rng, CONSONANTS, length)
            if kind == "pair":
                rec = {"prompt": prompt, "chosen": good, "rejected": bad}
            elif kind == "unpaired":
                rec = {"prompt": prompt, "completion": good if i % 2 else bad, "label": bool(i % 2)}
            elif kind == "ranked":
                mixed = good[:length // 2] + bad[length // 2:]
                rec = {"prompt": prompt, "responses": [good, mixed, bad]}
            else:
                k = rng.randrange(length + 1)
                response = "".join(rng.sample(list(good[:k] + bad[k:]), length))
                rec = {"prompt": prompt, "response": response, "score": k / length}
            f.write(json.dumps(rec) + "\n")
    return path
