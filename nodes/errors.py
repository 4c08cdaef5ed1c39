"""Errors raised by Cinetune nodes reach ComfyUI as plain built-in exceptions, so the user reads a sentence.

ComfyUI reports a failed node as ``"<exception_type>: <message>"``, where ``exception_type`` is the exception's
module-qualified class name unless the class is a built-in (``execution.py`` ``full_type_name``, ComfyUI 0.3.75 and
current releases). A pack error therefore showed as ``cinetune.training.items.DatasetError: …`` (under ComfyUI the
module path even starts with the custom node folder). Here a pack error leaving a node's ``execute`` (or its
``validate_inputs``, at queue time) is raised again as the built-in class it derives from (``DatasetError`` →
``ValueError``, ``AttentionBackendError`` → ``RuntimeError``) with the same message and notes, the original chained
as its cause (``raise … from``) and its traceback kept, so ComfyUI's log and the error's traceback still point at the
line that failed.

Only classes defined in this package are translated: ComfyUI's own exceptions (its interrupt, out-of-memory
handling), ``KeyboardInterrupt``/``SystemExit`` and every third-party exception pass through unchanged, because
the host tells them apart by class.

Use :class:`PlainErrors` as a base of the node base class (every subclass's ``execute`` is wrapped once, also the
class copies ComfyUI makes per run), or :func:`plain_errors` on a single function.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, TypeVar

__all__ = ["PACKAGE", "PlainErrors", "is_pack_error", "plain_errors", "plain_exception", "wrap_execute"]

#: The pack's root package, whatever name the host imported it under (``cinetune``, ``custom_nodes.cinetune``, …).
PACKAGE = __name__.rsplit(".", 2)[0]

_WRAPPED = "__cinetune_plain_errors__"

F = TypeVar("F", bound=Callable[..., Any])


def is_pack_error(exc: BaseException) -> bool:
    """Whether ``exc``'s class is defined in this package (a module of :data:`PACKAGE`)."""
    module = type(exc).__module__ or ""
    return module == PACKAGE or module.startswith(PACKAGE + ".")


def _builtin_base(cls: type) -> type[Exception]:
    """The first built-in class in ``cls``'s method resolution order (``Exception`` at the latest)."""
    for klass in cls.__mro__:
        if klass.__module__ == "builtins" and issubclass(klass, Exception):
            # KeyError would quote the message (str(KeyError("x")) == "'x'"): its parent reads as a sentence
            return LookupError if klass is KeyError else klass
    return Exception


def plain_exception(exc: BaseException) -> Exception | None:
    """The built-in exception ``exc`` becomes, or None when it stays as it is.

    Args:
        exc: any exception.
    Returns:
        For an ``Exception`` of this package: an instance of its first built-in base class (``ValueError``,
        ``RuntimeError``, …; ``LookupError`` for a ``KeyError``, whose text would be quoted) with ``exc``'s message
        and ``__notes__``; the cause and traceback are set by the caller (:func:`plain_errors`). None for
        everything else (built-ins, the host's and other libraries' exceptions, ``BaseException``\\ s such as
        ``KeyboardInterrupt``).
    """
    if not isinstance(exc, Exception) or not is_pack_error(exc):
        return None
    base = _builtin_base(type(exc))
    message = str(exc.args[0]) if isinstance(exc, KeyError) and len(exc.args) == 1 else str(exc)  # unquoted
    try:
        plain = base(message)
    except TypeError:  # a built-in with a fixed signature (UnicodeDecodeError): keep the sentence
        plain = Exception(message)
    for note in getattr(exc, "__notes__", ()):
        plain.add_note(note)
    return plain


def _raise_plain(exc: Exception) -> None:
    plain = plain_exception(exc)
    if plain is not None:
        raise plain.with_traceback(exc.__traceback__) from exc


def plain_errors(function: F) -> F:
    """Wrap ``function`` (plain or ``async``) so that a pack exception it raises leaves as :func:`plain_exception`.

    Wrapping twice returns the wrapped function unchanged. The wrapper keeps the name, docstring and signature
    (``functools.wraps``) and stays a coroutine function when ``function`` is one (ComfyUI picks its async path
    by ``inspect.iscoroutinefunction(execute)``).

    Raises (from the wrapper):
        the built-in equivalent of a pack exception, chained to it; anything else unchanged.
    """
    if getattr(function, _WRAPPED, False):
        return function
    if inspect.iscoroutinefunction(function):
        @functools.wraps(function)
        async def wrapper(*args, **kwargs):
            try:
                return await function(*args, **kwargs)
            except Exception as exc:
                _raise_plain(exc)
                raise
    else:
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            try:
                return function(*args, **kwargs)
            except Exception as exc:
                _raise_plain(exc)
                raise
    setattr(wrapper, _WRAPPED, True)
    return wrapper  # type: ignore[return-value]


#: The node classmethods whose pack errors leave as built-ins: running the node, and checking its queued values
#: (a refusal at queue time is then reported with the type ``ValueError``, not the pack's module path).
NODE_METHODS = ("execute", "validate_inputs")


def wrap_execute(cls: type) -> type:
    """Wrap the :data:`NODE_METHODS` classmethods ``cls`` defines itself (not inherited ones) with
    :func:`plain_errors`; returns ``cls``. Nothing is set when a method is already wrapped, so the locked class
    copies ComfyUI builds for each run (whose attributes cannot be set) pass untouched."""
    for name in NODE_METHODS:
        method = cls.__dict__.get(name)
        if isinstance(method, classmethod) and not getattr(method.__func__, _WRAPPED, False):
            setattr(cls, name, classmethod(plain_errors(method.__func__)))
    return cls


class PlainErrors:
    """Mixin for the pack's node base class: every subclass's ``execute`` and ``validate_inputs`` raise plain
    built-in exceptions instead of the pack's own classes (:func:`wrap_execute`). Put it first among the bases:
    ``class CinetuneNode(PlainErrors, io.ComfyNode)``."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        wrap_execute(cls)

