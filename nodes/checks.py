"""The checks every Cinetune node runs on its widget values when a prompt is queued, before anything executes.

ComfyUI validates a prompt before running it, but not completely for V3 nodes: 0.3.75 passes a combo value from the
API to the node without comparing it with the options (a wrong ``nabla`` ran as another option; a wrong ``dtype``
failed later with a bare ``KeyError``). Every node of the pack derives from :class:`CinetuneNode`, whose
``validate_inputs`` checks each value against the node's own schema, so a wrong value is refused by ``POST /prompt``
with an error naming the node, the input, the value and what is allowed:

- **combos**: the value must be one of the options (model-file lists are read again, so a file added after start-up
  counts);
- **numbers**: within the schema's ``min``/``max`` (ComfyUI skips its own range check for a node whose
  ``validate_inputs`` takes ``**kwargs``, so it is done here), and not NaN (which every comparison lets through);
- **text**: valid Unicode (no lone surrogate, which JSON can carry but no tokenizer or file system takes);
- **per-input rules** a node declares in ``INPUT_RULES`` (``input id → callable`` raising ``ValueError``), e.g.
  :class:`FileName` for values that become file or folder names, or the dataset-folder location rule.

Values that reach a node through a link are not known at validation time and are not checked here.
A failed check raises :class:`InputError`; ComfyUI reports it as the node's validation error (one entry, the message
as its details), in 0.3.75 and in current releases alike.
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from comfy_api.latest import io

from . import search
from .errors import PlainErrors

#: Longest file or folder name (bytes of UTF-8) that every common file system takes (ext4, APFS, NTFS: 255).
NAME_MAX_BYTES = 255

#: Bytes :func:`~cinetune.core.checkpoint.atomic_path` adds to a name for its temporary file:
#: ``"." + name + "." + 8 random characters + ".tmp"``.
ATOMIC_TEMP_EXTRA = len(".") + len(".") + 8 + len(".tmp")

#: Characters Windows does not allow in file names (besides the path separators and control characters).
WINDOWS_FORBIDDEN = '<>:"|?*'

#: Device names Windows reserves, with or without an extension (``CON``, ``nul.txt``, …).
WINDOWS_RESERVED = frozenset({"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)),
                              *(f"LPT{i}" for i in range(1, 10))})

_OPTIONS_SHOWN = 20
_WIDGETS = (io.Boolean.Input, io.Int.Input, io.Float.Input, io.String.Input, io.Combo.Input)


class InputError(ValueError):
    """A widget value the node cannot use; the message names the node, the input, the value and the fix."""


def _text_problem(text: str) -> str | None:
    """What makes ``text`` invalid as text (a lone UTF-16 surrogate, which cannot be encoded), or None."""
    for i, char in enumerate(text):
        if unicodedata.category(char) == "Cs":
            return f"it contains {char!r} at position {i}, half of a character pair, which is not valid text; remove it"
    return None


def _name_problem(name: str, suffix_bytes: int) -> str | None:
    """What is wrong with ``name`` as one file or folder name, or None."""
    if not name.strip():
        return "it is empty"
    problem = _text_problem(name)
    if problem is not None:
        return problem
    for char in name:
        if unicodedata.category(char) in ("Cc", "Zl", "Zp"):
            return f"it contains the control character {char!r}"
        if char in "/\\":
            return f"it contains the path separator {char!r}"
        if char in WINDOWS_FORBIDDEN:
            return f"it contains {char!r}, which Windows does not allow in file names"
    if name != name.strip():
        return "it begins or ends with a space"
    if name.startswith("~"):
        return "it begins with '~', which shells read as a home folder"
    if name in (".", "..") or name.endswith("."):
        return "it is '.' or '..' or ends with a dot"
    if name.split(".")[0].upper() in WINDOWS_RESERVED:
        return f"'{name.split('.')[0]}' is a device name Windows reserves"
    size = len(name.encode("utf-8")) + suffix_bytes
    if size > NAME_MAX_BYTES:
        longest = NAME_MAX_BYTES - suffix_bytes
        return (f"it is {len(name.encode('utf-8'))} bytes long, and with what the pack adds the file name would be "
                f"{size} bytes, over the {NAME_MAX_BYTES} that file systems allow: use at most {longest} bytes")
    return None


@dataclass(frozen=True)
class FileName:
    """Input rule for a text value that becomes a file or folder name.

    Refused: empty names, control characters (NUL included), lone surrogates, ``/`` and ``\\``, the characters
    Windows forbids (``<>:"|?*``), leading or trailing spaces, a leading ``~``, ``.``/``..`` and names ending in a
    dot, Windows device names (``CON``, ``NUL``, ``COM1``, …), and names whose longest derived file name exceeds
    ``NAME_MAX_BYTES``.

    Attributes:
        suffix: what the pack appends to the name in the longest file name it writes from it (e.g.
            ``".safetensors"``).
        atomic: that file is written through a temporary file beside it (:data:`ATOMIC_TEMP_EXTRA` bytes more).
        subfolders: the value may name sub-folders with ``/`` (each part is checked as a name; the suffix goes on
            the last part), as ComfyUI's ``filename_prefix``; ``\\`` is still refused, so names stay portable.
    """

    suffix: str = ""
    atomic: bool = False
    subfolders: bool = False

    def __call__(self, value: Any) -> None:
        """Raise ``ValueError`` saying what is wrong with ``value``."""
        if not isinstance(value, str):
            raise ValueError(f"{value!r} is not text")
        suffix_bytes = len(self.suffix.encode("utf-8")) + (ATOMIC_TEMP_EXTRA if self.atomic else 0)
        parts = value.split("/") if self.subfolders else [value]
        for i, part in enumerate(parts):
            problem = _name_problem(part, suffix_bytes if i == len(parts) - 1 else 0)
            if problem is not None:
                where = f" (part {i + 1}, {shown(part)})" if len(parts) > 1 else ""
                kind, example = (("a name with sub-folders separated by '/'", "cinetune/my_video") if self.subfolders
                                 else ("a file name", "my_style_lora"))
                raise ValueError(f"{shown(value)} cannot be used as {kind}: {problem}{where}. Use letters, digits, "
                                 f"'_' and '-', e.g. '{example}'.")


def shown(value: Any, limit: int = 60) -> str:
    """``repr(value)`` for messages, shortened to about ``limit`` characters (with the full length)."""
    text = repr(value)
    if len(text) <= limit:
        return text
    length = f" ({len(value)} characters)" if isinstance(value, str) else ""
    return f"{text[:limit]}…{length}"


def check_file_name(value: str, rule: FileName, what: str) -> str:
    """``value`` if ``rule`` accepts it, for use at execution time too.

    Raises:
        InputError: naming ``what`` (the input) and the problem.
    """
    try:
        rule(value)
    except ValueError as e:
        raise InputError(f"{what}: {e}") from None
    return value


def _format_options(options: list) -> str:
    if not options:
        return "it has no options (for a file list: put the file into its models folder, then reload the page)"
    listed = ", ".join(repr(o) for o in options[:_OPTIONS_SHOWN])
    more = f", … ({len(options)} in all)" if len(options) > _OPTIONS_SHOWN else ""
    return f"valid options: {listed}{more}"


def _widget_problem(spec: io.Input, value: Any) -> str | None:
    """What is wrong with ``value`` for the widget ``spec`` (combo options, number range and NaN, text that is not
    valid Unicode), or None."""
    if isinstance(spec, io.Combo.Input):
        options = list(spec.options or [])
        chosen = value if isinstance(value, list) and getattr(spec, "multiselect", False) else [value]
        bad = [v for v in chosen if v not in options]
        if bad:
            return f"{shown(bad[0])} is not one of its options; {_format_options(options)}"
    elif isinstance(spec, (io.Int.Input, io.Float.Input)) and isinstance(value, (int, float)):
        low, high = getattr(spec, "min", None), getattr(spec, "max", None)
        if isinstance(value, float) and math.isnan(value):
            span = f" between {low} and {high}" if low is not None and high is not None else ""
            return f"{value} is not a number; give a number{span}"
        if low is not None and value < low:
            return f"{value} is below its minimum {low}"
        if high is not None and value > high:
            return f"{value} is above its maximum {high}"
    elif isinstance(spec, io.String.Input) and isinstance(value, str):
        return _text_problem(value)
    return None


def check_inputs(node: type[io.ComfyNode], values: dict[str, Any],
                 rules: dict[str, Callable[[Any], None]]) -> None:
    """Check widget values against ``node``'s schema and ``rules`` (see the module notes).

    Args:
        node: the node class (its ``define_schema()`` is called for fresh options).
        values: input id → value as queued; None (an input fed by a link, or left out) is not checked.
        rules: input id → callable raising ``ValueError`` with the problem.
    Raises:
        InputError: the first bad value, naming the node, the input, the value and what is valid.
    """
    schema = node.define_schema()
    for spec in schema.inputs:
        value = values.get(spec.id)
        if value is None:
            continue
        problem = _widget_problem(spec, value)
        rule = rules.get(spec.id)
        if problem is None and rule is not None:
            try:
                rule(value)
            except ValueError as e:
                problem = str(e)
        if problem is not None:
            raise InputError(f"{schema.display_name}, input '{spec.id}': {problem}")


def widget_values(node: type[io.ComfyNode], values: dict[str, Any]) -> dict[str, Any]:
    """The node's widget settings: ``values`` of its widget inputs, the schema default where a value is None or
    absent (socket inputs and linked values are left out)."""
    settings = {}
    for spec in node.define_schema().inputs:
        if isinstance(spec, _WIDGETS):
            value = values.get(spec.id)
            settings[spec.id] = spec.default if value is None else value
    return settings


class CinetuneNode(PlainErrors, io.ComfyNode):
    """Base class of every Cinetune node: checks the queued widget values (see the module notes).

    A node lists extra per-input rules in ``INPUT_RULES``. Its node info carries search aliases
    (:mod:`cinetune.nodes.search`).
    """

    INPUT_RULES: ClassVar[dict[str, Callable[[Any], None]]] = {}
    GET_NODE_INFO_V1 = classmethod(search.node_info_v1)

    @classmethod
    def validate_inputs(cls, **values) -> bool:
        check_inputs(cls, values, cls.INPUT_RULES)
        return True
