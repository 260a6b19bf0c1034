"""align.losses against TRL 1.12.0's PPOTrainer math (GAE, clipped losses, whitening, KL).

TRL removed PPO after 1.12.0, so the comparison runs in the throwaway venv that
`python bench/ppo_step.py` creates (.bench-venvs/trl112); without it this test skips.
The script checks that its copies of TRL's inline code still match the installed source,
and exits non-zero if any item that is not a documented convention differs.
"""

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TRL112_PYTHON = REPO / ".bench-venvs" / "trl112" / "bin" / "python"


@pytest.mark.skipif(not TRL112_PYTHON.exists(), reason="no .bench-venvs/trl112 (python bench/ppo_step.py makes it)")
def test_losses_match_trl_1_12_ppo():
    proc = subprocess.run([str(TRL112_PYTHON), str(REPO / "bench" / "compare_trl112_math.py")],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "all non-convention items match" in proc.stdout
