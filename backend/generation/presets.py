"""Sampler presets, and the one a model opens on.

A 135M model at temperature 0.7 rambles where a 7B one answers: small models open on "Small model" (low
temperature, a min-p floor that drops the long tail), which answers the simple-question set of
`backend/bench/first_answers.py` at least as often as greedy does (`python -m backend first-answers`; docs/first-answers.md
has the measured rates). A model whose own `generation_config.json` sets sampling values opens on those instead.
"""
from __future__ import annotations

FIELDS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")

PRESETS: dict[str, dict[str, float]] = {
    "Small model": dict(temperature=0.2, top_k=0, top_p=0.9, min_p=0.1, repetition_penalty=1.0, presence_penalty=0.0,
                        frequency_penalty=0.0),
    "Precise": dict(temperature=0.2, top_k=40, top_p=0.9, min_p=0.0, repetition_penalty=1.05, presence_penalty=0.0,
                    frequency_penalty=0.0),
    "Balanced": dict(temperature=0.7, top_k=0, top_p=0.95, min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0,
                     frequency_penalty=0.0),
    "Creative": dict(temperature=1.1, top_k=0, top_p=0.98, min_p=0.05, repetition_penalty=1.0, presence_penalty=0.3,
                     frequency_penalty=0.2),
}
MODEL_PRESET = "Model's own"       # the sampling values of the model's generation_config.json
SMALL_MODEL_PARAMS = 1_000_000_000  # below this, a model opens on "Small model"
TINY_MODEL_PARAMS = 500_000_000     # below this, the chat box says to expect short, simple answers


def from_generation_config(gen: dict | None) -> dict[str, float] | None:
    """The preset a model's generation_config.json asks for (do_sample false: greedy), or None if it sets none."""
    if not isinstance(gen, dict):
        return None
    if gen.get("do_sample") is False:
        return dict(PRESETS["Balanced"], temperature=0.0, top_p=1.0, top_k=0)
    keys = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")
    given = {k: gen[k] for k in keys if isinstance(gen.get(k), (int, float)) and not isinstance(gen.get(k), bool)}
    if "temperature" not in given and "top_p" not in given:
        return None
    return {**PRESETS["Balanced"], **{k: float(v) if k != "top_k" else int(v) for k, v in given.items()}}


def opening_preset(info: dict | None) -> tuple[str, dict[str, float]]:
    """(name, values) the parameters panel opens on for the loaded model (`ModelHandle.info()`)."""
    own = from_generation_config((info or {}).get("generation_config"))
    if own is not None:
        return MODEL_PRESET, own
    params = (info or {}).get("parameters") or 0
    name = "Small model" if 0 < params < SMALL_MODEL_PARAMS else "Balanced"
    return name, PRESETS[name]


def size_hint(info: dict | None) -> str:
    """One line under the chat box for a tiny model; empty otherwise."""
    params = (info or {}).get("parameters") or 0
    if not 0 < params < TINY_MODEL_PARAMS:
        return ""
    return f"A {params / 1e6:,.0f}M-parameter model: expect short, simple answers."
