"""Workload C of the peer benchmarks: one CUDA GPU, bf16 autocast, steady-state throughput.

(C1) a GPT-2-small-shaped language model (124M parameters, 12 layers, d=768, 12 heads,
vocabulary 50304, sequence 1024, batch 8), tokens/s and model FLOPs utilisation;
(C2) the CNN of workload B at batch 512 on 3x32x32 inputs, samples/s.
Every loop trains the same model from the same seed and data (a pinned DataLoader), with
AdamW, clipping at 1.0 and bf16 autocast: hand-written naive (`loss.item()` every step,
foreach AdamW) and careful (fused AdamW, no per-step sync), careful + torch.compile,
careful inside DDP with one rank (what DDP itself costs), traineval with its defaults
(progress bar, metrics.jsonl, checkpointing, clipping; bf16 chosen by precision="auto") and
with compile=True, and PyTorch Lightning default (bar + per-step self.log) and lean.

Timing starts after `--warmup` updates (CUDA synchronised) and stops at the last update, so
start-up, compilation and end-of-run checkpoint writes are not counted. Each run is its
own process; runs alternate. MFU = 6 N + 12 L d T FLOPs per token (PaLM's estimate) over
the bf16 dense peak (989 TFLOP/s for H100/H200 SXM).

    python benchmarks/gpu_peers.py --workloads gpt,cnn --repeats 2 --json results.jsonl

`--compile-mode` picks torch.compile's mode for the compiled loops; `--profile DIR` writes a
torch.profiler kernel table of 5 updates per run (for finding where a compiled step's time
goes); `--smoke` runs everything on the CPU with a tiny GPT, to check the script before
spending device time on it (tests/test_benchmarks.py does).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from peers import small_cnn

PEAK_FLOPS = 989e12
SHAPE = {"vocab": 50304, "seq": 1024, "d": 768, "layers": 12}  # GPT-2 small
DEVICE = "cuda"  # --smoke: "cpu", with a tiny GPT, to check the script itself
COMPILE_MODE = "default"  # torch.compile's mode for the compiled loops (--compile-mode)
SPECS = {
    "gpt": {"batch": 8, "steps": 60, "label": "GPT-124M, {batch} x 1024 tokens, bf16"},
    "cnn": {"batch": 512, "steps": 150, "label": "CNN 3x32x32, batch {batch}, bf16"},
}
LOOPS = [
    "hand-written naive",
    "hand-written careful",
    "careful + compile",
    "careful + compile model and loss",
    "careful in DDP (1 rank)",
    "traineval defaults",
    "traineval compile",
    "Lightning default",
    "Lightning lean",
]


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, vocab: int, seq: int, d: int, layers: int) -> None:
        super().__init__()
        self.layers = layers
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, 12) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight  # tied, as GPT-2

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def make_model(workload: str) -> nn.Module:
    torch.manual_seed(0)
    if workload == "gpt":
        return GPT(**SHAPE)
    return small_cnn()


def make_loader(workload: str) -> DataLoader:
    spec = SPECS[workload]
    n = spec["batch"] * spec["steps"]
    generator = torch.Generator().manual_seed(0)
    if workload == "gpt":
        tokens = torch.randint(0, SHAPE["vocab"], (n, SHAPE["seq"] + 1), generator=generator)
        data = TensorDataset(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())
    else:
        data = TensorDataset(
            torch.randn(n, 3, 32, 32, generator=generator),
            torch.randint(0, 10, (n,), generator=generator),
        )
    pin = DEVICE == "cuda"
    return DataLoader(data, batch_size=spec["batch"], shuffle=False, pin_memory=pin)


def loss_of(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # No `.float()` on the logits: under autocast, cross_entropy's log-softmax already runs
    # in fp32, reading the bf16 logits directly (log_softmax with dtype=float32). An explicit
    # cast first materialises an fp32 copy of the 16 x 1024 x 50,304 logits and slows the
    # log-softmax and its backward 2-3x: ~4 ms of a ~53 ms update on an H100
    # (results/profiles/h100_gpt_b16_*). The numerics are the same (bf16 -> fp32 is exact).
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


class Clock:
    """Synchronised timestamps: after update `warmup`, and at the last update.

    With `profile` set, torch.profiler records updates warmup+1 .. warmup+5 and writes its
    kernel table there (those runs' throughput includes the profiler's cost).
    """

    def __init__(self, warmup: int, steps: int, profile: Path | None = None) -> None:
        self.warmup, self.steps = warmup, steps
        self.start = self.end = 0.0
        self.profile = profile
        self.profiler: Any = None

    def step(self, done: int) -> None:
        if self.profile is not None:
            self._profile(done)
        if done in (self.warmup, self.steps):
            synchronize()
            if done == self.warmup:
                self.start = time.perf_counter()
            else:
                self.end = time.perf_counter()

    def _profile(self, done: int) -> None:
        from torch.profiler import ProfilerActivity, profile

        if done == self.warmup:
            activities = [ProfilerActivity.CPU]
            if DEVICE == "cuda":
                activities.append(ProfilerActivity.CUDA)
            self.profiler = profile(activities=activities, record_shapes=True)
            self.profiler.__enter__()
        elif done == self.warmup + 5 and self.profiler is not None:
            synchronize()
            self.profiler.__exit__(None, None, None)
            table = self.profiler.key_averages(group_by_input_shape=True).table(
                sort_by=f"self_{'cuda' if DEVICE == 'cuda' else 'cpu'}_time_total",
                row_limit=30,
                max_name_column_width=60,
            )
            assert self.profile is not None
            self.profile.write_text(table)
            self.profiler = None


def raw(model: nn.Module, loader: DataLoader, clock: Clock, loop: str) -> None:
    careful = loop != "hand-written naive"
    model.to(DEVICE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=careful or None)
    forward: nn.Module = model
    if loop == "careful in DDP (1 rank)":
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29511")
        dist.init_process_group("nccl" if DEVICE == "cuda" else "gloo", rank=0, world_size=1)
        forward = DistributedDataParallel(model, device_ids=[0] if DEVICE == "cuda" else None)
    loss_function = loss_of
    if loop.startswith("careful + compile"):
        forward = torch.compile(model, mode=COMPILE_MODE)  # type: ignore[assignment]
    if loop == "careful + compile model and loss":
        loss_function = torch.compile(loss_of, mode=COMPILE_MODE)
    running = torch.zeros((), device=DEVICE)
    for done, (x, y) in enumerate(loader, start=1):
        x, y = x.to(DEVICE, non_blocking=True), y.to(DEVICE, non_blocking=True)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = loss_function(forward(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if careful:
            running += loss.detach()
        else:
            running += loss.item()
        clock.step(done)
    float(running)


def with_traineval(model: nn.Module, loader: DataLoader, clock: Clock, loop: str) -> None:
    from traineval import Callback, TrainingConfig, TrainingManager

    class Mark(Callback):
        def on_step_end(self, state_loop: Any) -> None:
            clock.step(state_loop.state.global_step)

    with tempfile.TemporaryDirectory() as folder:
        config = TrainingConfig(
            num_epochs=1,
            learning_rate=3e-4,
            weight_decay=0.0,
            scheduler_type="constant",
            warmup_steps=0,
            output_dir=folder,
            tensorboard_logging=False,
            progress_bar=True,
            batch_size=loader.batch_size or 1,
            device=DEVICE,
            compile=loop == "traineval compile",
            compile_mode=COMPILE_MODE,
        )
        TrainingManager(config).train(model, loader, callbacks=[Mark()])


def with_lightning(model: nn.Module, loader: DataLoader, clock: Clock, loop: str) -> None:
    import lightning as L

    lean = loop == "Lightning lean"

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def training_step(self, batch: Any, index: int) -> torch.Tensor:
            x, y = batch
            loss = loss_of(self.net(x), y)
            if not lean:
                self.log("train_loss", loss, prog_bar=True)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            # foreach, not fused: Lightning refuses to clip a fused optimizer under AMP
            return torch.optim.AdamW(self.parameters(), lr=3e-4)

    class Mark(L.Callback):
        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            clock.step(trainer.global_step)

    with tempfile.TemporaryDirectory() as folder:
        options: dict[str, Any] = {
            "accelerator": "gpu" if DEVICE == "cuda" else "cpu",
            "devices": 1,
            "max_epochs": 1,
            "precision": "bf16-mixed",
            "gradient_clip_val": 1.0,
            "default_root_dir": folder,
            "callbacks": [Mark()],
        }
        if lean:
            options.update(
                enable_progress_bar=False,
                logger=False,
                enable_checkpointing=False,
                enable_model_summary=False,
            )
        L.Trainer(**options).fit(Module(), loader)


def run_one(loop: str, workload: str, warmup: int, profile: Path | None) -> dict[str, Any]:
    loader = make_loader(workload)
    model = make_model(workload)
    params = sum(p.numel() for p in model.parameters())
    if profile is not None:
        profile.mkdir(parents=True, exist_ok=True)
        profile = profile / f"{workload}-{loop.replace(' ', '_')}.txt"
    clock = Clock(warmup, SPECS[workload]["steps"], profile)
    if loop.startswith(("hand-written", "careful")):
        function = raw
    elif loop.startswith("traineval"):
        function = with_traineval
    else:
        function = with_lightning
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        function(model, loader, clock, loop)
    seconds = clock.end - clock.start
    timed = SPECS[workload]["steps"] - warmup
    batch = SPECS[workload]["batch"]
    out: dict[str, Any] = {"loop": loop, "workload": workload, "seconds": seconds}
    out.update(batch=SPECS[workload]["batch"], compile_mode=COMPILE_MODE, profiled=bool(profile))
    out["samples_per_sec"] = timed * batch / seconds
    if workload == "gpt":
        tokens = timed * batch * SHAPE["seq"]
        out["tokens_per_sec"] = tokens / seconds
        flops_per_token = 6 * params + 12 * SHAPE["layers"] * SHAPE["d"] * SHAPE["seq"]
        out["mfu"] = out["tokens_per_sec"] * flops_per_token / PEAK_FLOPS
    return out


def main() -> None:
    args = _arguments()
    if args.run:
        print(json.dumps(run_one(args.run[0], args.run[1], args.warmup, args.profile)))
        return
    if not args.smoke and not torch.cuda.is_available():
        print("workload C needs a CUDA GPU; none is available here")
        return
    loops = [loop for loop in args.loops.split(",") if loop]
    if importlib.util.find_spec("lightning") is None:
        print("skipping Lightning: not installed")
        loops = [loop for loop in loops if not loop.startswith("Lightning")]
    versions = f"python {platform.python_version()}, torch {torch.__version__}"
    if importlib.util.find_spec("lightning") is not None:
        versions += f", lightning {__import__('lightning').__version__}"
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU (smoke test)"
    print(f"{device}; {versions}")
    _print_table(args, loops, _run_all(args, loops))


def _arguments() -> argparse.Namespace:
    """The command line; it also sets the workloads' steps and batch, the compile mode and,
    for a smoke test, the CPU and a tiny GPT."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="gpt,cnn")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compile-repeats", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--steps", type=int, help="updates per run (default: per workload)")
    parser.add_argument(
        "--smoke", action="store_true", help="check this script on the CPU with a tiny GPT"
    )
    parser.add_argument("--batch", type=int, help="batch size (default: per workload)")
    parser.add_argument("--loops", default=",".join(LOOPS))
    parser.add_argument("--json", type=Path, help="append each run's result here")
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode")
    parser.add_argument(
        "--profile", type=Path, help="write a kernel table of 5 updates per run to this folder"
    )
    parser.add_argument("--run", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    for spec in SPECS.values():
        if args.steps:
            spec["steps"] = args.steps
        if args.batch:
            spec["batch"] = args.batch
    global COMPILE_MODE, DEVICE
    COMPILE_MODE = args.compile_mode
    if args.smoke:
        DEVICE = "cpu"
        SHAPE.update(vocab=512, seq=32, d=48, layers=2)
    return args


def _child_command(args: argparse.Namespace, loop: str, workload: str) -> list[str]:
    """The command that runs one loop on one workload in its own process."""
    command = [sys.executable, __file__, "--run", loop, workload]
    command += ["--warmup", str(args.warmup)]
    if args.steps:
        command += ["--steps", str(args.steps)]
    if args.smoke:
        command += ["--smoke"]
    if args.batch:
        command += ["--batch", str(args.batch)]
    command += ["--compile-mode", args.compile_mode]
    if args.profile:
        command += ["--profile", str(args.profile)]
    return command


def _run_all(
    args: argparse.Namespace, loops: list[str]
) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Every (workload, loop) run, alternating the loops' order between repeats."""
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for workload in args.workloads.split(","):
        for repeat in range(args.repeats):
            order = loops if repeat % 2 == 0 else list(reversed(loops))
            for loop in order:
                if "compile" in loop and repeat >= args.compile_repeats:
                    continue
                done = subprocess.run(
                    _child_command(args, loop, workload), capture_output=True, text=True
                )
                if done.returncode != 0:
                    print(f"{loop} / {workload} failed:\n{done.stderr[-2000:]}", flush=True)
                    continue
                result = json.loads(done.stdout.strip().splitlines()[-1])
                results.setdefault((workload, loop), []).append(result)
                print(json.dumps(result), flush=True)
                if args.json:
                    with args.json.open("a") as handle:
                        handle.write(json.dumps(result) + "\n")
    return results


def _print_table(
    args: argparse.Namespace,
    loops: list[str],
    results: dict[tuple[str, str], list[dict[str, Any]]],
) -> None:
    """Medians per (workload, loop), against the naive and careful hand-written loops."""
    print()
    print("| workload | loop | runs | samples/s | tokens/s | MFU | vs naive | vs careful |")
    print("|---|---|---|---|---|---|---|---|")
    for workload in args.workloads.split(","):
        medians = {
            loop: statistics.median(r["samples_per_sec"] for r in runs)
            for (w, loop), runs in results.items()
            if w == workload
        }
        naive = medians.get("hand-written naive", float("nan"))
        careful = medians.get("hand-written careful", float("nan"))
        label = SPECS[workload]["label"].format(batch=SPECS[workload]["batch"])
        for loop in loops:
            runs = results.get((workload, loop))
            if not runs:
                continue
            samples = medians[loop]
            if workload == "gpt":
                tokens = statistics.median(r["tokens_per_sec"] for r in runs)
                mfu = statistics.median(r["mfu"] for r in runs)
                extra = f"{tokens:,.0f} | {mfu:.3f}"
            else:
                extra = "- | -"
            print(
                f"| {label} | {loop} | {len(runs)} | {samples:,.0f} | "
                f"{extra} | {samples / naive:.3f} | {samples / careful:.3f} |"
            )


if __name__ == "__main__":
    main()
