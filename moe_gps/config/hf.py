"""A Hugging Face ``config.json`` (or a checkpoint folder holding one) -> a model spec.

``--model`` takes a preset name, a MoE-GPS model YAML, or an HF config: this module reads
the config's own fields (the names of the transformers config classes) and returns the
mapping that :func:`moe_gps.config.loader.load_model` checks into a
:class:`~moe_gps.config.schema.ModelConfig`. Nothing is looked up on the network.

Families (``model_type``) and where each number comes from:

=================  ==========================  ====================  ==========================
model_type         routed experts              expert FFN size       MoE layers
=================  ==========================  ====================  ==========================
mixtral            num_local_experts           intermediate_size     all
qwen2_moe          num_experts                 moe_intermediate_size not in mlp_only_layers and
qwen3_moe          (or num_local_experts)                            (i + 1) % decoder_sparse_step == 0
deepseek_v2/v3     n_routed_experts            moe_intermediate_size i >= first_k_dense_replace and
                                                                     i % moe_layer_freq == 0
olmoe              num_experts                 intermediate_size     all
gpt_oss            num_local_experts           intermediate_size     all
=================  ==========================  ====================  ==========================

top_k is ``num_experts_per_tok`` everywhere. Shared experts: Qwen2-MoE has one of
``shared_expert_intermediate_size``; DeepSeek ``n_shared_experts`` of the routed size.
Attention: ``num_attention_heads``, ``num_key_value_heads`` and ``head_dim`` (default
hidden_size / heads); DeepSeek's MLA from its LoRA ranks and head dims (weights and the
compressed KV cache). Weight bytes from ``quantization_config`` (fp8: 1, mxfp4: 4.25
bits) or else ``torch_dtype`` / ``dtype``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from moe_gps.errors import UserError
from moe_gps.files import beyond_parser
from moe_gps.tables import format_indices

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "olmoe", "gpt_oss")
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "float": 4, "float8_e4m3fn": 1}


def is_hf_config(spec: str | os.PathLike) -> bool:
    """Whether ``--model`` names an HF config: a ``.json`` file or a folder."""
    p = Path(spec)
    return p.suffix == ".json" or p.is_dir()


def read_hf_config(spec: str | os.PathLike) -> tuple[dict[str, Any], str]:
    """(the config's mapping, its path) from a ``config.json`` or a checkpoint folder."""
    p = Path(spec)
    if p.is_dir():
        p = p / "config.json"
        if not p.is_file():
            raise UserError(f"{spec}: is a folder without a config.json; --model takes a preset, a model YAML, an "
                            "HF config.json or a checkpoint folder holding one")
    if not p.is_file():
        raise UserError(f"{spec}: no such file")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{p}: cannot read ({err})") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{p}: not valid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    except (ValueError, RecursionError) as err:
        raise UserError(f"{p}: {beyond_parser(err, 'JSON')}") from None
    if not isinstance(data, dict):
        raise UserError(f"{p}: holds a JSON {type(data).__name__}, expected an HF config object")
    return data, str(p)


class _Fields:
    """Typed access to a config mapping; errors name the file and the key."""

    def __init__(self, cfg: dict[str, Any], where: str):
        self.cfg, self.where = cfg, where

    def has(self, key: str) -> bool:
        return self.cfg.get(key) is not None

    def int(self, *keys: str, default: int | None = None) -> int:
        for key in keys:
            value = self.cfg.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise UserError(f"{self.where}: {key}: must be an integer, got {value!r}")
            return value
        if default is not None:
            return default
        raise UserError(f"{self.where}: {' or '.join(keys)}: missing (needed for a {self.cfg.get('model_type')} "
                        "model)")

    def int_list(self, key: str) -> list[int]:
        value = self.cfg.get(key) or []
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise UserError(f"{self.where}: {key}: must be a list of integers, got {value!r}")
        return value


def moe_layer_ids(cfg: dict[str, Any], where: str = "config.json") -> list[int]:
    """Decoder layers that hold routed experts, by the rules in the module docstring."""
    f = _Fields(_text_config(cfg), where)
    mt = f.cfg.get("model_type")
    n = f.int("num_hidden_layers")
    if mt in ("qwen2_moe", "qwen3_moe"):
        step = f.int("decoder_sparse_step", default=1)
        dense = set(f.int_list("mlp_only_layers"))
        return [i for i in range(n) if i not in dense and step > 0 and (i + 1) % step == 0]
    if mt in ("deepseek_v2", "deepseek_v3"):
        first = f.int("first_k_dense_replace", default=0)
        freq = f.int("moe_layer_freq", default=1)
        return [i for i in range(n) if i >= first and i % max(freq, 1) == 0]
    return list(range(n))


def _text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The language model's part of a multimodal config (``text_config``), else the config."""
    text = cfg.get("text_config")
    return text if isinstance(text, dict) and text.get("model_type") in FAMILIES else cfg


def _weight_bytes(cfg: dict[str, Any], outer: dict[str, Any], where: str) -> tuple[float, str, str]:
    """(bytes per weight, compute dtype, where it came from)."""
    quant = outer.get("quantization_config") or cfg.get("quantization_config")
    if isinstance(quant, dict) and quant.get("quant_method"):
        method = str(quant["quant_method"]).lower()
        if method == "fp8":
            return 1.0, "fp8", "quantization_config fp8"
        if method == "mxfp4":
            return 4.25 / 8, "bf16", "quantization_config mxfp4 (4-bit values + one 8-bit scale per 32)"
        raise UserError(f"{where}: quantization_config.quant_method {method!r} is not understood (fp8, mxfp4 are); write a "
                        "model YAML with weight_bytes instead (docs/configs.md)")
    dtype = outer.get("torch_dtype") or outer.get("dtype") or cfg.get("torch_dtype") or cfg.get("dtype")
    if dtype is None:
        return 2.0, "bf16", "no torch_dtype in the config: 2 bytes (bf16) assumed"
    if str(dtype) not in _DTYPE_BYTES:
        raise UserError(f"{where}: torch_dtype {dtype!r} is not understood ({', '.join(_DTYPE_BYTES)} are)")
    return float(_DTYPE_BYTES[str(dtype)]), "bf16", f"torch_dtype {dtype}"


def hf_model_dict(spec: str | os.PathLike) -> tuple[dict[str, Any], str]:
    """The ModelConfig mapping of an HF config, and the path it came from (for errors)."""
    outer, where = read_hf_config(spec)
    cfg = _text_config(outer)
    mt = cfg.get("model_type")
    if mt not in FAMILIES:
        got = f"model_type {mt!r}" if mt else "no model_type"
        raise UserError(f"{where}: {got}; MoE-GPS reads HF configs of {', '.join(FAMILIES)} (or give a model YAML, "
                        "docs/configs.md)")
    f = _Fields(cfg, where)
    hidden = f.int("hidden_size")
    heads = f.int("num_attention_heads")
    kv_heads = f.int("num_key_value_heads", default=heads)
    layers = moe_layer_ids(outer, where)
    if not layers:
        raise UserError(f"{where}: no decoder layer has routed experts (num_hidden_layers, mlp_only_layers, "
                        "decoder_sparse_step / first_k_dense_replace leave none)")
    if mt in ("deepseek_v2", "deepseek_v3"):
        experts, ffn = f.int("n_routed_experts"), f.int("moe_intermediate_size")
        shared, shared_ffn = f.int("n_shared_experts", default=0), None
    elif mt in ("qwen2_moe", "qwen3_moe"):
        experts, ffn = f.int("num_experts", "num_local_experts"), f.int("moe_intermediate_size")
        shared = 1 if mt == "qwen2_moe" and f.int("shared_expert_intermediate_size", default=0) > 0 else 0
        shared_ffn = f.int("shared_expert_intermediate_size") if shared else None
    elif mt == "olmoe":
        experts, ffn, shared, shared_ffn = f.int("num_experts", "num_local_experts"), f.int("intermediate_size"), 0, None
    else:  # mixtral, gpt_oss
        experts, ffn, shared, shared_ffn = f.int("num_local_experts", "num_experts"), f.int("intermediate_size"), 0, None
    top_k = f.int("num_experts_per_tok", "experts_per_token")
    weight_bytes, compute_dtype, dtype_note = _weight_bytes(cfg, outer, where)
    if mt in ("deepseek_v2", "deepseek_v3"):
        attention = _mla_attention(f, hidden, heads)
    else:
        head_dim = cfg.get("head_dim") or hidden // heads
        attention = {"num_heads": heads, "num_kv_heads": kv_heads, "head_dim": int(head_dim)}
    n = f.int("num_hidden_layers")
    path = Path(where)
    name = str(outer.get("_name_or_path") or (path.parent.name if path.name == "config.json" else path.stem) or mt)
    model: dict[str, Any] = {
        "name": name,
        "num_layers": len(layers),
        "num_experts": experts,
        "top_k": top_k,
        "hidden_size": hidden,
        "moe_intermediate_size": ffn,
        "attention": attention,
        "num_shared_experts": shared,
        "weight_bytes": weight_bytes,
        "activation_bytes": 2,
        "compute_dtype": compute_dtype,
        "source": (f"HF config {where} (model_type {mt}); MoE layers {format_indices(layers)} of {n} decoder layers; "
                   f"weights: {dtype_note}"),
    }
    if shared_ffn is not None:
        model["shared_intermediate_size"] = shared_ffn
    dense = _dense_weight_bytes(cfg, outer, weight_bytes)
    if dense is not None:
        model["dense_weight_bytes"] = dense
        model["source"] += f"; attention weights {dense:g} bytes (quantization_config.modules_to_not_convert)"
    return model, where


def _dense_weight_bytes(cfg: dict[str, Any], outer: dict[str, Any], weight_bytes: float) -> float | None:
    """Bytes per attention weight where the quantization leaves the attention out (gpt-oss: MXFP4 experts,
    ``modules_to_not_convert`` naming ``self_attn``): the checkpoint's dtype; None where it is quantized too."""
    quant = outer.get("quantization_config") or cfg.get("quantization_config")
    keep = quant.get("modules_to_not_convert") if isinstance(quant, dict) else None
    if not isinstance(keep, list) or not any("self_attn" in str(m) for m in keep):
        return None
    dtype = outer.get("torch_dtype") or outer.get("dtype") or cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"
    dense = float(_DTYPE_BYTES.get(str(dtype), 2))
    return dense if dense != weight_bytes else None


def _mla_attention(f: _Fields, hidden: int, heads: int) -> dict[str, Any]:
    """DeepSeek multi-head latent attention: heads as MHA, weights and KV cache of the LoRA form."""
    nope, rope, v = f.int("qk_nope_head_dim"), f.int("qk_rope_head_dim"), f.int("v_head_dim")
    kv_rank = f.int("kv_lora_rank")
    qk = nope + rope
    q_rank = f.cfg.get("q_lora_rank")
    q = hidden * heads * qk if q_rank is None else hidden * q_rank + q_rank * heads * qk
    params = q + hidden * (kv_rank + rope) + kv_rank * heads * (nope + v) + heads * v * hidden
    return {"num_heads": heads, "num_kv_heads": heads, "head_dim": qk, "params": params,
            "kv_bytes_per_token": (kv_rank + rope) * 2}
