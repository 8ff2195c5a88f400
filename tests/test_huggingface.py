"""Hugging Face models through traineval: their outputs, their own loss, their data.

Models are built from small configs (no download). References: a hand-written big-batch
loop with the model's own loss, scikit-learn-free counts of the shifted tokens.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader

from traineval import Evaluator, TrainingConfig, TrainingManager
from traineval.tasks import SequenceCrossEntropy
from traineval.training.batches import ModelLoss, label_shift

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

VOCAB = 64


def tiny_gpt2(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=32,
        vocab_size=VOCAB,
        n_positions=32,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


def tiny_bert(seed: int = 0, num_labels: int = 3, vocab: int = 32):
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(config)


def padded_lm_rows(n: int = 32, length: int = 12, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Token rows of random lengths, padded: labels -100 and attention 0 past each end."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(1, VOCAB, (length,), generator=generator)
        kept = int(torch.randint(3, length + 1, (1,), generator=generator))
        labels = ids.clone()
        labels[kept:] = -100
        mask = (torch.arange(length) < kept).long()
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return rows


def token_task(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Which of the marker tokens 1, 2, 3 a row of filler tokens (4..31) contains: 3 classes."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(4, 32, (10,), generator=generator)
        label = int(torch.randint(0, 3, (1,), generator=generator))
        ids[int(torch.randint(0, 10, (1,), generator=generator))] = label + 1
        rows.append({"input_ids": ids, "labels": torch.tensor(label)})
    return rows


def quiet_config(tmp_path, name: str, **settings) -> TrainingConfig:
    """A silent CPU run writing into `tmp_path / name`."""
    quiet = {"progress_bar": False, "tensorboard_logging": False, "device": "cpu"}
    return TrainingConfig(**{**quiet, "output_dir": str(tmp_path / name), **settings})


def exact_config(tmp_path, name: str, **overrides) -> TrainingConfig:
    """Plain SGD with momentum and no clipping: the weights are a linear function of the
    window's gradient, so 'equal to one big batch' can be checked to float rounding (Adam's
    normalisation would amplify rounding in near-zero gradients)."""
    settings = {
        "num_epochs": 1,
        "learning_rate": 0.5,
        "optimizer_type": "sgd",
        "weight_decay": 0.0,
        "warmup_steps": 0,
        "scheduler_type": "constant",
        "gradient_clipping": False,
        "mixed_precision": False,
        "early_stopping_patience": 0,
        "save_best_model": False,
        "checkpoint_save_frequency": 0,
        **overrides,
    }
    return quiet_config(tmp_path, name, **settings)


def max_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    return max(float((x - y).abs().max()) for x, y in pairs)


def big_batch_reference(rows: list[dict[str, torch.Tensor]]) -> torch.nn.Module:
    """By hand: the model's own loss on batches of 16, SGD with momentum."""
    reference = tiny_gpt2()
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.5, momentum=0.9)
    for batch in DataLoader(rows, batch_size=16):
        optimizer.zero_grad()
        reference(**batch).loss.backward()
        optimizer.step()
    return reference


def test_gpt2_accumulation_equals_one_big_batch_with_its_own_loss(tmp_path):
    rows = padded_lm_rows()

    def traineval(batch: int, accumulation: int):
        model = tiny_gpt2()
        config = exact_config(
            tmp_path, f"b{batch}", batch_size=batch, gradient_accumulation_steps=accumulation
        )
        TrainingManager(config).train(model, DataLoader(rows, batch_size=batch))
        return model

    reference = big_batch_reference(rows)
    # The naive window (the mean of the micro-batches' mean losses) is what this guards
    # against: its weights are far from the big batch's.
    naive = tiny_gpt2()
    optimizer = torch.optim.SGD(naive.parameters(), lr=0.5, momentum=0.9)
    for index, batch in enumerate(DataLoader(rows, batch_size=4)):
        (naive(**batch).loss / 4).backward()
        if index % 4 == 3:
            optimizer.step()
            optimizer.zero_grad()

    accumulated, big = traineval(4, 4), traineval(16, 1)
    assert max_difference(big, reference) < 1e-6
    assert max_difference(accumulated, reference) < 1e-6
    assert max_difference(naive, reference) > 1e-3


def test_gpt2_with_label_smoothing_trains_the_default_loss_on_the_next_token(tmp_path):
    """label_smoothing shapes traineval's loss (the model gets no labels): it must score the
    logits at t against the label at t + 1, as the model's own loss would."""
    rows = padded_lm_rows()
    model = tiny_gpt2()
    config = exact_config(
        tmp_path, "smoothed", batch_size=4, gradient_accumulation_steps=4, label_smoothing=0.1
    )
    TrainingManager(config).train(model, DataLoader(rows, batch_size=4))
    reference = tiny_gpt2()
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.5, momentum=0.9)
    for batch in DataLoader(rows, batch_size=16):
        optimizer.zero_grad()
        logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        torch.nn.functional.cross_entropy(
            logits.logits[:, :-1].reshape(-1, VOCAB),
            batch["labels"][:, 1:].reshape(-1),
            label_smoothing=0.1,
        ).backward()
        optimizer.step()
    assert max_difference(model, reference) < 1e-6
    # traineval's token loss passed as loss_function follows the same rule
    passed = tiny_gpt2()
    TrainingManager(exact_config(tmp_path, "passed", batch_size=16)).train(
        passed,
        DataLoader(rows, batch_size=16),
        loss_function=SequenceCrossEntropy(label_smoothing=0.1),
    )
    assert max_difference(passed, reference) < 1e-6


def test_gpt2_is_a_causal_model_and_counts_shifted_labels():
    model = tiny_gpt2()
    assert label_shift(model) == 1
    assert label_shift(tiny_bert()) == 0
    rule = ModelLoss.of(model)
    assert rule is not None
    labels = torch.tensor([[5, 6, -100], [7, -100, -100]])
    assert int(rule.items(labels)) == 1  # positions 1.. that are kept: the 6 alone


def test_gpt2_evaluation_scores_the_shifted_tokens():
    model = tiny_gpt2()
    rows = padded_lm_rows(n=12)
    metrics = Evaluator().evaluate_model(
        model, DataLoader(rows, batch_size=5), "cpu", write_files=False
    )
    # Reference: every kept next-token prediction over the whole set.
    logits_all, targets_all = [], []
    with torch.no_grad():
        for row in rows:
            logits = model(input_ids=row["input_ids"][None]).logits[0, :-1]
            logits_all.append(logits)
            targets_all.append(row["labels"][1:])
    logits, targets = torch.cat(logits_all), torch.cat(targets_all)
    kept = targets != -100
    loss = torch.nn.functional.cross_entropy(logits[kept], targets[kept])
    accuracy = (logits[kept].argmax(-1) == targets[kept]).float().mean()
    assert metrics["loss"] == pytest.approx(float(loss), rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(float(loss)), rel=1e-5)
    assert metrics["token_accuracy"] == pytest.approx(float(accuracy), abs=1e-9)


def test_tiny_bert_learns_a_token_task_through_train(tmp_path):
    train, val = token_task(768, seed=0), token_task(192, seed=1)
    config = quiet_config(
        tmp_path, "bert", num_epochs=8, batch_size=32, learning_rate=3e-3, warmup_steps=20
    )
    model = tiny_bert()
    result = TrainingManager(config).train(
        model,
        DataLoader(train, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0)),
        DataLoader(val, batch_size=64),
    )
    best = max(m["accuracy"] for m in result.training_history["val_metrics"])
    assert best >= 0.9
    # validation loss is the model's own loss, weighed by samples over the whole set
    model.eval()
    with torch.no_grad():
        batch = {k: torch.stack([r[k] for r in val]) for k in val[0]}
        expected = float(model(**batch).loss)
    metrics = Evaluator().evaluate_model(
        model, DataLoader(val, batch_size=50), "cpu", write_files=False
    )
    assert metrics["loss"] == pytest.approx(expected, rel=1e-5)


def test_hf_classifier_predictions_csv_and_ensemble(tmp_path):
    from traineval import EvaluationConfig

    rows = token_task(40, seed=3)
    members = [tiny_bert(seed=s) for s in (0, 1)]
    evaluator = Evaluator(EvaluationConfig(save_predictions=True, plot_metrics=False))
    loader = DataLoader(rows, batch_size=16)
    out = evaluator.evaluate_ensemble(members, loader, "cpu", output_dir=tmp_path)
    # the ensemble's accuracy from the members' mean probabilities, by hand
    with torch.no_grad():
        batch = {"input_ids": torch.stack([r["input_ids"] for r in rows])}
        mean = torch.stack([m(**batch).logits.softmax(-1) for m in members]).mean(0)
    labels = torch.stack([r["labels"] for r in rows])
    assert out["ensemble"]["accuracy"] == pytest.approx(
        float((mean.argmax(-1) == labels).float().mean())
    )
    lines = (tmp_path / "evaluation" / "predictions_ensemble.csv").read_text().splitlines()
    assert len(lines) == 41


def test_datasets_dataset_with_a_padding_collator_trains(tmp_path):
    datasets = pytest.importorskip("datasets")
    tokenizers = pytest.importorskip("tokenizers")
    words = ["[PAD]", "[UNK]", "good", "bad", "movie", "film", "very", "not", "the", "a"]
    vocab = {word: index for index, word in enumerate(words)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]"
    )
    generator = torch.Generator().manual_seed(0)
    texts, labels = [], []
    for _ in range(256):
        length = int(torch.randint(2, 7, (1,), generator=generator))
        filler = [words[int(i)] for i in torch.randint(4, 10, (length,), generator=generator)]
        label = int(torch.randint(0, 2, (1,), generator=generator))
        filler.insert(int(torch.randint(0, length, (1,), generator=generator)), words[2 + label])
        texts.append(" ".join(filler))
        labels.append(label)
    dataset = datasets.Dataset.from_dict({"text": texts, "label": labels})
    dataset = dataset.map(lambda rows: tokenizer(rows["text"]), batched=True)
    dataset = dataset.remove_columns(["text"]).with_format("torch")
    collator = transformers.DataCollatorWithPadding(tokenizer)
    loader = DataLoader(dataset, batch_size=32, shuffle=True, collate_fn=collator)
    val_loader = DataLoader(dataset, batch_size=64, collate_fn=collator)
    config = quiet_config(tmp_path, "ds", num_epochs=6, learning_rate=3e-3, warmup_steps=5)
    model = tiny_bert(num_labels=2, vocab=len(words))
    result = TrainingManager(config).train(model, loader, val_loader)
    assert result.training_history["val_metrics"][-1]["accuracy"] >= 0.9
