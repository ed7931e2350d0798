"""`--strategy fsdp`: the training loop's model sharded with PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`)
under torchrun, beside the default DDP (every process holds the whole model and its optimizer state).

Each Transformer block, then the model, is `fully_shard`ed: every process keeps 1/world of each parameter, its
gradient and its AdamW moments; a block's full weights exist only while its forward or backward runs (all-gather
before, reduce-scatter of the gradients after, averaged over processes as DDP does). The loop is otherwise the one
of loop.py: the same global batch per step, the same losses.

What needs the whole model is gathered collectively (every process calls the same methods at the same points):
  - checkpoints: the full parameters and the full optimizer state, written by rank 0 in the usual layout (the
    optimizer's state keyed by parameter name); a resume hands each process its shards again;
  - validation, samples and the final model: rank 0 loads the gathered weights into an unsharded copy of the model
    (made before sharding) and runs them on it (one more copy of the weights on rank 0: fine for the models one
    finetunes here; a model too big for one process's memory should save its checkpoints and score them apart).
Full finetuning and pretraining of the causal Transformers (GPT-2 and Llama families), eager kernels; LoRA trains
few parameters and stays on DDP.
"""
from __future__ import annotations

import copy

import torch

from ..errors import TrainError
from .config import TrainConfig
from .distributed import Dist


def check_fsdp(cfg: TrainConfig, family) -> None:
    """`family`: the model's backend.models.Family."""
    if cfg.mode not in ("full", "pretrain"):
        raise TrainError("--strategy fsdp shards full finetuning and pretraining; LoRA trains few parameters: run it "
                         "with the default strategy (ddp)")
    if not family.shards:
        raise TrainError(f"--strategy fsdp shards the Transformer's blocks (GPT-2 and Llama families); "
                         f"{family.described} trains with the default strategy (ddp)")
    if cfg.kernels != "eager":
        raise TrainError("--strategy fsdp runs the eager kernels; drop --kernels triton")


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


class Sharded:
    """The model after `fully_shard`, and the collectives that gather it (see the module's docstring)."""

    def __init__(self, core: torch.nn.Module, dist: Dist):
        from torch.distributed.fsdp import fully_shard

        self.core, self.dist = core, dist
        self.shadow = copy.deepcopy(core) if dist.main else None  # rank 0's unsharded copy, refreshed on demand
        self._shadow_step: int | None = None
        for block in core.blocks:
            fully_shard(block)
        fully_shard(core)

    def full_state(self) -> dict[str, torch.Tensor]:
        """Every tensor of the model's state dict, whole, on rank 0 (an empty dict elsewhere). Collective."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.core, options=_options(cpu_offload=True))

    def full_weights(self, names) -> dict[str, torch.Tensor]:
        """The parameters called `names`, whole, on rank 0. Collective."""
        state = self.full_state()
        return {n: state[n] for n in names} if self.dist.main else {}

    def full_optimizer(self, optimizer: torch.optim.Optimizer) -> dict:
        """The optimizer's state with every moment whole, keyed by parameter name, on rank 0. Collective."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.core, optimizer, options=_options(cpu_offload=True))

    def gathered(self, step: int) -> torch.nn.Module | None:
        """Rank 0: the unsharded copy holding the weights of `step` (gathered once per step); None elsewhere.
        Collective the first time per step."""
        if self._shadow_step == step:
            return self.shadow
        state = self.full_state()
        self._shadow_step = step
        if not self.dist.main:
            return None
        with torch.no_grad():
            own = self.shadow.state_dict()
            for name, tensor in state.items():
                if name in own:
                    own[name].copy_(tensor)
        return self.shadow

    def load(self, weights: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, optimizer_state: dict) -> None:
        """A checkpoint's whole parameters and optimizer state, each process taking its shards."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        if not isinstance(optimizer_state, dict) or "param_groups" not in optimizer_state or not all(
                isinstance(p, str) for g in optimizer_state["param_groups"] for p in g.get("params", [])):
            raise TrainError("this checkpoint was not written by an FSDP run; resume it with the strategy it was "
                             "made with")
        set_model_state_dict(self.core, weights, options=_options(strict=False))
        set_optimizer_state_dict(self.core, optimizer, optimizer_state, options=_options())
        self._shadow_step = None
