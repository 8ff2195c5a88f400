"""FixMatch and Mean Teacher against hand-written loops; the built-in augmentations."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from traineval import TrainingManager
from traineval.data.augment import ImageAugment, TabularAugment
from traineval.modes import SemiSupervised
from traineval.training.loop import TrainingInterrupted

from conftest import InterruptAt, make_classification, make_mlp, plain_sgd_config

WEAK, STRONG = TabularAugment("weak"), TabularAugment("strong")


def _partly_labeled(n: int = 48) -> TensorDataset:
    x, y = make_classification(n=n).tensors
    y = y.clone()
    y[::3] = -1
    return TensorDataset(x, y)


def _config(quiet_config, **overrides):
    settings = {"num_epochs": 2, "batch_size": 8, "learning_rate": 0.1, "seed": 3}
    return plain_sgd_config(quiet_config, **{**settings, **overrides})


def _fixmatch_reference(model, data, epochs, threshold, weight, seed):
    """FixMatch written out: boolean indexing, separate means, SGD; the same draws."""
    torch.manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    kept_any = 0
    for _ in range(epochs):
        for x, y in DataLoader(data, 8):
            weak, strong = WEAK(x), STRONG(x)
            out = model(torch.cat([weak, strong]))
            out_weak, out_strong = out[: len(x)], out[len(x) :]
            lab = y != -1
            loss = F.cross_entropy(out_weak[lab], y[lab]) if lab.any() else out.sum() * 0
            if (~lab).any():
                probs = out_weak[~lab].detach().softmax(1)
                confidence, pseudo = probs.max(1)
                mask = confidence >= threshold
                kept_any += int(mask.sum())
                terms = F.cross_entropy(out_strong[~lab], pseudo, reduction="none") * mask
                loss = loss + weight * terms.sum() / (~lab).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return kept_any


def test_fixmatch_equals_a_hand_written_fixmatch_loop(quiet_config):
    data = _partly_labeled()
    mode = SemiSupervised(
        algorithm="fixmatch",
        weak_augmentation=WEAK,
        strong_augmentation=STRONG,
        pseudo_label_threshold=0.4,
        unlabeled_weight=0.5,
    )
    config = _config(quiet_config)
    ours, theirs = make_mlp(), make_mlp()
    TrainingManager(config).train(ours, DataLoader(data, 8), mode=mode)
    kept = _fixmatch_reference(theirs, data, 2, 0.4, 0.5, seed=config.seed)
    assert 0 < kept < 2 * 16  # some, not all, unlabeled samples passed the threshold
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _mean_teacher_reference(model, data, epochs, decay, weight, rampup, seed):
    torch.manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    teacher = None  # the moving average: the model itself until the first update
    updates = 0
    for _ in range(epochs):
        for x, y in DataLoader(data, 8):
            student_view, teacher_view = WEAK(x), WEAK(x)
            with torch.no_grad():
                target = (teacher or model)(teacher_view).softmax(1)
            out = model(student_view)
            lab = y != -1
            loss = F.cross_entropy(out[lab], y[lab]) if lab.any() else out.sum() * 0
            ramp = math.exp(-5 * (1 - min(updates / rampup, 1.0)) ** 2)
            if (~lab).any():
                gap = ((out[~lab].softmax(1) - target[~lab]) ** 2).mean(1)
                loss = loss + weight * ramp * gap.sum() / (~lab).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            updates += 1
            if teacher is None:
                teacher = copy.deepcopy(model)
            else:
                with torch.no_grad():
                    for t, s in zip(teacher.parameters(), model.parameters(), strict=True):
                        t.lerp_(s, 1 - decay)


def test_mean_teacher_equals_a_hand_written_loop(quiet_config):
    data = _partly_labeled()
    mode = SemiSupervised(
        algorithm="mean_teacher", weak_augmentation=WEAK, unlabeled_weight=5.0, rampup_steps=8
    )
    config = _config(quiet_config, ema_decay=0.9)
    ours, theirs = make_mlp(), make_mlp()
    TrainingManager(config).train(ours, DataLoader(data, 8), mode=mode)
    _mean_teacher_reference(theirs, data, 2, 0.9, 5.0, 8, seed=config.seed)
    # the run ends holding the moving average (the teacher); compare the students' weights
    saved = torch.load(config.output_dir + "/checkpoints/last.pt", weights_only=True)
    student = saved["training_weights"]
    for (name, a), b in zip(student.items(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_a_fixmatch_run_resumes_to_the_uninterrupted_result(quiet_config, tmp_path):
    data = _partly_labeled()
    mode = SemiSupervised(algorithm="fixmatch", augmentation="tabular")

    def loader():  # each run its own, seeded alike (the augmentations draw from torch's)
        return DataLoader(data, 8, shuffle=True, generator=torch.Generator().manual_seed(0))

    straight = make_mlp()
    quiet_config["output_dir"] = str(tmp_path / "straight")
    TrainingManager(_config(quiet_config, num_epochs=3)).train(straight, loader(), mode=mode)
    quiet_config["output_dir"] = str(tmp_path / "resumed")
    with pytest.raises(TrainingInterrupted):  # inside epoch 2 (6 batches per epoch)
        TrainingManager(_config(quiet_config, num_epochs=3)).train(
            make_mlp(), loader(), mode=mode, callbacks=[InterruptAt(9)]
        )
    resumed = make_mlp()
    TrainingManager(_config(quiet_config, num_epochs=3)).train(
        resumed, loader(), mode=mode, resume_from="auto"
    )
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_semi_supervised_algorithm_errors_are_clear(quiet_config):
    with pytest.raises(ValueError, match=r"algorithm='fixmatch' needs a weak and a strong"):
        SemiSupervised(algorithm="fixmatch")
    with pytest.raises(ValueError, match=r"augmentations apply to 'fixmatch' and 'mean_teacher'"):
        SemiSupervised(augmentation="image", image_shape=(1, 8, 8))
    with pytest.raises(ValueError, match=r"semi_supervised\.augmentation='images' is invalid"):
        SemiSupervised(algorithm="fixmatch", augmentation="images")
    with pytest.raises(ValueError, match=r"weak_augmentation='nowhere:f': cannot import"):
        SemiSupervised(algorithm="mean_teacher", weak_augmentation="nowhere:f")
    mode = SemiSupervised(algorithm="mean_teacher", augmentation="tabular")
    with pytest.raises(ValueError, match=r"takes its teacher from the moving average"):
        TrainingManager(_config(quiet_config)).train(
            make_mlp(), DataLoader(_partly_labeled(), 8), mode=mode
        )
    by_path = SemiSupervised(
        algorithm="fixmatch",
        weak_augmentation="traineval.data.augment:ImageAugment",
        strong_augmentation=STRONG,
    )
    recorded = by_path.to_dict()
    assert recorded["weak_augmentation"] == "traineval.data.augment:ImageAugment"
    assert recorded["strong_augmentation"] == "traineval.data.augment:TabularAugment('strong')"


def test_weak_image_augmentation_shifts_by_whole_pixels():
    torch.manual_seed(0)
    image = torch.zeros(64, 1, 8, 8)
    image[:, :, 3:5, 3:5] = 1.0
    out = ImageAugment("weak", shift=0.125)(image)
    assert out.shape == image.shape
    assert torch.equal(out.sum(dim=(1, 2, 3)), image.sum(dim=(1, 2, 3)))  # shifted, not blurred
    assert set(out.unique().tolist()) == {0.0, 1.0}
    assert len({tuple(o.nonzero()[0].tolist()) for o in out}) > 1  # not all the same shift
    flat = ImageAugment("weak", image_shape=(1, 8, 8))(image.flatten(1))
    assert flat.shape == (64, 64)


def test_strong_image_augmentation_changes_images_and_cuts_out():
    torch.manual_seed(0)
    image = torch.rand(32, 1, 8, 8)
    out = ImageAugment("strong", cutout=0.5, fill=-7.0)(image)
    assert out.shape == image.shape
    assert torch.isfinite(out).all()
    assert (out == -7.0).flatten(1).any(1).all()  # every image has its cut-out square
    with pytest.raises(ValueError, match=r"needs \(N, C, H, W\) images"):
        ImageAugment("strong")(torch.rand(4, 64))


def test_tabular_augmentation_is_noise_and_feature_dropout():
    torch.manual_seed(0)
    x = torch.randn(256, 6) * torch.arange(1, 7)
    weak, strong = TabularAugment("weak")(x), TabularAugment("strong")(x)
    ratio = (weak - x).std(0) / x.std(0)
    assert torch.allclose(ratio, torch.full((6,), 0.05), atol=0.01)  # noise scaled per feature
    dropped = strong == x.mean(0)
    assert 0.1 < dropped.float().mean() < 0.3


def test_oversampling_gives_labeled_rows_their_share_of_the_batches():
    from traineval.data import oversample_labeled

    x, y = torch.randn(1250 + 50, 3), torch.full((1300,), -1)
    y[::26] = torch.arange(50) % 10  # 50 labeled rows among 1,250 unlabeled
    data = oversample_labeled(TensorDataset(x, y), share=0.25)
    labels = torch.stack([data[i][1] for i in range(len(data))])
    labeled = labels != -1
    assert int((~labeled).sum()) == 1250  # every unlabeled row once
    assert labeled.float().mean() == pytest.approx(0.25, abs=0.02)
    counts = torch.bincount(torch.as_tensor(data.indices)[labeled])
    assert set(counts[counts > 0].tolist()) == {8}  # each labeled row as often: 416 / 50
    with pytest.raises(ValueError, match=r"share=1\.5 is invalid"):
        oversample_labeled(TensorDataset(x, y), share=1.5)
    with pytest.raises(ValueError, match="no labeled rows"):
        oversample_labeled(TensorDataset(x, torch.full((1300,), -1)))


def test_fixmatch_and_mean_teacher_from_the_command_line(tmp_path):
    import json

    from traineval.cli import main

    for algorithm, extra in (("fixmatch", []), ("mean_teacher", ["training.ema_decay=0.9"])):
        out = tmp_path / algorithm
        args = ["demo", "-q", "mode=semi_supervised", "data.labeled_fraction=0.1"]
        args += [f"mode.algorithm={algorithm}", "mode.augmentation=image", *extra]
        args += ["training.num_epochs=2", f"training.output_dir={out}"]
        assert main(args) == 0
        record = json.loads((out / "evaluation" / "metrics.json").read_text())
        assert record["test"]["accuracy"] > 0.3  # ten classes: chance is 0.1
        assert "algorithm: " + algorithm in (out / "config.yaml").read_text()


def test_an_image_shape_that_does_not_hold_the_inputs_is_named():
    """image_shape=[1, 7, 7] on 64 features ended the run with torch's "shape '[64, 1, 7,
    7]' is invalid for input of size 4096" (exit 1)."""
    augment = ImageAugment("weak", image_shape=(1, 7, 7))
    with pytest.raises(ValueError, match=r"image_shape=\[1, 7, 7\] holds 49 values, the inputs"):
        augment(torch.rand(4, 64))
    assert ImageAugment("weak", image_shape=(1, 8, 8))(torch.rand(4, 64)).shape == (4, 64)


def test_an_augmentation_is_hashable_and_compared_as_an_object():
    """As a dataclass it had lost its hash (and a mode holding one, its own)."""
    weak = ImageAugment("weak")
    assert hash(weak) == hash(weak)
    assert weak != ImageAugment("weak")
