"""lm-evaluation-harness on Fornax, offline: a local multiple-choice task over a local JSONL, its accuracy against the
same log-likelihood comparison done directly with the model's logits."""
import json

import pytest
import torch

import backend
from tests.backend.tiny import make_tiny

lm_eval = pytest.importorskip("lm_eval")

QUESTIONS = [
    ("The capital of France is", ["Paris", "Berlin", "a banana"], 0),
    ("Water freezes at zero degrees", ["Celsius", "of the moon", "purple"], 0),
    ("The opposite of hot is", ["sideways", "cold"], 1),
    ("Two plus two equals", ["four", "seventeen", "green", "Tuesday"], 0),
    ("A dog says", ["moo", "woof"], 1),
    ("The sky is", ["loud", "blue", "edible"], 1),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-harness")
    make_tiny("llama", folder)
    return backend.load(folder)


def direct_logprob(handle, context: str, continuation: str) -> float:
    whole = handle.tokenizer.encode(context + continuation, add_special_tokens=False)
    n_ctx = len(handle.tokenizer.encode(context, add_special_tokens=False))
    ids = torch.tensor([whole])
    logp = handle.logits(ids)[0, :-1].log_softmax(-1)               # (T-1, V): row t predicts token t+1
    return logp[n_ctx - 1:].gather(1, ids[0, n_ctx:, None]).sum().item()


def test_local_multiple_choice_task_accuracy_equals_direct_computation(tiny, tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    from backend.scoring.harness import FornaxLM

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = tmp_path / "mc.jsonl"
    data.write_text("\n".join(json.dumps({"question": q, "choices": c, "answer": a}) for q, c, a in QUESTIONS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "fornax_mc.yaml").write_text(f"""task: fornax_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: question
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    results = lm_eval.simple_evaluate(model=FornaxLM(handle=tiny), tasks=["fornax_mc"],
                                      task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
                                      bootstrap_iters=0, log_samples=False)
    acc = results["results"]["fornax_mc"]["acc,none"]
    picks = [max(range(len(c)), key=lambda i: direct_logprob(tiny, q, " " + c[i])) for q, c, _ in QUESTIONS]
    expected = sum(p == a for p, (_, _, a) in zip(picks, QUESTIONS)) / len(QUESTIONS)
    assert acc == pytest.approx(expected)


def test_rolling_loglikelihood_and_generation(tiny):
    from lm_eval.api.instance import Instance

    from backend.scoring.harness import FornaxLM

    lm = FornaxLM(handle=tiny, max_length=16)
    text = "The quick brown fox jumps over the lazy dog, and then it runs away into the woods."
    req = Instance("loglikelihood_rolling", {}, (text,), 0)
    got = lm.loglikelihood_rolling([req], disable_tqdm=True)[0]
    # direct: the harness's rolling chunks of 16 predicted tokens, the first predicted from the end-of-text token,
    # each later chunk from the 16 tokens before its last one
    toks = tiny.tokenizer.encode(text, add_special_tokens=False)
    assert len(toks) > 40
    chunks = [([lm.eot_token_id, *toks[:15]], toks[:16])]
    for start in range(16, len(toks), 16):
        end = min(start + 16, len(toks))
        chunks.append((toks[end - 17:end - 1], toks[start:end]))
    assert [t for _, pred in chunks for t in pred] == toks
    expected = 0.0
    for inp, pred in chunks:
        logp = tiny.logits(torch.tensor([inp]))[0, -len(pred):].log_softmax(-1)
        expected += logp.gather(1, torch.tensor(pred)[:, None]).sum().item()
    assert got == pytest.approx(expected, rel=1e-4)
    gen = Instance("generate_until", {}, ("Once upon a time", {"until": ["\n"], "max_gen_toks": 5}), 0)
    assert lm.generate_until([gen], disable_tqdm=True) == [
        tiny.generate("Once upon a time", max_new_tokens=5, temperature=0, stop=["\n"]).text]
