"""Meta-learning mode: MAML, first-order MAML, Reptile and Prototypical Networks over batches
of few-shot tasks.

A batch is T tasks `(support_x, support_y, query_x, query_y)` with a leading task dimension
(`traineval.data.Episodes` under a DataLoader). For each task the model's weights are
adapted to the support set by `inner_steps` SGD steps at `inner_lr` (functionally,
with `torch.func.functional_call`: the model itself is not modified), then:

- `maml`: the loss is the adapted model's query loss, differentiated through the inner steps
  (second order; Finn et al., 2017);
- `fomaml`: the same loss, with the inner gradients treated as constants (first order);
- `reptile`: the gradient is `weights - adapted weights` (Nichol et al., 2018); the reported
  loss is the adapted model's query loss;
- `protonet`: no adaptation: queries are scored by their distance to each class's mean
  support embedding (Snell et al., 2017).

A model without buffers has all of a batch's tasks adapted at once (`torch.func.grad`
inside `vmap`); one with buffers (BatchNorm's running statistics change in place), one task
at a time, with the same result.

The step's loss averages over the batch's tasks and its gradient is the meta-gradient, so
the configured optimizer, schedule, clipping, accumulation (tasks weigh equally) and
checkpointing act on the meta-update like on any other. `evaluate` adapts the same way on
each validation task and scores the query predictions.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

from ..config.checks import Int, Number, OneOf, choice
from ..config.training_config import TaskType, setting
from ..data.episodes import Episodes
from ..data.sharding import shard_eval_loader
from ..data.splits import DataSplits
from ..system.distributed import Distributed
from ..training.batches import OutputTransform, in_eval_mode, prediction_of
from .base import StepOutput, loss_with_gradient
from .contract import Context, Mode, ModePlan, register

__all__ = ["FOMAML", "MAML", "META_ALGORITHMS", "MetaLearning", "MetaLearningStep", "Reptile"]

Weights = dict[str, torch.Tensor]
Tasks = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class MAML:
    """Model-agnostic meta-learning (Finn et al., 2017): the query loss of the adapted
    weights, differentiated through the inner steps (second order)."""

    name: ClassVar[str] = "maml"
    second_order: ClassVar[bool] = True  # the inner gradients stay in the graph
    detach_inner: ClassVar[bool] = False  # each inner step starts from constants

    def step(self, learner: MetaLearningStep, model: nn.Module, tasks: Tasks) -> StepOutput:
        """One meta-update's loss over the batch's tasks: every task at once when the model
        has no buffers (a BatchNorm's running statistics change in place), else one by one."""
        weights, buffers = _split_state(model)
        count = tasks[0].shape[0]
        if not any(True for _ in model.buffers()):
            query_losses, adapted = learner.all_tasks(model, weights, buffers, tasks)
            loss = self.batched_loss(query_losses, weights, adapted)
            return StepOutput(loss=loss, weight=count, num_samples=count)
        support_x, support_y, query_x, query_y = tasks
        losses = []
        directions: list[Any] = []  # what the algorithm's own update direction needs
        for t in range(count):
            fast = learner.adapt(model, weights, buffers, support_x[t], support_y[t])
            query_loss = learner.loss_function(
                learner.predict(model, {**buffers, **fast}, query_x[t]), query_y[t]
            )
            losses.append(self.task_loss(query_loss, weights, fast, directions))
        loss = self.meta_loss(torch.stack(losses).mean(), weights, directions, count)
        return StepOutput(loss=loss, weight=count, num_samples=count)

    def query_outputs(self, learner: MetaLearningStep, model: nn.Module, tasks: Tasks) -> Any:
        """The predictions for every task's queries after adapting to its support set
        (all tasks at once without buffers, as in training), first order: no meta-gradient."""
        support_x, support_y, query_x, _ = tasks
        weights, buffers = _split_state(model)
        if not any(True for _ in model.buffers()):
            return learner.all_task_outputs(model, weights, buffers, tasks)
        outputs = []
        for t in range(support_x.shape[0]):
            fast = learner.adapt(
                model, weights, buffers, support_x[t], support_y[t], create_graph=False
            )
            with torch.no_grad():
                outputs.append(learner.predict(model, {**buffers, **fast}, query_x[t]))
        return outputs

    def task_loss(
        self, query_loss: torch.Tensor, weights: Weights, adapted: Weights, directions: list[Any]
    ) -> torch.Tensor:
        """One task's contribution to the step's loss (`directions` collects what the
        algorithm's own update direction needs)."""
        return query_loss

    def meta_loss(
        self, loss: torch.Tensor, weights: Weights, directions: list[Any], tasks: int
    ) -> torch.Tensor:
        """The step's loss over its tasks; its gradient is the meta-gradient."""
        return loss

    def batched_loss(
        self, query_losses: torch.Tensor, weights: Weights, adapted: Weights
    ) -> torch.Tensor:
        """The step's loss from every task at once (`adapted`: a leading task dimension)."""
        return query_losses.mean()


class FOMAML(MAML):
    """First-order MAML: the same loss, the inner gradients treated as constants."""

    name: ClassVar[str] = "fomaml"
    second_order: ClassVar[bool] = False


class Reptile(MAML):
    """Reptile (Nichol et al., 2018): the update direction is `weights - adapted weights`,
    averaged over the tasks; the reported loss is the adapted models' query loss."""

    name: ClassVar[str] = "reptile"
    second_order: ClassVar[bool] = False
    detach_inner: ClassVar[bool] = True

    def task_loss(
        self, query_loss: torch.Tensor, weights: Weights, adapted: Weights, directions: list[Any]
    ) -> torch.Tensor:
        if not directions:
            directions.extend(torch.zeros_like(w) for w in weights.values())
        for total, w, a in zip(directions, weights.values(), adapted.values(), strict=True):
            total.add_(w.detach() - a.detach())
        return query_loss.detach()

    def meta_loss(
        self, loss: torch.Tensor, weights: Weights, directions: list[Any], tasks: int
    ) -> torch.Tensor:
        # value: the adapted models' query loss; gradient: mean of (weights - adapted)
        return loss_with_gradient(loss, list(weights.values()), [d / tasks for d in directions])

    def batched_loss(
        self, query_losses: torch.Tensor, weights: Weights, adapted: Weights
    ) -> torch.Tensor:
        directions = [w.detach() - adapted[name].detach().mean(0) for name, w in weights.items()]
        return loss_with_gradient(query_losses.detach().mean(), list(weights.values()), directions)


class ProtoNet:
    """Prototypical networks (Snell et al., 2017): the model embeds; each query is scored
    by its negative squared distance to each class's mean support embedding. No inner loop
    (`inner_lr`, `inner_steps` do not apply); support and queries go through the model in
    one forward pass. Labels are class ids 0..ways-1 within each task (as `Episodes` makes
    them)."""

    name: ClassVar[str] = "protonet"

    def step(self, learner: MetaLearningStep, model: nn.Module, tasks: Tasks) -> StepOutput:
        support_x, support_y, query_x, query_y = tasks
        logits = self.logits(learner, model, support_x, support_y, query_x)
        loss = learner.loss_function(logits.flatten(0, 1), query_y.flatten())
        count = support_x.shape[0]
        return StepOutput(loss=loss, weight=count, num_samples=count)

    def query_outputs(self, learner: MetaLearningStep, model: nn.Module, tasks: Tasks) -> Any:
        support_x, support_y, query_x, _ = tasks
        with torch.no_grad():
            return self.logits(learner, model, support_x, support_y, query_x)

    @staticmethod
    def logits(
        learner: MetaLearningStep,
        model: nn.Module,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        query_x: torch.Tensor,
    ) -> torch.Tensor:
        """(tasks, queries, classes) scores; a class index no support sample has scores
        -inf (the class count is bounded by the support size: no host sync per step)."""
        n = support_x.shape[0] * support_x.shape[1]
        inputs = torch.cat([support_x.flatten(0, 1), query_x.flatten(0, 1)])
        embedded = prediction_of(model(inputs), learner.output_transform).flatten(1)
        support = embedded[:n].unflatten(0, support_x.shape[:2])
        query = embedded[n:].unflatten(0, query_x.shape[:2])
        one_hot = F.one_hot(support_y.long(), support_y.shape[1]).to(support.dtype)
        counts = one_hot.sum(1)  # (tasks, classes)
        prototypes = one_hot.transpose(1, 2) @ support / counts.clamp(min=1).unsqueeze(-1)
        distances = torch.cdist(query.float(), prototypes.float()) ** 2
        return -distances.masked_fill(counts.unsqueeze(1) == 0, float("inf"))


MetaAlgorithm = MAML | ProtoNet
META_ALGORITHMS: dict[str, type[MetaAlgorithm]] = {
    a.name: a for a in (MAML, FOMAML, Reptile, ProtoNet)
}


SPLIT_NAMES = ("train", "val", "test")


@register
@dataclasses.dataclass(frozen=True)
class MetaLearning(Mode):
    """Batches of few-shot tasks, meta-trained with `algorithm`: maml, fomaml, reptile
    (`inner_steps` SGD steps at `inner_lr` adapt the weights to each task's support set) or
    protonet (prototypical networks: class means of the support embeddings, no inner loop).

    `ways`, `shots`, `queries`, `train_episodes` and `eval_episodes` say how a config-file
    run cuts its dataset into tasks (`traineval.data.Episodes`); in Python you bring the
    task loader yourself.
    """

    name: ClassVar[str] = "meta_learning"
    compile_refusal: ClassVar[str | None] = (
        "MAML differentiates through its inner gradient steps (double backward), which "
        "torch.compile does not support (the first-order algorithms are not compiled either)"
    )
    shards: ClassVar[bool] = False
    algorithm: str = setting("maml", OneOf(tuple(META_ALGORITHMS)))
    inner_lr: float = setting(0.1, Number(0, strict=True))
    inner_steps: int = setting(1, Int(1))
    ways: int = setting(5, Int(2))  # one class is no choice to learn
    shots: int = setting(1, Int(1))
    queries: int = setting(5, Int(1))
    train_episodes: int = setting(2000, Int(1))
    eval_episodes: int = setting(200, Int(1))

    own_metrics: ClassVar[bool] = True
    fold_refusal: ClassVar[str | None] = "its samples are tasks, not rows to fold"
    # the tasks an epoch draws (its length, and each task's classes and samples)
    resume_fixed: ClassVar[tuple[str, ...]] = ("ways", "shots", "queries", "train_episodes")

    def prepare(self, splits: DataSplits, data: Any) -> DataSplits:
        """Every split as few-shot tasks (drawn from `data.split_seed`); the model answers
        `ways` classes."""
        splits = super().prepare(splits, data)
        if splits.task_type is not TaskType.CLASSIFICATION:
            raise ValueError(
                f"mode: meta_learning needs a classification dataset, not {data.name!r}"
            )

        def tasks(dataset: Any, count: int, offset: int) -> Any:
            if dataset is None:
                return None
            seed = data.split_seed + offset
            try:
                return Episodes(dataset, self.ways, self.shots, self.queries, count, seed=seed)
            except ValueError as error:  # say which split, and which settings
                raise ValueError(
                    f"meta_learning: the {SPLIT_NAMES[offset]} split cannot make its tasks: "
                    f"{error}; lower shots or queries (or ways), or give that split more rows"
                ) from None

        return dataclasses.replace(
            splits,
            train=tasks(splits.train, self.train_episodes, 0),
            val=tasks(splits.val, self.eval_episodes, 1),
            test=tasks(splits.test, self.eval_episodes, 2),
            num_outputs=self.ways,
            class_names=None,
        )

    def task_of(self, splits: DataSplits) -> TaskType | None:
        return None  # scored by adapting to each task, not by the Evaluator

    def check(self, ctx: Context) -> None:
        super().check(ctx)
        allowed = ("val_loss", "val_accuracy", "train_loss")
        if ctx.config.monitor_metric not in allowed:
            raise ValueError(
                f"monitor_metric={ctx.config.monitor_metric!r} is invalid in "
                f"mode='meta_learning': expected one of {', '.join(allowed)} (query loss and "
                "accuracy after adaptation)"
            )

    def step(
        self, loss_function: Any = None, output_transform: OutputTransform | None = None
    ) -> MetaLearningStep:
        """The step these settings describe."""
        return MetaLearningStep(
            loss_function,
            self.algorithm,
            self.inner_lr,
            self.inner_steps,
            output_transform=output_transform,
        )

    def plan(self, ctx: Context) -> ModePlan:
        step = self.step(ctx.loss_function, ctx.output_transform)
        device, job = ctx.device, ctx.job
        # under torchrun each rank adapts to its share of the tasks; `evaluate` sums them
        val = shard_eval_loader(ctx.val_loader, job) if ctx.val_loader is not None else None

        def adapt(model: nn.Module) -> dict[str, float]:
            return step.evaluate(model, val, device, job)

        # the functional inner loop cannot run through DDP: the loop averages the gradients
        return ModePlan(step, wraps_model=False, evaluate=adapt if val is not None else None)

    def score(
        self, model: nn.Module, data: Any, device: torch.device, *, seed: int = 0
    ) -> dict[str, float]:
        """Query loss and accuracy after adapting to each test task's support set."""
        return self.step().evaluate(model.to(device), data, device)


class MetaLearningStep:
    """Step function for batches of few-shot tasks; see the module docstring."""

    def __init__(
        self,
        loss_function: Any = None,
        algorithm: str | MetaAlgorithm = "maml",
        inner_lr: float = 0.1,
        inner_steps: int = 1,
        *,
        output_transform: OutputTransform | None = None,
    ) -> None:
        if isinstance(algorithm, str):
            choice("meta_learning.algorithm", algorithm, tuple(META_ALGORITHMS))
            algorithm = META_ALGORITHMS[algorithm]()
        self.loss_function = loss_function or F.cross_entropy
        self.algorithm = algorithm
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.output_transform = output_transform

    def weight(self, batch: Any) -> int:
        """Tasks weigh equally: the number of tasks in the batch."""
        return int(_tasks(batch)[0].shape[0])

    def __call__(self, model: nn.Module, batch: Any) -> StepOutput:
        return self.algorithm.step(self, model, _tasks(batch))

    def all_tasks(
        self, model: nn.Module, weights: Weights, frozen: Weights, batch: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, Weights]:
        """Every task's query loss after adaptation, and its adapted weights, in one
        vectorised pass (`torch.func.vmap` over the task dimension; the inner gradients by
        `torch.func.grad`, differentiable for MAML's second order)."""
        algorithm = self._inner_loop()
        support_loss, inner = self._vectorised(
            model, frozen, algorithm.second_order, algorithm.detach_inner
        )

        def task(
            w: Weights, sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor, qy: torch.Tensor
        ) -> tuple[torch.Tensor, Weights]:
            fast = inner(w, sx, sy)
            return support_loss(fast, qx, qy), fast

        batched = vmap(task, in_dims=(None, 0, 0, 0, 0), randomness="different")
        losses, adapted = batched(weights, *batch)
        return losses, adapted

    def all_task_outputs(
        self, model: nn.Module, weights: Weights, frozen: Weights, tasks: Tasks
    ) -> torch.Tensor:
        """Every task's query predictions after its inner steps (first order), in one
        vectorised pass: what validation scores."""
        _, inner = self._vectorised(model, frozen, second_order=False, detach_inner=False)

        def task(w: Weights, sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor) -> torch.Tensor:
            fast = inner({name: v.detach() for name, v in w.items()}, sx, sy)
            return self.predict(model, {**frozen, **fast}, qx).detach()

        support_x, support_y, query_x, _ = tasks
        batched = vmap(task, in_dims=(None, 0, 0, 0), randomness="different")
        return batched(weights, support_x, support_y, query_x)

    def _vectorised(
        self, model: nn.Module, frozen: Weights, second_order: bool, detach_inner: bool
    ) -> tuple[Any, Any]:
        """One task's support loss, and its inner SGD steps written for `vmap`
        (`torch.func.grad`; second order keeps the inner gradients in the graph)."""

        def support_loss(fast: Weights, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.loss_function(self.predict(model, {**frozen, **fast}, x), y)

        def inner(fast: Weights, sx: torch.Tensor, sy: torch.Tensor) -> Weights:
            for _ in range(self.inner_steps):
                step = grad(support_loss)(fast, sx, sy)
                if not second_order:
                    step = {name: g.detach() for name, g in step.items()}
                fast = {name: fast[name] - self.inner_lr * step[name] for name in fast}
                if detach_inner:
                    fast = {name: v.detach() for name, v in fast.items()}
            return fast

        return support_loss, inner

    def adapt(
        self,
        model: nn.Module,
        weights: Weights,
        buffers: Weights,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        create_graph: bool | None = None,
    ) -> Weights:
        """`weights` after the inner SGD steps on one task's support set."""
        algorithm = self._inner_loop()
        second_order = algorithm.second_order if create_graph is None else create_graph
        fast = dict(weights)
        for _ in range(self.inner_steps):
            with torch.enable_grad():
                outputs = self.predict(model, {**buffers, **fast}, support_x)
                loss = self.loss_function(outputs, support_y)
                grads = torch.autograd.grad(
                    loss, list(fast.values()), create_graph=second_order, allow_unused=True
                )
            fast = {
                name: w if g is None else w - self.inner_lr * (g if second_order else g.detach())
                for (name, w), g in zip(fast.items(), grads, strict=True)
            }
            if algorithm.detach_inner:
                fast = {name: w.detach().requires_grad_() for name, w in fast.items()}
        return fast

    def _inner_loop(self) -> MAML:
        if not isinstance(self.algorithm, MAML):
            raise TypeError(
                f"{type(self.algorithm).__name__} adapts no weights: adapt() is for the "
                "gradient-based algorithms (maml, fomaml, reptile)"
            )
        return self.algorithm

    def predict(self, model: nn.Module, state: Weights, inputs: torch.Tensor) -> torch.Tensor:
        """The model's prediction with `state` in place of its weights (the loss and the
        accuracy read the prediction: see `traineval.training.batches`)."""
        return prediction_of(functional_call(model, state, (inputs,)), self.output_transform)

    def evaluate(
        self, model: nn.Module, loader: Any, device: torch.device, job: Distributed | None = None
    ) -> dict[str, float]:
        """Query loss, and accuracy for classification tasks (class-id targets), after
        adapting to each task's support set (under torchrun: over every rank's share of the
        tasks)."""
        loss_sum, correct, count = 0.0, 0, 0
        classes = True
        with in_eval_mode(model):
            for batch in loader:
                support_x, support_y, query_x, query_y = (
                    t.to(device, non_blocking=True) for t in _tasks(batch)
                )
                tasks = (support_x, support_y, query_x, query_y)
                every = self.algorithm.query_outputs(self, model, tasks)
                for t in range(support_x.shape[0]):
                    outputs = every[t]
                    with torch.no_grad():
                        loss = self.loss_function(outputs, query_y[t])
                    n = int(query_y[t].shape[0])
                    loss_sum += float(loss) * n
                    classes = classes and not query_y.is_floating_point()
                    if classes:
                        correct += int((outputs.argmax(dim=-1) == query_y[t]).sum())
                    count += n
        if job is not None:
            loss_sum, correct_sum, count_sum = job.sum([loss_sum, correct, count])
            correct, count = int(correct_sum), int(count_sum)
        if count == 0:
            raise ValueError("the validation loader yielded no tasks")
        if not classes:  # regression tasks: accuracy does not apply
            return {"loss": loss_sum / count}
        return {"loss": loss_sum / count, "accuracy": correct / count}


def _split_state(model: nn.Module) -> tuple[Weights, Weights]:
    """The trainable weights, and everything else the forward pass reads (frozen, buffers)."""
    weights: Weights = {}
    others: Weights = dict(model.named_buffers())
    for name, param in model.named_parameters():
        (weights if param.requires_grad else others)[name] = param
    return weights, others


def _tasks(batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if not isinstance(batch, (list, tuple)) or len(batch) != 4:
        raise ValueError(
            "meta-learning batches are (support_x, support_y, query_x, query_y) with a leading "
            "task dimension, e.g. a DataLoader over traineval.data.Episodes; got "
            f"{type(batch).__name__}"
            + (f" of {len(batch)} elements" if isinstance(batch, (list, tuple)) else "")
        )
    support_x, support_y, query_x, query_y = batch
    if support_x.ndim < 2 or support_y.ndim < 2:
        raise ValueError(
            "meta-learning batches need a leading task dimension: support_y of shape "
            f"(tasks, samples) or (tasks, samples, ...), got {tuple(support_y.shape)}"
        )
    return support_x, support_y, query_x, query_y
