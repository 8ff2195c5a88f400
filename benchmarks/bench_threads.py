"""CPU threads: torch's default thread count against fewer, on small and larger models.

Each variant is its own process, launched alternately, so the machine's noise falls on
all of them alike. A variant trains a config-file run (scikit-learn's digits, the run's
own loaders, fixed epochs, no early stopping, no TensorBoard) with a thread count set
through `training.cpu_threads` ("auto" and `None`, torch's default: one thread per core),
and reports the training time (TrainingResult.train_seconds) and the CPU time the process
spent (user + system, all threads). `--busy` adds a competing process for the whole
measurement (a two-thread matmul loop), as on a shared machine.

Workloads:
- demo: the `traineval demo` CNN (16/32 channels, hidden 64), batch 32;
- mlp-512: an MLP with two hidden layers of 512, batch 128;
- wide-mlp: an MLP with two hidden layers of 1,024, batch 256;
- wide-cnn: the CNN with 64/128 channels and hidden 256, batch 128.

    .venv/bin/python benchmarks/bench_threads.py [--repeats 3] [--epochs 8] [--busy]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKLOADS = {
    "demo": [
        "model.name=cnn",
        "model.options={channels: [16, 32], hidden: 64, dropout: 0.1}",
        "training.batch_size=32",
    ],
    "mlp-512": [
        "model.name=mlp",
        "model.options={hidden_sizes: [512, 512]}",
        "training.batch_size=128",
    ],
    "wide-mlp": [
        "model.name=mlp",
        "model.options={hidden_sizes: [1024, 1024]}",
        "training.batch_size=256",
    ],
    "wide-cnn": [
        "model.name=cnn",
        "model.options={channels: [64, 128], hidden: 256, dropout: 0.1}",
        "training.batch_size=128",
    ],
}


def child(workload: str, threads: str, epochs: int) -> None:
    """One measured run; prints a JSON line."""
    from importlib import resources

    from traineval.commands.experiment import RunConfig, run_experiment

    with tempfile.TemporaryDirectory() as folder:
        overrides = [
            *WORKLOADS[workload],
            f"training.num_epochs={epochs}",
            "training.early_stopping_patience=0",
            "training.tensorboard_logging=false",
            "training.progress_bar=false",
            "training.save_last_checkpoint=false",
            f"training.output_dir={folder}/run",
            f"training.cpu_threads={'null' if threads == 'none' else threads}",
        ]
        source = resources.files("traineval").joinpath("configs/demo.yaml")
        with resources.as_file(source) as path:
            config = RunConfig.from_yaml(path, overrides)
        from traineval.callbacks import Callback

        class Clock(Callback):  # CPU time and thread count of the training alone
            def on_train_start(self, loop):
                import torch

                self.threads = torch.get_num_threads()
                self.cpu = time.process_time()

            def on_train_end(self, loop, logs):
                self.cpu = time.process_time() - self.cpu

        clock = Clock()
        outcome = run_experiment(config, callbacks=[clock])
        print(
            json.dumps(
                {
                    "train_seconds": outcome.training.train_seconds,
                    "cpu_seconds": clock.cpu,
                    "threads_used": clock.threads,
                    "test_accuracy": (outcome.test_metrics or {}).get("accuracy"),
                }
            )
        )


def launch(workload: str, threads: str, epochs: int) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    command = [sys.executable, __file__, "--child", workload, threads, str(epochs)]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def busy_loop() -> subprocess.Popen[bytes]:
    code = (
        "import torch\ntorch.set_num_threads(2)\na = torch.randn(512, 512)\n"
        "while True:\n    a = (a @ a).tanh_()\n"
    )
    return subprocess.Popen([sys.executable, "-c", code])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--busy", action="store_true", help="a competing process meanwhile")
    parser.add_argument("--threads", default="1,auto,none")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--output", default=None, help="append the table to this file")
    args = parser.parse_args()
    variants = args.threads.split(",")
    workloads = args.workloads.split(",")
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    competitor = busy_loop() if args.busy else None
    try:
        for repeat in range(args.repeats):
            for workload in workloads:
                order = variants if repeat % 2 == 0 else variants[::-1]
                for threads in order:
                    result = launch(workload, threads, args.epochs)
                    results.setdefault((workload, threads), []).append(result)
                    print(workload, threads, result, file=sys.stderr, flush=True)
    finally:
        if competitor is not None:
            competitor.kill()
    table = render(results, workloads, variants, args)
    print(table)
    if args.output:
        with Path(args.output).open("a") as out:
            out.write(table + "\n")


def render(results, workloads, variants, args) -> str:
    condition = "busy (a 2-thread matmul process alongside)" if args.busy else "quiet"
    lines = [
        f"## CPU threads, {condition}: {os.cpu_count()} cores, torch "
        f"{__import__('torch').__version__}, Python {platform.python_version()}, "
        f"{args.epochs} epochs, median of {args.repeats}",
        "",
        "| workload | cpu_threads | threads | train s | vs none | CPU s | CPU vs none | test acc |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for workload in workloads:
        base = results[(workload, variants[-1])]
        base_train = statistics.median(r["train_seconds"] for r in base)
        base_cpu = statistics.median(r["cpu_seconds"] for r in base)
        for threads in variants:
            runs = results[(workload, threads)]
            train = statistics.median(r["train_seconds"] for r in runs)
            cpu = statistics.median(r["cpu_seconds"] for r in runs)
            lines.append(
                f"| {workload} | {threads} | {runs[0]['threads_used']} | {train:.2f} | "
                f"{train / base_train:.2f} | {cpu:.2f} | {cpu / base_cpu:.2f} | "
                f"{statistics.median(r['test_accuracy'] for r in runs):.4f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        main()
