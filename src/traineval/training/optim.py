"""Optimizers by name with decoupled parameter groups, and schedulers with linear warmup.

Every schedule is a function of the number of optimizer updates, stepped once per update
(plateau: once per evaluation, on the monitored metric).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config.training_config import SCHEDULERS
from ..runs.tracking import Plateau

__all__ = [
    "OptimizerChoice",
    "PlateauSchedule",
    "ScheduleChoice",
    "build_optimizer",
    "build_scheduler",
    "changed_settings",
    "configured_optimizer",
    "configured_scheduler",
    "freeze",
    "group_settings",
    "keep_chosen_settings",
    "parameter_groups",
    "restore_schedule",
]

logger = logging.getLogger(__name__)


def matching(model: nn.Module, prefix: str) -> list[str]:
    """The names of `model`'s parameters under `prefix` (the name itself, or a module path),
    each name of a tied parameter or of a module registered twice included."""
    return [name for name in parameter_names(model) if _under(name, prefix)]


def parameter_names(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every name of every parameter: a tied one (or one of a module registered under two
    names) under each of its names."""
    return dict(model.named_parameters(remove_duplicate=False))


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def check_prefixes(model: nn.Module, field: str, prefixes: Iterable[str]) -> None:
    """Every prefix names some parameter of `model`, or a ValueError says which does not."""
    for prefix in prefixes:
        if not matching(model, prefix):
            modules = ", ".join(name for name, _ in model.named_children()) or "none"
            raise ValueError(
                f"{field}: {prefix!r} matches no parameter of {type(model).__name__} "
                f"(its top-level modules: {modules})"
            )


def freeze(model: nn.Module, prefixes: Iterable[str]) -> int:
    """Turn off gradients for the parameters under `prefixes`; returns how many."""
    prefixes = list(prefixes)
    check_prefixes(model, "frozen_parameters", prefixes)
    frozen = {
        id(param): param
        for name, param in parameter_names(model).items()
        if any(_under(name, prefix) for prefix in prefixes)
    }
    for param in frozen.values():
        param.requires_grad_(False)
    return len(frozen)


def _multiplier(names: list[str], multipliers: dict[str, float]) -> float:
    """The factor of the longest prefix that matches one of a parameter's `names` (1.0
    where none does)."""
    best, factor = -1, 1.0
    for prefix, value in multipliers.items():
        if any(_under(name, prefix) for name in names) and len(prefix) > best:
            best, factor = len(prefix), value
    return factor


def parameter_groups(
    model: nn.Module,
    weight_decay: float,
    lr: float | None = None,
    multipliers: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    """Split trainable parameters: matrices decay; biases, norm weights and other 1-D tensors
    don't, nor the weights of embeddings with sparse gradients (torch's optimizers cannot
    add a decay to a sparse gradient). With `multipliers` ({prefix: factor}) each factor
    gets its own groups, whose rate is `lr` times the factor.

    Raises:
        ValueError: the model has no trainable parameters, or a prefix matches none.
    """
    multipliers = multipliers or {}
    check_prefixes(model, "lr_multipliers", multipliers)
    buckets: dict[tuple[float, bool], list[nn.Parameter]] = {}
    sparse = {f"{name}.weight".lstrip(".") for name in sparse_gradient_modules(model)}
    names: dict[int, list[str]] = {}
    for name, param in parameter_names(model).items():
        names.setdefault(id(param), []).append(name)
    for param in model.parameters():
        if param.requires_grad:
            aliases = names[id(param)]  # a tied weight: the embedding's name may not be first
            decays = param.ndim >= 2 and weight_decay != 0 and sparse.isdisjoint(aliases)
            factor = _multiplier(aliases, multipliers)
            buckets.setdefault((factor, decays), []).append(param)
    if not buckets:
        why = "all have requires_grad=False" if names else "it has none"
        raise ValueError(
            f"model {type(model).__name__} has no trainable parameters ({why}); nothing to optimize"
        )
    # (with no decay, one group per factor: one fused kernel launch per step instead of two)
    groups = []
    for (factor, decays), params in sorted(
        buckets.items(), key=lambda kv: (-kv[0][0], not kv[0][1])
    ):
        group: dict[str, Any] = {"params": params, "weight_decay": weight_decay if decays else 0.0}
        if multipliers:
            assert lr is not None, "lr is needed to scale groups by lr_multipliers"
            group["lr"] = lr * factor
        groups.append(group)
    return groups


def _kernel_options(params: Iterable[torch.Tensor]) -> dict[str, bool]:
    """Fused kernels where every parameter's device supports them, else foreach on CUDA."""
    params = list(params)
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    supported = set(_get_fused_kernels_supported_devices())
    if all(p.is_floating_point() and p.device.type in supported for p in params):
        return {"fused": True}
    if all(p.device.type == "cuda" for p in params):
        return {"foreach": True}
    return {}


@dataclass(frozen=True)
class OptimizerChoice:
    """An optimizer by name and its settings (a TrainingConfig's, by `of`)."""

    name: str
    lr: float
    weight_decay: float = 0.0
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    lr_multipliers: dict[str, float] | None = None

    @classmethod
    def of(cls, config: Any, lr: float | None = None) -> OptimizerChoice:
        """A TrainingConfig's optimizer (`lr` overrides its learning rate)."""
        c = config
        return cls(
            c.optimizer_type,
            c.learning_rate if lr is None else lr,
            weight_decay=c.weight_decay,
            momentum=c.momentum,
            betas=(c.adam_beta1, c.adam_beta2),
            eps=c.adam_epsilon,
            lr_multipliers=c.lr_multipliers,
        )


def build_optimizer(model: nn.Module, choice: OptimizerChoice) -> torch.optim.Optimizer:
    """Build `choice` (`adamw`, `adam` or `sgd`) over `model`'s trainable parameters.

    Weight decay skips biases and norm weights; `lr_multipliers` scales the rate of the
    parameters under each prefix; kernels are fused where the device allows.
    """
    name, lr, betas, eps = choice.name, choice.lr, choice.betas, choice.eps
    groups = parameter_groups(model, choice.weight_decay, lr, choice.lr_multipliers)
    kernels = _kernel_options(p for g in groups for p in g["params"])
    sparse = sparse_gradient_modules(model)
    if sparse and name in ("adam", "adamw"):
        raise ValueError(
            f"optimizer_type={name!r} cannot train sparse gradients, which the model's "
            f"{sparse[0] or type(model).__name__!r} (an embedding with sparse=True) makes: use "
            "optimizer_type='sgd', or sparse=False"
        )
    if sparse:
        kernels = {}  # torch's fused and foreach kernels take dense gradients only
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **kernels)
    if name == "adam":
        # Adam folds weight decay into the gradient (L2); AdamW decouples it.
        return torch.optim.Adam(groups, lr=lr, betas=betas, eps=eps, **kernels)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=choice.momentum, **kernels)
    raise ValueError(f"optimizer_type={name!r} is invalid: expected one of 'adamw', 'adam', 'sgd'")


def sparse_gradient_modules(model: nn.Module) -> list[str]:
    """The names of `model`'s modules whose weights get sparse gradients (an `nn.Embedding`
    or `nn.EmbeddingBag` made with sparse=True)."""
    kinds = (nn.Embedding, nn.EmbeddingBag)
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, kinds) and module.sparse and module.weight.requires_grad
    ]


class _WarmupShape:
    """LR multiplier for update `t` (0-based): linear warmup, then a named shape.

    A callable object rather than a lambda, so `LambdaLR.state_dict()` saves it.
    """

    def __init__(
        self,
        shape: str,
        warmup_steps: int,
        total_steps: int | None,
        min_ratio: float,
        step_size: int,
        gamma: float,
    ) -> None:
        self.shape = shape
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_ratio = min_ratio
        self.step_size = step_size
        self.gamma = gamma
        self.plateau_factor = 1.0

    def __call__(self, t: int) -> float:
        if t < self.warmup_steps:
            return (t + 1) / self.warmup_steps
        after = t - self.warmup_steps
        if self.shape == "cosine":
            assert self.total_steps is not None
            span = max(1, self.total_steps - self.warmup_steps)
            progress = min(1.0, after / span)
            return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        if self.shape == "linear":
            assert self.total_steps is not None
            progress = min(1.0, after / max(1, self.total_steps - self.warmup_steps))
            return self.min_ratio + (1 - self.min_ratio) * (1 - progress)
        if self.shape == "step":
            return float(self.gamma ** (after // self.step_size))
        if self.shape == "plateau":
            return self.plateau_factor
        return 1.0


class PlateauSchedule(torch.optim.lr_scheduler.LambdaLR):
    """Warmup per update, then multiply the LR by `factor` when the monitored metric stalls.

    `step()` runs once per optimizer update (warmup); `step_on_metric(value)` once per
    evaluation. Reduces after more than `patience` evaluations without improvement.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        shape: _WarmupShape,
        *,
        minimize: bool,
        patience: int,
        factor: float,
        min_lr: float,
    ) -> None:
        self.plateau = Plateau(minimize=minimize)
        self.patience = patience
        self.factor = factor
        self.min_lr = min_lr
        super().__init__(optimizer, shape)

    def step_on_metric(self, value: float) -> None:
        self.plateau.update(value)
        if self.plateau.num_bad > self.patience:
            shape = self.lr_lambdas[0]
            assert isinstance(shape, _WarmupShape)
            smallest = float(min(self.base_lrs))
            shape.plateau_factor = max(shape.plateau_factor * self.factor, self.min_lr / smallest)
            self.plateau.num_bad = 0
            apply_rates(self)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["plateau"] = self.plateau.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        self.plateau.load_state_dict(state.pop("plateau"))
        super().load_state_dict(state)


def group_settings(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Each parameter group's settings (every key but its parameters), as this run chose them."""
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def apply_rates(scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Each parameter group's rate at the schedule's position: its base times its factor."""
    for group, rate, base in zip(
        scheduler.optimizer.param_groups, scheduler.lr_lambdas, scheduler.base_lrs, strict=True
    ):
        group["lr"] = base * rate(scheduler.last_epoch)


# A config field -> the parameter-group setting it chooses (a group may hold more: a count,
# e.g. federated rounds, or values a schedule moves, e.g. one-cycle's betas).
_GROUP_SETTING = {
    "weight_decay": "weight_decay",
    "adam_beta1": "betas",
    "adam_beta2": "betas",
    "adam_epsilon": "eps",
    "momentum": "momentum",
}


def changed_settings(saved: dict[str, Any], config: Any) -> set[str]:
    """The optimizer fields (`learning_rate` and those of `_GROUP_SETTING`) whose value in a
    checkpoint's config (`saved`, as written) differs from this run's `config`; a field an
    older checkpoint did not record counts as unchanged."""
    names = ("learning_rate", *_GROUP_SETTING)
    return {name for name in names if name in saved and saved[name] != getattr(config, name)}


def keep_chosen_settings(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    chosen: list[dict[str, Any]],
    changed: set[str],
) -> None:
    """After a checkpoint's optimizer (and schedule) state is loaded, which restores the
    settings it trained with beside the moments: the `changed` fields (`changed_settings`)
    take this run's values from `chosen` (the groups as built for this run, taken before
    loading), and a changed learning rate becomes the schedule's base from the resumed update
    on. Nothing else is touched: a resume with the same settings stays bitwise, a rate set by
    a callback stays, and a one-cycle schedule keeps cycling Adam's beta1 or SGD's momentum.

    Raises:
        ValueError: a one-cycle schedule resumed with another learning rate (it cannot be
            re-planned mid-run).
    """
    groups, cycle = (
        optimizer.param_groups,
        isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR),
    )
    if cycle and "learning_rate" in changed:
        raise ValueError(
            f"cannot resume: the onecycle schedule was planned up to a learning rate of "
            f"{groups[0]['max_lr']:g}, this run's is {chosen[0]['max_lr']:g}, and a one-cycle "
            "schedule cannot be re-planned mid-run; resume with the checkpoint's learning_rate"
        )
    keys = {_GROUP_SETTING[name] for name in changed if name in _GROUP_SETTING}
    if cycle and getattr(scheduler, "cycle_momentum", False):
        keys -= {"betas", "momentum"}  # the schedule sets them at every update
    for group, mine in zip(groups, chosen, strict=True):
        group.update({key: mine[key] for key in keys if key in mine})
    if "learning_rate" not in changed:
        return
    if scheduler is None:
        for group, mine in zip(groups, chosen, strict=True):
            group["lr"] = mine["lr"]
    elif isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        scheduler.base_lrs = [mine["initial_lr"] for mine in chosen]
        for group, base in zip(groups, scheduler.base_lrs, strict=True):
            group["initial_lr"] = base
        apply_rates(scheduler)
        scheduler._last_lr = [group["lr"] for group in groups]  # what get_last_lr() reports


_PLAN = ("shape", "warmup_steps", "total_steps", "min_ratio", "step_size", "gamma")


def restore_schedule(
    scheduler: torch.optim.lr_scheduler.LRScheduler, state: dict[str, Any]
) -> None:
    """Load a checkpoint's schedule state into `scheduler`, which was planned for this run.

    The position (updates done, a plateau's reductions) comes from the checkpoint; the plan
    (warmup, length, shape) is this run's, so a run resumed with a longer `max_steps` or
    `num_epochs` follows its new plan from the resumed update on, with a warning naming both
    plans where the learning rates differ. OneCycleLR cannot be re-planned: a changed length
    is refused.
    """
    if isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR):
        if state.get("total_steps") != scheduler.total_steps:
            raise ValueError(
                f"cannot resume: the onecycle schedule was planned over {state.get('total_steps')} "
                f"optimizer updates, this run has {scheduler.total_steps}, and a one-cycle "
                "schedule cannot be re-planned mid-run; resume with the checkpoint's num_epochs "
                "and max_steps"
            )
        scheduler.load_state_dict(state)
        return
    lambdas = getattr(scheduler, "lr_lambdas", [])  # one object may serve every group
    shapes = list({id(fn): fn for fn in lambdas if isinstance(fn, _WarmupShape)}.values())
    planned = [{key: getattr(fn, key) for key in _PLAN} for fn in shapes]
    scheduler.load_state_dict(state)
    changed = False
    for fn, plan in zip(shapes, planned, strict=True):
        saved = {key: getattr(fn, key) for key in _PLAN}
        for key, value in plan.items():
            setattr(fn, key, value)
        changed = changed or _plans_differ(saved, plan, scheduler.last_epoch)
    if changed and isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        apply_rates(scheduler)
        old, new = _lengths(saved), _lengths(plan)
        logger.warning(
            "RESUMING WITH ANOTHER SCHEDULE: the %s schedule was planned as %s and is now %s; "
            "from update %d on the learning rate follows the new plan, so the run will not "
            "equal an uninterrupted one planned this way from the start",
            plan["shape"],
            old,
            new,
            scheduler.last_epoch,
        )


def _plans_differ(old: dict[str, Any], new: dict[str, Any], t: int) -> bool:
    """Whether two plans give another learning rate at some update from `t` (0-based) on."""
    reshaped = any(old[k] != new[k] for k in ("shape", "min_ratio", "step_size", "gamma"))
    warmup = old["warmup_steps"] != new["warmup_steps"]
    span = (old["total_steps"], old["warmup_steps"]) != (new["total_steps"], new["warmup_steps"])
    if reshaped or (old["shape"] in ("cosine", "linear") and span):
        return True
    return warmup and t < max(old["warmup_steps"], new["warmup_steps"])


def _lengths(plan: dict[str, Any]) -> str:
    """The parts of a plan that a run's length changes, in words."""
    words = f"warmup {plan['warmup_steps']}"
    if plan["shape"] in ("cosine", "linear"):
        words += f" over {plan['total_steps']} updates"
    return words


def configured_optimizer(
    model: nn.Module, config: Any, lr: float | None = None
) -> torch.optim.Optimizer:
    """`build_optimizer` with a TrainingConfig's choices (`lr` overrides its learning rate)."""
    return build_optimizer(model, OptimizerChoice.of(config, lr))


def configured_scheduler(
    optimizer: torch.optim.Optimizer, config: Any, total_steps: int | None
) -> torch.optim.lr_scheduler.LRScheduler:
    """`build_scheduler` with a TrainingConfig's choices, over `total_steps` updates."""
    return build_scheduler(optimizer, ScheduleChoice.of(config, total_steps))


def warmup_updates(config: Any, total_steps: int | None) -> int:
    """The optimizer updates to warm up over: `ceil(warmup_ratio * total_steps)` when the
    ratio is > 0, else `warmup_steps`; a warmup as long as the run or longer becomes a tenth
    of the run, with a warning naming both numbers when `warmup_steps` was set (the default
    of 1000 steps must not refuse a short run, nor warn about it).

    Example:
        >>> from traineval.config.training_config import TrainingConfig
        >>> warmup_updates(TrainingConfig(warmup_ratio=0.1), 320)
        32
        >>> warmup_updates(TrainingConfig(warmup_steps=50), 320)
        50
    """
    steps, ratio = config.warmup_steps, config.warmup_ratio
    if ratio > 0:
        if total_steps is None:
            raise ValueError(
                f"warmup_ratio={ratio} needs the number of optimizer updates, but the train "
                "loader has no len(): set max_steps, or give warmup_steps instead"
            )
        return min(math.ceil(ratio * total_steps), total_steps - 1)
    if total_steps is None or steps < total_steps:
        return steps
    shortened = total_steps // 10
    # the default is shortened quietly: a first short run with the defaults prints no
    # warning; a warmup the user set (even to the default's 1000) is worth one
    say = logger.warning if "warmup_steps" in config.given_fields else logger.debug
    instead = f"over the first {shortened} (a tenth of the run)"
    say(
        "warmup_steps=%d is not shorter than this run's %d optimizer updates: warming up "
        "%s instead; set warmup_steps or warmup_ratio to choose",
        steps,
        total_steps,
        instead if shortened else "not at all (a tenth of the run is no update)",
    )
    return shortened


@dataclass(frozen=True)
class ScheduleChoice:
    """A learning-rate schedule by name over `total_steps` optimizer updates (None: the
    length is unknown), and its settings (a TrainingConfig's, by `of`)."""

    name: str
    total_steps: int | None
    warmup_steps: int = 0
    min_lr: float = 0.0
    step_size: int = 1000
    gamma: float = 0.1
    minimize: bool = True
    plateau_patience: int = 5
    plateau_factor: float = 0.5

    @classmethod
    def of(cls, config: Any, total_steps: int | None) -> ScheduleChoice:
        """A TrainingConfig's schedule over `total_steps` updates (its warmup: `warmup_updates`)."""
        c = config
        return cls(
            c.scheduler_type,
            total_steps,
            warmup_steps=warmup_updates(c, total_steps),
            min_lr=c.min_learning_rate,
            step_size=c.scheduler_step_size,
            gamma=c.scheduler_gamma,
            minimize=c.minimize_monitor,
            plateau_patience=c.lr_scheduler_patience,
            plateau_factor=c.lr_scheduler_factor,
        )


def build_scheduler(
    optimizer: torch.optim.Optimizer, choice: ScheduleChoice
) -> torch.optim.lr_scheduler.LRScheduler:
    """Build `choice`: a scheduler stepped once per optimizer update, with linear warmup.

    Warmup: update `u` (1-based) of the first `warmup_steps` runs at `lr * u / warmup_steps`.
    `cosine` then decays to `min_lr` at `total_steps` (a half cosine), `linear` in a
    straight line (update `total_steps` would run at `min_lr`); `step` multiplies by `gamma` every
    `step_size` updates; `onecycle` uses torch's OneCycleLR with the warmup as its rising
    phase; `plateau` returns a `PlateauSchedule`; `constant` holds the LR.

    Raises:
        ValueError: an unknown name, or `total_steps` missing or not longer than the warmup
            for a schedule that needs it.
    """
    name, total_steps, warmup_steps = choice.name, choice.total_steps, choice.warmup_steps
    if name not in SCHEDULERS:
        raise ValueError(
            f"scheduler_type={name!r} is invalid: expected one of "
            + ", ".join(repr(known) for known in SCHEDULERS)
        )
    if total_steps is not None and warmup_steps >= total_steps:
        raise ValueError(
            f"warmup_steps={warmup_steps} is invalid: warmup must be shorter than training "
            f"({total_steps} optimizer updates); lower warmup_steps or train longer"
        )
    if name in ("cosine", "linear", "onecycle") and total_steps is None:
        raise ValueError(
            f"scheduler_type={name!r} needs the number of optimizer updates: the train loader "
            "has no len(); set max_steps or use scheduler_type='constant'"
        )
    if name == "onecycle":
        assert total_steps is not None
        max_lrs = [group["lr"] for group in optimizer.param_groups]
        pct_start = warmup_steps / total_steps if warmup_steps else 0.3
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=max_lrs, total_steps=total_steps, pct_start=pct_start
        )
    base = min(group["lr"] for group in optimizer.param_groups)
    c = choice
    shape = _WarmupShape(name, warmup_steps, total_steps, c.min_lr / base, c.step_size, c.gamma)
    if name == "plateau":
        return PlateauSchedule(
            optimizer,
            shape,
            minimize=c.minimize,
            patience=c.plateau_patience,
            factor=c.plateau_factor,
            min_lr=c.min_lr,
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, shape)
