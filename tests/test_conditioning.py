"""Tests of matryoshka.conditioning: encoders (tiny random T5, bundled MiniLM), batching, cache, factory."""

from __future__ import annotations

import os
import socket
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from matryoshka.conditioning import (
    EmbeddingCache,
    MiniLMTextEncoder,
    T5TextEncoder,
    TextEmbedding,
    TextEncoder,
    bundled_minilm_path,
    concat,
    encoder_cache_id,
    load_text_encoder,
    masked_mean,
    null_embedding,
    pad_embeddings,
    pad_to_length,
    parse_spec,
    precompute,
)
from matryoshka.conditioning.testing import TINY_T5_DIM, TINY_T5_EOS_ID, make_tiny_t5, tiny_t5_vocab

PROMPTS = ["a photo of a cat", "", "a big red dog sitting on the grass near a river at night", "zebra"]


@pytest.fixture(scope="module", autouse=True)
def offline_hub() -> Iterator[None]:
    """Every load here must work offline: HF_HUB_OFFLINE=1 and any network connection fails."""
    import huggingface_hub.constants

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a conditioning test tried to open a network connection: {args}")

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("TRANSFORMERS_OFFLINE", "1")
        # huggingface_hub reads the variable once, at import; set the flag it consults too.
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        patch.setattr(socket.socket, "connect", refuse)
        yield


@pytest.fixture(scope="module")
def tiny_t5_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_t5(tmp_path_factory.mktemp("tiny_t5"))


@pytest.fixture(scope="module")
def t5(tiny_t5_dir: Path) -> T5TextEncoder:
    return T5TextEncoder(str(tiny_t5_dir))


@pytest.fixture(scope="module")
def minilm() -> MiniLMTextEncoder:
    return MiniLMTextEncoder()


@pytest.fixture(params=["t5", "minilm"])
def encoder(request: pytest.FixtureRequest) -> TextEncoder:
    return request.getfixturevalue(request.param)


class CountingEncoder(TextEncoder):
    """Delegates to another encoder and records every batch it is asked to encode."""

    def __init__(self, inner: TextEncoder) -> None:
        self.inner = inner
        self.name = inner.name
        self.dim = inner.dim
        self.max_length = inner.max_length
        self.calls: list[list[str]] = []

    def encode(self, prompts: list[str]) -> TextEmbedding:
        self.calls.append(list(prompts))
        return self.inner.encode(prompts)

    def to(self, device: torch.device | str) -> CountingEncoder:
        self.inner.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.inner.device

    def to_config(self) -> dict[str, Any]:
        return self.inner.to_config()

    @property
    def encoded_prompts(self) -> list[str]:
        return [prompt for call in self.calls for prompt in call]


def reference_pooled(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean written row by row, independent of masked_mean's broadcasting."""
    rows = [states[b, : int(mask[b].sum())].mean(dim=0) for b in range(states.shape[0])]
    return torch.stack(rows)


# ----------------------------------------------------------------------------- the interface


def test_encode_returns_masked_states_mask_and_pooled_mean(encoder: TextEncoder) -> None:
    out = encoder.encode(PROMPTS)
    batch, length, dim = out.states.shape
    assert (batch, dim) == (len(PROMPTS), encoder.dim)
    assert out.mask.shape == (batch, length) and out.mask.dtype == torch.long
    assert out.pooled.shape == (batch, dim)
    assert out.states.dtype == out.pooled.dtype == torch.float32
    lengths = out.mask.sum(dim=1)
    assert int(lengths.max()) == length  # padded to the longest prompt, not further
    for row in range(batch):
        count = int(lengths[row])
        assert count >= 1
        assert torch.equal(out.mask[row, :count], torch.ones(count, dtype=torch.long))  # real tokens first
        assert not out.mask[row, count:].any()
        assert not out.states[row, count:].any()  # padding positions exactly zero
        assert out.states[row, :count].abs().sum(dim=-1).gt(0).all()  # real tokens carry states
    torch.testing.assert_close(out.pooled, reference_pooled(out.states, out.mask), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.pooled, masked_mean(out.states, out.mask))


def test_encoder_is_frozen_and_its_outputs_feed_a_trainable_layer(encoder: TextEncoder) -> None:
    model = encoder.model
    assert not model.training
    assert not any(parameter.requires_grad for parameter in model.parameters())
    out = encoder.encode(["a cat"])
    assert not out.states.requires_grad
    # inference_mode tensors would fail here: Linear saves its input for the weight gradient.
    layer = torch.nn.Linear(encoder.dim, 3)
    layer(out.states).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert not any(parameter.grad is not None for parameter in model.parameters())


def test_a_prompt_encodes_the_same_alone_and_in_a_batch(encoder: TextEncoder) -> None:
    together = encoder.encode(PROMPTS)
    for row, prompt in enumerate(PROMPTS):
        alone = encoder.encode([prompt])
        count = alone.length
        assert int(together.mask[row].sum()) == count
        torch.testing.assert_close(together.states[row, :count], alone.states[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(together.pooled[row], alone.pooled[0], rtol=1e-4, atol=1e-5)


def test_encode_rejects_a_bare_string_and_an_empty_list(t5: T5TextEncoder) -> None:
    with pytest.raises(TypeError, match="single string"):
        t5.encode("a photo of a cat")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        t5.encode([])
    with pytest.raises(TypeError, match=r"prompts\[1\]"):
        t5.encode(["a cat", None])  # type: ignore[list-item]


def test_to_device_returns_the_encoder_and_outputs_follow_it(t5: T5TextEncoder) -> None:
    assert t5.to("cpu") is t5
    assert t5.device == torch.device("cpu")
    assert t5.encode(["a cat"]).device == torch.device("cpu")


# ----------------------------------------------------------------------------- T5 tokenization


def test_t5_appends_eos_after_the_prompt_tokens(t5: T5TextEncoder) -> None:
    vocab = {piece: index for index, (piece, _) in enumerate(tiny_t5_vocab())}
    ids = t5.tokenize(["A photo of a cat", ""])
    expected = [vocab["\u2581" + word] for word in ["a", "photo", "of", "a", "cat"]] + [TINY_T5_EOS_ID]
    assert ids["input_ids"][0].tolist() == expected
    assert ids["input_ids"][1].tolist() == [TINY_T5_EOS_ID, 0, 0, 0, 0, 0]  # "" is just </s>, then <pad>
    assert ids["attention_mask"].tolist() == [[1] * 6, [1, 0, 0, 0, 0, 0]]
    # The same holds inside encode: the empty prompt is one real token long.
    assert t5.encode([""]).length == 1


def test_t5_truncates_to_max_length_and_keeps_the_final_eos(tiny_t5_dir: Path, t5: T5TextEncoder) -> None:
    long_prompt = " ".join(["the dog"] * 150)  # 300 words
    ids = t5.tokenize([long_prompt, "a cat"])["input_ids"]
    assert ids.shape == (2, 128)
    assert ids[0, -1].item() == TINY_T5_EOS_ID
    assert (ids[0, :-1] != TINY_T5_EOS_ID).all()
    short = T5TextEncoder(str(tiny_t5_dir), max_length=8)
    out = short.encode([long_prompt, "a cat"])
    assert out.length == 8 and out.mask.sum(dim=1).tolist() == [8, 3]
    assert short.tokenize([long_prompt])["input_ids"][0, -1].item() == TINY_T5_EOS_ID


def test_t5_pads_to_max_length_when_asked(tiny_t5_dir: Path) -> None:
    encoder = T5TextEncoder(str(tiny_t5_dir), max_length=16, pad_to_max_length=True)
    out = encoder.encode(["a cat", "a big dog"])
    assert out.states.shape == (2, 16, TINY_T5_DIM)
    assert out.mask.sum(dim=1).tolist() == [3, 4]
    assert not out.states[:, 4:].any()


def test_t5_load_errors_name_the_problem(tmp_path: Path, tiny_t5_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        T5TextEncoder(str(tmp_path / "missing"))
    with pytest.raises(OSError, match="could not load text encoder 'org/not-in-the-cache'"):
        T5TextEncoder("org/not-in-the-cache")  # offline: a hub id must already be in the HF cache
    # A tokenizer that does not append </s> cannot reproduce the official conditioning.
    from tokenizers import Tokenizer, processors

    broken = make_tiny_t5(tmp_path / "no_eos")
    backend = Tokenizer.from_file(str(broken / "tokenizer.json"))
    backend.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B", special_tokens=[])
    backend.save(str(broken / "tokenizer.json"))
    with pytest.raises(ValueError, match="</s>"):
        T5TextEncoder(str(broken))
    with pytest.raises(ValueError, match="max_length"):
        T5TextEncoder(str(tiny_t5_dir), max_length=1)
    with pytest.raises(ValueError, match="dtype"):
        T5TextEncoder(str(tiny_t5_dir), dtype="int8")


def test_make_tiny_t5_is_seeded_and_leaves_the_global_rng_alone(tmp_path: Path, t5: T5TextEncoder) -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    again = T5TextEncoder(str(make_tiny_t5(tmp_path / "again")))
    assert torch.equal(torch.rand(3), expected_next)
    assert torch.equal(again.encode(PROMPTS).states, t5.encode(PROMPTS).states)


def test_t5_runs_in_bfloat16_and_returns_float32(tiny_t5_dir: Path, t5: T5TextEncoder) -> None:
    half = T5TextEncoder(str(tiny_t5_dir), dtype="bfloat16")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    out = half.encode(PROMPTS)
    assert out.states.dtype == torch.float32
    torch.testing.assert_close(out.states, t5.encode(PROMPTS).states, rtol=0.1, atol=0.1)


# ----------------------------------------------------------------------------- MiniLM


def test_minilm_loads_offline_from_the_package_and_matches_sentence_transformers(
    minilm: MiniLMTextEncoder,
) -> None:
    from sentence_transformers import SentenceTransformer


    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert minilm.dim == 384 and minilm.name == "minilm"
    assert minilm.tokenizer.convert_ids_to_tokens(minilm.tokenize([""])["input_ids"][0]) == ["[CLS]", "[SEP]"]
    reference = SentenceTransformer(str(bundled_minilm_path()), device="cpu")
    expected = reference.encode(PROMPTS, convert_to_tensor=True)
    # sentence-transformers = masked mean then L2 normalisation; our pooled is the mean before it.
    ours = torch.nn.functional.normalize(minilm.encode(PROMPTS).pooled, dim=-1)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- batching


def test_concat_pads_rows_of_different_lengths(t5: T5TextEncoder) -> None:
    short = t5.encode(["a cat"])  # 3 tokens
    long = t5.encode(["a big red dog on the grass", "a dog"])  # 8 tokens
    both = concat([short, long])
    assert both.states.shape == (3, 8, TINY_T5_DIM)
    assert both.mask.sum(dim=1).tolist() == [3, 8, 3]
    assert torch.equal(both.states[0, :3], short.states[0]) and not both.states[0, 3:].any()
    assert torch.equal(both.states[1:], long.states)
    assert torch.equal(both.pooled, torch.cat([short.pooled, long.pooled]))
    padded = pad_embeddings([short, long], length=10)
    assert [embedding.length for embedding in padded] == [10, 10]
    assert torch.equal(padded[1].states[:, :8], long.states) and not padded[1].states[:, 8:].any()


def test_pad_to_length_trims_padding_but_never_real_tokens(t5: T5TextEncoder) -> None:
    out = t5.encode(["a cat", "a big red dog"])  # lengths 3 and 5
    wide = pad_to_length(out, 12)
    assert torch.equal(pad_to_length(wide, 5).states, out.states)
    with pytest.raises(ValueError, match="5 real tokens"):
        pad_to_length(out, 4)


def test_concat_refuses_embeddings_of_different_widths(t5: T5TextEncoder, minilm: MiniLMTextEncoder) -> None:
    with pytest.raises(ValueError, match="different widths"):
        concat([t5.encode(["a cat"]), minilm.encode(["a cat"])])


def test_null_embedding_is_the_empty_prompt_repeated(encoder: TextEncoder) -> None:
    null = null_embedding(encoder, 3)
    empty = encoder.encode([""])
    assert null.batch_size == 3
    for row in range(3):
        assert torch.equal(null.states[row], empty.states[0])
        assert torch.equal(null.pooled[row], empty.pooled[0])
    guided = concat([null, encoder.encode(["a cat", "a dog", "a bird"])])
    assert guided.batch_size == 6 and torch.equal(guided.pooled[:3], null.pooled)


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.lists(st.integers(1, 6), min_size=1, max_size=3), min_size=1, max_size=4))
def test_concat_keeps_every_real_token_and_zero_pads_the_rest(lengths: list[list[int]]) -> None:
    generator = torch.Generator().manual_seed(sum(map(sum, lengths)))
    parts = []
    for group in lengths:  # one TextEmbedding per group, padded to its own longest row
        length = max(group)
        mask = (torch.arange(length)[None] < torch.tensor(group)[:, None]).long()
        states = torch.randn(len(group), length, 4, generator=generator) * mask[..., None]
        parts.append(TextEmbedding(states=states, mask=mask, pooled=masked_mean(states, mask)))
    joined = concat(parts)
    flat = [count for group in lengths for count in group]
    assert joined.length == max(flat)
    assert joined.mask.sum(dim=1).tolist() == flat
    row = 0
    for part in parts:
        for index in range(part.batch_size):
            count = flat[row]
            assert torch.equal(joined.states[row, :count], part.states[index, :count])
            assert not joined.states[row, count:].any()
            row += 1
    torch.testing.assert_close(joined.pooled, masked_mean(joined.states, joined.mask))


def test_text_embedding_rejects_inconsistent_shapes() -> None:
    states = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="mask"):
        TextEmbedding(states=states, mask=torch.ones(2, 4, dtype=torch.long), pooled=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="pooled"):
        TextEmbedding(states=states, mask=torch.ones(2, 3, dtype=torch.long), pooled=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="integer or bool"):
        TextEmbedding(states=states, mask=torch.ones(2, 3), pooled=torch.zeros(2, 4))


def test_text_embedding_rows_repeat_and_casts(t5: T5TextEncoder) -> None:
    out = t5.encode(PROMPTS)
    assert torch.equal(out[-1].states, out.states[3:]) and out[1].batch_size == 1
    assert torch.equal(out[[2, 0]].mask, out.mask[[2, 0]])
    assert torch.equal(out.repeat(2).pooled, torch.cat([out.pooled, out.pooled]))
    half = out.to(dtype=torch.float16)
    assert half.states.dtype == half.pooled.dtype == torch.float16 and half.mask.dtype == torch.long
    assert out.lengths.tolist() == out.mask.sum(dim=1).tolist()


# ----------------------------------------------------------------------------- cache


def test_cache_encodes_only_misses_and_each_distinct_prompt_once(tmp_path: Path, t5: T5TextEncoder) -> None:
    cache = EmbeddingCache(tmp_path / "cache")
    counting = CountingEncoder(t5)
    first = cache.get_or_compute(["a cat", "a dog", "a cat"], counting)
    assert counting.calls == [["a cat", "a dog"]]
    assert torch.equal(first.states[0], first.states[2])
    cache.get_or_compute(["a dog", "a cat"], counting)
    assert len(counting.calls) == 1  # all hits: the encoder was not run
    cache.get_or_compute(["a cat", "a red bird", "a dog", ""], counting)
    assert counting.calls[1:] == [["a red bird", ""]]
    cache.get_or_compute(["x"] * 3 + ["y", "z"], counting, batch_size=1)
    assert counting.calls[2:] == [["x"], ["y"], ["z"]]


def test_cache_round_trip_is_exact_and_pads_like_the_encoder(tmp_path: Path, t5: T5TextEncoder) -> None:
    cache = EmbeddingCache(tmp_path / "cache")
    direct = t5.encode(PROMPTS)
    computed = cache.get_or_compute(PROMPTS, t5)  # all misses
    reread = EmbeddingCache(tmp_path / "cache").get_or_compute(PROMPTS, CountingEncoder(t5))  # all hits
    for out in (computed, reread):
        assert torch.equal(out.states, direct.states)
        assert torch.equal(out.mask, direct.mask)
        assert torch.equal(out.pooled, direct.pooled)
    # Rows are stored trimmed, so a hit of one short prompt is as long as that prompt alone.
    alone = cache.get_or_compute(["zebra"], t5)
    assert alone.length == int(direct.mask[3].sum())
    assert cache.get_or_compute(["a cat"], t5, length=20).length == 20
    # Misses without an encoder are named; hits need none.
    assert torch.equal(cache.lookup(PROMPTS, encoder_cache_id(t5)).states, direct.states)
    with pytest.raises(KeyError, match="a horse"):
        cache.lookup(["a cat", "a horse"], encoder_cache_id(t5))


def test_cache_files_are_written_atomically_and_keyed_by_encoder(tmp_path: Path, tiny_t5_dir: Path) -> None:
    cache = EmbeddingCache(tmp_path / "cache")
    encoder = T5TextEncoder(str(tiny_t5_dir))
    truncating = T5TextEncoder(str(tiny_t5_dir), max_length=4)
    cache.get_or_compute(["a big red dog on the grass"], encoder)
    files = sorted((tmp_path / "cache").rglob("*"))
    written = [path for path in files if path.is_file()]
    assert len(written) == 1 and written[0].suffix == ".safetensors"
    assert not [path for path in files if path.name.endswith(".tmp")]
    # Another max_length gives other states, so it must not hit the first entry.
    counting = CountingEncoder(truncating)
    assert cache.get_or_compute(["a big red dog on the grass"], counting).length == 4
    assert len(counting.calls) == 1


def test_cache_recomputes_a_corrupt_file_with_a_warning(tmp_path: Path, t5: T5TextEncoder) -> None:
    cache = EmbeddingCache(tmp_path / "cache")
    expected = cache.get_or_compute(["a cat"], t5)
    cache.path_for(encoder_cache_id(t5), "a cat").write_bytes(b"not a safetensors file")
    counting = CountingEncoder(t5)
    with pytest.warns(UserWarning, match="unreadable"):
        again = cache.get_or_compute(["a cat"], counting)
    assert counting.calls == [["a cat"]] and torch.equal(again.states, expected.states)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache.get_or_compute(["a cat"], counting)  # rewritten: read back cleanly


def test_cache_can_store_bfloat16(tmp_path: Path, t5: T5TextEncoder) -> None:
    cache = EmbeddingCache(tmp_path / "cache", storage_dtype=torch.bfloat16)
    first = cache.get_or_compute(PROMPTS, t5)
    second = cache.get_or_compute(PROMPTS, CountingEncoder(t5))
    assert first.states.dtype == second.states.dtype == torch.bfloat16
    assert torch.equal(first.states, second.states)
    torch.testing.assert_close(first.states.float(), t5.encode(PROMPTS).states, rtol=1e-2, atol=1e-2)


def test_precompute_streams_a_dataset_and_skips_what_is_cached(tmp_path: Path, t5: T5TextEncoder) -> None:
    captions = ["a cat", "a dog", "a cat", "a bird", "a tree", "a car", "a dog"]
    counting = CountingEncoder(t5)
    stream = (caption for caption in captions)  # no len(): precompute must stream
    stats = precompute(stream, counting, tmp_path / "cache", batch_size=2, progress=False)
    assert (stats.seen, stats.computed, stats.cached) == (7, 5, 2)
    assert sorted(counting.encoded_prompts) == sorted(set(captions))
    assert all(len(call) <= 2 for call in counting.calls)
    again = precompute(captions + ["a house"], counting, tmp_path / "cache", batch_size=2, progress=False)
    assert (again.seen, again.computed, again.cached) == (8, 1, 7)
    assert counting.calls[-1] == ["a house"]
    cache = EmbeddingCache(tmp_path / "cache")
    # Computed in a batch of two, so equal to encoding it alone up to float rounding.
    stored = cache.lookup(["a bird"], encoder_cache_id(t5))
    torch.testing.assert_close(stored.states, t5.encode(["a bird"]).states, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- factory


def test_parse_spec_reads_the_short_forms() -> None:
    assert parse_spec("minilm") == {"type": "minilm"}
    assert parse_spec("t5") == {"type": "t5"}
    assert parse_spec("t5:google/flan-t5-xl") == {"type": "t5", "name_or_path": "google/flan-t5-xl"}
    assert parse_spec("t5:/local/path") == {"type": "t5", "name_or_path": "/local/path"}
    with pytest.raises(ValueError, match="unknown text encoder 'clip:openai'"):
        parse_spec("clip:openai")
    with pytest.raises(ValueError, match="empty"):
        parse_spec("t5:")


def test_load_text_encoder_round_trips_through_to_config(tmp_path: Path, tiny_t5_dir: Path) -> None:
    original = load_text_encoder(f"t5:{tiny_t5_dir}", max_length=16)
    assert isinstance(original, T5TextEncoder) and original.max_length == 16
    config = original.to_config()
    assert config == {
        "type": "t5",
        "name_or_path": str(tiny_t5_dir),
        "max_length": 16,
        "dtype": "float32",
        "pad_to_max_length": False,
    }
    saved = tmp_path / "text_encoder.yaml"
    saved.write_text(yaml.safe_dump(config))
    rebuilt = load_text_encoder(yaml.safe_load(saved.read_text()))
    assert rebuilt.to_config() == config and rebuilt.name == original.name
    assert torch.equal(rebuilt.encode(PROMPTS).states, original.encode(PROMPTS).states)
    assert load_text_encoder(config, dtype="bfloat16").to_config()["dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="unknown entries \\['layers'\\]"):
        load_text_encoder({**config, "layers": 3})
    with pytest.raises(ValueError, match="no 'type'"):
        load_text_encoder({"max_length": 3})


def test_minilm_is_the_default_spec_and_round_trips(minilm: MiniLMTextEncoder) -> None:
    expected = {"type": "minilm", "max_length": 128, "dtype": "float32", "pad_to_max_length": False}
    assert minilm.to_config() == expected
    rebuilt = load_text_encoder("minilm")
    assert isinstance(rebuilt, MiniLMTextEncoder) and rebuilt.to_config() == minilm.to_config()
    assert torch.equal(rebuilt.encode(["a cat"]).states, minilm.encode(["a cat"]).states)
    copy = load_text_encoder(f"minilm:{bundled_minilm_path()}")
    assert copy.name == f"minilm:{bundled_minilm_path()}"
    assert load_text_encoder(copy.to_config()).to_config() == {**expected, "path": str(bundled_minilm_path())}
