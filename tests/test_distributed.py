"""Several processes on this CPU: `align run --nproc 2` (torchrun's launcher, gloo, fp32; bf16 all-reduce
fails on gloo, pytorch#111131). Each test starts real ranks that train data-parallel; nothing is mocked.

What is shown: the ranks really share the work (half the optimizer steps at the same per-device batch)
and really synchronise (two ranks at batch B/2 follow one process at batch B); DPO's reference
log-probs computed by two ranks, each on its share, equal one process's; two-rank PPO raises the
held-out reward like one-rank PPO; rank 0 alone writes; a `kill -9` of the launcher leaves no rank
behind and the same command resumes; one rank dying ends the run with one line and a failed manifest.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import (PPO_RECIPE, REPO, SEED, TINY_PREFS, TINY_SFT, copy_stages, record_learning, tiny_pref_stage,
                      tiny_sft_stage, write_recipe)

from align.errors import AlignError
from align.runner import run_recipe
from align.stages import load_recipe



def align_nproc(recipe: Path, *overrides: str, nproc: int = 2, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}
    return subprocess.run([sys.executable, "-m", "align", "run", "--nproc", str(nproc), str(recipe), *overrides],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def log_rows(stage_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (stage_dir / "log.jsonl").read_text().splitlines()]


def test_two_ranks_at_half_the_batch_follow_one_process(tiny_model, tmp_path):
    """One process at batch 16 and two ranks at batch 8 see the same 16 rows per optimizer step (accelerate
    shards each global batch), so with gradients averaged over ranks the runs differ only by float summation
    order. Step 1's gradient norm agrees to 1e-5 (a rank that skipped the all-reduce would be off by ~20%, as
    measured when the "before" evaluation ran ahead of `train()`: now `eval_on_start`, training.train_with_eval);
    after 34 steps at lr 3e-3 the held-out loss agrees within 2% (measured: 1.1% over 102 steps, 2.115 vs 2.091),
    far tighter than the 6.2 -> ~2 the loss moves."""
    one = write_recipe(tmp_path / "one.yaml", tmp_path / "one", {"sft": tiny_sft_stage(tiny_model, epochs=1)},
                       seed=SEED)
    two = write_recipe(tmp_path / "two.yaml", tmp_path / "two",
                       {"sft": tiny_sft_stage(tiny_model, epochs=1, batch_size=8)}, seed=SEED)
    single = run_recipe(load_recipe(one))["sft"]
    result = align_nproc(two)
    assert result.returncode == 0, result.stderr[-2000:]
    pair = read(tmp_path / "two" / "sft" / "metrics.json")

    assert pair["global_step"] == single["global_step"] == 34
    grad_1 = [r["grad_norm"] for r in log_rows(tmp_path / "one" / "sft") if "grad_norm" in r][0]
    grad_2 = [r["grad_norm"] for r in log_rows(tmp_path / "two" / "sft") if "grad_norm" in r][0]
    record_learning("test_two_ranks_at_half_the_batch_follow_one_process",
                    eval_loss_rel_diff=abs(pair["eval_loss"] / single["eval_loss"] - 1),
                    eval_loss_drop=pair["eval_loss_before"] - pair["eval_loss"])
    assert grad_2 == pytest.approx(grad_1, rel=1e-5)
    # over seeds 0-4 x 1 and 2 torch threads (tests/spread.py): the two-rank held-out loss within 0.01-0.73% of one
    # process's, down 2.46-2.60 from the start
    assert pair["eval_loss"] == pytest.approx(single["eval_loss"], rel=0.02)
    assert pair["eval_loss"] < pair["eval_loss_before"] - 2

    manifest = read(tmp_path / "two" / "sft" / "manifest.json")
    assert (manifest["world_size"], manifest["launcher"], manifest["status"]) == (2, "align --nproc 2", "complete")
    assert manifest["tokens_per_s"] == pair["tokens_per_s"] > 0
    peaks = manifest["peak_memory_mb_per_rank"]
    assert len(peaks) == 2 and all(p["rss"] > 0 for p in peaks)
    steps = [r["step"] for r in log_rows(tmp_path / "two" / "sft") if "loss" in r]
    assert steps == sorted(set(steps))  # one writer: no step logged twice
    assert (tmp_path / "two" / "sft" / "run.rank1.log").exists()
    assert result.stdout.count("done:") == 1 and result.stderr.count("stage sft: complete") == 1


def test_accelerate_launch_with_the_cpu_config_runs_two_ranks(tiny_model, tmp_path):
    """The accelerate route: `recipes/accelerate/cpu_ddp.yaml` (with --multi_gpu, which only picks accelerate's
    torchrun launcher) trains on two gloo ranks, half of one process's 34 steps."""
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "out", {"sft": tiny_sft_stage(tiny_model, epochs=1)})
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                             str(REPO / "recipes" / "accelerate" / "cpu_ddp.yaml"), "--multi_gpu",
                             "--main_process_port", "0", "-m", "align", "run", str(recipe)],
                            capture_output=True, text=True, timeout=240, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    manifest = read(tmp_path / "out" / "sft" / "manifest.json")
    assert (manifest["world_size"], manifest["launcher"]) == (2, "accelerate")
    assert read(tmp_path / "out" / "sft" / "metrics.json")["global_step"] == 17


def test_dpo_on_two_ranks_takes_half_the_steps_with_the_same_reference(tiny_model, tmp_path, monkeypatch):
    """TRL computes the reference log-probs on each rank's share and gathers them; our cache stores the
    merged result. The two ranks' cache equals one process's to float precision."""
    stage = tiny_pref_stage(tiny_model, lr=2e-4, beta=0.1, ref_cache=True, eval_prompts=0, epochs=1)
    caches = {}
    for n in (1, 2):
        cache = tmp_path / f"cache{n}"
        monkeypatch.setenv("ALIGN_CACHE", str(cache))
        recipe = write_recipe(tmp_path / f"dpo{n}.yaml", tmp_path / f"out{n}", {"dpo": stage}, seed=SEED)
        if n == 1:
            run_recipe(load_recipe(recipe))
        else:
            result = align_nproc(recipe)
            assert result.returncode == 0, result.stderr[-2000:]
        caches[n] = {p.name: torch.load(p) for p in (cache / "ref_logps").glob("*.pt")}
    one, two = (read(tmp_path / f"out{n}" / "dpo" / "metrics.json") for n in (1, 2))
    record_learning("test_dpo_on_two_ranks_takes_half_the_steps_with_the_same_reference",
                    loss_drop_one=one["eval_loss_before"] - one["eval_loss"],
                    loss_drop_two=two["eval_loss_before"] - two["eval_loss"])
    assert two["global_step"] == math.ceil(one["global_step"] / 2)
    assert one["global_step"] == math.ceil(360 / 16)  # 400 pairs, 10% held out
    assert caches[1].keys() == caches[2].keys() and len(caches[1]) == 2  # train and held-out splits, same keys
    for key in caches[1]:
        for side in ("chosen", "rejected"):
            assert torch.allclose(caches[1][key][side], caches[2][key][side], atol=1e-4)
    for m in (one, two):  # the reference is the starting policy: step-0 implicit rewards are 0
        assert abs(m["eval_rewards/chosen_before"]) < 1e-4 and abs(m["eval_rewards/rejected_before"]) < 1e-4
        assert m["eval_loss"] < m["eval_loss_before"]  # down 0.278-0.279 (one), 0.182-0.183 (two): seeds 0-4
        assert m["prefix_sharing"] == "on, pairs packed"  # one shared-prompt sequence per pair on every rank


def test_reward_kto_and_rloo_on_two_ranks_share_their_batches(tiny_model, tmp_path):
    """Every TRL stage shards its data over the ranks: per-device batch 16 on 2 ranks is 32 rows a step."""
    prefs = tiny_pref_stage(tiny_model, epochs=1)
    rloo = dict(model=str(tiny_model), data=str(REPO / "recipes" / "data" / "tiny_prompts.jsonl"),
                eval_fraction=0.1, max_length=64, response_length=8, batch_size=8, num_generations=4, max_steps=3,
                eval_prompts=0)
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "out", {
        "reward": prefs, "kto": {**prefs, "lr": 2e-4, "eval_prompts": 0}, "rloo": rloo}, seed=SEED)
    result = align_nproc(recipe)
    assert result.returncode == 0, result.stderr[-2000:]
    m = {name: read(tmp_path / "out" / name / "metrics.json") for name in ("reward", "kto", "rloo")}
    record_learning("test_reward_kto_and_rloo_on_two_ranks_share_their_batches",
                    reward_loss_drop=m["reward"]["eval_loss_before"] - m["reward"]["eval_loss"])
    assert m["reward"]["global_step"] == math.ceil(m["reward"]["train_pairs"] / 32)
    assert m["kto"]["global_step"] == math.ceil(m["kto"]["train_rows"] / 32)
    prompts_seen = m["rloo"]["epoch"] * m["rloo"]["train_prompts"]  # 3 steps x 2 ranks x 8 completions / 4 each
    assert prompts_seen == pytest.approx(3 * 2 * 8 / 4, abs=0.01)
    for name in m:
        assert read(tmp_path / "out" / name / "manifest.json")["world_size"] == 2
    # learning on the held-out pairs: the loss, not the accuracy, which can start at its ceiling (a CI run whose
    # old row-index split held out 4 pairs measured 1.0 before and after)
    assert m["reward"]["eval_loss"] < m["reward"]["eval_loss_before"]
    assert m["reward"]["eval_pairs"] >= 20


def test_ppo_on_two_ranks_raises_the_held_out_reward_like_one(ppo_upstream, tmp_path):
    """32 prompts per step: 16 per rank. Advantages are whitened over both ranks' tokens and the logged
    reward is over all 32 rollouts; both runs must lift the held-out reward clearly (the starting policy
    scores ~-0.2, a reward-trained one above 1). The two-rank run is killed after its step-4 checkpoint
    and resumed, so checkpoints written by rank 0 restore both ranks."""
    metrics = {}
    for n in (1, 2):
        out = copy_stages(ppo_upstream, tmp_path / f"ppo{n}")
        overrides = [f"output_dir={out}", f"seed={SEED}", "stages.ppo.max_steps=8", "stages.ppo.eval_prompts=16",
                     "stages.ppo.save_steps=4"]
        if n == 1:
            run_recipe(load_recipe(PPO_RECIPE, overrides))
        else:  # killed after its step-4 checkpoint, then resumed by the same command
            kill_launcher_after_a_checkpoint(PPO_RECIPE, out / "ppo", *overrides)
            result = align_nproc(PPO_RECIPE, *overrides)
            assert result.returncode == 0, result.stderr[-2000:]
            assert read(out / "sft" / "manifest.json")["world_size"] == 1  # skipped, not rerun
        metrics[n] = read(out / "ppo" / "metrics.json")
    gains = {f"reward_gain_{n}": m["eval_reward_after"] - m["eval_reward_before"] for n, m in metrics.items()}
    record_learning("test_ppo_on_two_ranks_raises_the_held_out_reward_like_one", **gains,
                    **{f"kl_last_{n}": m["kl_last"] for n, m in metrics.items()})
    # over seeds 0-4 x 1 and 2 torch threads (tests/spread.py): held-out reward up 1.86-4.04 on one process and
    # 1.88-4.02 on two ranks, last KL 1.2-3.2
    for n, m in metrics.items():
        assert m["eval_reward_after"] > m["eval_reward_before"] + 0.5, (n, m)
        assert m["kl_last"] < 10
    assert read(tmp_path / "ppo2" / "ppo" / "manifest.json")["world_size"] == 2
    assert metrics[2]["resumed_from_step"] == 4
    rows = log_rows(tmp_path / "ppo2" / "ppo")
    assert [r["step"] for r in rows] == list(range(1, 9))  # steps past the checkpoint logged once, by rank 0


def test_kill_the_launcher_then_the_same_command_resumes(tiny_model, tmp_path):
    """`kill -9` of `align run --nproc 2` mid-stage: no rank survives it (they die with the launcher),
    and the same command resumes from the last complete checkpoint and finishes with the step count of
    an uninterrupted run: half of one process's 68 steps."""
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "out",
                          {"sft": tiny_sft_stage(tiny_model, epochs=2, save_steps=4, save_total_limit=3)})
    kill_launcher_after_a_checkpoint(recipe, tmp_path / "out" / "sft")

    result = align_nproc(recipe)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = read(tmp_path / "out" / "sft" / "metrics.json")
    manifest = read(tmp_path / "out" / "sft" / "manifest.json")
    assert metrics["resumed_from_step"] and 0 < metrics["resumed_from_step"] < 34
    assert metrics["global_step"] == 34 and manifest["attempts"] == 2 and manifest["status"] == "complete"
    assert "resuming" in result.stderr


def kill_launcher_after_a_checkpoint(recipe: Path, stage_dir: Path, *overrides: str) -> None:
    """Start `align run --nproc 2`, `kill -9` it once a checkpoint is complete, and check no rank survives."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}
    launcher = subprocess.Popen([sys.executable, "-m", "align", "run", "--nproc", "2", str(recipe), *overrides],
                                env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((stage_dir / "checkpoints").glob("checkpoint-*/align_checkpoint_ok")) and time.time() < deadline:
        time.sleep(0.05)
    ranks = descendants(launcher.pid)
    assert ranks, "the launcher started no process"
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()
    assert read(stage_dir / "manifest.json")["status"] == "running"
    time.sleep(2)
    assert not [pid for pid in ranks if alive(pid)], "a rank outlived its launcher"


def descendants(pid: int) -> list[int]:
    """Every process below `pid` now (by parent pid, from /proc): this launcher's ranks, not another test's that
    runs the same recipe in another pytest-xdist worker."""
    children = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(proc.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Running or sleeping; a zombie (dead, not yet reaped by whoever adopted it) or a gone pid is not."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def test_a_recipe_that_cannot_split_over_the_ranks_is_one_line_before_any_rank_starts(tiny_model, tmp_path):
    stage = dict(model=str(tiny_model), data=str(REPO / "recipes" / "data" / "tiny_prompts.jsonl"),
                 reward_fn="ppo_reward_fns:always_nan", rollout_batch_size=5, batch_size=5, max_steps=1)
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "out", {"ppo": stage})
    result = align_nproc(recipe)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "align: error: stages.ppo.rollout_batch_size: 5 must be a multiple of the 2 training processes: each "
        "samples an equal share of every step's prompts"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("how, stages, expected", [
    ("fsdp", {"reward": {"lora": {"r": 4}}}, "stages.reward.lora: the adapter is saved merged into the base "
                                              "(always, for a reward model), which fsdp's shards cannot be yet"),
    ("zero3", {"sft": {"lora": {"r": 4}, "merge_lora": True}}, "stages.sft.lora: the adapter is saved merged"),
    ("zero2", {"ppo": {"reward_fn": "ppo_reward_fns:always_nan"}}, "stages.ppo: ppo runs under DDP or FSDP2"),
])
def test_what_a_sharded_launch_cannot_do_is_refused_before_training(tiny_model, tmp_path, monkeypatch, how, stages,
                                                                     expected):
    """`accelerate launch` with fsdp2.yaml / zero3.yaml / zero2.yaml tells the ranks through these variables."""
    from align.stages import check_recipe

    data = {"reward": TINY_PREFS, "sft": TINY_SFT, "ppo": REPO / "recipes" / "data" / "tiny_prompts.jsonl"}
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "out", {
        name: {"model": str(tiny_model), "data": str(data[name]), **extra} for name, extra in stages.items()})
    monkeypatch.setenv("ACCELERATE_USE_FSDP" if how == "fsdp" else "ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", how[-1])
    with pytest.raises(AlignError) as e:
        check_recipe(load_recipe(recipe))
    assert str(e.value).startswith(expected), str(e.value)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    check_recipe(load_recipe(recipe))  # the same recipe passes under DDP


def test_one_rank_dying_ends_the_run_with_one_line_and_a_failed_manifest(tiny_model, tmp_path):
    """Rank 1 is killed (as the OOM killer would) inside its first reward call; rank 0 is stopped by the
    launcher; the stage's manifest says failed, naming the rank; stderr carries one error line."""
    stage = dict(model=str(tiny_model), data=str(REPO / "recipes" / "data" / "tiny_prompts.jsonl"),
                 reward_fn="ppo_reward_fns:killed_on_rank_1", eval_fraction=0.0, max_length=64,
                 response_length=4, rollout_batch_size=4, batch_size=2, max_steps=2)
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "out", {"ppo": stage})
    result = align_nproc(recipe)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "rank 1 of 2 exited with code -9" in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    manifest = read(tmp_path / "out" / "ppo" / "manifest.json")
    assert manifest["status"] == "failed" and "rank 1" in manifest["error"]
    assert not (tmp_path / "out" / "ppo" / "model").exists()


def test_one_process_helpers(monkeypatch):
    from align import distributed

    assert distributed.shard(list(range(8)), 2, 0) == [0, 1, 2, 3]
    assert distributed.shard(list(range(8)), 2, 1) == [4, 5, 6, 7]
    assert distributed.decide(lambda: 7) == 7 and distributed.gather("x") == ["x"]
    for var in ("WORLD_SIZE", "RANK", "ALIGN_LAUNCHER", "TORCHELASTIC_RUN_ID", "ACCELERATE_MIXED_PRECISION"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.launcher() == "none" and distributed.is_main()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    assert distributed.launcher() == "torchrun"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert distributed.launcher() == "accelerate"
    assert distributed.peer_lost(RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:1"))
    assert not distributed.peer_lost(RuntimeError("CUDA out of memory")) and not distributed.peer_lost(ValueError("x"))
    monkeypatch.setenv("RANK", "1")
    assert not distributed.is_main()


def test_whitening_with_a_sum_over_ranks_is_the_plain_one_for_one_rank():
    from align.losses import masked_whiten

    torch.manual_seed(0)
    x, mask = torch.randn(4, 6), (torch.rand(4, 6) > 0.3).float()
    assert torch.allclose(masked_whiten(x, mask, sum_over=lambda t: t), masked_whiten(x, mask), atol=1e-6)
