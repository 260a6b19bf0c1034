"""The spread of the learning tests' measured values over seeds and torch threads: what their bounds are set from.

    .venv/bin/python tests/spread.py                   # every learning test below, seeds 0-4 x threads 1, 2
    .venv/bin/python tests/spread.py tests/test_ppo.py::test_align_eval_judges_the_ppo_policy_against_sft --seeds 0 1
    .venv/bin/python tests/spread.py --out DIR         # finish an interrupted matrix in DIR
    .venv/bin/python tests/spread.py --summary DIR     # print DIR's table again, run nothing

One pytest process per group of test files (GROUPS), seed and thread count (`-p no:cacheprovider -q`, with
ALIGN_TEST_SEED, ALIGN_TEST_THREADS and ALIGN_SPREAD_LOG set; tests/conftest.py reads them and `record_learning`
writes the values). At most two busy processes at once: two 1-thread runs, or one 2-thread run, or one file of 2-process
tests (its two ranks are the two). Then, per test and value: min, max and mean over the runs, and the runs that
failed. The raw JSONL, each run's junit XML and output stay in the folder it prints. Not a test module: pytest
collects test_*.py only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Every test that asserts a trained model got better (tests/conftest.py: record_learning), not slow or gpu.
LEARNING_TESTS = [
    "tests/test_ppo.py::test_ppo_raises_the_held_out_reward_with_bounded_kl",
    "tests/test_ppo.py::test_lora_ppo_uses_the_disabled_adapter_as_reference",
    "tests/test_ppo.py::test_align_eval_judges_the_ppo_policy_against_sft",
    "tests/test_ppo.py::test_shared_value_head_learns_without_a_second_model",
    "tests/test_grpo.py::test_grpo_raises_the_reward_models_score",
    "tests/test_grpo.py::test_rloo_learns_from_a_reward_fn",
    "tests/test_preference.py::test_reward_model_learns_the_preference",
    "tests/test_preference.py::test_dpo_learns_and_the_reward_model_sees_it",
    "tests/test_preference.py::test_lora_dpo_holds_no_second_model",
    "tests/test_preference.py::test_kto_learns_from_unpaired_labels",
    "tests/test_preference.py::test_reward_stage_starts_from_a_lora_sft_adapter",
    "tests/test_preference_data.py::test_reward_model_from_a_tokenizer_without_pad_token_still_learns",
    "tests/test_sft.py::test_full_sft_lowers_held_out_loss",
    "tests/test_sft.py::test_lora_sft_on_an_earlier_stage_saves_an_adapter_that_peft_loads",
    "tests/test_sft.py::test_assistant_only_loss_ignores_prompt_tokens",
    "tests/test_sft.py::test_packing_and_tensorboard",
    "tests/test_hacking.py::test_ppo_that_fools_its_reward_raises_the_flag",
    "tests/test_hacking.py::test_align_eval_reports_the_signals_and_a_judge",
    "tests/test_frontier.py::test_quick_frontier_run",
    "tests/test_distributed.py::test_two_ranks_at_half_the_batch_follow_one_process",
    "tests/test_distributed.py::test_dpo_on_two_ranks_takes_half_the_steps_with_the_same_reference",
    "tests/test_distributed.py::test_reward_kto_and_rloo_on_two_ranks_share_their_batches",
    "tests/test_distributed.py::test_ppo_on_two_ranks_raises_the_held_out_reward_like_one",
]
TWO_PROCESS_FILES = {"tests/test_distributed.py"}  # each test starts two ranks: the file runs alone
# Files that share one pytest process (fewer interpreter starts), in two halves of about equal time so that
# two 1-thread runs pair up; any other file runs in its own.
GROUPS = [("tests/test_hacking.py", "tests/test_frontier.py", "tests/test_preference_data.py"),
          ("tests/test_ppo.py", "tests/test_sft.py", "tests/test_preference.py", "tests/test_grpo.py")]
CAPACITY = 2  # busy processes at once: the machine's two cores, shared


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tests", nargs="*", help="pytest node ids (default: every learning test listed in this file)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    p.add_argument("--out", type=Path, help="folder for the logs (default: a new one under the temp folder); runs "
                                            "whose junit XML is already there are not run again")
    p.add_argument("--summary", type=Path, metavar="DIR", help="print the table of a finished folder and exit")
    p.add_argument("--timeout", type=int, default=1800, help="seconds one pytest process may take")
    return p.parse_args(argv)


def jobs_of(tests: list[str], seeds: list[int], threads: list[int]) -> list[dict]:
    """One job per group of files (GROUPS, else one file), seed and thread count; by seed, then 1-thread before
    2-thread (two of those run at once), 2-process files last in each seed."""
    group_of = {path: group for group in GROUPS for path in group}
    by_group = defaultdict(list)
    for test in tests:
        path = test.split("::")[0]
        by_group[group_of.get(path, (path,))].append(test)
    jobs = []
    for seed in seeds:
        for t in threads:
            for group in sorted(by_group, key=lambda g: g[0] in TWO_PROCESS_FILES):
                name = "+".join(Path(path).stem.removeprefix("test_") for path in group) + f"-seed{seed}-threads{t}"
                cost = CAPACITY if group[0] in TWO_PROCESS_FILES else t
                jobs.append({"name": name, "tests": by_group[group], "seed": seed, "threads": t, "cost": cost})
    return jobs


def start(job: dict, out: Path) -> subprocess.Popen:
    env = {**os.environ, "ALIGN_TEST_SEED": str(job["seed"]), "ALIGN_TEST_THREADS": str(job["threads"]),
           "ALIGN_SPREAD_LOG": str(out / f"{job['name']}.jsonl")}
    env.pop("PYTEST_XDIST_WORKER_COUNT", None)
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--durations=10",
           f"--junitxml={out / job['name']}.xml", *job["tests"]]
    log = open(out / f"{job['name']}.out", "w")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def run_matrix(jobs: list[dict], out: Path, timeout: int) -> None:
    """Strictly in order (a 2-slot job waits for the slots to drain rather than be overtaken for ever)."""
    pending = [j for j in jobs if not (out / f"{j['name']}.xml").exists()]
    running: list[tuple[dict, subprocess.Popen, float]] = []
    t0 = time.time()
    print(f"{len(pending)} runs to go ({len(jobs) - len(pending)} already in {out})", flush=True)
    while pending or running:
        for item in list(running):
            job, proc, began = item
            if proc.poll() is None and time.time() - began > timeout:
                proc.kill()
            if proc.poll() is not None:
                running.remove(item)
                print(f"  {job['name']}: exit {proc.returncode}, {time.time() - began:.0f} s "
                      f"({(time.time() - t0) / 60:.1f} min in)", flush=True)
        while pending and sum(j["cost"] for j, _, _ in running) + pending[0]["cost"] <= CAPACITY:
            job = pending.pop(0)
            running.append((job, start(job, out), time.time()))
        time.sleep(1)
    print(f"matrix done in {(time.time() - t0) / 60:.1f} min", flush=True)


def outcomes(out: Path) -> dict[str, list[str]]:
    """Test name -> the runs it failed in, each with the first line of its failure."""
    failed = defaultdict(list)
    for xml in sorted(out.glob("*.xml")):
        run = xml.stem.split("-", 1)[1]
        for case in ET.parse(xml).getroot().iter("testcase"):
            for bad in list(case.findall("failure")) + list(case.findall("error")):
                message = (bad.get("message") or "").splitlines()[0][:110] if bad.get("message") else bad.tag
                failed[case.get("name")].append(f"{run}: {message}")
    return failed


def summary(out: Path) -> str:
    values = defaultdict(lambda: defaultdict(list))
    runs = defaultdict(set)
    for path in sorted(out.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            run = f"seed{row['seed']}-threads{row['threads']}"
            runs[row["test"]].add(run)
            for key, value in row.items():
                if key not in ("test", "seed", "threads") and isinstance(value, (int, float)):
                    values[row["test"]][key].append(value)
    failed = outcomes(out)
    lines = [f"spread over {out} (raw values: {out}/*.jsonl)"]
    for test in sorted(set(values) | set(failed)):
        lines.append(f"\n{test}: {len(runs[test])} runs recorded")
        for key, xs in values[test].items():
            finite = [x for x in xs if math.isfinite(x)]
            if finite:
                lines.append(f"  {key:<22} min {min(finite):9.4f}  max {max(finite):9.4f}  "
                             f"mean {statistics.fmean(finite):9.4f}  (n={len(xs)})")
        for fail in failed.get(test, ()):
            lines.append(f"  FAILED {fail}")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.summary:
        print(summary(args.summary))
        return
    out = args.out or Path(tempfile.mkdtemp(prefix="align-spread-"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"logs: {out}", flush=True)
    run_matrix(jobs_of(args.tests or LEARNING_TESTS, args.seeds, args.threads), out, args.timeout)
    text = summary(out)
    (out / "summary.txt").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
