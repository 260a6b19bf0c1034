"""Several processes: who writes, and the few collectives the pipeline itself needs.

align has no distribution layer of its own. The launcher (`torchrun`, `accelerate launch`, or
`align run --nproc N`, which starts torchrun) starts one process per device; every process runs
the whole recipe; TRL's trainers and `accelerate` shard the data and synchronise the gradients
(DDP, FSDP2, DeepSpeed ZeRO per the accelerate config); our PPO goes through `accelerate.prepare`.
What this module adds:

- `setup()`: joins the process group once (accelerate's `PartialState`: gloo on CPU, NCCL on
  GPUs) and asks Linux to kill this worker when its launcher dies, so a `kill -9` of the
  launcher never leaves orphans that go on writing while the next run starts.
- one writer: `is_main()` is rank 0. Every file align writes goes through `align.artifacts`,
  whose writers do nothing on the other ranks (`artifacts.write_text`, `StepLog`,
  `save_folder_atomically`); a rank that fails writes its own failure record.
- `decide(fn)`: runs `fn` on rank 0 alone (reading manifests, choosing a checkpoint, deleting a
  stale folder) and hands its result to every rank, so no rank reads another's half-written
  file and all ranks take the same branch.
- `gather(obj)`, `all_sum(tensor)`, `barrier()`: the collectives of PPO's statistics and the
  per-rank peak memory of the manifest.

With one process every function is the trivial one and nothing initialises a process group.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import Any, Callable, TypeVar

T = TypeVar("T")

PR_SET_PDEATHSIG = 1


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def launcher() -> str:
    """Who started this process: `align --nproc`, `accelerate`, `torchrun`, another launcher, or none."""
    if os.environ.get("ALIGN_LAUNCHER"):
        return os.environ["ALIGN_LAUNCHER"]
    if any(k.startswith("ACCELERATE_") and k != "ACCELERATE_USE_CPU" for k in os.environ) \
            and "ACCELERATE_MIXED_PRECISION" in os.environ:
        return "accelerate"
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return "torchrun"
    return "other" if world_size() > 1 else "none"


def sharding() -> str | None:
    """What the accelerate launch shards: `fsdp`, `zero3`, `zero2`/`zero1` (DeepSpeed), or None (DDP, one
    process). Read from the variables `accelerate launch` sets, so the checks know before any model loads."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "fsdp"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return f"zero{os.environ.get('ACCELERATE_DEEPSPEED_ZERO_STAGE', '2')}"
    return None


def active() -> bool:
    import torch.distributed as dist

    return world_size() > 1 and dist.is_available() and dist.is_initialized()


def setup() -> None:
    """Join the process group (several processes only) and die with the launcher."""
    if world_size() <= 1:
        return
    _die_with_parent()
    import torch
    from accelerate import PartialState

    # gloo on CPU (fp32 only: its all-reduce has no bf16, pytorch#111131), NCCL on GPUs.
    PartialState(cpu=not torch.cuda.is_available())


def _die_with_parent() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the launcher died before prctl took hold
        os._exit(137)


def peer_lost(error: BaseException) -> bool:
    """Whether `error` is this rank finding that another rank is gone (a collective's connection closed):
    a consequence, not a cause. The rank that failed, or the launcher, reports the cause."""
    if world_size() <= 1 or not isinstance(error, RuntimeError):
        return False
    text = str(error)
    return any(s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe"))


def teardown() -> None:
    """Every rank waits for the others, then leaves the process group. Left to the interpreter's shutdown, gloo's
    threads were sometimes still running when their objects went: a finished rank aborted with "terminate called
    without an active exception" (exit -6; seen once in CI after a resumed two-rank run had completed)."""
    if active():
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        import torch.distributed as dist

        dist.barrier()


def broadcast(obj: T) -> T:
    """Rank 0's `obj` on every rank."""
    if not active():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def decide(fn: Callable[[], T]) -> T:
    """`fn()` run on rank 0 only, its result handed to every rank (the others wait for it). An exception
    on rank 0 is raised on every rank, so none is left waiting for a result that never comes."""
    if not active():
        return fn()
    outcome = None
    if is_main():
        try:
            outcome = ("ok", fn())
        except BaseException as e:  # noqa: BLE001 - re-raised below on every rank
            outcome = ("error", e)
    kind, value = broadcast(outcome)
    if kind == "error":
        raise value
    return value


def gather(obj: Any) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not active():
        return [obj]
    import torch.distributed as dist

    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_sum(tensor):
    """The sum over ranks of `tensor`: a new tensor on `tensor`'s device (fp32 or fp64 on gloo)."""
    if not active():
        return tensor.clone()
    import torch.distributed as dist

    out = tensor.detach().clone()
    if dist.get_backend() == "nccl" and out.device.type != "cuda":  # NCCL reduces CUDA tensors only
        import torch

        out = out.to(torch.cuda.current_device())
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(tensor.device)


def shard(items: list, n: int | None = None, r: int | None = None) -> list:
    """This rank's share of `items`: the `r`-th of `n` contiguous blocks (`len(items)` a multiple of `n`)."""
    n = world_size() if n is None else n
    r = rank() if r is None else r
    k = len(items) // n
    return items[r * k:(r + 1) * k]


def accelerator():
    """An `accelerate.Accelerator` for a loop of our own (PPO): DDP over gloo on CPU processes, else what the
    launcher's accelerate config says (DDP, FSDP2). Buffers are not broadcast at every forward: they never
    change here, and the broadcast would make the number of forward passes a collective matter."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    return Accelerator(cpu=not torch.cuda.is_available(),
                       kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
