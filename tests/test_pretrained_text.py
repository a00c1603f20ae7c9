"""A pretrained BERT with its own WordPiece tokenizer: the tokenizer's ids and round trips, the
encoder's weights and load report, saving and reloading without the BERT directory, the errors
for a vocabulary or length that does not fit, and data + MLM steps through the whole model.

The BERT directory is built offline with the libraries' own functions: a small WordPiece
vocabulary of the synthetic world's words, a 2-layer BERT (with a pooler, which lands in the
report's unused tensors) and both ``save_pretrained``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertModel, BertTokenizerFast

from opt.config import load_config
from opt.data.pipeline import BatchLoader
from opt.errors import UserError
from opt.model.opt_model import ModelSpec, OPTModel
from opt.tasks.mixture import TaskMixture
from opt.text.tokenizer import HuggingFaceTokenizer, load_tokenizer, save_tokenizer, tokenizer_in
from tests.test_model import SMALL

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ("a the picture shows there is large small red blue green white purple cyan orange yellow circle cross "
         "square star triangle diamond at top bottom left right center to of on in above below placed").split()
PIECES = ["##s", "##es", "##ed"]
VOCABULARY = SPECIAL_TOKENS + WORDS + PIECES
CAPTION = "a red circle at the top left"


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    """A directory as a downloaded BERT's: config, weights (pooler included) and tokenizer files."""
    vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    vocab.write_text("\n".join(VOCABULARY) + "\n")
    directory = tmp_path_factory.mktemp("bert")
    BertTokenizerFast(vocab=str(vocab)).save_pretrained(directory)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(VOCABULARY), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(directory)
    return directory


def pretrained_model(directory: Path, *overrides: str) -> tuple[OPTModel, HuggingFaceTokenizer, object]:
    config = load_config("configs/tiny.yaml", SMALL + [f"tokenizer.path={directory}",
                                                       f"model.text.pretrained_dir={directory}", *overrides])
    tokenizer = load_tokenizer(config.tokenizer.path)
    torch.manual_seed(0)
    return OPTModel(ModelSpec.from_config(config, tokenizer)).eval(), tokenizer, config


def text_batch(tokenizer, captions: list[str]) -> dict:
    rows = [tokenizer.encode(caption) for caption in captions]
    width = max(map(len, rows))
    ids = torch.tensor([row + [tokenizer.pad_id] * (width - len(row)) for row in rows])
    return {"text": {"ids": ids, "mask": ids != tokenizer.pad_id, "present": torch.ones(len(rows), dtype=torch.bool)}}


def test_wordpiece_tokenizer_round_trips_with_cls_and_sep_as_bos_and_eos(bert_dir):
    tokenizer = load_tokenizer(bert_dir)
    assert isinstance(tokenizer, HuggingFaceTokenizer) and tokenizer.vocab_size == len(VOCABULARY)
    index = {token: i for i, token in enumerate(VOCABULARY)}
    assert (tokenizer.bos_id, tokenizer.eos_id) == (index["[CLS]"], index["[SEP]"])
    assert (tokenizer.pad_id, tokenizer.mask_id, tokenizer.unk_id) == (index["[PAD]"], index["[MASK]"], index["[UNK]"])
    ids = tokenizer.encode(CAPTION)
    assert ids == [index["[CLS]"]] + [index[w] for w in CAPTION.split()] + [index["[SEP]"]]
    assert tokenizer.decode(ids) == CAPTION
    # WordPiece pieces join back into words; decoding stops at [SEP] and drops [MASK] and [PAD]
    circles = tokenizer.encode("two Circles", add_bos=False, add_eos=False)
    assert circles == [index["[UNK]"], index["circle"], index["##s"]]
    ids = [tokenizer.bos_id, tokenizer.mask_id] + tokenizer.encode("red circles", add_bos=False, add_eos=False)
    assert tokenizer.decode(ids + [tokenizer.eos_id, index["blue"], tokenizer.pad_id]) == "red circles"


def test_wordpiece_truncation_keeps_cls_and_sep(bert_dir):
    tokenizer = load_tokenizer(bert_dir)
    ids = tokenizer.encode("a large red circle " * 20, max_length=9)
    assert len(ids) == 9 and ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
    assert tokenizer.decode(ids) == "a large red circle a large red"


def test_wordpiece_tokenizer_files_reload_with_the_same_ids(bert_dir, tmp_path):
    tokenizer = load_tokenizer(bert_dir)
    assert all(name.startswith("tokenizer/") for name in tokenizer.files())
    save_tokenizer(tokenizer, tmp_path)
    assert tokenizer_in(tmp_path) == tmp_path / "tokenizer"
    reloaded = load_tokenizer(tokenizer_in(tmp_path))
    caption = "there is a small purple square below a large yellow star"
    assert reloaded.encode(caption) == tokenizer.encode(caption)
    assert (reloaded.vocab_size, reloaded.special_ids) == (tokenizer.vocab_size, tokenizer.special_ids)


def test_directories_without_a_usable_tokenizer_are_one_line_user_errors(bert_dir, tmp_path):
    weights_only = tmp_path / "weights"
    weights_only.mkdir()
    shutil.copy(bert_dir / "config.json", weights_only)
    with pytest.raises(UserError, match="holds no tokenizer") as error:
        load_tokenizer(weights_only)
    assert str(weights_only) in str(error.value) and "\n" not in str(error.value)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(VOCABULARY) + "\n")
    BertTokenizerFast(vocab=str(vocab), mask_token=None).save_pretrained(tmp_path / "no_mask")
    with pytest.raises(UserError, match="has no mask token") as error:
        load_tokenizer(tmp_path / "no_mask")
    assert str(tmp_path / "no_mask") in str(error.value) and "\n" not in str(error.value)


def test_pretrained_bert_loads_tensor_by_tensor_and_reports_the_pooler_unused(bert_dir):
    model, tokenizer, _ = pretrained_model(bert_dir)
    encoder = model.encoders["text"]
    saved = load_file(bert_dir / "model.safetensors")
    bert_state = encoder.bert.state_dict()
    assert set(bert_state) == {name for name in saved if not name.startswith("pooler.")}
    for name, tensor in bert_state.items():
        torch.testing.assert_close(tensor, saved[name], atol=0, rtol=0, msg=name)
    report = encoder.load_report
    assert sorted(report.loaded) == sorted(bert_state) and report.fresh == []
    assert report.unused == ["pooler.dense.bias", "pooler.dense.weight"]
    assert model.spec.model.text.width == 32 and model.spec.model.text.layers == 2
    assert model.spec.model.text.pretrained_dir == model.spec.backbones["text"]["source"]  # a record only
    assert model.spec.backbones["text"]["source"] == str(bert_dir)
    assert model.spec.backbones["text"]["config"]["vocab_size"] == len(VOCABULARY)
    # the pooled vector is the BERT's own [CLS] state
    batch = text_batch(tokenizer, [CAPTION, "there is a small blue star in the center"])
    reference = BertModel.from_pretrained(bert_dir, local_files_only=True).eval()
    with torch.no_grad():
        pooled = model.encode_unimodal(batch)["text"]["pooled"]
        expected = reference(input_ids=batch["text"]["ids"],
                             attention_mask=batch["text"]["mask"].long()).last_hidden_state[:, 0]
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=1e-5)


def test_saved_model_reloads_without_the_bert_directory(bert_dir, tmp_path):
    copy = tmp_path / "bert"
    shutil.copytree(bert_dir, copy)
    model, tokenizer, _ = pretrained_model(copy)
    model.save_pretrained(tmp_path / "model", tokenizer=tokenizer)
    shutil.rmtree(copy)
    loaded = OPTModel.from_pretrained(tmp_path / "model")
    reloaded_tokenizer = load_tokenizer(tokenizer_in(tmp_path / "model"))
    captions = [CAPTION, "a large green cross placed at the bottom"]
    assert text_batch(reloaded_tokenizer, captions)["text"]["ids"].equal(text_batch(tokenizer, captions)["text"]["ids"])
    batch = text_batch(reloaded_tokenizer, captions)
    with torch.no_grad():
        a, b = model.encode_unimodal(batch)["text"], loaded.encode_unimodal(batch)["text"]
        fused_a, fused_b = model.fuse({"text": a}), loaded.fuse({"text": b})
    torch.testing.assert_close(b["pooled"], a["pooled"], atol=0, rtol=0)
    torch.testing.assert_close(fused_b["states"], fused_a["states"], atol=0, rtol=0)
    assert loaded.encoders["text"].load_report is None  # rebuilt from the saved config, weights from the model
    assert loaded.spec == model.spec


def test_a_tokenizer_of_another_vocabulary_is_a_one_line_user_error(bert_dir, tokenizer):
    config = load_config("configs/tiny.yaml", SMALL + [f"model.text.pretrained_dir={bert_dir}"])
    with pytest.raises(UserError) as error:
        OPTModel(ModelSpec.from_config(config, tokenizer))
    message = str(error.value)
    assert message == (f"model.text.pretrained_dir {bert_dir} has a {len(VOCABULARY)}-token vocabulary but the "
                       f"tokenizer (tokenizer.path) has {tokenizer.vocab_size}; use the BERT directory's own "
                       f"tokenizer (tokenizer.path={bert_dir})")


def test_more_text_positions_than_the_bert_has_is_a_one_line_user_error(bert_dir):
    with pytest.raises(UserError, match="has 512 positions but 600 are asked for; lower data.max_text_tokens") as error:
        pretrained_model(bert_dir, "data.max_text_tokens=600")
    assert "\n" not in str(error.value)


def test_batches_start_with_cls_and_mlm_steps_train(bert_dir, world):
    model, tokenizer, config = pretrained_model(bert_dir, "data.batch_size=4")
    batch = next(iter(BatchLoader(f"{world}/val-*.tar", config.data, config.audio, tokenizer, train=False)))
    ids, mask = batch["text"]["ids"], batch["text"]["mask"]
    assert (ids[:, 0] == tokenizer.bos_id).all()
    assert ((ids == tokenizer.eos_id) & mask).sum(dim=1).eq(1).all()
    assert (ids[mask] != tokenizer.unk_id).float().mean() > 0.9  # the world's words are in the vocabulary
    model.train()
    mixture = TaskMixture(config, model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = model.encoders["text"].bert.embeddings.word_embeddings.weight.detach().clone()
    for _ in range(3):
        output = mixture.task("mlm")(model, batch, mixture.generators)
        assert torch.isfinite(output.loss)
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        optimizer.step()
    assert not model.encoders["text"].bert.embeddings.word_embeddings.weight.equal(before)
