"""A Hugging Face causal LM trained on its own loss: traineval against a hand-written loop.

Workload (CPU, fp32, one thread): a GPT-2 built from a small config (4 layers, 128 wide,
vocabulary 1,024, no download) on padded rows of 64 tokens (labels -100 past each row's
end), batch 16, AdamW lr 1e-3, clipping at 1.0, constant LR, 60 updates. The hand-written
loop is the careful one: `model(**batch).loss`, backward, clip, fused AdamW, the loss kept on
the device. traineval runs with `train()`'s defaults for such a model (it passes the labels in
and trains on the model's loss, weighed by the shifted label positions) and lean (no progress
bar, logs or checkpoints). Tokens are the label positions the loss counts (after the shift).
Each run is its own process, runs alternate, medians are reported with the ratio to the
hand-written loop.

    .venv/bin/python benchmarks/bench_hf.py [--repeats 3] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from peers import with_traineval

STEPS, BATCH, LENGTH, VOCAB = 60, 16, 64, 1024


def make_model() -> torch.nn.Module:
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=4,
        n_head=4,
        n_embd=128,
        vocab_size=VOCAB,
        n_positions=LENGTH,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


def make_rows() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(STEPS * BATCH):
        ids = torch.randint(1, VOCAB, (LENGTH,), generator=generator)
        kept = int(torch.randint(LENGTH // 4, LENGTH + 1, (1,), generator=generator))
        labels = ids.clone()
        labels[kept:] = -100
        mask = (torch.arange(LENGTH) < kept).long()
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return rows


def hand_written(model: torch.nn.Module, loader: DataLoader) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0, fused=True)
    running = torch.zeros(())
    for batch in loader:
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        running += loss.detach()
    float(running)


LOOPS = {
    "hand-written (model's loss)": hand_written,
    # peers.py's traineval runs: defaults, and lean (no progress bar, logs or checkpoints)
    "traineval defaults": lambda m, d: with_traineval(m, d, lean=False),
    "traineval lean": lambda m, d: with_traineval(m, d, lean=True),
}


def run_one(loop: str) -> None:
    torch.set_num_threads(1)
    rows = make_rows()
    tokens = sum(int((row["labels"][1:] != -100).sum()) for row in rows)
    loader = DataLoader(rows, batch_size=BATCH)
    warm = make_model()  # the first fused optimizer imports torch._dynamo: not timed
    torch.optim.AdamW(warm.parameters(), fused=True)
    import traineval  # noqa: F401  (imports are start-up, not the loop)

    model = make_model()
    started = time.perf_counter()
    with (
        open(os.devnull, "w") as sink,
        contextlib.redirect_stderr(sink),
        contextlib.redirect_stdout(sink),
    ):
        LOOPS[loop](model, loader)
    print(time.perf_counter() - started, tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    parser.add_argument("--run", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        run_one(args.run)
        return
    times: dict[str, list[float]] = {loop: [] for loop in LOOPS}
    tokens = 0
    loops = list(LOOPS)
    for repeat in range(args.repeats):
        for loop in loops if repeat % 2 == 0 else reversed(loops):
            command = [sys.executable, __file__, "--run", loop]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            seconds, tokens_text = out.split()[-2:]
            times[loop].append(float(seconds))
            tokens = int(tokens_text)
    import transformers

    reference = statistics.median(times["hand-written (model's loss)"])
    lines = [
        f"python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}; {platform.machine()}, {os.cpu_count()} cores, 1 torch "
        f"thread; GPT-2 4x128, vocabulary {VOCAB}, {STEPS} updates of {BATCH} x {LENGTH} "
        f"tokens ({tokens} counted label positions); {args.repeats} runs per loop "
        "(each its own process, alternating), medians",
        "",
        "| loop | median s | tokens/s | ratio to hand-written |",
        "|---|---|---|---|",
    ]
    for loop in loops:
        median = statistics.median(times[loop])
        lines.append(
            f"| {loop} | {median:.2f} | {tokens / median:,.0f} | {reference / median:.3f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table + "\n")


if __name__ == "__main__":
    main()
