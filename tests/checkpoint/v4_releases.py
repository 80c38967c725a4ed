"""The DeepSeek-V4 releases' config.json fields that their tensor inventory depends on (deepseek-v4.md 1.6)."""

FLASH = {
    "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", "vocab_size": 129280,
    "hidden_size": 4096, "num_hidden_layers": 43, "num_attention_heads": 64, "head_dim": 512, "q_lora_rank": 1024,
    "o_lora_rank": 1024, "o_groups": 8, "moe_intermediate_size": 2048, "n_routed_experts": 256,
    "n_shared_experts": 1, "num_experts_per_tok": 6, "num_hash_layers": 3, "index_n_heads": 64,
    "index_head_dim": 128, "hc_mult": 4, "num_nextn_predict_layers": 1, "expert_dtype": "fp4",
    "compress_ratios": [0, 0] + [4 if i % 2 == 0 else 128 for i in range(2, 43)] + [0],
}
FLASH_0731 = dict(FLASH, compress_ratios=FLASH["compress_ratios"][:43] + [0, 0, 0], dspark_block_size=5,
                  dspark_target_layer_ids=[40, 41, 42], dspark_markov_rank=256)
PRO = dict(FLASH, hidden_size=7168, num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536,
           n_routed_experts=384, moe_intermediate_size=3072, o_groups=16,
           compress_ratios=[128, 128] + [4 if i % 2 == 0 else 128 for i in range(2, 61)] + [0])
