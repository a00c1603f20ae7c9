"""Pretext tasks: each masking rule, the 5-way composition, modality drops, the mixture."""

from __future__ import annotations

import copy

import pytest
import torch

from opt.config import load_config
from opt.data.pipeline import BatchLoader
from opt.model.opt_model import ModelSpec, OPTModel
from opt.tasks.base import select_positions
from opt.tasks.mixture import TaskMixture, TrainingForward
from opt.tasks.modality_level import drop_modalities
from opt.tasks.sample_level import itm_assignment
from opt.tasks.token_level import mask_text_ids, ordinary_ids, same_utterance_logits
from tests.test_model import SMALL


def test_select_positions_rate_and_validity():
    generator = torch.Generator().manual_seed(0)
    valid = torch.rand(400, 50, generator=generator) < 0.7
    chosen = select_positions(valid, 0.15, generator)
    assert not (chosen & ~valid).any()
    assert chosen.sum() / valid.sum() == pytest.approx(0.15, abs=0.01)
    one = torch.zeros(3, 5, dtype=torch.bool)
    one[:, 2] = True
    assert select_positions(one, 0.0001, generator)[:, 2].all()  # every row gets at least one


def test_mlm_masks_15_percent_with_80_10_10():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(7, 500, (4000, 60), generator=generator)
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[:, 0] = valid[:, -1] = False  # bos and eos are never selected
    masked, selected = mask_text_ids(ids, valid, rate=0.15, mask_id=4, ordinary=ordinary_ids(500, range(7)),
                                     generator=generator)
    assert not selected[:, 0].any() and not selected[:, -1].any()
    assert selected.float().sum() / valid.sum() == pytest.approx(0.15, abs=0.005)
    picked = selected.sum().float()
    as_mask = (masked[selected] == 4).sum() / picked
    kept = (masked[selected] == ids[selected]).sum() / picked
    random = 1 - as_mask - kept
    assert as_mask == pytest.approx(0.8, abs=0.01)
    assert kept == pytest.approx(0.1, abs=0.015)  # random draws equal to the original are rare (1/493)
    assert random == pytest.approx(0.1, abs=0.015)
    assert (masked[~selected] == ids[~selected]).all()
    assert (masked[selected & (masked != 4)] >= 7).all()


def test_mlm_draws_random_tokens_around_a_wordpiece_vocabularys_special_ids():
    """BERT's [PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103 sit inside the vocabulary."""
    specials = (0, 100, 101, 102, 103)
    ordinary = ordinary_ids(200, specials)
    assert len(ordinary) == 195 and not set(specials) & set(ordinary.tolist())
    ids = torch.full((2000, 20), 150)
    masked, selected = mask_text_ids(ids, torch.ones_like(ids, dtype=torch.bool), rate=0.5, mask_id=103,
                                     ordinary=ordinary, generator=torch.Generator().manual_seed(0))
    drawn = masked[selected & (masked != 103) & (masked != 150)]
    assert len(drawn) > 1000 and not torch.isin(drawn, torch.tensor(specials)).any()


def test_mam_distractors_are_other_real_frames_of_the_same_utterance():
    generator = torch.Generator().manual_seed(3)
    frames = torch.eye(12)[None].repeat(3, 1, 1)  # frame j of every utterance is the one-hot e_j
    lengths = torch.tensor([12, 6, 4])
    valid = torch.arange(12)[None] < lengths[:, None]
    rows, positions = torch.tensor([0, 0, 1, 2]), torch.tensor([3, 11, 5, 0])
    predicted = frames[rows, positions] * 2.0  # similarity 2 with the true frame, 0 with every other
    logits, labels = same_utterance_logits(predicted, frames[rows], valid[rows], positions, negatives=10,
                                           generator=generator)
    assert logits.shape == (4, 11) and (labels == 0).all()
    assert (logits[:, 0] == 2.0).all()
    finite = logits[:, 1:].isfinite().sum(1)
    assert finite.tolist() == [10, 10, 5, 3]  # at most the utterance's other frames, never the true one
    assert (logits[:, 1:][logits[:, 1:].isfinite()] == 0).all()
    every, positions_as_labels = same_utterance_logits(predicted, frames[rows], valid[rows], positions,
                                                       negatives=0, generator=generator)
    assert (positions_as_labels == positions).all() and every.shape == (4, 12)
    assert every.isfinite().sum(1).tolist() == [12, 12, 6, 4]
    # the distractors are drawn evenly among the utterance's other frames
    scores = []
    for _ in range(300):
        logits_one, _ = same_utterance_logits(torch.arange(12.0)[None], torch.eye(12)[None], valid[:1],
                                              torch.tensor([0]), negatives=3, generator=generator)
        scores += logits_one[0, 1:].long().tolist()  # the similarity is the frame index
    counts = torch.bincount(torch.tensor(scores), minlength=12)
    assert counts[0] == 0 and (counts[1:] > 50).all()  # each other frame drawn ~82 times of 900


def test_five_way_itm_composition():
    generator = torch.Generator().manual_seed(2)
    size = 8
    counts = torch.zeros(5)
    for _ in range(500):
        labels, image_from, audio_from = itm_assignment(size, generator)
        index = torch.arange(size)
        counts += torch.bincount(labels, minlength=5)
        for c, i, a, s in zip(labels.tolist(), image_from.tolist(), audio_from.tolist(), index.tolist()):
            if c == 0:
                assert i == s and a == s
            elif c == 1:
                assert i != s and a == s
            elif c == 2:
                assert i == s and a != s
            elif c == 3:
                assert i == a != s
            else:
                assert len({s, i, a}) == 3
    assert torch.allclose(counts / counts.sum(), torch.full((5,), 0.2), atol=0.02)
    labels, image_from, audio_from = itm_assignment(3, generator)  # smallest batch still works
    assert all(len({s, i, a}) == 3 for s, i, a, c in zip(range(3), image_from.tolist(), audio_from.tolist(),
                                                           labels.tolist()) if c == 4)


def test_whole_modality_masking_drops_one_or_two_others_at_the_configured_rate():
    size = 4000
    batch = {"keys": list(range(size)),
             **{m: {"present": torch.ones(size, dtype=torch.bool)} for m in ("text", "image", "audio")}}
    dropped = drop_modalities(batch, "text", 0.3, torch.Generator().manual_seed(3))
    assert dropped["text"]["present"].all()
    image_gone, audio_gone = ~dropped["image"]["present"], ~dropped["audio"]["present"]
    any_gone = (image_gone | audio_gone).float().mean()
    assert any_gone == pytest.approx(0.3, abs=0.025)
    both = (image_gone & audio_gone).float().mean()
    assert both == pytest.approx(0.1, abs=0.02)  # one of three subsets: {image}, {audio}, {image, audio}
    assert batch["image"]["present"].all()  # the input batch is not modified


@pytest.fixture(scope="module")
def small_setup(world, tokenizer):
    config = load_config("configs/tiny.yaml", SMALL + ["tasks.queue_size=16", "data.batch_size=8"])
    torch.manual_seed(0)
    model = OPTModel(ModelSpec.from_config(config, tokenizer)).train()
    batch = next(iter(BatchLoader(f"{world}/val-*.tar", config.data, config.audio, tokenizer, train=False)))
    return config, model, batch


@pytest.mark.parametrize("name", ["mlm", "mvm", "mam", "text_decoding", "image_decoding", "itm", "contrastive"])
def test_each_task_returns_a_finite_loss_with_gradients(small_setup, name):
    config, model, batch = small_setup
    mixture = TaskMixture(config, model)
    output = mixture.task(name)(model, batch, mixture.generators)
    assert output.loss.ndim == 0 and torch.isfinite(output.loss)
    assert "loss" in output.metrics and 0.0 <= output.metrics["accuracy"] <= 1.0
    model.zero_grad(set_to_none=True)
    output.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_mixture_sample_mode_follows_weights_and_sum_mode_runs_all(small_setup):
    config, model, _ = small_setup
    weighted = load_config("configs/tiny.yaml", SMALL + [
        "tasks.weights={mlm: 3.0, itm: 1.0, text_decoding: 0, mvm: 0, mam: 0, image_decoding: 0, contrastive: 0}"])
    mixture = TaskMixture(weighted, model)
    picks = [mixture.choose()[0] for _ in range(2000)]
    assert set(picks) == {"mlm", "itm"} and picks.count("mlm") / 2000 == pytest.approx(0.75, abs=0.03)
    summed = TaskMixture(load_config("configs/tiny.yaml", SMALL + ["tasks.mode=sum"]), model)
    assert summed.choose() == summed.names and len(summed.names) == 7


def test_phases_run_their_own_weights_first_then_the_main_weights(small_setup):
    config, model, _ = small_setup
    phased = load_config("configs/tiny.yaml", SMALL + [
        "tasks.weights={mlm: 1, mvm: 0, mam: 0, text_decoding: 0, image_decoding: 0, itm: 1, contrastive: 0}",
        "tasks.phases=[{steps: 3, weights: {text_decoding: 1}}, {steps: 2, weights: {image_decoding: 1, mam: 1}}]"])
    mixture = TaskMixture(phased, model)
    assert set(mixture.names) == {"mlm", "itm", "text_decoding", "image_decoding", "mam"}  # every phase's tasks
    picks = [mixture.choose(step)[0] for step in range(3)] + [mixture.choose(step)[0] for step in (3, 4) * 50]
    assert picks[:3] == ["text_decoding"] * 3 and set(picks[3:]) == {"image_decoding", "mam"}
    assert {mixture.choose(step)[0] for step in range(5, 200)} == {"mlm", "itm"}
    summed = TaskMixture(load_config("configs/tiny.yaml", SMALL + [
        "tasks.mode=sum", "tasks.phases=[{steps: 1, weights: {text_decoding: 2, mlm: 1}}]"]), model)
    assert summed.choose(0) == ["mlm", "text_decoding"] and len(summed.choose(1)) == 7


def test_a_phase_can_restrict_what_decoding_conditions_on(small_setup):
    config, model, batch = small_setup
    mixture = TaskMixture(load_config("configs/tiny.yaml", SMALL + [
        "tasks.weights={mlm: 0, mvm: 0, mam: 0, text_decoding: 1, image_decoding: 0, itm: 0, contrastive: 0}",
        "tasks.text_decoding_conditions=[image]",
        "tasks.phases=[{steps: 10, weights: {text_decoding: 1}, text_decoding_conditions: [audio]}]"]), model)

    def sources(steps: range) -> set[str]:
        return {key for step in steps for key in mixture(model, batch, step)[1]["text_decoding"]
                if key.startswith("accuracy_")}

    in_phase, after = sources(range(10)), sources(range(10, 20))
    assert in_phase == {"accuracy_from_audio"} and after == {"accuracy_from_image"}


@pytest.mark.parametrize("fraction, objectives", [(0.0, {"autoregressive"}), (1.0, {"parallel"}),
                                                 (0.5, {"autoregressive", "parallel"})])
def test_image_decoding_trains_the_configured_share_of_parallel_steps(small_setup, fraction, objectives):
    _, model, batch = small_setup
    config = load_config("configs/tiny.yaml", SMALL + [f"tasks.image_decoding_parallel_fraction={fraction}"])
    mixture = TaskMixture(config, model)
    seen = {key.removeprefix("loss_") for _ in range(12)
            for key in mixture.task("image_decoding")(model, batch, mixture.generators).metrics if key.startswith("loss_")}
    assert seen == objectives


def test_contrastive_state_includes_momentum_encoders_and_queues(small_setup):
    config, model, batch = small_setup
    mixture = TaskMixture(config, model)
    keys = mixture.state_dict().keys()
    assert any(k.startswith("stateful.contrastive.momentum_encoders.") for k in keys)
    assert {"stateful.contrastive.queue_text", "stateful.contrastive.queue_pointer"} <= set(keys)
    task = mixture.task("contrastive")
    before = task.queue_image.clone()
    task(model, batch, mixture.generators)
    assert int(task.queue_pointer) == 8 and int(task.queue_filled) == 8
    assert not torch.equal(before[:8], task.queue_image[:8]) and torch.equal(before[8:], task.queue_image[8:])


def test_momentum_encoders_are_buffers_run_beside_the_model_never_in_it(small_setup, monkeypatch):
    """The momentum copies hold no parameters (nothing trains them, ZeRO-3 never partitions them),
    their embeddings equal the online ones while the weights are equal, and the model keeps its own
    encoders throughout the task (no swapping)."""
    config, model, batch = small_setup
    mixture = TaskMixture(load_config("configs/tiny.yaml", SMALL + ["tasks.momentum=1.0"]), model)
    task = mixture.task("contrastive")
    assert not list(task.parameters()) and len(list(task.momentum_encoders.buffers())) > 0
    online_encoders = model.encoders
    seen = []
    original = type(model).encode_unimodal

    def watched(self, *args, **kwargs):
        seen.append(self.encoders is online_encoders)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "encode_unimodal", watched)
    model.eval()
    keys = task._momentum_embeddings(model, batch)
    queries = model.tower_embeddings(model.encode_unimodal(batch))
    for modality in keys:  # momentum 1.0 keeps the copies equal to the online weights
        torch.testing.assert_close(keys[modality], queries[modality])
    output = task(model, batch, mixture.generators)
    model.train()
    assert seen and all(seen)
    assert all(isinstance(value, torch.Tensor) and not value.requires_grad for value in output.metrics.values())


def test_training_forward_is_the_whole_step_and_reads_older_checkpoints(small_setup):
    """One module runs the mixture on the model; a state dict of the model alone (the layout of
    checkpoints before the mixture joined the engine's module) loads into it, tasks' state untouched."""
    config, model, batch = small_setup
    model = copy.deepcopy(model)  # the fixture's model stays as it was
    mixture = TaskMixture(config, model)
    forward = TrainingForward(model, mixture)
    loss, metrics = forward(batch, 0)
    assert loss.requires_grad and len(metrics) == 1 and set(metrics) <= set(mixture.names)  # one task: sample mode
    assert {name for name, _ in forward.named_parameters()} == {f"model.{name}" for name, _ in model.named_parameters()}
    older = {name: torch.full_like(value, 0.5) if value.is_floating_point() else value
             for name, value in model.state_dict().items()}
    queue = mixture.task("contrastive").queue_text.clone()
    forward.load_state_dict(older)
    assert torch.equal(model.cross.cls, torch.full_like(model.cross.cls, 0.5))
    assert torch.equal(mixture.task("contrastive").queue_text, queue)


def test_contrastive_aligns_only_the_configured_pairs(small_setup):
    config, model, batch = small_setup
    two = load_config("configs/tiny.yaml", SMALL + ["tasks.queue_size=16", "data.batch_size=8",
                                                    "tasks.contrastive_pairs=[text-image,text-audio]"])
    metrics = {}
    for name, settings in (("all", config), ("two", two)):
        mixture = TaskMixture(settings, model)
        metrics[name] = mixture.task("contrastive")(model, batch, mixture.generators).metrics
    assert {"t2i_accuracy", "i2a_accuracy", "a2i_accuracy"} <= set(metrics["all"])
    assert {"t2i_accuracy", "i2t_accuracy", "t2a_accuracy", "a2t_accuracy"} <= set(metrics["two"])
    assert "i2a_accuracy" not in metrics["two"] and "a2i_accuracy" not in metrics["two"]


@pytest.mark.parametrize("name, source", [("text_decoding", "image"), ("image_decoding", "text")])
def test_generation_tasks_condition_only_on_modalities_the_batch_has(small_setup, name, source):
    config, model, batch = small_setup
    text_image = {key: value for key, value in batch.items() if key != "audio"}  # a run with data.modalities [text, image]
    mixture = TaskMixture(config, model)
    seen = set()
    for _ in range(12):  # the old draw over all three conditions picked audio alone with p = 1/3 each time
        output = mixture.task(name)(model, text_image, mixture.generators)
        assert torch.isfinite(output.loss)
        seen |= {key for key in output.metrics if key.startswith("accuracy_from_")}
    assert seen == {f"accuracy_from_{source}"}  # the one condition left without audio
