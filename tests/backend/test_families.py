"""The family records (backend/models/): each record's hooks agree with the model it builds, and its capabilities
with what a handle over that model does."""
import pytest
import torch

from backend import ModelHandle
from backend.errors import GenerationError
from backend.formats.tokenizer import Tokenizer
from backend.models import FAMILIES, family
from backend.models.config import FAMILIES as CONFIG_FAMILIES
from backend.models.config import ModelConfig

from .tiny import save_tokenizer

PRESET = {"gpt2": "tiny-gpt2", "llama": "tiny-llama", "bert": "tiny-bert", "lstm": "tiny-lstm"}


def test_every_config_family_has_a_record():
    assert set(FAMILIES) == set(CONFIG_FAMILIES) == set(PRESET)


@pytest.mark.parametrize("name", sorted(PRESET))
def test_record_round_trips_its_weights_and_counts_its_parameters(name):
    cfg = ModelConfig.from_name(PRESET[name])
    fam = family(cfg)
    torch.manual_seed(0)
    model = fam.new(cfg)
    model.init_weights()
    model.eval()
    # parameters from sizes alone = the parameters the module holds (tied weights once)
    assert fam.param_count(cfg) == sum(p.numel() for p in model.parameters())
    hf = fam.to_hf_state(model.state_dict(), cfg)
    rebuilt = fam.build(cfg, hf, torch.float32, torch.device("cpu"), True)
    assert type(rebuilt) is type(model)
    ids = torch.randint(0, cfg.vocab_size, (2, 7))
    with torch.no_grad():
        assert torch.allclose(model(ids), rebuilt(ids), atol=1e-5)


@pytest.mark.parametrize("name", sorted(PRESET))
def test_capabilities_are_what_the_handle_does(name, tmp_path):
    vocab = save_tokenizer(tmp_path)
    cfg = ModelConfig.from_name(PRESET[name])
    cfg.vocab_size = vocab
    if cfg.pad_token_id is None and name == "bert":
        cfg.pad_token_id = 0
    torch.manual_seed(0)
    model = family(cfg).new(cfg)
    model.init_weights()
    model.eval().requires_grad_(False)
    handle = ModelHandle(model, Tokenizer.from_folder(tmp_path), source=name)
    can = handle.info()["capabilities"]
    assert can == handle.family.capabilities()
    messages = [{"role": "user", "content": "hello"}]
    if can["chats"]:
        assert handle.encode(messages)
    else:
        with pytest.raises(GenerationError, match="does not chat"):
            handle.encode(messages)
    if can["generates"]:
        assert handle.generate("The", max_new_tokens=3, temperature=0).completions[0].token_ids
    else:
        with pytest.raises(GenerationError, match="does not generate"):
            handle.generate("The", max_new_tokens=3, temperature=0)


@pytest.mark.parametrize("preset, changes", [
    ("tiny-llama", dict(qkv_bias=True, tie_embeddings=False)),              # Qwen2-style, untied head
    ("tiny-llama", dict(qkv_bias=True, out_bias=True, mlp_bias=True)),
    ("tiny-bert", dict(labels=["neg", "pos", "neutral"])),                   # a classifier head
    ("tiny-bert", dict(nsp_head=True, tie_embeddings=False)),
    ("tiny-lstm", dict(tie_embeddings=True)),
])
def test_parameter_count_of_variants(preset, changes):
    cfg = ModelConfig(**{**ModelConfig.from_name(preset).to_dict(), **changes})
    model = family(cfg).new(cfg)
    assert family(cfg).param_count(cfg) == sum(p.numel() for p in model.parameters())
