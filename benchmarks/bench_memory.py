"""Peak memory of one training step whose output dominates memory: traineval beside a
hand-written loop, each in its own process (peak RSS, `resource.getrusage`).

The model is a small language-model head: token embeddings (vocabulary 32,000, width 64) and
a projection back to the vocabulary, batch 16 x 128 tokens, so the logits are 16 x 128 x
32,000 floats (262 MB) and their gradient as much again; the weights are 16 MB. A loop that
keeps the step's outputs referenced through backward holds the logits while backward makes
their gradient. Each loop trains 3 updates; in the hand-written one nothing but the loss
outlives the forward pass. "added by training" is the peak less the RSS before the loop
starts (traineval's own modules, imported when the run is assembled, are part of it).
Prints a table; `--markdown FILE` also writes it; `--before SRC` measures another tree too.

    .venv/bin/python benchmarks/bench_memory.py [--repeats 2] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap

SETUP = """
import resource, json, torch
from torch import nn
from torch.nn import functional as F
torch.manual_seed(0)
torch.set_num_threads(1)
VOCAB, WIDTH, BATCH, SEQ = 32000, 64, 16, 128
model = nn.Sequential(nn.Embedding(VOCAB, WIDTH), nn.Linear(WIDTH, VOCAB))
tokens = torch.randint(0, VOCAB, (BATCH * 4, SEQ))
data = torch.utils.data.TensorDataset(tokens[:, :-1], tokens[:, 1:])
def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
"""

HAND_WRITTEN = """
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
base = peak_mb()
for x, y in torch.utils.data.DataLoader(data, batch_size=BATCH):
    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
print(json.dumps({"base": base, "peak": peak_mb()}))
"""

TRAINEVAL = """
from traineval import TrainingConfig, TrainingManager
from traineval.modes import Mode, ModePlan, StepOutput

def step(model, batch):
    x, y = batch
    logits = model(x)
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    return StepOutput(loss=loss, weight=len(x), num_samples=len(x), outputs=logits, targets=y)
step.weight = lambda batch: len(batch[0])

class LanguageModel(Mode):
    name = "lm_for_the_memory_benchmark"
    def plan(self, ctx):
        return ModePlan(step)

quiet = {"verbose": False} if "verbose" in TrainingConfig.__dataclass_fields__ else {}
config = TrainingConfig(
    num_epochs=1, batch_size=BATCH, optimizer_type="adamw", learning_rate=1e-3,
    warmup_steps=0, scheduler_type="constant", progress_bar=False, **quiet,
    tensorboard_logging=False, save_best_model=False, save_last_checkpoint=False,
    checkpoint_save_frequency=0, gradient_clipping=False, early_stopping_patience=0,
    output_dir=OUT, overwrite_output_dir=True, device="cpu", cpu_threads=None,
)
base = peak_mb()
TrainingManager(config).train(
    model, torch.utils.data.DataLoader(data, batch_size=BATCH), mode=LanguageModel()
)
print(json.dumps({"base": base, "peak": peak_mb()}))
"""


def measure(body: str, env: dict[str, str], out: str) -> dict[str, float]:
    code = SETUP + f"OUT = {out!r}\n" + textwrap.dedent(body)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    if done.returncode:
        raise SystemExit(f"a measured loop failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--markdown")
    parser.add_argument("--before", help="a src folder of another traineval tree, measured too")
    args = parser.parse_args()
    loops = {"hand-written": (HAND_WRITTEN, dict(os.environ))}
    loops["traineval"] = (TRAINEVAL, dict(os.environ))
    if args.before:
        loops["traineval before"] = (TRAINEVAL, {**os.environ, "PYTHONPATH": args.before})
    rows = []
    for name, (body, env) in loops.items():
        runs = [measure(body, env, f"/tmp/bench-memory-{os.getpid()}") for _ in range(args.repeats)]
        best = min(runs, key=lambda run: run["peak"])
        rows.append((name, best["peak"], best["peak"] - best["base"]))
    floor, added = rows[0][1], rows[0][2]
    lines = [
        "| loop | peak RSS (MB) | over hand-written | added by training (MB) | over hand-written |",
        "|---|---|---|---|---|",
    ]
    for name, peak, grown in rows:
        over, grown_over = peak / floor - 1, grown / added - 1
        lines.append(f"| {name} | {peak:,.0f} | {over:+.1%} | {grown:,.0f} | {grown_over:+.1%} |")
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as handle:
            handle.write(table + "\n")


if __name__ == "__main__":
    main()
