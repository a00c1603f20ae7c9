"""SentencePiece tokenizer: special ids, round trips, truncation, CLI."""

from __future__ import annotations

import pytest

from opt.cli import main
from opt.data.shards import resolve_shards
from opt.errors import UserError
from opt.text.tokenizer import TextTokenizer, iter_shard_captions, train_tokenizer


def test_special_ids_are_fixed(tokenizer):
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2, 3)
    assert (tokenizer.mask_id, tokenizer.cls_id, tokenizer.sep_id) == (4, 5, 6)
    assert tokenizer.sp.id_to_piece(tokenizer.mask_id) == "[MASK]"


def test_world_captions_round_trip_and_use_whole_words(world, tokenizer):
    captions = list(iter_shard_captions(resolve_shards(str(world))))
    assert len(captions) > 300
    pieces = words = 0
    for caption in captions:
        ids = tokenizer.encode(caption)
        assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
        assert tokenizer.decode(ids) == caption
        assert tokenizer.unk_id not in ids
        pieces += len(ids) - 2
        words += len(caption.split())
    assert pieces / words < 1.3  # mostly one piece per word


def test_any_unicode_round_trips_through_byte_fallback(tokenizer):
    text = "héllo wörld — 日本語 🙂 tab\tend"
    ids = tokenizer.encode(text, add_bos=False, add_eos=False)
    assert tokenizer.unk_id not in ids
    assert tokenizer.decode(ids) == text.replace("\t", " ")  # SentencePiece normalises whitespace


def test_truncation_keeps_bos_and_eos(tokenizer):
    ids = tokenizer.encode("a large red circle " * 50, max_length=12)
    assert len(ids) == 12 and ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id


def test_decode_stops_at_eos_and_drops_specials(tokenizer):
    ids = [tokenizer.bos_id, tokenizer.mask_id] + tokenizer.encode("a red star", add_bos=False, add_eos=False)
    ids += [tokenizer.eos_id] + tokenizer.encode("blue", add_bos=False, add_eos=False) + [tokenizer.pad_id]
    assert tokenizer.decode(ids) == "a red star"


def test_save_and_load_give_the_same_ids(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "copy.model")
    loaded = TextTokenizer.from_file(tmp_path / "copy.model")
    assert loaded.encode("a small cyan cross above a large white star") == tokenizer.encode(
        "a small cyan cross above a large white star")


def test_bad_inputs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="vocab-size"):
        train_tokenizer(["a b c"], tmp_path / "t.model", vocab_size=100)
    with pytest.raises(UserError, match="no captions"):
        train_tokenizer([], tmp_path / "t.model", vocab_size=400)
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(UserError, match="not a SentencePiece model"):
        TextTokenizer.from_file(tmp_path / "junk.model")


def test_cli_trains_a_tokenizer(world, tmp_path, capsys):
    out = tmp_path / "cli.model"
    assert main(["tokenizer", "train", "--data", f"{world}/train-*.tar", "--out", str(out), "--vocab-size", "400"]) == 0
    assert TextTokenizer.from_file(out).vocab_size <= 400
    assert "pieces" in capsys.readouterr().out
