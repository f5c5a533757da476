"""Text conditioning: frozen text encoders behind one interface, batching helpers, an embedding cache.

    encoder = load_text_encoder("minilm")          # or "t5:google/flan-t5-xl", or a to_config() dict
    text = encoder.encode(["a photo of a cat"])    # states (B, L, D), mask (B, L), pooled (B, D)
    both = concat([null_embedding(encoder, 1), text])   # unconditional + conditional rows for guidance
"""

from matryoshka.conditioning.base import TextEmbedding, TextEncoder, masked_mean
from matryoshka.conditioning.batching import concat, null_embedding, pad_embeddings, pad_to_length
from matryoshka.conditioning.cache import (
    EmbeddingCache,
    PrecomputeStats,
    cache_key,
    encoder_cache_id,
    precompute,
)
from matryoshka.conditioning.factory import (
    DEFAULT_TEXT_ENCODER,
    load_text_encoder,
    parse_spec,
    register_text_encoder,
)
from matryoshka.conditioning.minilm import MiniLMTextEncoder, bundled_minilm_path
from matryoshka.conditioning.t5 import T5TextEncoder

__all__ = [
    "DEFAULT_TEXT_ENCODER",
    "EmbeddingCache",
    "MiniLMTextEncoder",
    "PrecomputeStats",
    "T5TextEncoder",
    "TextEmbedding",
    "TextEncoder",
    "bundled_minilm_path",
    "cache_key",
    "concat",
    "encoder_cache_id",
    "load_text_encoder",
    "masked_mean",
    "null_embedding",
    "pad_embeddings",
    "pad_to_length",
    "parse_spec",
    "precompute",
    "register_text_encoder",
]
