"""HuggingFace transformers MoE models: find their MoE blocks, run them expert-parallel.

Supported: the sparse MoE blocks of Mixtral, Qwen2-MoE (with its shared expert),
Qwen3-MoE and OLMoE as transformers v5 builds them: a block with a ``gate`` router that
returns ``(router_logits, top_k_weights, top_k_index)`` and fused ``experts`` holding
``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``. :func:`find_moe_blocks` also
finds transformers v4 blocks (a ``gate`` linear layer returning logits and an expert
list), which the trace recorder supports but the expert-parallel runtime does not.

:func:`load_ep_model` loads a local checkpoint on every rank (CPU memory for the whole
model), replaces each MoE block's experts with an :class:`ExpertParallelMoE` holding
only this rank's slots, frees the full expert tensors and moves the rest to the device.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from moe_gps.errors import UserError
from runtime.dist import DistContext
from runtime.moe_layer import ExpertParallelMoE

SUPPORTED = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


def moe_settings(config: Any) -> tuple[int, int, bool]:
    """(num_experts, top_k, normalise top-k weights) from a transformers config."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    E = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
    k = getattr(cfg, "num_experts_per_tok", None)
    if not E or not k:
        raise UserError(f"model type {getattr(cfg, 'model_type', '?')!r}: the config has no num_local_experts/"
                        "num_experts and num_experts_per_tok; is it a mixture-of-experts model?")
    normalize = bool(getattr(cfg, "norm_topk_prob", True)) if getattr(cfg, "model_type", "") != "mixtral" else True
    return int(E), int(k), normalize


def find_moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The sparse MoE blocks in forward order: modules with a ``gate`` and ``experts``."""
    out = []
    for name, module in model.named_modules():
        if hasattr(module, "gate") and hasattr(module, "experts") and isinstance(module.gate, nn.Module):
            out.append((name, module))
    return out


def is_fused(block: nn.Module) -> bool:
    """transformers v5 layout: fused expert tensors."""
    return hasattr(block.experts, "gate_up_proj") and hasattr(block.experts, "down_proj")


def _first_line(err: BaseException) -> str:
    text = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    return " ".join(text[:2])[:300] if text else type(err).__name__


def _check_config_json(path: Path) -> None:
    """One line for a config.json that is not a JSON object with a model_type."""
    import json

    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read ({_first_line(err)})") from None
    except (ValueError, RecursionError) as err:
        raise UserError(f"{path}: not valid JSON ({_first_line(err)})") from None
    if not isinstance(doc, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(doc).__name__}")
    if not isinstance(doc.get("model_type"), str):
        raise UserError(f"{path}: has no 'model_type' (e.g. \"mixtral\"), so it is not a transformers model config")


def check_checkpoint_folder(path: str | Path) -> Path:
    """One line for a path that is not a checkpoint folder with a readable config.json; returns it as a Path."""
    p = Path(path)
    if not (p / "config.json").exists():
        raise UserError(f"{p}: not a HuggingFace checkpoint folder (no config.json)")
    _check_config_json(p / "config.json")
    return p


def load_hf_model(path: str | Path, dtype: torch.dtype) -> nn.Module:
    """A local checkpoint folder as a causal LM on the CPU (no downloads). A checkpoint that lacks some of
    the model's weights is refused: transformers would initialise them at random (a random router)."""
    try:
        import transformers
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError:
        raise UserError("reading a HuggingFace checkpoint needs transformers: pip install 'moe-gps[collect]'") \
            from None
    p = check_checkpoint_folder(path)
    try:
        config = AutoConfig.from_pretrained(p, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to read the user's config is about that file
        raise UserError(f"{p / 'config.json'}: transformers cannot read it ({_first_line(err)})") from None
    kind = getattr(config.get_text_config(), "model_type", config.model_type)
    if kind not in SUPPORTED:
        raise UserError(f"{p}: model type {kind!r} is not supported (supported: {', '.join(SUPPORTED)})")
    try:
        model, info = AutoModelForCausalLM.from_pretrained(p, dtype=dtype, local_files_only=True,
                                                           output_loading_info=True)
    except Exception as err:  # noqa: BLE001 - a damaged or mismatched checkpoint
        raise UserError(f"{p}: cannot load the checkpoint ({type(err).__name__}: {_first_line(err)})") from None
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        more = f", ... ({len(missing)} in all)" if len(missing) > 3 else ""
        raise UserError(f"{p}: the checkpoint lacks weights of the model ({', '.join(missing[:3])}{more}); "
                        "transformers would initialise them at random")
    model.eval()
    model.moe_gps_source = f"{p} ({kind}, transformers {transformers.__version__})"
    return model


class HFEPBlock(nn.Module):
    """A transformers v5 sparse MoE block with its experts expert-parallel.

    Keeps the model's own router (``gate``) and, for Qwen2-MoE, its shared expert.
    ``record``/``last_experts``/``last_weights`` as in :class:`runtime.moe_layer.MoEBlock`.
    """

    def __init__(self, block: nn.Module, layer: int, ctx: DistContext) -> None:
        super().__init__()
        fused = block.experts
        E, twoI, H = fused.gate_up_proj.shape
        self.gate = block.gate
        self.shared_expert = getattr(block, "shared_expert", None)
        self.shared_expert_gate = getattr(block, "shared_expert_gate", None)
        self.experts = ExpertParallelMoE(layer, int(E), int(H), int(twoI) // 2, ctx, act=fused.act_fn,
                                         dtype=fused.gate_up_proj.dtype)
        self.source = fused                 # full expert tensors, dropped by drop_source()
        self.record = False
        self.last_experts: np.ndarray | None = None
        self.last_weights: np.ndarray | None = None

    def expert_weights(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.source.gate_up_proj[expert].detach(), self.source.down_proj[expert].detach()

    def drop_source(self) -> None:
        self.source = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        t0 = self.experts._now()
        _, weights, experts = self.gate(x)
        route_s = self.experts._now() - t0
        if self.record:
            self.last_experts = experts.to(torch.int16).cpu().numpy()
            self.last_weights = weights.float().cpu().numpy()
        out = self.experts(x, experts, weights, route_s=route_s)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return out.reshape(shape)


def wrap_moe_blocks(model: nn.Module, ctx: DistContext) -> list[HFEPBlock]:
    """Replace every MoE block of ``model`` by an :class:`HFEPBlock`; returns them in layer order."""
    blocks = find_moe_blocks(model)
    if not blocks:
        raise UserError("the model has no sparse MoE block (a module with 'gate' and 'experts')")
    if not all(is_fused(b) for _, b in blocks):
        raise UserError("the expert-parallel runtime needs transformers v5 MoE blocks (fused experts with "
                        "gate_up_proj/down_proj); upgrade transformers (pip install 'transformers>=5')")
    out = []
    for layer, (name, block) in enumerate(blocks):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        ep = HFEPBlock(block, layer, ctx)
        setattr(parent, attr, ep)
        out.append(ep)
    return out
