"""Help text of the experiment config: every key once, with its type, default and description.

`config_help` is what ``scripts/simulate.py --help`` prints. It is built from the config
dataclasses themselves: the keys and types from their fields, the defaults from their default
values, the valid ranges from `fedjax_llm.config.FIELD_RANGES` and the descriptions from the
``Attributes:`` section of each dataclass's docstring, so a new field shows up without an edit
here.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import textwrap
from typing import Any

import draccus

from fedjax_llm.config import ExperimentConfig, field_range, field_types

_ENTRY = re.compile(r"(\w+)(?:\s*\([^)]*\))?:\s*(.*)")


def config_help(width: int = 100) -> str:
    """Returns the help text of every config key, grouped by section.

    Each key is one entry, ``--section.key  (type, default D, range)  description``, with the
    description from the ``Attributes:`` docstring section of its dataclass. The settings of
    each registered ``algorithm.type`` (custom ones included) are listed under that type.
    Internal fields (a leading ``_``, or not ``__init__`` arguments) are left out. Entries
    are wrapped at ``width`` columns between words, never inside one.

    Args:
      width: the column to wrap at.

    Returns:
      The text, ending with a newline.
    """
    intro = (
        "Config keys. Set them in the YAML file (section: {key: value}) or on the command line "
        "as --section.key VALUE; write a list as [a,b] and none as null."
    )
    out = [textwrap.fill(intro, width, break_long_words=False, break_on_hyphens=False)]
    for name, field in field_types(ExperimentConfig).items():
        section_class = field.base
        out += ["", _wrap(f"{name}: {_summary(section_class)}", width, indent=0)]
        if isinstance(section_class, type) and issubclass(section_class, draccus.ChoiceRegistry):
            out += _choice_section(name, section_class, width)
        else:
            out += _entries(section_class, name + ".", width, indent=2)
    return "\n".join(out) + "\n"


def attribute_docs(config_class: type) -> dict[str, str]:
    """Returns field name -> description from the ``Attributes:`` docstring sections of a class
    and its bases (a subclass's own description wins), whitespace collapsed."""
    docs: dict[str, str] = {}
    for klass in reversed(config_class.__mro__):
        docs.update(_parse_attributes(klass.__dict__.get("__doc__") or ""))
    return docs


def _parse_attributes(doc: str) -> dict[str, str]:
    docs: dict[str, str] = {}
    section_indent = entry_indent = None
    current = None
    for line in inspect.cleandoc(doc).splitlines():
        text, indent = line.strip(), len(line) - len(line.lstrip())
        if section_indent is None:
            if text == "Attributes:":
                section_indent = indent
            continue
        if not text:
            continue
        if indent <= section_indent:  # the next section, or prose after the attributes
            break
        match = _ENTRY.fullmatch(text)
        if entry_indent is None:
            entry_indent = indent
        if indent == entry_indent and match:
            current = match.group(1)
            docs[current] = match.group(2)
        elif current is not None:
            docs[current] += " " + text
    return docs


def _summary(config_class: type) -> str:
    """The first paragraph of a class docstring, or "" for a class without one."""
    doc = config_class.__dict__.get("__doc__") or ""
    if not doc or doc.startswith(f"{config_class.__name__}("):  # dataclass's generated doc
        return ""
    return _plain(inspect.cleandoc(doc).split("\n\n")[0])


def _plain(text: str) -> str:
    """Collapses whitespace and drops reST markup: ``x`` and `x` become x."""
    return " ".join(re.sub(r"`{1,2}([^`]+)`{1,2}", r"\1", text).split())


def _choice_section(name: str, base: type, width: int) -> list[str]:
    """The keys of a choice section: ``type``, the shared keys, then each type's own keys."""
    choices = base.get_known_choices()
    default_class = type(getattr(ExperimentConfig(), name))
    default_name = next((k for k, v in choices.items() if v is default_class), None)
    type_entry = (
        f"--{name}.type  ({' | '.join(choices)}, default {default_name})  which {name}; the "
        "keys of each type are listed under it below."
    )
    lines = [_wrap(type_entry, width, indent=2)]
    lines += _entries(base, name + ".", width, indent=2)
    shared = set(field_types(base))
    for choice, choice_class in choices.items():
        summary = _summary(choice_class)
        lines.append(_wrap(f"{name}.type {choice}" + (f": {summary}" if summary else ""), width, 2))
        lines += _entries(choice_class, name + ".", width, indent=4, skip=shared)
    return lines


def _entries(
    config_class: type, prefix: str, width: int, indent: int, skip: set[str] = frozenset()
) -> list[str]:
    """One wrapped entry per field of a config class (sub-sections recursively)."""
    docs = attribute_docs(config_class)
    defaults = _defaults(config_class)
    lines = []
    for name, field in field_types(config_class).items():
        if name in skip:
            continue
        if field.is_section:
            lines.append(_wrap(f"{prefix}{name}: {_summary(field.base)}", width, indent))
            lines += _entries(field.base, f"{prefix}{name}.", width, indent + 2)
            continue
        details = [field.describe(), f"default {defaults.get(name, 'required')}"]
        valid = field_range(config_class, name) if field.is_number else None
        if valid is not None and valid.describe() != "any finite number":
            details.append(valid.describe())
        entry = f"--{prefix}{name}  ({', '.join(details)})  {_plain(docs.get(name, ''))}"
        lines.append(_wrap(entry.rstrip(), width, indent))
    return lines


def _wrap(entry: str, width: int, indent: int) -> str:
    return textwrap.fill(
        entry,
        width=width,
        initial_indent=" " * indent,
        subsequent_indent=" " * (indent + 4),
        break_long_words=False,
        break_on_hyphens=False,
    )


def _defaults(config_class: type) -> dict[str, str]:
    """Field name -> its default as YAML text, for the fields that have one."""
    out = {}
    for f in dataclasses.fields(config_class):
        if f.default is not dataclasses.MISSING:
            out[f.name] = _yaml_text(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = _yaml_text(f.default_factory())
    return out


def _yaml_text(value: Any) -> str:
    """A value as it is written on the command line: null, true, [q,v], 0.1, runs/x."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple | list):
        return "[" + ",".join(_yaml_text(v) for v in value) + "]"
    if isinstance(value, str):
        return value if value else '""'
    return repr(value)
