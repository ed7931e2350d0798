"""How often a sampling preset answers simple questions right, against greedy decoding on the same model.

A newcomer's first chat judges the project: a 135M model that says Paris at temperature 0 should not ramble at the
preset the page opens on. `answer_rate(handle, params, seeds)` asks every question of `QUESTIONS` (chat template,
no system prompt) and counts the answers that contain the expected word; `python -m backend first-answers` prints
greedy's rate beside each preset's over five seeds (`--presets`, `--seeds`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

# (question, accepted words): short factual questions a 135M instruct model answers greedily more often than not.
QUESTIONS: list[tuple[str, tuple[str, ...]]] = [
    ("What is the capital of France?", ("Paris",)),
    ("What is the capital of Japan?", ("Tokyo",)),
    ("What is the capital of Italy?", ("Rome",)),
    ("What is the capital of Germany?", ("Berlin",)),
    ("What is the capital of Spain?", ("Madrid",)),
    ("What is the capital of England?", ("London",)),
    ("What is the capital of Russia?", ("Moscow",)),
    ("What is the capital of Egypt?", ("Cairo",)),
    ("What color is the sky on a clear day?", ("blue",)),
    ("What color is grass?", ("green",)),
    ("What color is snow?", ("white",)),
    ("What color are bananas when they are ripe?", ("yellow",)),
    ("How many legs does a spider have?", ("eight", "8")),
    ("How many days are there in a week?", ("seven", "7")),
    ("How many continents are there on Earth?", ("seven", "7")),
    ("What is 2 + 2?", ("four", "4")),
    ("What is 10 times 10?", ("hundred", "100")),
    ("Which planet do we live on?", ("Earth",)),
    ("Which animal is known as the king of the jungle?", ("lion",)),
    ("What is the largest ocean on Earth?", ("Pacific",)),
    ("What gas do plants absorb from the air?", ("carbon dioxide", "CO2")),
    ("What is frozen water called?", ("ice",)),
    ("Who wrote Romeo and Juliet?", ("Shakespeare",)),
    ("What is the opposite of hot?", ("cold",)),
]

GREEDY = dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0,
              frequency_penalty=0.0)
MAX_NEW_TOKENS = 40   # room for "The capital of France is Paris." and a little preamble


def is_right(text: str, accepted: tuple[str, ...]) -> bool:
    """The answer names one of the accepted words (whole word, any case)."""
    return any(re.search(rf"\b{re.escape(w)}\b", text, re.IGNORECASE) for w in accepted)


@dataclass
class Rate:
    right: int
    asked: int

    @property
    def rate(self) -> float:
        return self.right / self.asked if self.asked else 0.0


def answer_rate(handle, params: dict, seeds: list[int | None], questions=QUESTIONS, runner: str | None = None,
                progress=None) -> Rate:
    """Ask each question once per seed (all seeds of a question as one batch: `num_samples`, then the seeds are
    the sampler's, drawn from the first one) and count the right answers."""
    right = asked = 0
    for i, (question, accepted) in enumerate(questions):
        messages = [{"role": "user", "content": question}]
        result = handle.generate(messages, backend=runner, max_new_tokens=MAX_NEW_TOKENS, seed=seeds[0],
                                 num_samples=len(seeds), **params)
        right += sum(is_right(t, accepted) for t in result.texts)
        asked += len(seeds)
        if progress is not None:
            progress(i + 1, len(questions))
    return Rate(right, asked)


def compare(handle, presets: dict[str, dict], seeds: int = 10, runner: str | None = None, progress=None
            ) -> dict[str, Rate]:
    """Greedy's rate (one answer per question) and each preset's over `seeds` samples per question, drawn in
    batches of five (seeds 1, 11, 21, ...: one batch's samples share its seed's generator)."""
    rates = {"greedy": answer_rate(handle, GREEDY, [0], runner=runner, progress=progress)}
    for name, params in presets.items():
        right = asked = 0
        for start in range(0, seeds, 5):
            batch = list(range(2 * start + 1, 2 * start + 1 + min(5, seeds - start)))
            r = answer_rate(handle, params, batch, runner=runner, progress=progress)
            right, asked = right + r.right, asked + r.asked
        rates[name] = Rate(right, asked)
    return rates
