"""The built-in model's parts: tokenizer, weights file, sampling and stop sequences."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from forgeline.backends.builtin import load_model
from forgeline.lm.generate import Sampling, StopFilter, choose
from forgeline.lm.tokenizer import StreamDecoder, Tokenizer
from forgeline.lm.weights import WeightsFormatError, load_weights, save_weights
from forgeline.training.bpe import train_bpe
from tests.support.tiny_models import SAMPLE_TEXT, random_numpy_model

# -- tokenizer ----------------------------------------------------------------


def test_tokenizer_round_trips_any_text() -> None:
    """Encoding then decoding gives back the text, unseen characters and underscores included."""
    tokenizer = train_bpe([SAMPLE_TEXT], 300)
    text = "The keeper's _door_ — café, 1818!\n\n  Ünïcödé 🌊 tabs\there."

    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_tokenizer_merges_frequent_words() -> None:
    """Learned merges make common words fewer tokens than their bytes."""
    tokenizer = train_bpe([SAMPLE_TEXT], 400)

    assert len(tokenizer.encode(" lighthouse")) < len(" lighthouse")


def test_tokenizer_training_is_deterministic(tmp_path: Path) -> None:
    """The same corpus gives the same tokenizer file, byte for byte."""
    first, second = train_bpe([SAMPLE_TEXT], 350), train_bpe([SAMPLE_TEXT], 350)

    assert first.to_json() == second.to_json()
    first.save(tmp_path / "t.json")
    assert Tokenizer.load(tmp_path / "t.json").merges == first.merges


def test_stream_decoder_holds_back_half_characters() -> None:
    """A character split across tokens comes out whole, once both halves are in."""
    tokenizer = Tokenizer([])  # bytes only: every byte is one token
    decoder = StreamDecoder(tokenizer)
    pieces = [decoder.push(b) for b in "é!".encode()]

    assert pieces == ["", "é", "!"]


# -- weights file -------------------------------------------------------------


def test_weights_round_trip_and_are_deterministic(tmp_path: Path) -> None:
    """Saved arrays load back equal, and saving twice gives identical bytes."""
    tensors = {"b": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.ones(4, np.float32)}
    save_weights(tmp_path / "one", tensors, {"config": "{}"})
    save_weights(tmp_path / "two", dict(reversed(tensors.items())), {"config": "{}"})

    loaded, metadata = load_weights(tmp_path / "one")
    assert (tmp_path / "one").read_bytes() == (tmp_path / "two").read_bytes()
    np.testing.assert_array_equal(loaded["b"], tensors["b"])
    assert metadata["config"] == "{}"


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        pytest.param(lambda data: data[:-10], "truncated", id="truncated"),
        pytest.param(lambda data: b"\xff" * 8 + data[8:], "header length", id="bad-length"),
        pytest.param(lambda data: data[:-1] + bytes([data[-1] ^ 1]), "checksum", id="bit-flip"),
        pytest.param(lambda data: b"hello", "too short", id="not-safetensors"),
    ],
)
def test_damaged_weights_are_refused(
    tmp_path: Path, damage: Callable[[bytes], bytes], message: str
) -> None:
    """Truncation, a bad header or a flipped bit is reported, never loaded."""
    path = tmp_path / "w.safetensors"
    save_weights(path, {"x": np.ones(64, np.float32)}, {})
    path.write_bytes(damage(path.read_bytes()))

    with pytest.raises(WeightsFormatError, match=message):
        load_weights(path)


# -- sampling -----------------------------------------------------------------


def test_zero_temperature_takes_the_likeliest_token() -> None:
    """Temperature 0 is greedy, whatever the random state."""
    logits = np.array([0.1, 3.0, 2.9, -1.0], np.float32)

    assert choose(logits, Sampling(temperature=0), np.random.default_rng()) == 1


def test_top_k_and_top_p_keep_only_the_likeliest() -> None:
    """top-k 2 and top-p 0.5 never draw outside their sets over many draws."""
    logits = np.log(np.array([0.4, 0.3, 0.2, 0.1], np.float32))
    rng = np.random.default_rng(7)

    drawn_k = {choose(logits, Sampling(temperature=1.0, top_k=2), rng) for _ in range(500)}
    drawn_p = {choose(logits, Sampling(temperature=1.0, top_p=0.5), rng) for _ in range(500)}
    assert drawn_k == {0, 1}
    assert drawn_p == {0, 1}  # 0.4 alone is short of 0.5, so 0.3 joins


def test_sampling_follows_the_distribution() -> None:
    """Plain sampling draws tokens about as often as their probability."""
    logits = np.log(np.array([0.7, 0.2, 0.1], np.float32))
    rng = np.random.default_rng(3)
    draws = np.bincount([choose(logits, Sampling(temperature=1.0), rng) for _ in range(4000)])

    assert draws / draws.sum() == pytest.approx([0.7, 0.2, 0.1], abs=0.03)


# -- stop sequences -----------------------------------------------------------


def test_stop_sequence_split_across_pieces_is_cut() -> None:
    """A stop sequence arriving in three pieces never leaks, and what precedes it does."""
    stop = StopFilter(("THE END",))
    sent = [stop.push(p) for p in ("and so it was. TH", "E E", "ND and more")]

    assert "".join(sent) == "and so it was. "
    assert stop.stopped


def test_held_text_that_was_no_stop_sequence_is_released() -> None:
    """Text held as a possible stop sequence comes out when it proves not to be one."""
    stop = StopFilter(("\n\n",))
    sent = [stop.push("one\n"), stop.push("two"), stop.push("\n")]

    assert "".join(sent) + stop.finish() == "one\ntwo\n"
    assert not stop.stopped


# -- model --------------------------------------------------------------------


def test_prompt_in_one_chunk_matches_token_by_token(tmp_path: Path) -> None:
    """Feeding a prompt at once gives the logits of feeding it one token at a time."""
    loaded = load_model(random_numpy_model(tmp_path / "m"))
    tokens = loaded.tokenizer.encode("The sea was calm, and the keeper walked along")[:20]

    at_once = loaded.model.forward(tokens, loaded.model.new_cache())
    one_by_one = loaded.model.logits_for(tokens)[-1]
    np.testing.assert_allclose(at_once, one_by_one, rtol=1e-4, atol=1e-4)


def test_generation_runs_past_the_context_window(tmp_path: Path) -> None:
    """The cache slides: three times the context length of tokens, each step still works."""
    loaded = load_model(random_numpy_model(tmp_path / "m"))
    cache = loaded.model.new_cache()
    context = loaded.model.config.context

    for step in range(3 * context):
        logits = loaded.model.forward([step % 200], cache)
        assert np.isfinite(logits).all()
    assert cache.length == context
    assert cache.position == 3 * context
