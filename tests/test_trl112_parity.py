"""align.losses against TRL 1.12.0's PPOTrainer math (KL penalty, GAE, whitening, clipped losses, entropy).

TRL removed PPO after 1.12.0, so TRL's side is not computed here: tests/fixtures/trl112_ppo_math.pt
holds fixed inputs and TRL 1.12.0's outputs on them, made by `python bench/make_trl112_fixture.py`
(which runs TRL in .bench-venvs/trl112 and checks its copies of TRL's inline code against the
installed source first; its docstring says how to regenerate). This test runs align's side of
bench/compare_trl112_math.py on the stored inputs and compares with the stored TRL outputs, with the
script's tolerances: 1e-10 where both sides compute in float64 the same way, 1e-6 (1e-5 for entropy)
where TRL rounds through float32 (its Bessel factor, its clip fractions) or ours does (entropy), and
the documented conventions (score one token past the end, approxkl over padding, ...) reported but
not failed. Needs no TRL 1.12 and never skips.
"""

import importlib.util
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "trl112_ppo_math.pt"


def load_compare():
    # By path: bench/ is not a package. The module imports torch and align/losses.py only (TRL lazily).
    spec = importlib.util.spec_from_file_location("compare_trl112_math", REPO / "bench" / "compare_trl112_math.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_losses_match_stored_trl_1_12_ppo_outputs(capsys):
    C = load_compare()
    data = torch.load(FIXTURE, weights_only=True)
    meta = data["meta"]
    assert meta["trl"] == "1.12.0" and meta["copies_checked"], meta
    # A fixture made with other constants than the script's would compare the wrong things.
    assert meta["constants"] == {"gamma": C.GAMMA, "lam": C.LAM, "kl_coef": C.KL_COEF, "clip": C.CLIP,
                                 "vclip": C.VCLIP}, "regenerate: python bench/make_trl112_fixture.py"
    cases, trl_out = C.unpack(*data["cases"]), C.unpack(*data["trl"])
    (edge,) = C.unpack(*data["edge"])
    assert [c["seed"] for c in cases] == meta["seeds"] and len(cases) == len(trl_out) >= 10
    assert all(c["last"].dtype == torch.int64 and t["rollout_padding_mask"].dtype == torch.bool
               for c, t in zip(cases, trl_out))

    ok = C.compare(cases, trl_out, edge)
    out = capsys.readouterr().out
    assert ok, out
    assert "MISMATCH" not in out and out.count(" match") >= 15, out
    # The conventions are still there (a change in align's conventions shows here).
    assert out.count("differs by design") == 5, out


def test_compare_catches_a_wrong_loss():
    """The comparison is not vacuous: TRL's stored pg_loss, perturbed by 1e-6, fails it."""
    C = load_compare()
    data = torch.load(FIXTURE, weights_only=True)
    cases, trl_out = C.unpack(*data["cases"]), C.unpack(*data["trl"])
    (edge,) = C.unpack(*data["edge"])
    trl_out[3]["pg_loss"] = trl_out[3]["pg_loss"] + 1e-6
    assert not C.compare(cases, trl_out, edge)
