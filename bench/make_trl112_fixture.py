"""Write tests/fixtures/trl112_ppo_math.pt: fixed inputs and TRL 1.12.0's PPO math on them.

    python bench/make_trl112_fixture.py      # from the main venv: makes .bench-venvs/trl112 if missing
                                              # (as bench/ppo_step.py does: torch 2.13.0 CPU + trl 1.12.0
                                              # from PyPI), then re-runs itself there

How the committed file was made: this script, run as above, with trl 1.12.0 and torch 2.13.0+cpu in
.bench-venvs/trl112. It imports bench/compare_trl112_math.py, checks that its copies of the inline code
of TRL's `PPOTrainer.train` still match the installed `trl/experimental/ppo/ppo_trainer.py` line for
line (`check_copies`), builds the first 10 of that script's 20 random float64 cases (`random_case`,
seeds 0-9: B = 4..8 rows, T = 6..12 tokens, right-padded; 10 keep the file under 200 KB), runs TRL's
side on them (`trl_outputs`: the KL penalty, GAE, whitening, the clipped losses and entropy, with
TRL's own `masked_mean` / `masked_var` / `masked_whiten` imported) and saves, with
`torch.save` (tensors packed into one flat float64 tensor each, `compare_trl112_math.pack`; bool and
int64 values are exact in float64):

    meta   versions, the sha256 of TRL's ppo_trainer.py, the constants (gamma, lam, ...), the seeds
    cases  the inputs of each case (tensors as given to both sides)
    trl    TRL's outputs for each case
    edge   TRL's outputs for the two edge cases the report prints

tests/test_trl112_parity.py then runs align's side (`align_diffs`, `compare`) against the stored TRL
outputs, with no TRL 1.12 installed. Regenerate (the same command) when compare_trl112_math.py changes
its cases, constants or what TRL's side returns; the test fails on a fixture whose constants or seeds no
longer match the script.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "trl112_ppo_math.pt"
SEEDS = range(10)  # the first 10 of compare_trl112_math.SEEDS


def load_compare():
    spec = importlib.util.spec_from_file_location("compare_trl112_math", REPO / "bench" / "compare_trl112_math.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def in_trl112_venv() -> bool:
    try:
        import trl
    except ImportError:
        return False
    return trl.__version__ == "1.12.0"


def main() -> None:
    if not in_trl112_venv():
        sys.path.insert(0, str(REPO / "bench"))
        from ppo_step import VENV_PY, ensure_trl_venv

        ensure_trl_venv()
        sys.exit(subprocess.run([str(VENV_PY), str(Path(__file__).resolve()), *sys.argv[1:]]).returncode)

    import torch

    C = load_compare()
    trl = C.load_trl()
    C.check_copies()
    cases = [C.random_case(seed) for seed in SEEDS]
    trl_out = [C.trl_outputs(c) for c in cases]
    edge = C.trl_edge_outputs()
    source = Path(C.T.__file__).read_bytes()
    meta = {
        "trl": str(trl.__version__), "torch": str(torch.__version__), "python": platform.python_version(),
        "trl_source": str(Path(C.T.__file__).relative_to(Path(trl.__file__).parents[1])),
        "trl_source_sha256": hashlib.sha256(source).hexdigest(),
        "copies_checked": True,
        "constants": {"gamma": C.GAMMA, "lam": C.LAM, "kl_coef": C.KL_COEF, "clip": C.CLIP, "vclip": C.VCLIP},
        "seeds": list(SEEDS),
        "made_by": "python bench/make_trl112_fixture.py",
    }
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    tmp = FIXTURE.with_suffix(".tmp")
    torch.save({"meta": meta, "cases": C.pack(cases), "trl": C.pack(trl_out), "edge": C.pack([edge])}, tmp)
    os.replace(tmp, FIXTURE)
    print(f"wrote {FIXTURE.relative_to(REPO)} ({FIXTURE.stat().st_size / 1024:.0f} KB): {len(cases)} cases, "
          f"TRL {trl.__version__}, torch {torch.__version__}")
    # The same comparison the test runs, here against the live outputs, so a bad fixture shows at once.
    ok = C.compare(cases, trl_out, edge)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
