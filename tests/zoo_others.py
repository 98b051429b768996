"""Encoders, vision encoders, speech encoders, encoder-decoders and VLMs of the zoo
(tests/hf_zoo.py)."""

from __future__ import annotations

from hf_zoo import ENC, TEXT, VIS, L, _tf, arch, seq2seq_sites, vlm_sites

# ---------------------------------------------------------------------------- encoders


@arch("bert", "BertModel", "encoder", traits=("post-norm", "absolute-position"))
def _bert():
    return _tf().BertConfig(**ENC)


@arch("roberta", "RobertaModel", "encoder", traits=("post-norm",))
def _roberta():
    return _tf().RobertaConfig(**ENC, pad_token_id=1)


@arch("xlm_roberta", "XLMRobertaModel", "encoder", traits=("post-norm",))
def _xlm_roberta():
    return _tf().XLMRobertaConfig(**ENC, pad_token_id=1)


@arch("distilbert", "DistilBertModel", "encoder", sites=lambda c: c.n_layers)
def _distilbert():
    return _tf().DistilBertConfig(
        vocab_size=512, dim=64, n_layers=L, n_heads=4, hidden_dim=128, max_position_embeddings=128
    )


@arch("albert", "AlbertModel", "encoder", traits=("shared-weights",), shared_weights=True)
def _albert():
    return _tf().AlbertConfig(**ENC, embedding_size=32, num_hidden_groups=1)


@arch("electra", "ElectraModel", "encoder", traits=("embedding-projection",))
def _electra():
    return _tf().ElectraConfig(**ENC, embedding_size=32)


@arch("deberta_v2", "DebertaV2Model", "encoder", traits=("disentangled", "relative-position"))
def _deberta_v2():
    return _tf().DebertaV2Config(
        **ENC, relative_attention=True, position_buckets=8, max_relative_positions=16,
        pos_att_type=["p2c", "c2p"],
    )


@arch("mpnet", "MPNetModel", "encoder", traits=("relative-position",))
def _mpnet():
    return _tf().MPNetConfig(**ENC)  # 32 buckets: MPNet's encoder hard-codes the count


@arch("bigbird", "BigBirdModel", "encoder", traits=("local-global",))
def _bigbird():
    # block-sparse needs seq > (5 + 2 * random blocks) * block; at 16 tokens it runs full
    return _tf().BigBirdConfig(**ENC, attention_type="original_full", block_size=4)


@arch("longformer", "LongformerModel", "encoder", traits=("local-global", "windowed"))
def _longformer():
    return _tf().LongformerConfig(**ENC, attention_window=4, pad_token_id=1)


# ---------------------------------------------------------------------------- vision


@arch("vit", "ViTModel", "vision", traits=("plain",))
def _vit():
    return _tf().ViTConfig(**VIS)


@arch("deit", "DeiTModel", "vision", traits=("distillation-token",))
def _deit():
    return _tf().DeiTConfig(**VIS)


@arch("beit", "BeitModel", "vision", traits=("relative-bias",))
def _beit():
    return _tf().BeitConfig(**VIS, use_relative_position_bias=True, use_mask_token=False)


@arch("data2vec_vision", "Data2VecVisionModel", "vision", traits=("shared-relative-bias",))
def _data2vec_vision():
    return _tf().Data2VecVisionConfig(**VIS, use_shared_relative_position_bias=True)


@arch("swin", "SwinModel", "vision", sites=lambda c: sum(c.depths), traits=("windowed",))
def _swin():
    return _tf().SwinConfig(
        image_size=32, patch_size=4, num_channels=3, embed_dim=32, depths=[2], num_heads=[2],
        window_size=4, mlp_ratio=2.0,  # 8x8 patches, 4 windows; the second layer shifts them
    )


@arch("clip_vision", "CLIPVisionModel", "vision", traits=("pre-norm", "quick-gelu"))
def _clip_vision():
    return _tf().CLIPVisionConfig(**VIS)


@arch("siglip_vision", "SiglipVisionModel", "vision", traits=("attention-pooling-head",))
def _siglip_vision():
    return _tf().SiglipVisionConfig(**VIS, vision_use_head=False)


@arch("dinov2", "Dinov2Model", "vision", traits=("layer-scale",))
def _dinov2():
    return _tf().Dinov2Config(**{**VIS, "patch_size": 4}, mlp_ratio=2)


# ---------------------------------------------------------------------------- speech


_CONV = dict(conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 4), num_feat_extract_layers=2)


@arch("wav2vec2", "Wav2Vec2Model", "speech", traits=("conv-features", "conv-position"))
def _wav2vec2():
    return _tf().Wav2Vec2Config(
        **{k: v for k, v in ENC.items() if k != "max_position_embeddings"}, **_CONV,
        num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2,
    )


@arch("hubert", "HubertModel", "speech", traits=("conv-features",))
def _hubert():
    return _tf().HubertConfig(
        **{k: v for k, v in ENC.items() if k != "max_position_embeddings"}, **_CONV,
        num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2,
    )


# ---------------------------------------------------------------------------- encoder-decoder


@arch("t5", "T5ForConditionalGeneration", "seq2seq", sites=seq2seq_sites,
      traits=("relative-bias", "cross-attention"))
def _t5():
    return _tf().T5Config(
        vocab_size=512, d_model=64, d_kv=16, d_ff=128, num_layers=L, num_decoder_layers=L,
        num_heads=4, relative_attention_num_buckets=8, decoder_start_token_id=0,
    )


@arch("bart", "BartForConditionalGeneration", "seq2seq", sites=seq2seq_sites,
      traits=("post-norm", "cross-attention"))
def _bart():
    return _tf().BartConfig(
        vocab_size=512, d_model=64, encoder_layers=L, decoder_layers=L,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
        decoder_ffn_dim=128, max_position_embeddings=128,
    )


@arch("whisper", "WhisperForConditionalGeneration", "seq2seq", sites=seq2seq_sites,
      traits=("speech", "cross-attention"))
def _whisper():
    return _tf().WhisperConfig(
        vocab_size=512, num_mel_bins=16, d_model=64, encoder_layers=L, decoder_layers=L,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
        decoder_ffn_dim=128, max_source_positions=16, max_target_positions=32,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        suppress_tokens=None, begin_suppress_tokens=None,
    )


# ---------------------------------------------------------------------------- VLMs


@arch("llava", "LlavaForConditionalGeneration", "vlm", sites=vlm_sites,
      traits=("clip-vision", "llama"))
def _llava():
    tf = _tf()
    return tf.LlavaConfig(
        vision_config=tf.CLIPVisionConfig(**VIS),
        text_config=tf.LlamaConfig(**TEXT),
        image_token_index=511,
        image_seq_length=16,
        vision_feature_layer=-1,  # every vision layer feeds the text model
    )


@arch("paligemma", "PaliGemmaForConditionalGeneration", "vlm", sites=vlm_sites,
      traits=("siglip-vision", "gemma", "prefix-lm"))
def _paligemma():
    tf = _tf()
    vision = tf.SiglipVisionConfig(**VIS, vision_use_head=False)
    text = tf.GemmaConfig(**{**TEXT, "num_key_value_heads": 1}, head_dim=16)
    return tf.PaliGemmaConfig(
        vision_config=vision, text_config=text, image_token_index=511, projection_dim=64,
    )


@arch("idefics3", "Idefics3ForConditionalGeneration", "vlm", sites=vlm_sites,
      traits=("5d-pixels", "pixel-shuffle", "llama"))
def _idefics3():
    tf = _tf()
    return tf.Idefics3Config(
        vision_config=tf.Idefics3VisionConfig(**VIS),
        text_config=tf.LlamaConfig(**TEXT),
        image_token_id=511,
        scale_factor=2,  # 16 patches -> 4 image tokens
    )


@arch("aya_vision", "AyaVisionForConditionalGeneration", "vlm", sites=vlm_sites,
      traits=("siglip-vision", "parallel-residual", "pixel-shuffle"))
def _aya_vision():
    tf = _tf()
    return tf.AyaVisionConfig(
        vision_config=tf.SiglipVisionConfig(**VIS, vision_use_head=False),
        text_config=tf.Cohere2Config(**TEXT),
        image_token_index=511,
        downsample_factor=2,
        vision_feature_layer=-1,
    )
