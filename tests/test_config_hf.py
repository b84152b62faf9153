"""``--model`` takes a Hugging Face config.json or checkpoint folder (moe_gps/config/hf.py).

Each fixture is a config.json as the transformers config class of its family writes it
(``MixtralConfig``, ``Qwen2MoeConfig``, ``Qwen3MoeConfig``, ``DeepseekV2Config``,
``DeepseekV3Config``, ``OlmoeConfig``, ``GptOssConfig`` in
``transformers/models/<family>/configuration_<family>.py``: their ``__init__`` argument
names are the JSON keys), with the values of the released checkpoints' config.json.
Only the keys the model spec needs, plus a few unrelated ones the reader must ignore.
"""

from __future__ import annotations

import json

import pytest

from moe_gps.config import load_model
from moe_gps.config.hf import FAMILIES, moe_layer_ids
from moe_gps.errors import UserError

COMMON = {"vocab_size": 32000, "rms_norm_eps": 1e-5, "rope_theta": 1e6, "tie_word_embeddings": False,
          "max_position_embeddings": 32768, "torch_dtype": "bfloat16", "transformers_version": "4.51.0"}

# mistralai/Mixtral-8x7B-v0.1
MIXTRAL = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 4096,
           "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
           "num_local_experts": 8, "num_experts_per_tok": 2, "router_aux_loss_coef": 0.02, **COMMON}
# Qwen/Qwen1.5-MoE-A2.7B (model_type qwen2_moe), with layer 1 made dense to check mlp_only_layers
QWEN2_MOE = {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "hidden_size": 2048,
             "intermediate_size": 5632, "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
             "num_experts": 60, "num_experts_per_tok": 4, "num_hidden_layers": 24, "num_attention_heads": 16,
             "num_key_value_heads": 16, "decoder_sparse_step": 1, "mlp_only_layers": [1], "norm_topk_prob": False,
             **COMMON}
# Qwen/Qwen3-30B-A3B
QWEN3_MOE = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
             "intermediate_size": 6144, "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
             "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
             "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True, **COMMON}
# deepseek-ai/DeepSeek-V2-Lite (no q LoRA)
DEEPSEEK_V2 = {"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "hidden_size": 2048,
               "intermediate_size": 10944, "moe_intermediate_size": 1408, "n_routed_experts": 64,
               "n_shared_experts": 2, "num_experts_per_tok": 6, "first_k_dense_replace": 1, "moe_layer_freq": 1,
               "num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16, "q_lora_rank": None,
               "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
               "topk_method": "greedy", **COMMON}
# deepseek-ai/DeepSeek-V3 (FP8 weights as released)
DEEPSEEK_V3 = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": 7168,
               "intermediate_size": 18432, "moe_intermediate_size": 2048, "n_routed_experts": 256,
               "n_shared_experts": 1, "num_experts_per_tok": 8, "first_k_dense_replace": 3, "moe_layer_freq": 1,
               "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128, "q_lora_rank": 1536,
               "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
               "n_group": 8, "topk_group": 4, "num_nextn_predict_layers": 1,
               "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]},
               **COMMON}
# allenai/OLMoE-1B-7B-0924
OLMOE = {"architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", "hidden_size": 2048, "intermediate_size": 1024,
         "num_experts": 64, "num_experts_per_tok": 8, "num_hidden_layers": 16, "num_attention_heads": 16,
         "num_key_value_heads": 16, "norm_topk_prob": False, **COMMON}
# openai/gpt-oss-20b (MXFP4 experts)
GPT_OSS = {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "hidden_size": 2880,
           "intermediate_size": 2880, "num_local_experts": 32, "num_experts_per_tok": 4, "experts_per_token": 4,
           "num_hidden_layers": 24, "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64,
           "sliding_window": 128, "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": []},
           **COMMON}


def _write(tmp_path, cfg: dict, folder: str = "ckpt") -> str:
    d = tmp_path / folder
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


@pytest.mark.parametrize("cfg, layers, experts, k, ffn, attn, shared, wbytes", [
    (MIXTRAL, 32, 8, 2, 14336, (32, 8, 128), (0, None), 2.0),
    (QWEN2_MOE, 23, 60, 4, 1408, (16, 16, 128), (1, 5632), 2.0),
    (QWEN3_MOE, 48, 128, 8, 768, (32, 4, 128), (0, None), 2.0),
    (DEEPSEEK_V2, 26, 64, 6, 1408, (16, 16, 192), (2, None), 2.0),
    (DEEPSEEK_V3, 58, 256, 8, 2048, (128, 128, 192), (1, None), 1.0),
    (OLMOE, 16, 64, 8, 1024, (16, 16, 128), (0, None), 2.0),
    (GPT_OSS, 24, 32, 4, 2880, (64, 8, 64), (0, None), 4.25 / 8),
], ids=["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "olmoe", "gpt_oss"])
def test_hf_config_of_each_family(tmp_path, cfg, layers, experts, k, ffn, attn, shared, wbytes):
    m = load_model(_write(tmp_path, cfg))                    # the checkpoint folder
    assert (m.num_layers, m.num_experts, m.top_k, m.moe_intermediate_size) == (layers, experts, k, ffn)
    assert (m.attention.num_heads, m.attention.num_kv_heads, m.attention.head_dim) == attn
    assert (m.num_shared_experts, m.shared_intermediate_size) == shared
    assert m.weight_bytes == pytest.approx(wbytes) and m.hidden_size == cfg["hidden_size"]
    assert m.name == "ckpt" and cfg["model_type"] in m.source
    assert load_model(str(tmp_path / "ckpt" / "config.json")) == m     # the file itself


@pytest.mark.parametrize("preset, cfg", [("mixtral-8x7b", MIXTRAL), ("qwen3-30b-a3b", QWEN3_MOE),
                                         ("deepseek-v3", DEEPSEEK_V3)])
def test_hf_config_gives_the_hand_written_presets(tmp_path, preset, cfg):
    """The presets were copied from these configs by hand; reading the config gives the same sizes."""
    m, p = load_model(_write(tmp_path, cfg)), load_model(preset)
    for field in ("num_layers", "num_experts", "top_k", "hidden_size", "moe_intermediate_size", "num_shared_experts",
                  "weight_bytes", "compute_dtype", "expert_bytes", "attention_params", "kv_bytes_per_token"):
        assert getattr(m, field) == getattr(p, field), field


def test_moe_layer_rules():
    assert moe_layer_ids(DEEPSEEK_V3) == list(range(3, 61))
    assert moe_layer_ids({**QWEN2_MOE, "decoder_sparse_step": 2, "mlp_only_layers": []}) == list(range(1, 24, 2))
    assert moe_layer_ids({**DEEPSEEK_V2, "moe_layer_freq": 2}) == list(range(2, 27, 2))
    # multimodal wrappers keep the language model under text_config
    assert moe_layer_ids({"model_type": "qwen3_vl_moe", "text_config": QWEN3_MOE}) == list(range(48))


@pytest.mark.parametrize("cfg, message", [
    ({"model_type": "llama", "hidden_size": 8}, "model_type 'llama'; MoE-GPS reads HF configs of mixtral"),
    ({k: v for k, v in MIXTRAL.items() if k != "num_local_experts"}, "num_local_experts or num_experts: missing"),
    ({**MIXTRAL, "num_experts_per_tok": "two"}, "num_experts_per_tok: must be an integer, got 'two'"),
    ({**MIXTRAL, "quantization_config": {"quant_method": "awq"}}, "quant_method 'awq' is not understood"),
    ({**MIXTRAL, "num_experts_per_tok": 9}, "top_k: 9 exceeds num_experts=8"),
])
def test_bad_hf_configs_are_one_line(tmp_path, cfg, message):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=message) as err:
        load_model(str(path))
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_folder_without_config_and_broken_json(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="is a folder without a config.json"):
        load_model(str(tmp_path / "empty"))
    (tmp_path / "bad.json").write_text("{\"model_type\": ")
    with pytest.raises(UserError, match=r"bad.json: not valid JSON at line 1"):
        load_model(str(tmp_path / "bad.json"))


def test_transformers_own_config_classes_are_read(tmp_path):
    """The configs transformers itself writes (``to_json_file``) are read, whatever its version
    calls the expert count (transformers 5 writes ``num_local_experts`` for Qwen3-MoE)."""
    transformers = pytest.importorskip("transformers")
    classes = {"mixtral": "MixtralConfig", "qwen2_moe": "Qwen2MoeConfig", "qwen3_moe": "Qwen3MoeConfig",
               "deepseek_v2": "DeepseekV2Config", "deepseek_v3": "DeepseekV3Config", "olmoe": "OlmoeConfig",
               "gpt_oss": "GptOssConfig"}
    assert set(classes) == set(FAMILIES)
    for mt, name in classes.items():
        cls = getattr(transformers, name, None)
        if cls is None:
            continue
        extra = {"num_experts_per_tok": 6} if mt == "deepseek_v2" else {}   # its class default is None
        d = tmp_path / mt
        cls(**extra).save_pretrained(d)
        m = load_model(str(d))
        cfg = json.loads((d / "config.json").read_text())
        assert m.top_k == cfg["num_experts_per_tok"] and m.num_layers == len(moe_layer_ids(cfg)) >= 1, mt


def test_simulate_and_recommend_model_flag_takes_a_checkpoint_folder(tmp_path):
    from moe_gps.cli.common_args import model_from_args
    from moe_gps.cli.main import build_parser

    folder = _write(tmp_path, QWEN3_MOE, "Qwen3-30B-A3B")
    for command in ("simulate", "recommend"):
        args = build_parser().parse_args([command, "t.parquet", "--model", folder])
        m = model_from_args(args, None)
        assert m == load_model(folder) and m.name == "Qwen3-30B-A3B"
