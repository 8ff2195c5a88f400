"""Unsupervised objectives and their evaluation: the VAE's ELBO, the linear probe."""

from __future__ import annotations

import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader, TensorDataset

from traineval import TrainingManager
from traineval.evaluation.probe import linear_probe
from traineval.loggers import read_jsonl
from traineval.models import VAE, Autoencoder
from traineval.modes import Unsupervised
from traineval.training.loop import TrainingInterrupted

from conftest import InterruptAt, make_classification, plain_sgd_config


def _data() -> TensorDataset:
    x, y = make_classification(n=64).tensors
    return TensorDataset(x, y)


def _vae() -> VAE:
    torch.manual_seed(0)
    return VAE(8, hidden_sizes=(6,), latent_dim=2)


def _elbo_reference(model, data, epochs, beta, seed):
    """The negative ELBO written out per sample, the same noise draws, SGD."""
    torch.manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(epochs):
        for x, _y in DataLoader(data, 16):
            h = model.encoder(x)
            mean, log_var = model.mean(h), model.log_var(h)
            code = mean + torch.randn(mean.shape) * (0.5 * log_var).exp()
            reconstruction = model.decoder(code)
            losses = []
            for i in range(len(x)):
                squared = ((reconstruction[i] - x[i]) ** 2).sum()
                kl = 0.5 * (mean[i] ** 2 + log_var[i].exp() - 1 - log_var[i]).sum()
                losses.append(squared + beta * kl)
            loss = torch.stack(losses).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def test_the_elbo_objective_equals_a_hand_written_vae_loop(quiet_config):
    data = _data()
    config = plain_sgd_config(quiet_config, num_epochs=2, learning_rate=0.05, seed=5)
    ours, theirs = _vae(), _vae()
    mode = Unsupervised(objective="elbo", beta=0.5)
    TrainingManager(config).train(ours, DataLoader(data, 16), mode=mode)
    _elbo_reference(theirs, data, 2, 0.5, seed=5)
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_vae_run_resumes_to_the_uninterrupted_result(quiet_config, tmp_path):
    data = _data()
    mode = Unsupervised(objective="elbo")

    def run(name, model, **kwargs):
        quiet_config["output_dir"] = str(tmp_path / name)
        config = plain_sgd_config(quiet_config, num_epochs=3, learning_rate=0.05)
        TrainingManager(config).train(model, DataLoader(data, 16), mode=mode, **kwargs)

    straight, resumed = _vae(), _vae()
    run("straight", straight)
    with pytest.raises(TrainingInterrupted):
        run("resumed", _vae(), callbacks=[InterruptAt(6)])
    run("resumed", resumed, resume_from="auto")
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_linear_probe_equals_scikit_learn_on_the_codes():
    torch.manual_seed(0)
    model = Autoencoder(8, latent_dim=3)
    train, test = _data(), TensorDataset(*make_classification(n=40, seed=1).tensors)
    got = linear_probe(model, DataLoader(train, 16), DataLoader(test, 7))["probe_accuracy"]
    with torch.no_grad():
        fit_codes, test_codes = model.encode(train.tensors[0]), model.encode(test.tensors[0])
    reference = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    reference.fit(fit_codes.numpy(), train.tensors[1].numpy())
    expected = (reference.predict(test_codes.numpy()) == test.tensors[1].numpy()).mean()
    assert got == pytest.approx(expected)


def test_the_probe_reads_the_samples_a_loaders_sampler_gives():
    """Train and validation loaders over one dataset with subset samplers (the tutorials'
    split): the probe fits on the one subset and scores on the other, as scikit-learn does
    on those rows (a loader of its own over the dataset alone read every row for both)."""
    from torch.utils.data import SubsetRandomSampler

    torch.manual_seed(0)
    model = Autoencoder(8, latent_dim=3)
    x, y = make_classification(n=120, seed=4).tensors
    data = TensorDataset(x, y)
    fit_rows, eval_rows = list(range(0, 120, 2)), list(range(1, 120, 2))
    generator = torch.Generator().manual_seed(1)
    fit = DataLoader(data, 16, sampler=SubsetRandomSampler(fit_rows, generator=generator))
    state = generator.get_state()
    got = linear_probe(model, fit, DataLoader(data, 7, sampler=SubsetRandomSampler(eval_rows)))
    assert torch.equal(generator.get_state(), state)  # the training's draws are untouched
    with torch.no_grad():
        codes = model.encode(x)
    reference = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    reference.fit(codes[fit_rows].numpy(), y[fit_rows].numpy())
    expected = (reference.predict(codes[eval_rows].numpy()) == y[eval_rows].numpy()).mean()
    assert got["probe_accuracy"] == pytest.approx(expected)


def test_the_probe_is_a_validation_metric_and_errors_are_clear(quiet_config, tmp_path):
    data = _data()
    loader = DataLoader(data, 16)
    config = plain_sgd_config(quiet_config, num_epochs=2, learning_rate=0.05)
    mode = Unsupervised(objective="elbo", linear_probe=True)
    result = TrainingManager(config).train(_vae(), loader, loader, mode=mode)
    validations = result["training_history"]["val_metrics"]
    assert all(0 <= m["probe_accuracy"] <= 1 for m in validations)
    assert {"mse", "loss"} <= set(validations[-1])  # the reconstruction's metrics stay
    logged = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert any("val_probe_accuracy" in r for r in logged)
    with pytest.raises(ValueError, match=r"linear_probe=True scores the codes of the valid"):
        TrainingManager(config).train(_vae(), loader, mode=mode)
    with pytest.raises(ValueError, match=r"objective='elbo' needs a model returning a mapping"):
        TrainingManager(config).train(Autoencoder(8), loader, mode=Unsupervised(objective="elbo"))
    with pytest.raises(ValueError, match=r"unsupervised\.objective='elb' is invalid"):
        Unsupervised(objective="elb")
    with pytest.raises(ValueError, match=r"has no encode\(\) method"):
        linear_probe(torch.nn.Linear(8, 8), loader, loader)


def test_a_vae_with_its_probe_from_the_command_line(tmp_path):
    import json

    from traineval.cli import main

    args = ["demo", "-q", "mode=unsupervised", "model.name=vae", "model.options={}"]
    args += ["mode.objective=elbo", "mode.beta=0.05", "mode.linear_probe=true"]
    args += ["training.monitor_metric=val_probe_accuracy", "training.num_epochs=3"]
    assert main([*args, f"training.output_dir={tmp_path}"]) == 0
    record = json.loads((tmp_path / "evaluation" / "metrics.json").read_text())
    assert set(record["test"]) >= {"mse", "r2_score"}
    assert record["monitor_metric"] == "val_probe_accuracy"
    assert record["best_val"] > 0.3  # codes that separate ten digits better than chance


def test_a_bounded_autoencoder_output_equals_the_activation_of_the_plain_one():
    """output_activation='sigmoid' is the plain decoder's output through a sigmoid (inputs
    in [0, 1], e.g. pixels / 16); an unknown name is refused with the allowed ones, also
    from a config file's model options."""
    from traineval.models import build_model

    torch.manual_seed(0)
    plain = Autoencoder(6, hidden_sizes=(5,), latent_dim=2)
    bounded = Autoencoder(6, hidden_sizes=(5,), latent_dim=2, output_activation="sigmoid")
    bounded.load_state_dict(plain.state_dict())
    x = torch.rand(4, 6)
    torch.testing.assert_close(bounded(x), torch.sigmoid(plain(x)))
    assert bounded(x).min() >= 0
    with pytest.raises(ValueError, match=r"output_activation='relu' is invalid: expected null"):
        Autoencoder(6, output_activation="relu")
    built = build_model(
        "autoencoder", input_shape=(6,), output_dim=6, options={"output_activation": "tanh"}
    )
    assert built(x).abs().max() <= 1


def test_the_probe_leaves_the_training_and_its_resume_as_they_are(quiet_config, tmp_path):
    """The probe iterated the training's shuffled loader, drawing its generator: a run with
    the probe trained on another order than without it, and a resume after a probe in the
    middle of an epoch (eval_frequency) trained on yet another. Reference: the same run
    without the probe, and the uninterrupted run."""
    data = _data()

    def run(folder, probe, stop_at=None, resume=None):
        loader = DataLoader(data, 16, shuffle=True, generator=torch.Generator().manual_seed(5))
        config = plain_sgd_config(
            quiet_config, num_epochs=3, learning_rate=0.05, eval_frequency=3, seed=5,
            output_dir=str(tmp_path / folder), monitor_metric="val_loss",
        )  # fmt: skip
        model = _vae()
        mode = Unsupervised(objective="elbo", linear_probe=probe)
        callbacks = [InterruptAt(stop_at)] if stop_at else []
        try:
            TrainingManager(config).train(
                model, loader, DataLoader(data, 16), mode=mode, callbacks=callbacks,
                resume_from=resume,
            )  # fmt: skip
        except TrainingInterrupted:
            return None
        return model.state_dict()

    without = run("plain", probe=False)
    straight = run("straight", probe=True)
    assert all(torch.equal(without[k], straight[k]) for k in without)
    assert run("stopped", probe=True, stop_at=5) is None  # after the probe at update 3
    resumed = run("stopped", probe=True, resume="auto")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
