"""Input names, model kind and example shapes come from the model (forward signature,
main_input_name, config, tokenizer), never from its class name; a factory's examples are the
truth. Tiny Hugging Face models built offline, one per input family."""

from __future__ import annotations

import os

import pytest
import torch

from attnc.capture.program import capture
from attnc.errors import CalibrationError, LoadError
from attnc.load.calibration import CalibrationConfig, generated_batches, load_calibration
from attnc.load.models import load_model, wrap_hf

os.environ.setdefault("TRANSFORMERS_DISABLE_TORCH_CHECK", "1")
tf = pytest.importorskip("transformers")

ENC = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
DEC = dict(
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    intermediate_size=64,
    head_dim=16,
    max_position_embeddings=256,
)
VIS = dict(ENC, image_size=32, patch_size=8)
SEQ2SEQ = dict(
    vocab_size=128,
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
)
AUDIO = dict(
    ENC,
    vocab_size=32,
    conv_dim=(16, 16),
    conv_stride=(5, 2),
    conv_kernel=(10, 3),
    num_conv_pos_embeddings=8,
    num_conv_pos_embedding_groups=2,
)


def _config(arch: str):
    if arch == "llama":
        return tf.LlamaForCausalLM, tf.LlamaConfig(**DEC)
    if arch == "bert":
        return tf.BertModel, tf.BertConfig(vocab_size=128, **ENC)
    if arch == "roberta":  # one token type: no token_type_ids without a tokenizer asking for it
        return tf.RobertaModel, tf.RobertaConfig(vocab_size=128, type_vocab_size=1, **ENC)
    if arch == "vit":
        return tf.ViTModel, tf.ViTConfig(**VIS)
    if arch == "beit":  # relative position bias
        return tf.BeitModel, tf.BeitConfig(**VIS, use_relative_position_bias=True)
    if arch == "data2vec-vision":
        return tf.Data2VecVisionModel, tf.Data2VecVisionConfig(
            **VIS, use_relative_position_bias=True
        )
    if arch == "swin":  # windowed attention
        return tf.SwinModel, tf.SwinConfig(
            image_size=32,
            patch_size=4,
            embed_dim=16,
            depths=[1, 1],
            num_heads=[2, 2],
            window_size=4,
        )
    if arch == "whisper":
        return tf.WhisperForConditionalGeneration, tf.WhisperConfig(
            **SEQ2SEQ,
            num_mel_bins=8,
            max_source_positions=16,
            max_target_positions=32,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=3,
        )
    if arch == "wav2vec2":
        return tf.Wav2Vec2Model, tf.Wav2Vec2Config(**AUDIO)
    if arch == "hubert":
        return tf.HubertModel, tf.HubertConfig(**AUDIO)
    if arch == "t5":
        return tf.T5ForConditionalGeneration, tf.T5Config(
            vocab_size=128, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2
        )
    if arch == "bart":
        return tf.BartForConditionalGeneration, tf.BartConfig(**SEQ2SEQ, max_position_embeddings=64)
    if arch == "llava":
        return tf.LlavaForConditionalGeneration, tf.LlavaConfig(
            vision_config=tf.CLIPVisionConfig(**VIS),
            text_config=tf.LlamaConfig(**DEC),
            image_token_index=127,
            image_seq_length=16,
        )
    if arch == "paligemma":
        return tf.PaliGemmaForConditionalGeneration, tf.PaliGemmaConfig(
            vision_config=tf.SiglipVisionConfig(**VIS),
            text_config=tf.GemmaConfig(**DEC),
            image_token_index=127,
            projection_dim=32,
        )
    if arch == "gemma3":
        return tf.Gemma3ForConditionalGeneration, tf.Gemma3Config(
            vision_config=tf.SiglipVisionConfig(**VIS),
            text_config=tf.Gemma3TextConfig(**DEC),
            image_token_index=127,
            mm_tokens_per_image=4,
            boi_token_index=125,
            eoi_token_index=126,
        )
    if arch == "idefics3":  # pixels (batch, images, channels, height, width), pixel shuffle
        return tf.Idefics3ForConditionalGeneration, tf.Idefics3Config(
            vision_config=tf.Idefics3VisionConfig(**VIS),
            text_config=tf.LlamaConfig(**DEC),
            image_token_id=127,
            scale_factor=2,
        )
    if arch == "qwen2-vl":  # flattened patches + image_grid_thw: not worked out, a factory is
        return tf.Qwen2VLForConditionalGeneration, tf.Qwen2VLConfig(
            vision_config=dict(
                depth=2,
                embed_dim=32,
                hidden_size=32,
                num_heads=2,
                patch_size=4,
                spatial_merge_size=2,
                temporal_patch_size=2,
            ),
            text_config=dict(**DEC, rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]}),
            image_token_id=127,
            video_token_id=126,
            vision_start_token_id=125,
        )
    raise KeyError(arch)


def build(arch: str):
    cls, cfg = _config(arch)
    torch.manual_seed(0)
    return cls._from_config(cfg, attn_implementation="sdpa").eval()


# arch -> (kind, {input name: shape}); shapes follow the config (image 32, 8 mel bins x 32
# frames, 170 audio samples = 16 frames of the conv stack), 16 image tokens for LLaVA/PaliGemma,
# 4 for Idefics3 (4x4 patches shuffled by 2)
EXPECT = {
    "llama": ("causal-lm", {"input_ids": (2, 16), "attention_mask": (2, 16)}),
    "bert": (
        "encoder",
        {"input_ids": (2, 16), "attention_mask": (2, 16), "token_type_ids": (2, 16)},
    ),
    "roberta": ("encoder", {"input_ids": (2, 16), "attention_mask": (2, 16)}),
    "vit": ("vision", {"pixel_values": (2, 3, 32, 32)}),
    "beit": ("vision", {"pixel_values": (2, 3, 32, 32)}),
    "data2vec-vision": ("vision", {"pixel_values": (2, 3, 32, 32)}),
    "swin": ("vision", {"pixel_values": (2, 3, 32, 32)}),
    "whisper": ("speech", {"input_features": (2, 8, 32), "decoder_input_ids": (2, 12)}),
    "wav2vec2": ("speech", {"input_values": (2, 170)}),
    "hubert": ("speech", {"input_values": (2, 170)}),
    "t5": (
        "seq2seq",
        {"input_ids": (2, 16), "attention_mask": (2, 16), "decoder_input_ids": (2, 12)},
    ),
    "bart": (
        "seq2seq",
        {"input_ids": (2, 16), "attention_mask": (2, 16), "decoder_input_ids": (2, 12)},
    ),
    "llava": (
        "vlm",
        {"input_ids": (2, 32), "attention_mask": (2, 32), "pixel_values": (2, 3, 32, 32)},
    ),
    "paligemma": (
        "vlm",
        {"input_ids": (2, 32), "attention_mask": (2, 32), "pixel_values": (2, 3, 32, 32)},
    ),
    "gemma3": (
        "vlm",
        {"input_ids": (2, 20), "attention_mask": (2, 20), "pixel_values": (2, 3, 32, 32)},
    ),
    "idefics3": (
        "vlm",
        {"input_ids": (2, 20), "attention_mask": (2, 20), "pixel_values": (2, 1, 3, 32, 32)},
    ),
}
IMAGE_TOKENS = {"llava": 16, "paligemma": 16, "gemma3": 4, "idefics3": 4}


@pytest.mark.parametrize("arch", list(EXPECT))
def test_inputs_from_the_model(arch):
    model = build(arch)
    loaded = wrap_hf(model, arch, None, None)
    kind, shapes = EXPECT[arch]
    assert loaded.kind == kind
    assert loaded.input_names == list(shapes)
    got = zip(loaded.input_names, loaded.example_args, strict=True)
    assert {n: tuple(t.shape) for n, t in got} == shapes
    if arch in IMAGE_TOKENS:
        ids = loaded.example_args[0]
        assert ((ids == 127).sum(1) == IMAGE_TOKENS[arch]).all()
    if arch == "whisper":  # the decoder starts with its start token
        assert (loaded.example_args[1][:, 0] == 3).all()
    with torch.no_grad():
        out = loaded.module(*loaded.example_args)
    assert isinstance(out, torch.Tensor) and torch.isfinite(out).all()


CAPTURE = ["beit", "swin", "hubert", "t5"]
SLOW = ["whisper", "gemma3", "idefics3"]
# PaliGemma: torch.export of its text path differs from eager (eager passes no mask and SDPA runs
# is_causal; the exported graph carries a materialised mask and the logits differ by ~0.04)
WRONG = pytest.mark.xfail(strict=True, reason="PaliGemma's exported graph differs from eager")


@pytest.mark.parametrize(
    "arch",
    CAPTURE
    + [pytest.param(a, marks=pytest.mark.slow) for a in SLOW]
    + [pytest.param("paligemma", marks=[pytest.mark.slow, WRONG])],
)
def test_capture_beyond_text_and_vit(arch):
    """Capture runs on what the loader built, and the captured graph computes what the model
    computes (relative-bias and windowed vision, speech, encoder-decoder, a non-LLaVA VLM)."""
    loaded = wrap_hf(build(arch), arch, None, None)
    program = capture(loaded)
    assert program.sites
    with torch.no_grad():
        torch.testing.assert_close(
            program(*loaded.example_args), loaded.module(*loaded.example_args)
        )


def test_unworkable_vlm_is_one_line_error():
    """Qwen2-VL's pixels are flattened patches with a grid: not guessed, a one-line error that
    names the factory form."""
    with pytest.raises(LoadError) as err:
        wrap_hf(build("qwen2-vl"), "qwen2-vl", None, None)
    text = err.value.one_line()
    assert "\n" not in text and "Qwen2VLForConditionalGeneration" in text
    assert "image inputs" in text and "file.py:factory" in text
    assert "--input-shape" not in text  # (batch, seq) sets no image layout


class _Series(tf.PreTrainedModel):
    """A Hugging Face model whose main input attnc does not know."""

    config_class = tf.PretrainedConfig
    main_input_name = "past_values"

    def __init__(self, config):
        super().__init__(config)
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, past_values, return_dict=None):
        return self.proj(past_values)


def test_unknown_inputs_say_which_form_to_use():
    model = _Series(tf.PretrainedConfig()).eval()
    with pytest.raises(LoadError) as err:
        wrap_hf(model, "series", None, None)
    text = err.value.one_line()
    assert "'past_values'" in text and "--input-shape" in text and "factory" in text
    loaded = wrap_hf(model, "series", None, [2, 8, 4])
    assert loaded.kind == "custom" and loaded.input_names == ["past_values"]
    assert loaded.module(*loaded.example_args).shape == (2, 8, 4)


# ----------------------------------------------------------------------------------------------
# factories and folders


FACTORIES = """
import torch
import test_inputs as T

def ids_only():
    return T.build("llama"), (torch.randint(0, 128, (2, 8)),)

def ids_tensor():
    return T.build("llama"), torch.randint(0, 128, (2, 8))

def as_dict():
    ids = torch.randint(0, 128, (2, 8))
    return T.build("bert"), {"input_ids": ids, "token_type_ids": torch.zeros_like(ids)}

def vlm_dict():
    ids = torch.randint(0, 100, (2, 24))
    ids[:, 2:18] = 127
    return T.build("llava"), {"input_ids": ids, "pixel_values": torch.randn(2, 3, 32, 32)}

def bad_name():
    return T.build("llama"), {"tokens": torch.zeros(2, 8, dtype=torch.long)}

def too_many():
    return torch.nn.Linear(4, 4), (torch.randn(2, 4), torch.randn(2, 4))
"""


@pytest.fixture(scope="module")
def factories(tmp_path_factory):
    f = tmp_path_factory.mktemp("factories") / "made.py"
    f.write_text(FACTORIES)
    return f


def test_factory_examples_are_the_truth(factories):
    """Fewer tensors than a guess would give (the old `zip()` crash), a bare tensor, and a dict
    of keyword tensors: each named from the forward signature, the given tensors kept."""
    for fn in ("ids_only", "ids_tensor"):
        loaded = load_model(f"{factories}:{fn}")
        assert loaded.kind == "causal-lm" and loaded.input_names == ["input_ids"]
        assert loaded.example_args[0].shape == (2, 8)
    program = capture(loaded)
    assert len(program.sites) == 2
    loaded = load_model(f"{factories}:as_dict")
    assert loaded.kind == "encoder"
    assert loaded.input_names == ["input_ids", "token_type_ids"]
    with torch.no_grad():
        ref = loaded.module.model(*loaded.example_args[:1]).last_hidden_state
        assert torch.equal(loaded.module(*loaded.example_args), ref)  # by keyword, not position
    loaded = load_model(f"{factories}:vlm_dict")
    assert loaded.kind == "vlm" and loaded.input_names == ["input_ids", "pixel_values"]
    assert loaded.module(*loaded.example_args).shape == (2, 24, 128)


@pytest.mark.parametrize(
    "fn,words", [("bad_name", "'tokens' is not a parameter"), ("too_many", "gives 2 example")]
)
def test_factory_examples_that_do_not_fit(factories, fn, words):
    with pytest.raises(LoadError) as err:
        load_model(f"{factories}:{fn}")
    assert words in err.value.one_line()


def _bert_folder(path, tokenizer: bool):
    build("bert").save_pretrained(str(path))
    if tokenizer:
        vocab = path / "vocab.txt"
        words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world"]
        vocab.write_text("\n".join(words + [f"w{i}" for i in range(121)]))
        tf.BertTokenizer(vocab_file=str(vocab)).save_pretrained(str(path))
        vocab.unlink()
    return path


def test_hf_folder_keeps_token_type_ids_the_tokenizer_emits(tmp_path):
    """A BERT folder with its tokenizer: the inputs are what the tokenizer emits, so tokenizer
    output feeds the model (and its ONNX export) as is."""
    loaded = load_model(str(_bert_folder(tmp_path / "bert", tokenizer=True)))
    assert loaded.kind == "encoder" and loaded.tokenizer is not None
    enc = loaded.tokenizer(["hello world", "hello"], padding=True, return_tensors="pt")
    assert set(loaded.input_names) == set(enc.keys())
    with torch.no_grad():
        out = loaded.module(*(enc[n] for n in loaded.input_names))
        ref = loaded.module.model(**enc).last_hidden_state
    assert torch.equal(out, ref)


def test_hf_folders_of_other_kinds(tmp_path):
    for arch in ("whisper", "beit", "t5"):
        build(arch).save_pretrained(str(tmp_path / arch))
        loaded = load_model(str(tmp_path / arch))
        kind, shapes = EXPECT[arch]
        assert loaded.kind == kind and loaded.input_names == list(shapes), arch


# ----------------------------------------------------------------------------------------------
# calibration for the new kinds


def test_calibration_fills_what_text_cannot(tmp_path):
    data = tmp_path / "c.jsonl"
    data.write_text('{"input_ids": [5, 6, 7, 8, 9, 10]}\n{"input_ids": [11, 12, 13]}\n')
    bert = wrap_hf(build("bert"), "bert", None, None)
    ds = load_calibration(
        str(data),
        names=bert.input_names,
        example_args=bert.example_args,
        cfg=CalibrationConfig(samples=2, batch_size=2, holdout=0.0),
    )
    args = dict(zip(bert.input_names, ds.calib[0].args, strict=True))
    assert (args["token_type_ids"] == 0).all() and args["input_ids"][0, 0] == 5
    whisper = wrap_hf(build("whisper"), "whisper", None, None)
    ds = load_calibration(
        str(data),
        names=whisper.input_names,
        example_args=whisper.example_args,
        cfg=CalibrationConfig(samples=2, batch_size=2, holdout=0.0),
    )
    feats, dec = ds.calib[0].args
    assert feats.shape == (dec.shape[0], 8, 32) and feats.is_floating_point()
    assert dec[0, 0] == 5  # the text feeds the decoder
    hubert = wrap_hf(build("hubert"), "hubert", None, None)
    with pytest.raises(CalibrationError, match="takes no token ids"):
        load_calibration(
            str(data),
            names=hubert.input_names,
            example_args=hubert.example_args,
            cfg=CalibrationConfig(samples=2, batch_size=2),
        )


def test_generated_vlm_batches_keep_one_image_of_tokens():
    loaded = wrap_hf(build("llava"), "llava", None, None)
    for b in generated_batches(
        loaded.example_args, loaded.input_names, CalibrationConfig(samples=8, batch_size=4)
    ):
        ids = b.args[0]
        assert ids.shape == (4, 32) and ((ids == 127).sum(1) == 16).all()
        with torch.no_grad():
            assert torch.isfinite(loaded.module(*b.args)).all()
