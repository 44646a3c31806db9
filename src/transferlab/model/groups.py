"""A timm backbone split into layer groups, bottom to top, that run one after the other.

timm says which parameters make up which group (``model.group_matcher(coarse=True)``: the stem,
each stage or block, the top; without one, ``feature_info``'s stages). The modules that hold them are taken in the order
``forward_features`` calls them, and the last group ends with timm's own pooling
(``forward_head(pre_logits=True)``: ConvNeXt's head norm, ViT's class token, MobileNetV3's head
convolution). Where later modules do not run one after another (HRNet's branches), the last group
runs them through timm's own ``forward_features``. The split is checked once, on a small input,
against the whole backbone: running the groups in order must give what timm gives, else caching and
unfreezing would lie. The zoo's table (``zoo.GROUPS``) is only for what timm does not say.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from transferlab.model.zoo import GROUPS, TIMM


class Delegate(nn.Module):
    """A piece of the backbone that runs one of timm's own methods: it owns the modules and parameters the
    method uses (so freezing and the state dict see them once) and calls the backbone to run it."""

    def __init__(self, model: nn.Module, modules: list[str], params: list[str] = ()) -> None:
        super().__init__()
        for name in modules:
            self.add_module(name.replace(".", "_"), model.get_submodule(name))
        for name in params:
            self.register_parameter(name, model.get_parameter(name))
        object.__setattr__(self, "backbone", model)  # not a submodule: its modules belong to the groups

    def train(self, mode: bool = True) -> Delegate:
        """Also the backbone's own flag, which timm's methods read: GhostNet's ``forward_head`` applies dropout,
        even before its pre-logits, whenever the top module says it is training."""
        super().train(mode)
        self.backbone.training = mode
        return self


class Pooling(Delegate):
    """timm's pooling at the top of the backbone (and whatever its head has before the classifier)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_head(x, pre_logits=True)


class _Reached(Exception):
    pass


class Stem(Delegate):
    """``forward_features`` up to the input of the first block: a stem with code between its modules (ViT's
    class token and position embedding)."""

    def __init__(self, model: nn.Module, modules: list[str], params: list[str], stop: str) -> None:
        super().__init__(model, modules, params)
        self.stop = stop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        reached: list[torch.Tensor] = []

        def catch(_module: nn.Module, args: tuple) -> None:
            reached.append(args[0])
            raise _Reached

        handle = self.backbone.get_submodule(self.stop).register_forward_pre_hook(catch)
        try:
            self.backbone.forward_features(x)
        except _Reached:
            pass
        finally:
            handle.remove()
        return reached[0]


class Passthrough(nn.Module):
    """Stands in for a module whose output a :class:`Tail` is given (not an ``nn.Identity``: timm tests for
    that to prune a model)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Tail(Delegate):
    """``forward_features`` from a module on, for a model whose later modules do not run one after another
    (HRNet's branches): timm's own code runs it, with the modules before it passing their input through."""

    def __init__(self, model: nn.Module, modules: list[str], params: list[str], skipped: list[str]) -> None:
        super().__init__(model, modules, params)
        self.skipped = skipped

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        owners = []
        for name in self.skipped:
            parent, _, child = name.rpartition(".")
            owner = self.backbone.get_submodule(parent)
            owners.append((owner, child, owner._modules[child]))
            owner._modules[child] = Passthrough()
        try:
            return self.backbone.forward_features(x)
        finally:
            for owner, child, module in owners:
                owner._modules[child] = module


class Whole(Delegate):
    """The whole backbone as one group: the last resort for a model timm gives no groups for."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)


def layer_groups(model: nn.Module, family: str, size: int = 224) -> list[nn.Sequential]:
    """Split a timm backbone into its layer groups, bottom to top (modules are shared, not copied).

    ``family`` is a key of the zoo's table, or ``TIMM``: groups from timm, checked on a ``size`` px input.
    """
    if family == TIMM:
        return timm_groups(model, size)
    groups: list[nn.Sequential] = []
    for entry in GROUPS[family]:
        if entry.endswith(".*"):
            groups.extend(nn.Sequential(child) for child in model.get_submodule(entry[:-2]).children())
        else:
            groups.append(nn.Sequential(*(model.get_submodule(p) for p in entry.split(","))))
    return groups


def timm_groups(model: nn.Module, size: int) -> list[nn.Sequential]:
    """Layer groups from timm's ``group_matcher``; one group (with a warning) when timm has none that holds."""
    x = torch.randn(2, 3, size, size)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            order = _call_order(model, x)
            reference = model.forward_head(model.forward_features(x), pre_logits=True)
            for candidate in _candidates(model, order):
                if _runs_as(model, candidate, x, reference):
                    return candidate
    finally:
        model.train(training)
    warnings.warn(
        f"timm gives no layer groups for {type(model).__name__} that run in sequence: it is one group, so "
        "fine-tuning trains all of it",
        stacklevel=3,
    )
    return [nn.Sequential(Whole(model, [n for n, _ in model.named_children()], _own_params(model)))]


def _candidates(model: nn.Module, order: list[str]):
    """Splits to try, simplest first: modules in call order, then with the stem run by timm's own code, then
    the longest run of modules in call order with the rest run by timm's code."""
    group_of = _group_of(model, order)
    if not group_of:
        return
    units = _units(model, "", order, group_of)
    ids = _unit_groups(units, group_of)
    called = {u.split(".")[0] for u in units}
    head = [n for n, _ in model.named_children() if n not in called]
    top_params = _own_params(model)
    if not top_params:
        yield _assemble(model, units, ids, head)
    if len(set(ids)) > 1:  # the stem: everything before the first unit of the second group
        first = next(i for i, g in enumerate(ids) if g != ids[0])
        stem = Stem(model, units[:first], top_params, stop=units[first])
        yield _assemble(model, [stem, *units[first:]], [ids[0], *ids[first:]], head)
    for k in range(len(units) - 1, 0, -1):
        if ids[k] == ids[0]:
            break
        rest = _covering(model, set(units[:k]), set(head))
        tail = Tail(model, rest, top_params, skipped=units[:k])
        yield _assemble(model, [*units[:k], tail], [*ids[:k], ids[k]], head)


def _group_of(model: nn.Module, order: list[str]) -> dict[str, int]:
    """Each parameter's group: timm's ``group_matcher``, else its ``feature_info`` (a group ends with each
    feature stage, the stem in the first, what follows the last stage on top), else none."""
    matcher = getattr(model, "group_matcher", None)
    if matcher is not None:
        from timm.models._manipulate import group_parameters

        return group_parameters(model, matcher(coarse=True), reverse=True)
    info = [f["module"] for f in getattr(model, "feature_info", None) or [] if f.get("module") in order]
    if len(info) < 2:
        return {}
    where = {name: i for i, name in enumerate(order)}
    group_of = {}
    for p, _ in model.named_parameters():
        module = p.rpartition(".")[0]
        while module and module not in where:
            module = module.rpartition(".")[0]
        at = where.get(module, len(order))
        group_of[p] = sum(at > where[f] and not p.startswith(f + ".") for f in info)
    return group_of


def _covering(model: nn.Module, taken: set[str], head: set[str], prefix: str = "") -> list[str]:
    """The fewest modules that hold everything under ``prefix`` outside ``taken`` and ``head``."""
    out = []
    for name, _ in model.get_submodule(prefix.rstrip(".")).named_children():
        full = prefix + name
        if full in taken or full in head:
            continue
        if any(t.startswith(full + ".") for t in taken):
            out.extend(_covering(model, taken, head, full + "."))
        else:
            out.append(full)
    return out


def _assemble(model: nn.Module, units: list, ids: list, head: list[str]) -> list[nn.Sequential]:
    groups: list[list[nn.Module]] = []
    for i, (unit, gid) in enumerate(zip(units, ids)):
        module = unit if isinstance(unit, nn.Module) else model.get_submodule(unit)
        if i == 0 or gid != ids[i - 1]:
            groups.append([])
        groups[-1].append(module)
    groups[-1].append(Pooling(model, head))
    return [nn.Sequential(*g) for g in groups]


def _call_order(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Every module's name in the order ``forward_features`` first calls it."""
    order: list[str] = []
    handles = [
        m.register_forward_pre_hook(lambda _m, _a, name=name: order.append(name))
        for name, m in model.named_modules()
        if name
    ]
    try:
        model.forward_features(x)
    finally:
        for h in handles:
            h.remove()
    return list(dict.fromkeys(order))


def _units(model: nn.Module, prefix: str, order: list[str], group_of: dict[str, int]) -> list[str]:
    """The modules under ``prefix`` in call order, each inside one group (a module spanning several is split)."""
    depth = prefix.count(".")
    children = [n for n in order if n.startswith(prefix) and n.count(".") == depth and n != prefix.rstrip(".")]
    out: list[str] = []
    for name in children:
        spanned = {g for p, g in group_of.items() if p.startswith(name + ".")}
        out.extend(_units(model, name + ".", order, group_of) if len(spanned) > 1 else [name])
    return out


def _unit_groups(units: list[str], group_of: dict[str, int]) -> list[int]:
    """Each unit's group; one without parameters joins the group before it (the first, the group after it)."""
    ids: list[int | None] = []
    for name in units:
        found = {g for p, g in group_of.items() if p.startswith(name + ".")}
        ids.append(min(found) if found else None)
    last = next((g for g in ids if g is not None), 0)
    filled = []
    for g in ids:
        last = g if g is not None else last
        filled.append(last)
    return filled


def _own_params(model: nn.Module) -> list[str]:
    """Parameters held by the backbone itself, not by one of its modules (ViT's class token)."""
    return [n for n, _ in model.named_parameters(recurse=False)]


def _runs_as(model: nn.Module, groups: list[nn.Sequential], x: torch.Tensor, reference: torch.Tensor) -> bool:
    """Whether ``groups`` in order compute the backbone's pooled features, and hold each parameter once."""
    try:
        y = x
        for g in groups:
            y = g(y)
    except Exception:  # noqa: BLE001 - a split that cannot run is not the backbone
        return False
    held = [id(p) for g in groups for p in g.parameters()]
    once = len(held) == len(set(held)) and set(held) == {id(p) for p in model.parameters()}
    return once and y.shape == reference.shape and torch.allclose(y, reference, rtol=1e-4, atol=1e-5)
