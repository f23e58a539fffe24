"""`optim.name` -> an optimizer class, and the config-load check of `optim.kwargs` against its constructor.

Three kinds of name:
- the built-in names (`OPTIMIZERS`: sgd, adam, adamw, rmsprop, adagrad) take the tuned paths of
  `deepnets.module.build_optimizer` (fused / foreach kernels, optim.momentum / betas / eps / amsgrad);
- any `torch.optim` class, spelled as torch spells it (`NAdam`, `RAdam`, `SGD`, ...);
- an import path `path/to/file.py:Class` or `package.module:Class` naming a `torch.optim.Optimizer`
  subclass (a config that names code runs that code when it loads).
The last two are built as `cls(param_groups, lr=optim.lr, **optim.kwargs)`, with weight decay per
parameter group as for the built-in names; the other optim.* optimizer fields do not reach them.

torch is imported only when a name is not a built-in one (config loading stays fast).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping
from typing import Any

from deepnets.errors import UserError
from deepnets.imports import absolute_spec, is_import_path, resolve_import

# built-in name -> the torch.optim class its tuned path builds
OPTIMIZERS: dict[str, str] = {
    "sgd": "SGD",
    "adam": "Adam",
    "adamw": "AdamW",
    "rmsprop": "RMSprop",
    "adagrad": "Adagrad",
}
# constructor arguments deepnets sets itself (the parameter groups, optim.lr, weight decay per group) ...
OWN_ARGS = {"params": "the parameter groups", "lr": "optim.lr", "weight_decay": "optim.weight_decay"}
# ... and, for the built-in names, what their tuned path sets from optim.* (fused / foreach: chosen per device)
TUNED_ARGS: dict[str, dict[str, str]] = {
    "sgd": {"momentum": "optim.momentum", "nesterov": "optim.nesterov"},
    "adam": {"betas": "optim.betas", "eps": "optim.eps", "amsgrad": "optim.amsgrad"},
    "adamw": {"betas": "optim.betas", "eps": "optim.eps", "amsgrad": "optim.amsgrad"},
    "rmsprop": {"momentum": "optim.momentum", "eps": "optim.eps"},
    "adagrad": {"eps": "optim.eps"},
}
_KERNEL_ARGS = {"fused": "chosen per device", "foreach": "chosen per device"}


def _torch_optimizers() -> dict[str, type]:
    import torch.optim

    return {
        n: c
        for n in dir(torch.optim)
        if isinstance(c := getattr(torch.optim, n), type)
        and issubclass(c, torch.optim.Optimizer)
        and c is not torch.optim.Optimizer
    }


def optimizer_class(name: str, key: str = "optim.name") -> type:
    """The class `name` builds; one UserError naming `key` (with "did you mean") when there is none."""
    import torch.optim

    if name in OPTIMIZERS:
        return getattr(torch.optim, OPTIMIZERS[name])
    if is_import_path(name):
        return resolve_import(name, key, torch.optim.Optimizer)
    classes = _torch_optimizers()
    if name in classes:
        return classes[name]
    lower = {n.lower(): n for n in classes}
    near = (
        [lower[name.lower()]]
        if name.lower() in lower
        else difflib.get_close_matches(name, [*OPTIMIZERS, *classes], 1, 0.6)
    )
    hint = f"; did you mean {near[0]}?" if near else ""
    raise UserError(
        f"{key}: {name!r} is not an optimizer{hint} (allowed: {', '.join(OPTIMIZERS)}, a torch.optim class "
        f"such as {', '.join(sorted(classes)[:6])}, ..., or an import path file.py:Class / package.module:Class)"
    )


def canonical_name(name: str) -> str:
    """`name` as config.yaml records it: an import path's file made absolute (the run reloads from any directory)."""
    return absolute_spec(name) if is_import_path(name) else name


def check_optimizer(name: str, kwargs: Mapping[str, Any], lr: float, weight_decay: bool, key: str = "optim") -> None:
    """At config load: `optim.name` resolves, `optim.kwargs` fit its constructor, and the class is
    constructed once on a dummy parameter with them (bad values fail here, naming optim.kwargs)."""
    if name in OPTIMIZERS and not kwargs:
        return  # the tuned path: its own fields are checked where they are defined
    cls = optimizer_class(name, f"{key}.name")
    torch_class = cls.__module__.startswith("torch.optim") and not is_import_path(name)
    shown = f"torch.optim.{cls.__name__}" if torch_class else f"{cls.__module__}.{cls.__qualname__}"
    try:
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]  # without self
    except (TypeError, ValueError):  # no signature to read (a C extension): constructing it still checks
        params = []
    takes_any = not params or any(p.kind is p.VAR_KEYWORD for p in params)
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    reserved = {**OWN_ARGS, **TUNED_ARGS.get(name, {}), **(_KERNEL_ARGS if name in OPTIMIZERS else {})}
    for k in kwargs:
        if k in reserved:
            raise UserError(f"{key}.kwargs.{k}: set by deepnets ({reserved[k]}); remove it from {key}.kwargs")
        if not takes_any and k not in names:
            near = difflib.get_close_matches(k, names, 1, 0.6)
            hint = f"did you mean {near[0]}? " if near else ""
            allowed = ", ".join(n for n in names if n not in reserved)
            raise UserError(f"{key}.kwargs.{k}: not an argument of {shown} ({hint}allowed: {allowed})")
    if not takes_any and "lr" not in names:
        raise UserError(f"{key}.name: {shown} takes no lr argument (deepnets passes optim.lr)")
    if weight_decay and not takes_any and "weight_decay" not in names:
        raise UserError(f"{key}.weight_decay: {shown} takes no weight_decay; set optim.weight_decay=0")
    required = [
        p.name
        for p in params[1:]  # after the parameters
        if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in OWN_ARGS
    ]
    missing = [r for r in required if r not in kwargs]
    if missing:
        raise UserError(f"{key}.kwargs: {shown} needs {', '.join(missing)}; add {key}.kwargs.{missing[0]}")
    import torch

    dummy = [torch.zeros(1, requires_grad=True)]
    try:
        cls(dummy, lr=lr, **kwargs)
    except Exception as e:  # the class refused a value: say which class and why, in one line
        text = " ".join(str(e).split()) or type(e).__name__
        raise UserError(f"{key}.kwargs: {shown} refuses {dict(kwargs)!r}: {text}") from None
