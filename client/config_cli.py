"""Typer commands generated from pydantic configs: every option is declared once, on its field.

`opd train`, `opd probe`, `opd coldstart`, `opd select-prompts` and `opd serve` take their flags
from the fields of TrainConfig, ProbeConfig, ColdstartConfig, SelectConfig and Settings: the
flag's name is the field's name in kebab case, its help is the field's description, and its
default is the field's default (shown in the help). So a CLI option and its config field cannot
disagree. Why typer and not chz or tyro: typer already is the CLI (rich help, sub-commands,
the testing runner), and the generator is one small function over `model_fields`, where a second
CLI library would be one more dependency for the same result.

Rules:
- every flag defaults to "not given"; only given flags reach the model, so the model's own
  default (or, for Settings, the OPD_* environment) applies otherwise;
- a nested model field (ColdstartConfig.sft: SFTConfig) becomes flags with a prefix
  (`--sft-lr`), chosen per command;
- `bool` fields get `--x/--no-x`; `Literal` fields a choice; `list[...]` fields repeat the flag;
  fields whose items are models (ProbeConfig.teachers) take strings their validator parses;
- fields named in `env` are never flags (secrets stay off the command line, where `ps` shows
  them): their value comes from that environment variable;
- a refused value exits with status 2 and names the flag.
"""

from __future__ import annotations

import inspect
import os
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import typer
from pydantic import BaseModel, SecretStr, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined


@dataclass(frozen=True)
class Flag:
    """One generated option: where its value goes in the model, and how typer declares it."""

    param: str  # python parameter name (flag = --param-with-dashes)
    path: tuple[str, ...]  # field path inside the model
    annotation: Any
    option: Any  # typer.Option(...)


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return rest[0], True
    return annotation, False


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def cli_type(annotation: Any) -> Any:
    """The python type typer sees for a field type (typer itself handles Literal choices,
    lists, tuples, bools and numbers)."""
    inner, _ = _unwrap_optional(annotation)
    if inner is SecretStr:
        return str
    origin, args = typing.get_origin(inner), typing.get_args(inner)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        origin, args = list, args[:1]  # tuple[X, ...]: a repeated flag
    if origin in (list, Sequence):
        (item,) = args or (str,)
        # typer takes lists of plain types only: models and choices arrive as strings, which
        # the model's validation parses (and refuses naming the flag)
        plain = not _is_model(item) and typing.get_origin(item) is not Literal
        return list[cli_type(item) if plain else str]
    return inner


def _default_text(info: FieldInfo) -> str:
    if info.default is PydanticUndefined and info.default_factory is None:
        return ""
    default = info.default if info.default_factory is None else info.default_factory()
    if default is None or default == []:
        return ""
    if isinstance(default, bool):
        return f" (default: {'on' if default else 'off'})"
    if isinstance(default, tuple):
        default = " ".join(str(v) for v in default)
    return f" (default: {default})"


def flags_of(
    model: type[BaseModel],
    *,
    prefix: str = "",
    path: tuple[str, ...] = (),
    exclude: Sequence[str] = (),
    nested: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
    env_prefix: str | None = None,
) -> list[Flag]:
    """The flags of a model's fields, nested models flattened with their prefix.

    nested: {field: flag prefix} for model-typed fields (default: the field's name + "_").
    env_prefix: for settings read from the environment (Settings), the help names each
    flag's variable."""
    flags: list[Flag] = []
    nested = dict(nested or {})
    env = dict(env or {})
    for name, info in model.model_fields.items():
        if name in exclude or name in env:
            continue
        annotation, _ = _unwrap_optional(info.annotation)
        if _is_model(annotation):
            sub_prefix = nested.get(name, f"{name}_")
            flags += flags_of(
                annotation,
                prefix=sub_prefix,
                path=(*path, name),
                exclude=[e.split(".", 1)[1] for e in exclude if e.startswith(name + ".")],
                env_prefix=env_prefix,
            )
            continue
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        param = prefix + str(extra.get("cli_name", name))
        py_type = cli_type(info.annotation)
        required = info.is_required()
        text = (info.description or name.replace("_", " ")) + _default_text(info)
        if env_prefix:
            text += f" (env {env_prefix}{name.upper()})"
        flag_name = "--" + param.replace("_", "-")
        decls = [f"{flag_name}/--no-{flag_name[2:]}"] if py_type is bool else [flag_name]
        option = typer.Option(*decls, help=text, show_default=False)
        annotation_out = py_type if required else py_type | None
        flags.append(Flag(param, (*path, name), annotation_out, option))
    return flags


def values_from(flags: Sequence[Flag], given: Mapping[str, Any]) -> dict[str, Any]:
    """Nested keyword arguments of the model from the flags that were given."""
    out: dict[str, Any] = {}
    for flag in flags:
        value = given.get(flag.param)
        if value is None or (isinstance(value, list | tuple) and not value):
            continue  # not given: the model's default (or the environment) applies
        node = out
        for key in flag.path[:-1]:
            node = node.setdefault(key, {})
        node[flag.path[-1]] = list(value) if isinstance(value, list | tuple) else value
    return out


def _flag_for(flags: Sequence[Flag], loc: tuple[Any, ...]) -> str:
    """The flag a pydantic error location points at (or the dotted field path)."""
    keys = tuple(str(k) for k in loc if not isinstance(k, int))
    for flag in flags:
        if keys[: len(flag.path)] == flag.path:
            return "--" + flag.param.replace("_", "-")
    return ".".join(keys) or "the command's options"


def build_config(
    model: type[BaseModel],
    flags: Sequence[Flag],
    given: Mapping[str, Any],
    env: Mapping[str, str] | None = None,
    **fixed: Any,
) -> Any:
    """The model from the given flags, env-only fields and fixed values; a refused value exits
    with status 2 naming its flag."""
    values = values_from(flags, given)
    for field, var in (env or {}).items():
        if os.environ.get(var):
            values[field] = os.environ[var]
    values.update(fixed)
    try:
        return model(**values)
    except ValidationError as exc:
        lines = [f"{_flag_for(flags, e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise typer.BadParameter("; ".join(lines)) from None


def config_command(
    model: type[BaseModel],
    run: Callable[[Any], None],
    *,
    doc: str,
    exclude: Sequence[str] = (),
    nested: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
    env_prefix: str | None = None,
) -> Callable[..., None]:
    """A typer command whose options are the model's fields; it builds the model and calls
    run(config). For a pydantic-settings model (Settings) the given flags are init values, so
    they override its environment variables."""
    flags = flags_of(model, exclude=exclude, nested=nested, env=env, env_prefix=env_prefix)
    seen: dict[str, Flag] = {}
    for flag in flags:
        if flag.param in seen:
            raise ValueError(f"two fields map to the flag {flag.param!r}: use another prefix")
        seen[flag.param] = flag

    def command(**given: Any) -> None:
        run(build_config(model, flags, given, env))

    params = [
        inspect.Parameter(
            f.param,
            inspect.Parameter.KEYWORD_ONLY,
            default=inspect.Parameter.empty if _required(f) else None,
            annotation=Annotated[f.annotation, f.option],
        )
        for f in flags
    ]
    params.sort(key=lambda p: p.default is not inspect.Parameter.empty)  # required first
    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = " ".join(doc.split())
    command.flags = flags  # type: ignore[attr-defined]
    return command


def _required(flag: Flag) -> bool:
    return not (
        typing.get_origin(flag.annotation) in (typing.Union, types.UnionType)
        and type(None) in typing.get_args(flag.annotation)
    )
