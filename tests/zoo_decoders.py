"""Decoder LMs of the zoo (tests/hf_zoo.py): dense, GQA/MQA, qk-norm, sliding window,
soft-capping, ALiBi, parallel residual and mixture-of-experts families."""

from __future__ import annotations

from hf_zoo import TEXT, L, _tf, arch

# ---------------------------------------------------------------------------- decoder LMs


@arch("llama", "LlamaForCausalLM", "causal-lm", traits=("gqa", "rope"))
def _llama():
    return _tf().LlamaConfig(**TEXT)


@arch("mistral", "MistralForCausalLM", "causal-lm", traits=("gqa", "sliding-window"))
def _mistral():
    return _tf().MistralConfig(**TEXT, sliding_window=8)


@arch("qwen2", "Qwen2ForCausalLM", "causal-lm", traits=("gqa", "qkv-bias"))
def _qwen2():
    return _tf().Qwen2Config(**TEXT)


@arch("qwen3", "Qwen3ForCausalLM", "causal-lm", traits=("gqa", "qk-norm"))
def _qwen3():
    return _tf().Qwen3Config(**TEXT, head_dim=16)


@arch("gemma", "GemmaForCausalLM", "causal-lm", traits=("mqa", "gelu"))
def _gemma():
    return _tf().GemmaConfig(**{**TEXT, "num_key_value_heads": 1}, head_dim=16)


@arch("gemma2", "Gemma2ForCausalLM", "causal-lm", traits=("soft-capping", "sliding-window"))
def _gemma2():
    return _tf().Gemma2Config(
        **TEXT, head_dim=16, sliding_window=8, attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0, attn_implementation="eager",
    )


@arch("phi3", "Phi3ForCausalLM", "causal-lm", traits=("fused-qkv",))
def _phi3():
    return _tf().Phi3Config(**TEXT, pad_token_id=0)


@arch("phi", "PhiForCausalLM", "causal-lm", traits=("parallel-residual", "partial-rope"))
def _phi():
    return _tf().PhiConfig(**TEXT, partial_rotary_factor=0.5)


@arch("gpt2", "GPT2LMHeadModel", "causal-lm", traits=("absolute-position", "conv1d"))
def _gpt2():
    return _tf().GPT2Config(vocab_size=512, n_embd=64, n_layer=L, n_head=4, n_positions=128)


@arch("gptj", "GPTJForCausalLM", "causal-lm", traits=("parallel-residual",))
def _gptj():
    return _tf().GPTJConfig(
        vocab_size=512, n_embd=64, n_layer=L, n_head=4, n_positions=128, rotary_dim=8
    )


@arch("gpt_neox", "GPTNeoXForCausalLM", "causal-lm", traits=("parallel-residual",))
def _gpt_neox():
    return _tf().GPTNeoXConfig(
        vocab_size=512, hidden_size=64, num_hidden_layers=L, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=128, use_parallel_residual=True,
    )


def _falcon(**kw):
    return _tf().FalconConfig(
        vocab_size=512, hidden_size=64, num_hidden_layers=L, num_attention_heads=4,
        max_position_embeddings=128, parallel_attn=True, new_decoder_architecture=False,
        bias=False, **kw,
    )


@arch("falcon", "FalconForCausalLM", "causal-lm", traits=("parallel-residual", "mqa"))
def _falcon_mqa():
    return _falcon(multi_query=True, alibi=False)


@arch("falcon_alibi", "FalconForCausalLM", "causal-lm", traits=("parallel-residual", "alibi"))
def _falcon_alibi():
    return _falcon(multi_query=False, alibi=True)


@arch("bloom", "BloomForCausalLM", "causal-lm", traits=("alibi", "eager"))
def _bloom():
    return _tf().BloomConfig(vocab_size=512, hidden_size=64, n_layer=L, n_head=4)


@arch("mpt", "MptForCausalLM", "causal-lm", traits=("alibi", "eager"))
def _mpt():
    return _tf().MptConfig(
        vocab_size=512, d_model=64, n_layers=L, n_heads=4, max_seq_len=128, expansion_ratio=2
    )


@arch("gpt_bigcode", "GPTBigCodeForCausalLM", "causal-lm", traits=("mqa",))
def _gpt_bigcode():
    return _tf().GPTBigCodeConfig(
        vocab_size=512, n_embd=64, n_layer=L, n_head=4, n_positions=128, multi_query=True
    )


@arch("opt", "OPTForCausalLM", "causal-lm", traits=("learned-position",))
def _opt():
    return _tf().OPTConfig(
        vocab_size=512, hidden_size=64, num_hidden_layers=L, num_attention_heads=4, ffn_dim=128,
        max_position_embeddings=128, word_embed_proj_dim=64,
    )


@arch("cohere", "CohereForCausalLM", "causal-lm", traits=("parallel-residual",))
def _cohere():
    return _tf().CohereConfig(**TEXT)


@arch("stablelm", "StableLmForCausalLM", "causal-lm", traits=("partial-rope", "layernorm"))
def _stablelm():
    return _tf().StableLmConfig(**TEXT)


@arch("olmo", "OlmoForCausalLM", "causal-lm", traits=("non-parametric-norm",))
def _olmo():
    return _tf().OlmoConfig(**TEXT, pad_token_id=1)


@arch("mixtral", "MixtralForCausalLM", "causal-lm", traits=("moe",))
def _mixtral():
    return _tf().MixtralConfig(**TEXT, num_local_experts=4, num_experts_per_tok=2)


@arch("qwen2_moe", "Qwen2MoeForCausalLM", "causal-lm", traits=("moe", "shared-expert"))
def _qwen2_moe():
    return _tf().Qwen2MoeConfig(
        **TEXT, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
    )


@arch("olmoe", "OlmoeForCausalLM", "causal-lm", traits=("moe", "qk-norm"))
def _olmoe():
    return _tf().OlmoeConfig(**TEXT, num_experts=4, num_experts_per_tok=2, pad_token_id=1)
