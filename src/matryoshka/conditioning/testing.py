"""A tiny random T5 (weights + tokenizer) saved to disk, for tests that need a T5 without a download.

`make_tiny_t5(path)` writes a directory that loads through exactly the code path users take with a
real checkpoint: `T5TextEncoder(path)` -> AutoTokenizer + T5EncoderModel.from_pretrained.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Word pieces carry the SentencePiece word-start marker, like T5's vocabulary; the single letters let
# any lowercase ASCII word tokenize (letter by letter) without <unk>.
TINY_T5_WORDS = [
    *("a", "an", "the", "of", "on", "in", "with", "and", "photo", "picture", "painting", "drawing"),
    *("cat", "dog", "bird", "horse", "car", "tree", "house", "red", "green", "blue", "yellow", "black"),
    *("white", "big", "small", "sitting", "running", "flying", "under", "over", "near", "beach", "city"),
    *("night", "day", "snow", "grass", "river", "mountain"),
]
TINY_T5_PAD_ID = 0
TINY_T5_EOS_ID = 1
TINY_T5_UNK_ID = 2
TINY_T5_DIM = 32


def tiny_t5_vocab() -> list[tuple[str, float]]:
    """(piece, log-probability) pairs of the tiny Unigram vocabulary; <pad> 0, </s> 1, <unk> 2 as in T5."""
    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    words = [("\u2581" + word, -2.0) for word in TINY_T5_WORDS]
    letters = [(chr(code), -6.0) for code in range(ord("a"), ord("z") + 1)]
    return specials + words + [("\u2581", -4.0)] + letters


def make_tiny_t5(path: str | Path, seed: int = 0, d_model: int = TINY_T5_DIM) -> Path:
    """Writes a randomly initialised 1-layer T5 encoder (d_model 32 unless given) and its tokenizer to `path`.

    The tokenizer is a SentencePiece-style Unigram model (lowercasing, "\u2581" word marker) whose
    post-processor appends `</s>` to every sequence, as T5's does. Returns `path`.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = tiny_t5_vocab()

    backend = Tokenizer(models.Unigram(vocab, unk_id=TINY_T5_UNK_ID, byte_fallback=False))
    backend.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Strip()])
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", TINY_T5_EOS_ID)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="right",
        model_max_length=512,
    )
    tokenizer.save_pretrained(path)

    config = T5Config(
        vocab_size=len(vocab),
        d_model=d_model,
        d_kv=16,
        d_ff=64,
        num_layers=1,
        num_heads=2,
        pad_token_id=TINY_T5_PAD_ID,
        eos_token_id=TINY_T5_EOS_ID,
        decoder_start_token_id=TINY_T5_PAD_ID,
    )
    with torch.random.fork_rng(devices=[]):  # leave the caller's random stream as it was
        torch.manual_seed(seed)
        model = T5EncoderModel(config)
    model.save_pretrained(path)
    return path


def make_tiny_clip(path: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """Writes a randomly initialised tiny CLIP (1-layer text and vision towers, 32-d projections), a
    word-level tokenizer over TINY_T5_WORDS and the letters, and a CLIP image processor to `path`,
    loadable exactly as a hub CLIP is (CLIPModel / AutoTokenizer / CLIPImageProcessor.from_pretrained)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    words = ["<|pad|>", "<|startoftext|>", "<|endoftext|>", "<|unk|>", *TINY_T5_WORDS,
             *(chr(c) for c in range(ord("a"), ord("z") + 1))]
    vocab = {word: index for index, word in enumerate(dict.fromkeys(words))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 1), ("<|endoftext|>", 2)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<|pad|>", bos_token="<|startoftext|>", eos_token="<|endoftext|>",
        unk_token="<|unk|>", model_max_length=32,
    )
    tokenizer.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
                       ).save_pretrained(path)
    config = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 32, "pad_token_id": 0, "bos_token_id": 1,
                     "eos_token_id": 2},
        vision_config={"image_size": image_size, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 1, "num_attention_heads": 2},
        projection_dim=32,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    model.save_pretrained(path)
    return path
