"""The preset a model opens on: a small model's answers simple questions at least as often as greedy decoding
(the newcomer's first chat), and the rules that pick it."""
import pytest

import backend
from backend.bench import first_answers
from backend.generation import presets
from backend.loading import default_gguf_path


def test_an_answer_counts_when_it_names_an_accepted_word():
    assert first_answers.is_right("The capital of France is Paris.", ("Paris",))
    assert first_answers.is_right("a spider has 8 legs", ("eight", "8"))
    assert not first_answers.is_right("Parisian food is good", ("Paris",))  # a whole word, not a prefix
    assert not first_answers.is_right("It is Lyon.", ("Paris",))


def test_small_models_open_on_the_small_preset_and_large_ones_on_balanced():
    assert presets.opening_preset({"parameters": 135_000_000}) == ("Small model", presets.PRESETS["Small model"])
    assert presets.opening_preset({"parameters": 7_000_000_000}) == ("Balanced", presets.PRESETS["Balanced"])
    assert presets.size_hint({"parameters": 134_515_008}) == \
        "A 135M-parameter model: expect short, simple answers."
    assert presets.size_hint({"parameters": 7_000_000_000}) == ""


def test_a_models_own_generation_config_wins():
    name, values = presets.opening_preset({"parameters": 135_000_000,
                                           "generation_config": {"temperature": 0.3, "top_p": 0.8, "top_k": 20}})
    assert name == presets.MODEL_PRESET
    assert (values["temperature"], values["top_p"], values["top_k"]) == (0.3, 0.8, 20)
    assert presets.opening_preset({"parameters": 135_000_000, "generation_config": {"do_sample": False}}
                                  )[1]["temperature"] == 0.0
    # a config that sets no sampling value (eos ids only) leaves the size rule in charge
    assert presets.opening_preset({"parameters": 135_000_000, "generation_config": {"eos_token_id": 2}}
                                  )[0] == "Small model"


@pytest.mark.slow  # ~4 minutes on two cores: `pytest -m slow`; CI asks the capital question in Chromium instead
@pytest.mark.skipif(default_gguf_path() is None, reason=f"needs {backend.DEFAULT_INSTALL}")
def test_the_default_models_opening_preset_answers_at_least_as_often_as_greedy():
    handle = backend.load("default")
    name, values = presets.opening_preset(handle.info())
    assert name == "Small model"
    greedy = first_answers.answer_rate(handle, first_answers.GREEDY, [0])
    # ten samples per question: two batches of five (seeds 1 and 11), as `python -m backend first-answers` runs them
    runs = [first_answers.answer_rate(handle, values, list(range(s, s + 5))) for s in (1, 11)]
    opening = first_answers.Rate(sum(r.right for r in runs), sum(r.asked for r in runs))
    assert greedy.asked == len(first_answers.QUESTIONS) >= 20
    assert greedy.rate >= 0.5, f"greedy answered {greedy.right} / {greedy.asked}: the set is not simple enough"
    assert opening.rate >= greedy.rate, (f"the opening preset answered {opening.right} / {opening.asked}, "
                                         f"greedy {greedy.right} / {greedy.asked}")


def test_a_folders_generation_config_reaches_the_opening_preset(tmp_path):
    from tests.backend.tiny import make_tiny

    make_tiny("llama", tmp_path / "m")
    (tmp_path / "m" / "generation_config.json").write_text('{"do_sample": true, "temperature": 0.6, "top_p": 0.9}')
    info = backend.load(str(tmp_path / "m")).info()
    assert info["generation_config"]["temperature"] == 0.6
    assert presets.opening_preset(info) == (presets.MODEL_PRESET, {**presets.PRESETS["Balanced"], "temperature": 0.6,
                                                                   "top_p": 0.9})
    (tmp_path / "m" / "generation_config.json").write_text("[1, 2")  # malformed: ignored, the size rule decides
    assert presets.opening_preset(backend.load(str(tmp_path / "m")).info())[0] == "Small model"
