"""`load_environment`: what `opd train --env SPEC --env-arg key=value` resolves to, a factory
that makes one environment per episode.

SPEC is one of:
- a built-in name: "calculator" (`CalculatorEnv`), "followup" (`FollowupEnv`);
- "module.path:Class" (as verifiers names environments), a class with `reset` and `step`:
  an opd environment, built as `Class(**kwargs)`;
- "trl:module.path:Class", a TRL `environment_factory` class, wrapped in `TRLEnvironment`.
  Without the prefix, a class that has `reset` but no `step` is taken as one too: no opd
  environment lacks `step`, and every TRL environment does, so the shape decides safely. The
  prefix is for saying so explicitly (and fails if the class has no `reset`).
  `max_tool_calling_iterations` in kwargs goes to the wrapper, the rest to the class;
- "tools:module.path:fn1,fn2,...", plain tool functions as TRL's `tools=[...]` takes them,
  unchanged, wrapped in `FunctionToolsEnv` (kwargs: `max_tool_calling_iterations`).

The kwargs are checked against the constructor's signature here, so a misspelt `--env-arg`
fails before the first episode, with the spec in the message. All errors are ValueError.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from opd.client.episodes.base import Environment
from opd.client.episodes.calculator import CalculatorEnv
from opd.client.episodes.followup import FollowupEnv
from opd.client.episodes.trl_adapters import FunctionToolsEnv, TRLEnvironment
from opd.client.user_code import import_module_for, import_named

BUILTIN: dict[str, type] = {"calculator": CalculatorEnv, "followup": FollowupEnv}
TRL_PREFIX = "trl:"
TOOLS_PREFIX = "tools:"
_SPEC_HELP = (
    "calculator, followup, module.path:Class, trl:module.path:Class or tools:module.path:fn1,fn2"
)


class EnvironmentFactory:
    """Makes one environment per call (one per episode). `spec` names where it came from, for
    messages such as `EpisodeError`'s."""

    def __init__(self, spec: str, build: Callable[[], Environment]) -> None:
        self.spec = spec
        self._build = build

    def __call__(self) -> Environment:
        return self._build()

    def __repr__(self) -> str:
        return f"EnvironmentFactory({self.spec!r})"


def _import_class(spec: str, path: str) -> type:
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"environment {spec!r}: expected {_SPEC_HELP}")
    obj = import_named(f"environment {spec!r}", module_name, attr)
    if not inspect.isclass(obj):
        raise ValueError(f"environment {spec!r}: {attr!r} is not a class")
    return obj


def _import_functions(spec: str, path: str) -> list[Callable]:
    """The functions "module.path:fn1,fn2" names (TRL's tools=[...], as they are)."""
    module_name, sep, names = path.partition(":")
    if not sep or not module_name or not names:
        raise ValueError(f"environment {spec!r}: expected tools:module.path:fn1,fn2")
    module = import_module_for(f"environment {spec!r}", module_name)
    tools = []
    for name in (n.strip() for n in names.split(",")):
        fn = getattr(module, name, None)
        if not callable(fn):
            raise ValueError(f"environment {spec!r}: {module_name!r} has no function {name!r}")
        tools.append(fn)
    return tools


def _check_kwargs(spec: str, cls: type, kwargs: dict) -> None:
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as e:
        raise ValueError(f"environment {spec!r}: bad arguments {sorted(kwargs)}: {e}") from e


def load_environment(spec: str, kwargs: dict | None = None) -> Callable[[], Environment]:
    """The factory SPEC names (see the module docstring), built with `kwargs`."""
    kwargs = dict(kwargs or {})
    if spec.startswith(TOOLS_PREFIX):
        tools = _import_functions(spec, spec[len(TOOLS_PREFIX) :])
        _check_kwargs(spec, FunctionToolsEnv, {"tools": tools, **kwargs})
        return EnvironmentFactory(spec, lambda: FunctionToolsEnv(tools, **kwargs))
    if spec in BUILTIN:
        cls = BUILTIN[spec]
        _check_kwargs(spec, cls, kwargs)
        return EnvironmentFactory(spec, lambda: cls(**kwargs))
    explicit_trl = spec.startswith(TRL_PREFIX)
    cls = _import_class(spec, spec[len(TRL_PREFIX) :] if explicit_trl else spec)
    has_reset = callable(getattr(cls, "reset", None))
    has_step = callable(getattr(cls, "step", None))
    if not has_reset:
        raise ValueError(
            f"environment {spec!r}: {cls.__name__} has no reset method (an opd environment "
            "needs reset and step, a TRL environment_factory class reset)"
        )
    if has_step and not explicit_trl:
        _check_kwargs(spec, cls, kwargs)
        return EnvironmentFactory(spec, lambda: cls(**kwargs))
    limit = kwargs.pop("max_tool_calling_iterations", None)
    _check_kwargs(spec, cls, kwargs)
    return EnvironmentFactory(
        spec, lambda: TRLEnvironment(cls(**kwargs), max_tool_calling_iterations=limit)
    )
