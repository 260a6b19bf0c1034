"""`align run --nproc N`: torchrun for the user, on one machine.

This process becomes torchrun's agent (`torch.distributed.launcher.elastic_launch`, the code
behind `torchrun --standalone`) and starts N copies of `python -m align run ...`, one per rank;
each joins the process group in `align.distributed.setup` (gloo on CPU, NCCL on GPUs). What it
adds over a bare `torchrun`:

- one line when a rank fails, naming the rank and its exit code (the rank's own error line is
  printed above it by that rank), instead of torchrun's traceback; exit code 2 when the rank
  stopped on bad input, else 1;
- any stage still marked `running` is marked `failed` (a rank killed by the OOM killer writes
  nothing itself);
- the workers die with this process (`PR_SET_PDEATHSIG`, set by each worker), so a `kill -9`
  of `align run --nproc` leaves nothing running; the same command again resumes.

More than one machine, FSDP or DeepSpeed: `accelerate launch --config_file recipes/accelerate/X.yaml
-m align run RECIPE` (README, "From one GPU to many").
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from pathlib import Path

from align.artifacts import now, read_json, write_json
from align.errors import AlignError

log = logging.getLogger("align")


def launch(nproc: int, run_argv: list[str], recipe) -> int:
    """Run `align <run_argv>` on `nproc` local processes; returns the exit code for the CLI."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc < 1:
        raise AlignError(f"--nproc {nproc}: expected a number of processes of at least 1")
    os.environ["ALIGN_LAUNCHER"] = f"align --nproc {nproc}"
    # torchrun's default of 1 thread per process, unless the user chose: the cores shared out instead.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # we say what failed, once
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"align-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1)
    log.info("launching %d processes (torchrun, %s)", nproc, "NCCL" if _cuda() else "gloo, fp32")
    try:
        elastic_launch(config, sys.executable)("-m", "align", *run_argv)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        marked = mark_failed(recipe, f"rank {rank} exited with code {failure.exitcode}")
        where = f"; stage {', '.join(marked)} marked failed" if marked else ""
        print(f"align: error: rank {rank} of {nproc} exited with code {failure.exitcode} (its error is above)"
              f"{where}; run the same command again to resume", file=sys.stderr)
        return 2 if failure.exitcode == 2 else 1
    return 0


def mark_failed(recipe, error: str) -> list[str]:
    """Stages of `recipe` whose manifest still says `running`, now `failed` with `error`."""
    marked = []
    for name in recipe.stages:
        path = Path(recipe.stage_dir(name)) / "manifest.json"
        manifest = read_json(path)
        if manifest and manifest.get("status") == "running":
            manifest.update(status="failed", error=error, ended_at=now())
            write_json(path, manifest)
            marked.append(name)
    return marked


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
