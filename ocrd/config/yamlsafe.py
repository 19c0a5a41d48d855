"""A YAML reader for policies: no tags, no anchors or aliases, no duplicate
keys, at most 1 MiB, a line number for every key path, and the text of every
plain scalar that YAML 1.1 read as something other than a string (`no`,
`10:00`, `2024_`, `2024-01-01`), so that messages can say how it was read."""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any

import yaml

MAX_BYTES = 1024 * 1024
MAX_DEPTH = 32
Loc = tuple[str | int, ...]


class YamlError(ValueError):
    """The text is not a policy-shaped YAML document; `line` is 1-based when known."""

    def __init__(self, message: str, line: int | None = None, loc: Loc = ()) -> None:
        super().__init__(message)
        self.line = line
        self.loc = loc


@dataclass(frozen=True, slots=True)
class Scalar:
    """An unquoted value that YAML did not read as a string: its text and what it became."""

    text: str
    value: Any
    line: int | None

    def reading(self) -> str:
        """How YAML read it, for people: 'the number 2024', 'the boolean false'."""
        value = self.value
        if value is None:
            return "null (no value)"
        if isinstance(value, bool):
            return f"the boolean {str(value).lower()}"
        if isinstance(value, int | float):
            base60 = "base-60 " if ":" in self.text else ""
            return (
                f"the {base60}number {value:g}"
                if isinstance(value, float)
                else (f"the {base60}number {value}")
            )
        if isinstance(value, datetime.datetime):
            return f"the timestamp {value.isoformat(sep=' ')}"
        if isinstance(value, datetime.date):
            return f"the date {value.isoformat()}"
        return f"a {type(value).__name__}"


@dataclass(frozen=True, slots=True)
class Document:
    """A parsed policy file: its value, the line of every key path, and its non-string scalars."""

    value: Any
    lines: dict[Loc, int] = field(default_factory=dict)
    scalars: dict[Loc, Scalar] = field(default_factory=dict)


def _line(node: yaml.Node | yaml.Event | yaml.Mark | None) -> int | None:
    if node is None:
        return None
    mark = node if isinstance(node, yaml.Mark) else node.start_mark
    return None if mark is None else mark.line + 1


class _Loader(yaml.SafeLoader):
    """SafeLoader that notes anchors and explicit tags as it composes (so that
    the walk below can refuse them naming the key) and bounds the nesting."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.flagged: dict[int, str] = {}  # id(node) -> why it is refused
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        why = None
        anchor = getattr(event, "anchor", None)
        tag = getattr(event, "tag", None)
        if isinstance(event, yaml.AliasEvent):
            # Never resolve it (a "billion laughs" file would expand): a flagged
            # placeholder lets the walk below name the key that used it.
            self.get_event()  # type: ignore[no-untyped-call]
            placeholder: Any = yaml.ScalarNode("tag:yaml.org,2002:null", "")
            placeholder.start_mark = placeholder.end_mark = event.start_mark
            self.flagged[id(placeholder)] = (
                f"YAML alias '*{event.anchor}' is not allowed in a policy; write the value out"
            )
            return placeholder  # type: ignore[no-any-return]
        if anchor is not None:
            why = f"YAML anchor '&{anchor}' is not allowed in a policy; write the value out"
        elif tag is not None and tag != "!":
            why = f"YAML tag {tag!r} is not allowed in a policy; remove it"
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise YamlError(
                    f"nested more than {MAX_DEPTH} levels deep; a policy is a few levels at most",
                    _line(event),
                )
            node: yaml.Node | None = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if why is not None and node is not None and id(node) not in self.flagged:
            # An alias returns the anchored node itself: the anchor's reason stands.
            self.flagged[id(node)] = why
        return node


def _build(node: yaml.Node, loader: _Loader, loc: Loc, doc: Document) -> Any:
    lines = doc.lines
    line = _line(node)
    if id(node) in loader.flagged:
        raise YamlError(loader.flagged[id(node)], line, loc)
    if line is not None:
        lines.setdefault(loc, line)
    if isinstance(node, yaml.MappingNode):
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if id(key_node) in loader.flagged:
                raise YamlError(loader.flagged[id(key_node)], _line(key_node), loc)
            if not isinstance(key_node, yaml.ScalarNode):
                raise YamlError("a mapping key must be a plain word", _line(key_node), loc)
            key = loader.construct_object(key_node)
            if not isinstance(key, str):
                raise YamlError(
                    f"key {key!r} must be a word, not a {type(key).__name__}",
                    _line(key_node),
                    loc,
                )
            child: Loc = (*loc, key)
            if key in result:
                raise YamlError(f"duplicate key {key!r}; keep only one", _line(key_node), child)
            lines[child] = _line(key_node) or 0
            result[key] = _build(value_node, loader, child, doc)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_build(item, loader, (*loc, i), doc) for i, item in enumerate(node.value)]
    value = loader.construct_object(node)
    if not isinstance(value, str) and isinstance(node, yaml.ScalarNode) and node.style is None:
        doc.scalars[loc] = Scalar(text=node.value, value=value, line=line)
    return value


def load(data: bytes) -> tuple[Any, dict[Loc, int]]:
    """Parse one YAML document from *data*: (value, {key path: line})."""
    doc = read(data)
    return doc.value, doc.lines


def read(data: bytes) -> Document:
    """Parse one YAML document from *data* (YamlError, with a line, if it is not one)."""
    if len(data) > MAX_BYTES:
        raise YamlError(f"file is {len(data)} bytes; a policy may be at most {MAX_BYTES} (1 MiB)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise YamlError(f"not UTF-8 text (byte {exc.start}); save the file as UTF-8", line) from exc
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return Document(None)
        doc = Document(None)
        return Document(_build(node, loader, (), doc), doc.lines, doc.scalars)
    except yaml.MarkedYAMLError as exc:
        sentence, at_context = _explain(exc)
        mark = exc.context_mark if at_context and exc.context_mark else exc.problem_mark
        raise YamlError(f"invalid YAML: {sentence}", _line(mark)) from exc
    except yaml.YAMLError as exc:
        raise YamlError(f"invalid YAML: {exc}") from exc
    finally:
        loader.dispose()


# PyYAML's parser messages, said plainly. Each: (a fragment of its problem text, the
# sentence, whether the line that matters is where the construct began, not where it broke).
_SENTENCES: tuple[tuple[str, str, bool], ...] = (
    (
        "found '<block mapping start>'",
        "this key is indented differently from the keys above it; the keys of one "
        "section must start in the same column (indent with spaces only)",
        False,
    ),
    (
        "found '<block sequence start>'",
        "this list item is indented differently from the lines above it; the '- ' items "
        "of one list must start in the same column",
        False,
    ),
    (
        "but found '-'",
        "a list item '- ' where a key was expected; indent the list under its key",
        False,
    ),
    (
        "expected <block end>",
        "this line is indented differently from the lines above it; check its indentation",
        False,
    ),
    (
        "mapping values are not allowed here",
        "a ':' where no key may start: a key is indented under a value, or a value "
        "that contains ': ' needs quotes",
        False,
    ),
    ("character '\\t'", "a tab character; indent YAML with spaces, never tabs", False),
    (
        "that cannot start any token",
        "a value starts with a character YAML reserves; put the value in quotes",
        False,
    ),
    (
        "expected ',' or ']'",
        "a list opened with '[' on this line is not closed; add the missing ']' (or quote "
        "an item that contains ',', ']' or ': ')",
        True,
    ),
    (
        "expected ',' or '}'",
        "a mapping opened with '{' on this line is not closed; add the missing '}' (or "
        "quote a value that contains ',' or '}')",
        True,
    ),
    (
        "found unexpected end of stream",
        "a quoted value that starts on this line is never closed; add the closing quote",
        True,
    ),
    (
        "could not find expected ':'",
        "this key has no ':' after it; write 'key: value'",
        True,
    ),
    (
        "found another document",
        "another document starts here ('---'); a policy is one document",
        False,
    ),
    (
        "unknown escape character",
        "an unknown backslash escape in a double-quoted value; use single quotes, "
        "or write '\\\\' for a backslash",
        False,
    ),
)


def _explain(exc: yaml.MarkedYAMLError) -> tuple[str, bool]:
    """A plain sentence for PyYAML's error, and whether its context line is the one to name."""
    problem = exc.problem or exc.context or ""
    for fragment, sentence, at_context in _SENTENCES:
        if fragment in problem:
            return sentence, at_context
    return f"this line is not valid YAML ({problem}); check its indentation and quotes", False
