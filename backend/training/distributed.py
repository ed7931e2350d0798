"""The process group of a torchrun launch (gloo on CPU, nccl on CUDA), and the few collectives the loop needs."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class Dist:
    world: int = 1
    rank: int = 0
    local_rank: int = 0

    @classmethod
    def from_env(cls, device_type: str) -> "Dist":
        """torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK): one process group, gloo on CPU, nccl on CUDA."""
        import torch.distributed as dist

        world = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if world > 1 and device_type == "cuda" and torch.cuda.is_available():
            # this rank's GPU before NCCL starts: else every rank's communicator (and its default tensors) use GPU 0
            torch.cuda.set_device(local_rank)
        if world > 1 and not dist.is_initialized():
            # CUDA runs keep gloo for the small CPU tensors the loop reduces (stop flags, broadcast bytes)
            dist.init_process_group("cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo")
        return cls(world, int(os.environ.get("RANK", "0")), local_rank)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(t)
        return t

    def broadcast_bytes(self, data: bytes | None) -> bytes:
        """Rank 0's bytes on every rank (plain tensors, no pickling)."""
        if self.world == 1:
            return data
        import torch.distributed as dist

        n = torch.tensor([len(data) if self.main else 0])
        dist.broadcast(n, 0)
        if self.main:
            buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        else:
            buf = torch.empty(int(n), dtype=torch.uint8)
        dist.broadcast(buf, 0)
        return bytes(buf.tolist())

    def close(self):
        import torch.distributed as dist

        if self.world > 1 and dist.is_initialized():
            try:  # leave together: a rank tearing gloo down while rank 0 still saves the model aborts at exit
                dist.barrier()
            except RuntimeError:
                pass  # another rank failed; its error is the one to report
            dist.destroy_process_group()
