"""Session fixtures: one small synthetic world and a tokenizer trained on it."""

from __future__ import annotations

from pathlib import Path

import pytest

from opt.config import Config, load_config
from opt.data.shards import resolve_shards
from opt.data.world.synth import synthesize_world
from opt.text.tokenizer import TextTokenizer, iter_shard_captions, train_tokenizer

WORLD_COUNTS = {"train": 240, "val": 24, "test": 24, "test_novel": 40, "test_unseen": 16}
WORLD_SEED = 3


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    synthesize_world(out, WORLD_COUNTS, seed=WORLD_SEED, shard_size=100, workers=1, progress=False)
    return out


@pytest.fixture(scope="session")
def tokenizer(world, tmp_path_factory) -> TextTokenizer:
    path = tmp_path_factory.mktemp("tok") / "tok.model"
    return train_tokenizer(iter_shard_captions(resolve_shards(f"{world}/train-*.tar")), path, vocab_size=400)


@pytest.fixture()
def config() -> Config:
    return load_config(None, ["data.batch_size=8", "data.workers=0", "data.shuffle_buffer=0"])


@pytest.fixture(scope="session")
def small_training_overrides(world, tokenizer, tmp_path_factory) -> list[str]:
    """Overrides for short pretraining runs of a small model on the session world."""
    from tests.test_model import SMALL

    path = tmp_path_factory.mktemp("training") / "tok.model"
    tokenizer.save(path)
    return SMALL + [f"data.train={world}/train-*.tar", f"data.val={world}/val-*.tar", "train.eval_every=0",
                    f"tokenizer.path={path}", "data.batch_size=4",
                    "data.workers=0", "data.shuffle_buffer=16", "tasks.queue_size=8", "train.log_every=1",
                    "train.lr=1e-3"]
