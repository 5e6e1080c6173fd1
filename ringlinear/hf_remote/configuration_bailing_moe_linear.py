"""Ring-linear configuration (`model_type: bailing_moe_linear`) for transformers' remote code, written by ringlinear
beside the checkpoints it saves: the fields of `ringlinear.config.RingLinearConfig`, same names and defaults
(Ring-mini-linear-2.0). Needs only transformers."""

from transformers import PretrainedConfig


class BailingMoeLinearV2Config(PretrainedConfig):
    model_type = "bailing_moe_linear"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size=157184,
        hidden_size=2048,
        intermediate_size=5120,
        moe_intermediate_size=512,
        moe_shared_expert_intermediate_size=None,
        num_hidden_layers=20,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=128,
        layer_group_size=5,
        group_norm_size=4,
        linear_silu=False,
        lightning_layerwise_decay=True,
        first_k_dense_replace=1,
        num_experts=256,
        num_experts_per_tok=8,
        num_shared_experts=1,
        n_group=8,
        topk_group=4,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_bias_update_rate=1e-3,
        router_dtype="fp32",
        use_qk_norm=True,
        use_qkv_bias=False,
        use_bias=False,
        use_rmsnorm=True,
        rms_norm_eps=1e-6,
        partial_rotary_factor=0.5,
        rope_theta=1_000_000.0,
        rope_scaling=None,
        max_position_embeddings=131072,
        num_nextn_predict_layers=0,
        mtp_loss_scaling_factor=0.0,
        initializer_range=0.006,
        hidden_act="silu",
        use_cache=True,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=156892,
        pad_token_id=156892,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.moe_intermediate_size = moe_intermediate_size
        self.moe_shared_expert_intermediate_size = moe_shared_expert_intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.layer_group_size = layer_group_size
        self.group_norm_size = group_norm_size
        self.linear_silu = linear_silu
        self.lightning_layerwise_decay = lightning_layerwise_decay
        self.first_k_dense_replace = first_k_dense_replace
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.num_shared_experts = num_shared_experts
        self.n_group = n_group
        self.topk_group = topk_group
        self.norm_topk_prob = norm_topk_prob
        self.routed_scaling_factor = routed_scaling_factor
        self.score_function = score_function
        self.moe_router_enable_expert_bias = moe_router_enable_expert_bias
        self.moe_router_bias_update_rate = moe_router_bias_update_rate
        self.router_dtype = router_dtype
        self.use_qk_norm = use_qk_norm
        self.use_qkv_bias = use_qkv_bias
        self.use_bias = use_bias
        self.use_rmsnorm = use_rmsnorm
        self.rms_norm_eps = rms_norm_eps
        self.partial_rotary_factor = partial_rotary_factor
        self.rope_theta = rope_theta
        if isinstance(getattr(PretrainedConfig, "rope_scaling", None), property):
            # transformers >= 5 keeps RoPE parameters in `rope_parameters` (`rope_scaling` is a deprecated alias)
            self.rope_parameters = dict(rope_scaling) if rope_scaling else None
        else:
            self.rope_scaling = rope_scaling
        self.max_position_embeddings = max_position_embeddings
        self.num_nextn_predict_layers = num_nextn_predict_layers
        self.mtp_loss_scaling_factor = mtp_loss_scaling_factor
        self.initializer_range = initializer_range
        self.hidden_act = hidden_act
        self.use_cache = use_cache
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)


__all__ = ["BailingMoeLinearV2Config"]
