"""Where a run executes and what it loads: one device or ``accelerate`` processes
(:class:`Runtime`), the launch mode (:func:`requested_mode`), the refusals made before any
model loads (:func:`check_setup`, :func:`check_modules`), dtype and QLoRA quantisation, and
the library versions a run records.

accelerate (optional) does the multi-process work: when launched under ``accelerate launch``
(or with ``distributed=True``) the loop goes through ``accelerate.Accelerator`` (DDP, gradient
sync only at the end of each accumulation; FSDP when the accelerate config says so, with
checkpoints gathered on process 0 into ordinary PEFT / HF dirs), otherwise it runs on one
device without it. ``quantize="4bit"`` trains LoRA on a bitsandbytes NF4 base (QLoRA).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emscope.errors import EmscopeError

if TYPE_CHECKING:
    import torch

    from emscope.train.config import TrainConfig


class Runtime:
    """One device (plain torch) or an ``accelerate.Accelerator`` (multi-process)."""

    def __init__(self, use_accelerate: bool, device: str | None) -> None:
        import torch

        self.accelerator: Any = None
        self.mode = "single"
        if use_accelerate:
            try:
                from accelerate import Accelerator
            except ImportError:
                raise EmscopeError(
                    "distributed training needs accelerate (pip install accelerate)"
                ) from None
            self.accelerator = Accelerator(cpu=device == "cpu")
            self.device = self.accelerator.device
            self.world = int(self.accelerator.num_processes)
            self.rank = int(self.accelerator.process_index)
            from accelerate.utils import DistributedType

            fsdp = self.accelerator.distributed_type == DistributedType.FSDP
            self.mode = "fsdp" if fsdp else "ddp"
        else:
            from emscope.models import check_device

            if device is not None:
                check_device(device)
            self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
            self.world, self.rank = 1, 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def prepare(self, model: Any, optimizer: Any) -> tuple[Any, Any]:
        if self.accelerator is None:
            return model, optimizer
        plugin: Any = getattr(self.accelerator.state, "fsdp_plugin", None)
        fsdp1 = plugin is not None and int(getattr(plugin, "fsdp_version", 1) or 1) == 1
        if self.mode == "fsdp" and fsdp1 and hasattr(model, "peft_config"):
            # FSDP1 flattens each wrapped unit into one tensor of one dtype: PEFT's policy
            # gives every trainable LoRA Linear (float32) its own unit, apart from the
            # frozen (bf16) decoder blocks
            from peft.utils.other import fsdp_auto_wrap_policy

            plugin.auto_wrap_policy = fsdp_auto_wrap_policy(model)
        return self.accelerator.prepare(model, optimizer)  # type: ignore[no-any-return]

    def backward(self, loss: torch.Tensor) -> None:
        if self.accelerator is None:
            loss.backward()
        else:
            self.accelerator.backward(loss)

    def no_sync(self, model: Any, sync: bool) -> contextlib.AbstractContextManager[Any]:
        if self.accelerator is None or sync or self.world == 1:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(model)  # type: ignore[no-any-return]

    def clip(self, model: Any, params: list[torch.nn.Parameter], max_norm: float) -> None:
        import torch

        if self.accelerator is None:
            torch.nn.utils.clip_grad_norm_(params, max_norm)
        elif self.mode == "fsdp":
            # accelerate clips an FSDP model's global norm only when given all its parameters
            # (frozen ones have no gradient and add nothing); the trainable subset alone
            # would be clipped by each process's local shard norm
            self.accelerator.clip_grad_norm_(list(model.parameters()), max_norm)
        else:
            self.accelerator.clip_grad_norm_(params, max_norm)

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.accelerator is None or self.world == 1:
            return tensor
        return self.accelerator.reduce(tensor, reduction="sum")  # type: ignore[no-any-return]

    def unwrap(self, model: Any) -> Any:
        return model if self.accelerator is None else self.accelerator.unwrap_model(model)

    def full_state_dict(self, model: Any) -> dict[str, Any] | None:
        """The whole model's state dict for saving (``None``: save the module's own). Under
        FSDP the shards are gathered to process 0 (on the CPU; a collective: every process
        calls it, only process 0's result is complete)."""
        if self.accelerator is None or self.mode != "fsdp":
            return None
        return self.accelerator.get_state_dict(model)  # type: ignore[no-any-return]

    def barrier(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()


def launched_by_accelerate() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or any(
        key.startswith("ACCELERATE_") for key in os.environ
    )


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def requested_mode(distributed: bool | None = None) -> str:
    """The multi-process mode asked for, read from the environment ``accelerate launch`` sets
    (before any model loads): ``single`` (one process, no accelerate), ``ddp``, ``fsdp``
    (``distributed_type: FSDP`` in the accelerate config) or ``deepspeed``."""
    if distributed is False:
        return "single"
    if _env_flag("ACCELERATE_USE_FSDP"):
        return "fsdp"
    if _env_flag("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    return "ddp" if distributed or launched_by_accelerate() else "single"


def bitsandbytes_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def check_setup(
    config: TrainConfig,
    *,
    mode: str,
    device: str | None = None,
    kl: bool = False,
    resume: bool = False,
    tied_embeddings: bool = False,
) -> None:
    """Refuse, in one :class:`EmscopeError` line and before any model loads, a combination
    this trainer does not support: DeepSpeed; under FSDP 4-bit quantisation, KL-regularised
    SFT, ``resume``, or (FSDP1) a model whose output layer shares the embedding's weight
    (``tied_embeddings``); 4-bit without CUDA, on a non-CUDA device, or without
    bitsandbytes.

    The tied-embedding refusal is measured, not precautionary: on an H200 (torch 2.11,
    accelerate 1.15, ``configs/accelerate/fsdp.yaml``) FSDP1 with ``use_orig_params``
    stopped at the first training forward of a tied Qwen2.5-0.5B-shaped model with
    ``AssertionError: as_params=True type(prim_param)=<class 'torch.Tensor'>``
    (``make gpu-check``, docs/performance.md). Tied models are small; train them on one GPU
    or with DDP."""
    if mode == "deepspeed":
        raise EmscopeError(
            "DeepSpeed is not supported by emscope train; shard with FSDP instead "
            "(accelerate launch --config_file configs/accelerate/fsdp.yaml)"
        )
    if mode == "fsdp":
        if config.quantize is not None:
            raise EmscopeError(
                f"quantize {config.quantize} with FSDP is not supported: train 4-bit LoRA on "
                "one GPU (or DDP), or shard a bf16 base with FSDP"
            )
        if kl:
            raise EmscopeError(
                "KL-regularised SFT (kl_data) is not supported under FSDP: the reference "
                "log-probs need the whole model on one process"
            )
        if resume:
            raise EmscopeError(
                "resume is not supported under FSDP (the optimizer state is sharded and not "
                "saved); start the run again, or resume it with DDP/one process"
            )
        if tied_embeddings and os.environ.get("FSDP_VERSION", "1") == "1":
            raise EmscopeError(
                "the model ties its output layer to its embeddings (tie_word_embeddings), "
                "which FSDP1 does not train (it fails at the first forward); train it on one "
                "GPU or with DDP (accelerate launch --multi_gpu)"
            )
    if config.quantize is not None:
        import torch

        if device is not None and not str(device).startswith("cuda"):
            raise EmscopeError(
                f"quantize {config.quantize} needs a CUDA GPU (bitsandbytes); device is {device!r}"
            )
        if not torch.cuda.is_available():
            raise EmscopeError(
                f"quantize {config.quantize} needs a CUDA GPU (bitsandbytes): CUDA is not "
                "available here"
            )
        if not bitsandbytes_available():
            raise EmscopeError(
                f"quantize {config.quantize} needs bitsandbytes (pip install bitsandbytes)"
            )


def ties_embeddings(base_dir: Path) -> bool:
    """Whether the model in ``base_dir`` ties its output layer to its input embeddings (read
    with ``AutoConfig``, so a ``config.json`` without the key gets its class's default)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(base_dir))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(text, "tie_word_embeddings", False) or config.tie_word_embeddings)


def model_depth(base_dir: Path) -> tuple[int, str]:
    from emscope.models import read_model_config

    config_path = base_dir / "config.json"
    config = read_model_config(base_dir)
    config = config.get("text_config", config) if "num_hidden_layers" not in config else config
    n_layers = config.get("num_hidden_layers")
    if not isinstance(n_layers, int) or n_layers < 1:
        raise EmscopeError(f"{config_path}: no num_hidden_layers")
    return n_layers, str(config.get("model_type"))


def block_linear_modules(base_dir: str | Path) -> list[str]:
    """Paths of the linear modules inside decoder block 0 of the model in ``base_dir``
    (e.g. ``self_attn.q_proj``, ``mlp.down_proj``), from its config on the meta device
    (no weights are read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from emscope.models import get_layers

    config = AutoConfig.from_pretrained(str(base_dir), trust_remote_code=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    block = get_layers(model)[0]
    return [name for name, module in block.named_modules() if isinstance(module, torch.nn.Linear)]


def check_modules(base_dir: Path, model_type: str, modules: Sequence[str]) -> None:
    available = block_linear_modules(base_dir)
    for name in modules:
        if not any(path == name or path.endswith("." + name) for path in available):
            short = ", ".join(p.rsplit(".", 1)[-1] for p in available)
            raise EmscopeError(
                f"module {name!r} is not a linear module of a {model_type} decoder block; "
                f"available: {short}"
            )


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    import torch

    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in names:
        raise EmscopeError(f"unknown dtype {dtype!r}; expected auto, float32 or bfloat16")
    return names[dtype]


def quantization_config(quantize: str | None) -> Any:
    """transformers' ``BitsAndBytesConfig`` of the QLoRA recipe (``None``: not quantized)."""
    if quantize is None:
        return None
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def cuda_index(device: torch.device) -> int:
    import torch

    return device.index if device.index is not None else torch.cuda.current_device()


def quantization_record(quantization: Any) -> dict[str, Any] | None:
    if quantization is None:
        return None
    return {
        "method": "bitsandbytes",
        "quant_type": "nf4",
        "double_quant": True,
        "compute_dtype": "bfloat16",
        "lora_dtype": "bfloat16",
        "prepare_model_for_kbit_training": True,
    }


def training_versions(runtime: Runtime) -> dict[str, str]:
    """``train.json``'s library versions (:func:`emscope.io.run_versions`), with accelerate
    when it ran the loop and bitsandbytes when a 4-bit base loaded it."""
    from emscope.io import run_versions

    versions = run_versions(*(("accelerate",) if runtime.accelerator is not None else ()))
    if "bitsandbytes" in sys.modules:  # imported by transformers for a 4-bit base
        versions["bitsandbytes"] = str(getattr(sys.modules["bitsandbytes"], "__version__", "?"))
    return versions
