"""A YAML reader for policies: no tags, no anchors or aliases, no duplicate
keys, at most 1 MiB, and a line number for every key path."""

from __future__ import annotations

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


def _build(node: yaml.Node, loader: _Loader, loc: Loc, lines: dict[Loc, int]) -> Any:
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
            result[key] = _build(value_node, loader, child, lines)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_build(item, loader, (*loc, i), lines) for i, item in enumerate(node.value)]
    return loader.construct_object(node)


def load(data: bytes) -> tuple[Any, dict[Loc, int]]:
    """Parse one YAML document from *data*: (value, {key path: line})."""
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
            return None, {}
        lines: dict[Loc, int] = {}
        return _build(node, loader, (), lines), lines
    except yaml.MarkedYAMLError as exc:
        problem = exc.problem or exc.context or "invalid YAML"
        raise YamlError(f"invalid YAML: {problem}", _line(exc.problem_mark)) from exc
    except yaml.YAMLError as exc:
        raise YamlError(f"invalid YAML: {exc}") from exc
    finally:
        loader.dispose()
