"""
An MkDocs hook (see mkdocs.yml): the API reference from the docstrings.

In C{docs/api.md}, each line C{<!-- api: MODULE -->} is replaced, on the
site, by the module's docstring and those of everything in its
C{__all__} (classes with their public methods, functions, with their
signatures). The docstrings are epytext, Twisted's convention
(C{L{...}}, C{C{...}}, C{@param}); they are turned into Markdown here.
On GitHub the page shows the module list instead: the markers are HTML
comments.

A module that cannot be imported, or a name in C{__all__} that it lacks,
is a warning, so C{mkdocs build --strict} fails on it.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import re
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("mkdocs.plugins.api_reference")

_MARKER = re.compile(r"^<!-- api: ([\w.]+) -->$", re.MULTILINE)

# Epytext inline markup, innermost first (a few rounds handle nesting).
_LINK_NAMED = re.compile(r"L\{([^{}<]*?)\s*<([^{}>]*)>\}")
_INLINE = re.compile(r"([LCIBUM])\{([^{}]*)\}")
_FIELD = re.compile(r"^@(\w+)(?:\s+([^:]+))?:\s*(.*)$")

_FIELD_TITLES = {
    "param": "Parameters",
    "type": "Parameters",
    "keyword": "Parameters",
    "ivar": "Attributes",
    "cvar": "Attributes",
    "var": "Attributes",
    "return": "Returns",
    "returns": "Returns",
    "rtype": "Returns",
    "raise": "Raises",
    "raises": "Raises",
    "see": "See also",
    "note": "Note",
    "since": "Since",
}


def _inline(text: str) -> str:
    """Epytext inline markup as Markdown."""
    for _ in range(3):
        text = _LINK_NAMED.sub(lambda m: m.group(1) or f"`{m.group(2)}`", text)
        text = _INLINE.sub(_replace_inline, text)
    return text


def _replace_inline(match: re.Match[str]) -> str:
    kind, body = match.groups()
    if kind in "LC":
        return f"`{body}`" if "`" not in body else body
    if kind == "I":
        return f"*{body}*"
    if kind == "B":
        return f"**{body}**"
    return body


def epytext_to_markdown(doc: str) -> str:
    """
    A docstring (already dedented by L{inspect.getdoc}) as Markdown: inline
    markup converted, C{@field}s gathered into lists under a title, and
    C{::} literal blocks fenced.
    """
    lines = doc.splitlines()
    body: list[str] = []
    fields: dict[str, list[str]] = {}
    current: list[str] | None = None
    literal = False
    for line in lines:
        match = _FIELD.match(line)
        if match:
            kind, name, text = match.groups()
            title = _FIELD_TITLES.get(kind, kind.capitalize())
            entry = f"- `{name.strip()}`: {text}" if name else f"- {text}"
            if kind == "type" and name:
                entry = f"- `{name.strip()}` is of type {text}"
            current = fields.setdefault(title, [])
            current.append(entry)
            continue
        if current is not None:
            if line.strip():
                current[-1] += " " + line.strip()
                continue
            current = None
        if literal:
            if line.strip() and not line.startswith(" "):
                _close_fence(body)
                literal = False
            else:
                if line.strip() or body[-1] != "```python":
                    body.append(line[4:] if line.startswith("    ") else line)
                continue
        if line.rstrip().endswith("::"):
            body += [line.rstrip()[:-1], "", "```python"]
            literal = True
            continue
        body.append(line)
    if literal:
        _close_fence(body)
    out = [_inline(line) if not _in_code(body, i) else line for i, line in enumerate(body)]
    for title, entries in fields.items():
        out += ["", f"**{title}**", "", *(_inline(e) for e in entries)]
    return "\n".join(out).strip()


def _close_fence(body: list[str]) -> None:
    """End a fenced block: no blank lines inside its end, one after it."""
    while body and not body[-1].strip():
        body.pop()
    body += ["```", ""]


def _in_code(lines: list[str], index: int) -> bool:
    """Whether line C{index} is inside a fenced block (fences included)."""
    fences = sum(1 for line in lines[: index + 1] if line.startswith("```"))
    return fences % 2 == 1 or lines[index].startswith("```")


def _signature(obj: Any) -> str:
    try:
        return _format_signature(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(...)"


def _annotation(annotation: Any) -> str:
    # With "from __future__ import annotations" they are strings: shown as
    # written, not quoted.
    return annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)


def _format_signature(signature: inspect.Signature) -> str:
    """A signature as the source writes it (annotations unquoted)."""
    parts = []
    star = False
    for parameter in signature.parameters.values():
        kind = parameter.kind
        if kind is parameter.KEYWORD_ONLY and not star:
            parts.append("*")
            star = True
        text = parameter.name
        if kind is parameter.VAR_POSITIONAL:
            text, star = "*" + text, True
        elif kind is parameter.VAR_KEYWORD:
            text = "**" + text
        if parameter.annotation is not parameter.empty:
            text += ": " + _annotation(parameter.annotation)
        if parameter.default is not parameter.empty:
            text += " = " + _short_repr(parameter.default)
        parts.append(text)
    result = f"({', '.join(parts)})"
    if signature.return_annotation is not signature.empty:
        result += " -> " + _annotation(signature.return_annotation)
    return result


def _doc(obj: Any) -> str:
    doc = inspect.getdoc(obj)
    return epytext_to_markdown(doc) if doc else "*(no docstring)*"


def render_module(name: str) -> str:
    """The reference of module C{name}: its docstring and its C{__all__}."""
    module = importlib.import_module(name)
    out = [f"## `{name}`", "", _doc(module), ""]
    for attr in getattr(module, "__all__", []):
        if not hasattr(module, attr):
            log.warning("api_reference: %s.__all__ names %r, which it lacks", name, attr)
            continue
        obj = getattr(module, attr)
        qualified = f"{name}.{attr}"
        if inspect.isclass(obj):
            kind = "interface" if _is_interface(obj) else "class"
            out += [f"### `{attr}`", "", f"*{kind}* `{qualified}{_init_signature(obj)}`", ""]
            out += [_doc(obj) if obj.__doc__ else "*(no docstring)*", ""]
            out += _members(obj, qualified)
        elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
            out += [f"### `{attr}`", "", f"`{qualified}{_signature(obj)}`", "", _doc(obj), ""]
        else:
            out += [f"### `{attr}`", "", f"`{qualified}` = `{_short_repr(obj)}`", ""]
    return "\n".join(out)


def _is_interface(cls: Any) -> bool:
    try:
        from zope.interface.interface import InterfaceClass
    except ImportError:
        return False
    return isinstance(cls, InterfaceClass)


def _init_signature(cls: Any) -> str:
    if _is_interface(cls):
        return ""
    try:
        return _format_signature(inspect.signature(cls))
    except (TypeError, ValueError):
        return ""


def _members(cls: Any, qualified: str) -> list[str]:
    """The public methods and properties a class defines itself."""
    out: list[str] = []
    if _is_interface(cls):
        for member in cls.names():
            description = cls[member]
            doc = getattr(description, "__doc__", "") or ""
            signature = ""
            if hasattr(description, "getSignatureString"):
                signature = description.getSignatureString()
            out += [f"- **`{member}{signature}`**", "", _indent(_doc_text(doc)), ""]
        return out
    for member, value in vars(cls).items():
        if member.startswith("_"):
            continue
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if inspect.isfunction(value):
            signature = _signature(value)
        elif isinstance(value, property):
            signature = " (property)"
        else:
            continue
        out += [f"- **`{member}{signature}`**", "", _indent(_doc(value)), ""]
    return out


def _doc_text(doc: str) -> str:
    return epytext_to_markdown(inspect.cleandoc(doc)) if doc.strip() else "*(no docstring)*"


def _indent(text: str) -> str:
    return "\n".join(("    " + line) if line.strip() else "" for line in text.splitlines())


def _short_repr(obj: Any) -> str:
    text = repr(obj)
    return text if len(text) <= 80 else text[:77] + "..."


def on_config(config: Any) -> Any:
    """
    Import the package from the tree being built (the directory above
    docs/), not whichever copy is installed.
    """
    root = str(Path(config["docs_dir"]).resolve().parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    return config


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Replace each C{<!-- api: MODULE -->} line by the module's reference."""
    if not _MARKER.search(markdown):
        return markdown

    def expand(match: re.Match[str]) -> str:
        try:
            return render_module(match.group(1))
        except Exception as e:
            log.warning("api_reference: cannot document %s: %s", match.group(1), e)
            return match.group(0)

    return _MARKER.sub(expand, markdown)
