"""The launcher configs in recipes/accelerate/ and the Slurm template in recipes/slurm/.

Each config is read by accelerate's own loader and put through `accelerate launch`'s own validation,
and what the training processes would be handed (the FSDP and DeepSpeed plugins built from the
launcher's environment) is checked against what the file's comment promises. The CPU launches run
for real: two gloo ranks through the torchrun launcher, and the documented trap of one process.
The Slurm template runs under stand-ins for srun, scontrol and accelerate.
"""

import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "recipes" / "accelerate"
SBATCH = REPO / "recipes" / "slurm" / "align.sbatch"

# What each file promises: top-level settings, then the nested deepspeed/fsdp keys.
EXPECTED = {
    "cpu_ddp": dict(distributed_type=DistributedType.MULTI_CPU, num_processes=2, num_machines=1,
                    mixed_precision="no", use_cpu=True),
    "single_gpu": dict(distributed_type=DistributedType.NO, num_processes=1, num_machines=1,
                       mixed_precision="bf16", use_cpu=False),
    "multi_gpu": dict(distributed_type=DistributedType.MULTI_GPU, num_processes=8, num_machines=1,
                      mixed_precision="bf16", use_cpu=False),
    "zero2": dict(distributed_type=DistributedType.DEEPSPEED, num_processes=8, num_machines=1,
                  mixed_precision="bf16", use_cpu=False),
    "zero3": dict(distributed_type=DistributedType.DEEPSPEED, num_processes=8, num_machines=1,
                  mixed_precision="bf16", use_cpu=False),
    "fsdp2": dict(distributed_type=DistributedType.FSDP, num_processes=8, num_machines=1,
                  mixed_precision="bf16", use_cpu=False),
    "multi_node": dict(distributed_type=DistributedType.MULTI_GPU, num_processes=16, num_machines=2,
                       machine_rank=0, main_process_port=29500, mixed_precision="bf16", use_cpu=False),
}
DEEPSPEED = {
    "zero2": {"zero_stage": 2, "zero3_init_flag": False, "offload_optimizer_device": "none",
              "deepspeed_multinode_launcher": "standard"},
    "zero3": {"zero_stage": 3, "zero3_init_flag": True, "zero3_save_16bit_model": True,
              "offload_optimizer_device": "none", "offload_param_device": "none",
              "deepspeed_multinode_launcher": "standard"},
}
FSDP = {"fsdp2": {"fsdp_version": 2, "fsdp_reshard_after_forward": True,
                  "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "fsdp_state_dict_type": "FULL_STATE_DICT",
                  "fsdp_cpu_ram_efficient_loading": True, "fsdp_offload_params": False}}


def config_path(name: str) -> Path:
    return CONFIGS / f"{name}.yaml"


def validated(name: str, *extra: str):
    """`accelerate launch --config_file FILE [extra] -m align run R.yaml`, validated as accelerate does."""
    argv = ["--config_file", str(config_path(name)), *extra, "-m", "align", "run", "R.yaml"]
    args, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    return args, defaults


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_config_has_its_promises_listed():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)
    assert not list(CONFIGS.glob("*.yml")), "use the .yaml suffix: the wheel ships recipes/accelerate/*.yaml"


def test_the_wheel_ships_them():
    """pyproject's package data for `recipes` covers every config and the Slurm template (the wheel build itself
    is tests/test_packaging.py's)."""
    import tomllib

    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["recipes"]
    shipped = {p for pattern in patterns for p in (REPO / "recipes").glob(pattern)}  # setuptools' glob: * stops at /
    assert sorted(p.name for p in {*CONFIGS.glob("*.yaml"), SBATCH} - shipped) == []


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_with_accelerates_loader(name):
    config = load_config_from_file(str(config_path(name)))
    assert isinstance(config, ClusterConfig)
    assert ClusterConfig.from_yaml_file(str(config_path(name))) == config
    for key, value in EXPECTED[name].items():
        assert getattr(config, key) == value, f"{name}: {key}"
    for key, value in DEEPSPEED.get(name, {}).items():
        assert config.deepspeed_config[key] == value, f"{name}: deepspeed_config.{key}"
    for key, value in FSDP.get(name, {}).items():
        assert config.fsdp_config[key] == value, f"{name}: fsdp_config.{key}"
    assert bool(config.fsdp_config) == (name in FSDP) and bool(config.deepspeed_config) == (name in DEEPSPEED)
    # Recipes own batch size, accumulation and clipping; a config value would have to match them exactly.
    assert not {"gradient_accumulation_steps", "gradient_clipping"} & set(config.deepspeed_config)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_nested_keys_are_launch_arguments(name):
    """accelerate copies fsdp_config / deepspeed_config keys onto its arguments without checking them: a typo
    would be dropped in silence. Each key must be one of `accelerate launch`'s own options."""
    config = load_config_from_file(str(config_path(name)))
    options = set(vars(launch_command_parser().parse_args(["x.py"])))
    nested = list(config.deepspeed_config) + [k if k.startswith("fsdp") else f"fsdp_{k}" for k in config.fsdp_config]
    assert [k for k in nested if k not in options] == []


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_opening_comment_has_the_launch_command(name):
    lines = config_path(name).read_text().splitlines()
    head = []
    for line in lines:
        if not line.startswith("#"):
            break
        head.append(line.lstrip("# "))
    comment = " ".join(head)
    assert f"accelerate launch --config_file recipes/accelerate/{name}.yaml" in comment
    assert "-m align run RECIPE" in comment
    assert re.search(r"shard", comment, re.I), f"{name}: say what it shards (or that it shards nothing)"
    assert re.search(r"\bpick\b", comment, re.I), f"{name}: say when to pick it"


def test_launcher_each_config_selects():
    picks = {}
    for name in EXPECTED:
        args, _ = validated(name)
        picks[name] = ("deepspeed" if args.use_deepspeed else "fsdp" if args.use_fsdp
                       else "torchrun" if args.multi_gpu else "one process")
    assert picks == {"cpu_ddp": "one process", "single_gpu": "one process", "multi_gpu": "torchrun",
                     "zero2": "deepspeed", "zero3": "deepspeed", "fsdp2": "fsdp", "multi_node": "torchrun"}
    args, _ = validated("cpu_ddp", "--multi_gpu")
    assert args.multi_gpu and args.num_processes == 2 and args.mixed_precision == "no"


def test_fsdp2_plugin_the_processes_get():
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env
    from torch.distributed.fsdp import CPUOffloadPolicy

    args, _ = validated("fsdp2")
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    with mock.patch.dict(os.environ, env, clear=True):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True  # FSDP2's FULL_SHARD
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"  # rank 0 saves a plain save_pretrained folder
    assert plugin.cpu_ram_efficient_loading is True
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
    assert not isinstance(plugin.cpu_offload, CPUOffloadPolicy)  # parameters stay on the GPU


@pytest.mark.parametrize("name,stage,gathers", [("zero2", 2, False), ("zero3", 3, True)])
def test_deepspeed_plugin_the_processes_get(name, stage, gathers):
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args, defaults = validated(name)
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
    cmd, env = prepare_deepspeed_cmd_env(args)
    assert cmd is None  # one machine: torchrun in-process, no pdsh
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    with mock.patch.dict(os.environ, env, clear=True):
        plugin = DeepSpeedPlugin()
    zero = plugin.deepspeed_config["zero_optimization"]
    assert zero["stage"] == stage
    assert zero["stage3_gather_16bit_weights_on_model_save"] is gathers
    assert plugin.zero3_init_flag is gathers
    # Filled from the recipe's batch_size, grad_accum and max_grad_norm by the trainer.
    assert plugin.deepspeed_config["gradient_accumulation_steps"] == "auto"
    assert plugin.deepspeed_config["gradient_clipping"] == "auto"


def test_multi_node_torchrun_arguments_per_machine():
    from accelerate.utils.launch import prepare_multi_gpu_env

    for rank in (0, 1):
        args, _ = validated("multi_node", "--machine_rank", str(rank))
        prepare_multi_gpu_env(args)
        assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("2", "8", rank)
        # accelerate 1.15 takes same_network from the command line only; either way torchrun meets at ip:port.
        endpoint = getattr(args, "rdzv_endpoint", None) or f"{args.master_addr}:{args.master_port}"
        assert endpoint == "node-0:29500" and args.rdzv_backend == "static"


# Each process writes its own file: the ranks share one stdout, where their lines can interleave.
PROBE = """
import json, os
from pathlib import Path
import torch.distributed as dist
from accelerate import PartialState

state = PartialState(cpu=True)  # what align.distributed.setup() and TrainingArguments(use_cpu=True) do on a CPU
Path(__file__).with_name(f"probe-{os.getpid()}.json").write_text(json.dumps({
    "rank": state.process_index, "world": state.num_processes, "type": str(state.distributed_type),
    "backend": dist.get_backend() if dist.is_initialized() else None,
    "mixed_precision": os.environ.get("ACCELERATE_MIXED_PRECISION")}))
"""


def launch_probe(tmp_path: Path, *launch_args: str) -> list[dict]:
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *launch_args, str(script)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return sorted((json.loads(p.read_text()) for p in tmp_path.glob("probe-*.json")), key=lambda r: r["rank"])


def test_cpu_ddp_launch_starts_two_gloo_ranks(tmp_path):
    ranks = launch_probe(tmp_path, "--config_file", str(config_path("cpu_ddp")), "--multi_gpu",
                         "--main_process_port", str(free_port()))
    assert [(r["rank"], r["world"]) for r in ranks] == [(0, 2), (1, 2)]
    assert {r["type"] for r in ranks} == {"DistributedType.MULTI_CPU"}
    assert {r["backend"] for r in ranks} == {"gloo"}
    assert {r["mixed_precision"] for r in ranks} == {"no"}  # gloo has no bf16 all-reduce


@pytest.mark.parametrize("launch_args", [("--cpu", "--num_processes", "2"), ("--config_file", "CPU_DDP")],
                         ids=["cpu-flag", "cpu_ddp-without-multi_gpu"])
def test_cpu_launch_without_torchrun_starts_one_process(tmp_path, launch_args):
    """The trap the README and cpu_ddp.yaml warn about: on a CPU machine these start ONE process."""
    args = [str(config_path("cpu_ddp")) if a == "CPU_DDP" else a for a in launch_args]
    ranks = launch_probe(tmp_path, *args)
    assert [(r["rank"], r["world"], r["type"]) for r in ranks] == [(0, 1, "DistributedType.NO")]


# ------------------------------------------------------------------------------------------- Slurm

def sbatch_command_lines() -> list[str]:
    """The script's lines with backslash continuations joined."""
    return SBATCH.read_text().replace("\\\n", " ").splitlines()


def test_sbatch_is_a_bash_script_that_parses():
    text = SBATCH.read_text()
    assert text.startswith("#!/bin/bash\n")
    done = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", text, re.M))
    assert {"nodes", "ntasks-per-node", "gpus-per-node", "cpus-per-task"} <= set(directives)
    assert directives["ntasks-per-node"] == "1"  # one launcher per node; it starts one process per GPU


def test_sbatch_srun_line_launches_align_run_per_node():
    (srun,) = [line for line in sbatch_command_lines() if line.lstrip().startswith("srun ")]
    assert "accelerate launch" in srun and "-m align run" in srun
    for option in ('--machine_rank "$SLURM_NODEID"', '--num_machines "$SLURM_NNODES"',
                   '--main_process_ip "$MAIN_PROCESS_IP"', '--num_processes "$NUM_PROCESSES"'):
        assert option in srun
    text = SBATCH.read_text()
    assert re.search(r'scontrol show hostnames "\$SLURM_JOB_NODELIST"', text)


def test_sbatch_under_stand_ins_for_slurm(tmp_path):
    """srun runs its command once per node with that node's SLURM_NODEID; accelerate prints its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_ins = {
        "scontrol": 'echo gpu-07; echo gpu-08\n',
        "srun": 'while [[ "$1" == --* ]]; do shift; done\n'
                'for id in $(seq 0 $((SLURM_NNODES - 1))); do SLURM_NODEID=$id "$@" || exit $?; done\n',
        "accelerate": 'printf "%s\\0" "$@" > "$CALLS/call-$SLURM_NODEID"\n',
    }
    for name, body in stand_ins.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body)
        (bin_dir / name).chmod(0o755)
    calls = tmp_path / "calls"
    calls.mkdir()
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "CALLS": str(calls),
           "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu-[07-08]", "SLURM_SUBMIT_DIR": str(REPO),
           "SLURM_CPUS_PER_TASK": "64"}
    env.pop("CONFIG", None)
    done = subprocess.run(["bash", str(SBATCH), "recipes/tiny-sft.yaml", "output_dir=/shared/run one"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for rank in (0, 1):
        argv = (calls / f"call-{rank}").read_text().rstrip("\0").split("\0")
        assert argv == ["launch", "--config_file", "recipes/accelerate/multi_gpu.yaml", "--num_machines", "2",
                        "--num_processes", "16", "--machine_rank", str(rank), "--main_process_ip", "gpu-07",
                        "--main_process_port", "29500", "-m", "align", "run", "recipes/tiny-sft.yaml",
                        "output_dir=/shared/run one"], shlex.join(argv)
    assert "2 nodes x 8 GPUs = 16 processes" in done.stdout

    usage = subprocess.run(["bash", str(SBATCH)], env=env, capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "usage: sbatch recipes/slurm/align.sbatch RECIPE" in usage.stderr
