"""The safe YAML reader: plain data only, with a line for every key path (DESIGN.md §2)."""

from __future__ import annotations

import time

import pytest

from ocrd.config import yamlsafe
from ocrd.config.yamlsafe import MAX_BYTES, YamlError

POLICY = b"""\
model_dir: /srv/models
prune:
  prefixes:
    - old_
    - tmp_
  min_age: 10m
required:
  - name: en_ocr_v1.bin
    sha256: abc
  - name: b.gguf
whitelist: ["*.gguf", "custom_*"]
"""

BILLION_LAUGHS = b"""\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


def rejected(data: bytes) -> YamlError:
    """The YamlError that loading *data* raises (fails the test if it loads)."""
    with pytest.raises(YamlError) as exc:
        yamlsafe.load(data)
    return exc.value


def test_load_returns_plain_data() -> None:
    """A policy document becomes plain dicts, lists and strings."""
    value, _ = yamlsafe.load(POLICY)
    assert value == {
        "model_dir": "/srv/models",
        "prune": {"prefixes": ["old_", "tmp_"], "min_age": "10m"},
        "required": [{"name": "en_ocr_v1.bin", "sha256": "abc"}, {"name": "b.gguf"}],
        "whitelist": ["*.gguf", "custom_*"],
    }


def test_line_map_gives_the_1_based_line_of_every_key_path() -> None:
    """Every key path (mapping keys and list indexes) maps to the line it starts on."""
    _, lines = yamlsafe.load(POLICY)
    assert lines == {
        (): 1,
        ("model_dir",): 1,
        ("prune",): 2,
        ("prune", "prefixes"): 3,
        ("prune", "prefixes", 0): 4,
        ("prune", "prefixes", 1): 5,
        ("prune", "min_age"): 6,
        ("required",): 7,
        ("required", 0): 8,
        ("required", 0, "name"): 8,
        ("required", 0, "sha256"): 9,
        ("required", 1): 10,
        ("required", 1, "name"): 10,
        ("whitelist",): 11,
        ("whitelist", 0): 11,
        ("whitelist", 1): 11,
    }


def test_line_map_points_at_the_key_not_its_value() -> None:
    """A key whose value starts on a later line is mapped to the key's own line."""
    _, lines = yamlsafe.load(b"# comment\n\nlog:\n\n  level:\n    debug\n")
    assert lines[("log",)] == 3
    assert lines[("log", "level")] == 5


def test_anchor_is_rejected_with_its_line() -> None:
    """An anchor is refused at the line that declares it."""
    error = rejected(b"model_dir: /m\nprune: &p\n  min_age: 1m\n")
    assert error.line == 2
    assert "anchor '&p'" in str(error)


def test_alias_is_rejected_with_its_line() -> None:
    """An alias is refused at the line that uses it, even without a matching anchor."""
    error = rejected(b"model_dir: /m\nwhitelist:\n  - *globs\n")
    assert error.line == 3
    assert "alias '*globs'" in str(error)


def test_merge_key_is_rejected() -> None:
    """The `<<` merge key (which needs an alias to be useful) is not accepted either."""
    error = rejected(b"base: &b {min_age: 1m}\nprune:\n  <<: *b\n")
    assert error.line == 1


def test_billion_laughs_fails_fast() -> None:
    """A "billion laughs" document fails at its first anchor in well under a second."""
    start = time.perf_counter()
    error = rejected(BILLION_LAUGHS)
    elapsed = time.perf_counter() - start
    assert elapsed < 0.5
    assert error.line == 1
    assert "anchor '&a' is not allowed" in str(error)


@pytest.mark.parametrize(
    ("data", "line", "tag"),
    [
        (b"model_dir: !!python/object/apply:os.system ['echo pwned']\n", 1, "python/object/apply"),
        (b"a: 1\nb: !!python/name:os.system\n", 2, "python/name"),
        (b"log:\n  level: !foo debug\n", 2, "'!foo'"),
        (b"suspend: !!bool yes\n", 1, "bool"),
        (b"!!map\nmodel_dir: /m\n", 1, "map"),
        (b"whitelist: !!set {a, b}\n", 1, "set"),
    ],
)
def test_explicit_tags_are_rejected_with_their_line(data: bytes, line: int, tag: str) -> None:
    """Any explicit tag, standard or custom, is refused before anything is constructed."""
    error = rejected(data)
    assert error.line == line
    assert "tag" in str(error)
    assert tag in str(error)


@pytest.mark.parametrize(
    ("data", "line", "key"),
    [
        (b"model_dir: /a\nsuspend: true\nmodel_dir: /b\n", 3, "model_dir"),
        (b"prune:\n  min_age: 1m\n  action: delete\n  min_age: 2m\n", 4, "min_age"),
        (b"log: {level: info, level: debug}\n", 1, "level"),
        (b"required:\n  - name: a\n    name: b\n", 3, "name"),
    ],
)
def test_duplicate_keys_are_rejected_at_the_second_key(data: bytes, line: int, key: str) -> None:
    """A key given twice in one mapping is an error at the line of the repeat."""
    error = rejected(data)
    assert error.line == line
    assert f"duplicate key {key!r}" in str(error)


def test_same_key_in_different_mappings_is_fine() -> None:
    """The same key in two different mappings is not a duplicate."""
    value, _ = yamlsafe.load(b"required:\n  - name: a\n  - name: b\n")
    assert value == {"required": [{"name": "a"}, {"name": "b"}]}


@pytest.mark.parametrize(
    ("data", "line"),
    [
        (b"model_dir: /m\nsuspend: \xff\n", 2),
        (b"\xfe\xffmodel_dir: /m\n", 1),
        (b"a: 1\nb: 2\nc: caf\xe9\n", 3),
    ],
)
def test_non_utf8_bytes_are_rejected_with_their_line(data: bytes, line: int) -> None:
    """Bytes that are not UTF-8 are an error at the line that holds them."""
    error = rejected(data)
    assert error.line == line
    assert "UTF-8" in str(error)


def test_utf8_text_is_read() -> None:
    """UTF-8 text, with or without a byte-order mark, is read as text."""
    assert yamlsafe.load("a: café\n".encode())[0] == {"a": "café"}
    assert yamlsafe.load(b"\xef\xbb\xbfa: 1\n")[0] == {"a": 1}


def test_more_than_one_mib_is_rejected() -> None:
    """A document one byte over 1 MiB is refused before it is parsed."""
    data = b"a: 1\n" + b"#" * (MAX_BYTES - 4)
    assert len(data) == MAX_BYTES + 1 == 1024 * 1024 + 1
    start = time.perf_counter()
    error = rejected(data)
    assert time.perf_counter() - start < 0.1
    assert "1 MiB" in str(error)
    assert str(MAX_BYTES + 1) in str(error)


@pytest.mark.parametrize("data", [b"", b"\n\n", b"   \n", b"# only a comment\n"])
def test_empty_document_is_none_with_no_lines(data: bytes) -> None:
    """A document with no content loads as (None, {})."""
    assert yamlsafe.load(data) == (None, {})


@pytest.mark.parametrize(
    ("data", "line"),
    [
        (b"1: a\n", 1),
        (b"model_dir: /m\ntrue: x\n", 2),
        (b"null: x\n", 1),
        (b"a: 1\n1.5: x\n", 2),
        (b"prune:\n  2024-01-01: x\n", 2),
        (b"? [a, b]\n: c\n", 1),
        (b"? {a: 1}\n: c\n", 1),
    ],
)
def test_non_string_keys_are_rejected_with_their_line(data: bytes, line: int) -> None:
    """Numbers, booleans, nulls, dates and collections are not valid mapping keys."""
    error = rejected(data)
    assert error.line == line
    assert "key" in str(error)


def test_quoted_keys_that_look_like_numbers_are_words() -> None:
    """A quoted key is a string even when it looks like a number."""
    assert yamlsafe.load(b"'1': a\n")[0] == {"1": "a"}


@pytest.mark.parametrize(
    ("data", "line"),
    [
        (b"a: [1, 2\n", 1),  # the line the list was opened on
        (b"a: 1\n\tb: 2\n", 2),
        (b"a: 1\n---\nb: 2\n", 2),
    ],
    ids=["unclosed", "tab", "two-documents"],
)
def test_malformed_yaml_is_a_yaml_error_with_a_line(data: bytes, line: int) -> None:
    """Syntax errors and multi-document streams become YamlError with a line."""
    error = rejected(data)
    assert error.line == line
    assert str(error).startswith("invalid YAML")


def test_deep_nesting_is_a_yaml_error_not_a_crash() -> None:
    """A small document nested thousands of levels deep is a YamlError, not a RecursionError."""
    data = b"a: " + b"[" * 2000 + b"]" * 2000 + b"\n"
    assert len(data) < MAX_BYTES
    try:
        yamlsafe.load(data)
    except YamlError:
        return
    except RecursionError:
        pytest.fail("RecursionError escaped yamlsafe.load; expected a YamlError")
    pytest.fail("a 2000-level nested document was accepted")


def test_yaml_error_is_a_value_error() -> None:
    """YamlError is a ValueError carrying an optional line."""
    error = YamlError("boom")
    assert isinstance(error, ValueError)
    assert error.line is None
    assert YamlError("boom", 7).line == 7


@pytest.mark.parametrize(
    ("text", "reading"),
    [
        ("2024_", "the number 2024"),
        ("0755", "the number 493"),
        ("10:00", "the base-60 number 600"),
        ("no", "the boolean false"),
        ("On", "the boolean true"),
        ("2024-01-01", "the date 2024-01-01"),
        ("~", "null (no value)"),
        ("1.5", "the number 1.5"),
    ],
)
def test_unquoted_values_yaml_did_not_read_as_text_keep_their_text(text: str, reading: str) -> None:
    """A plain scalar that became no string is recorded with its text, line and reading."""
    doc = yamlsafe.read(f"a: x\nb: [ok, {text}]\n".encode())
    scalar = doc.scalars[("b", 1)]
    assert (scalar.text, scalar.line, scalar.reading()) == (text, 2, reading)
    assert ("b", 0) not in doc.scalars  # a string is what the policy expects: not recorded


def test_quoted_values_are_text_and_not_recorded() -> None:
    """A quoted "10:00" is the string it says."""
    doc = yamlsafe.read(b"a: \"10:00\"\nb: 'no'\n")
    assert doc.value == {"a": "10:00", "b": "no"}
    assert doc.scalars == {}


@pytest.mark.parametrize(
    ("data", "line", "sentence"),
    [
        (b"prune:\n  prefixes: [old_]\n    min_age: 10m\n", 3, "this key is indented differently"),
        (b"a:\n  - x\n - y\n", 3, "this list item is indented differently"),
        (b"a: b: c\n", 1, "a value that contains ': ' needs quotes"),
        (b"a: 'x\n", 1, "a quoted value that starts on this line is never closed"),
        (b"a: {b: 1\n", 1, "a mapping opened with '{' on this line is not closed"),
        (b"a: 1\nb\n  c: 2\n", 2, "this key has no ':' after it"),
        (b"a: @x\n", 1, "put the value in quotes"),
    ],
)
def test_syntax_errors_are_plain_sentences_with_a_line(
    data: bytes, line: int, sentence: str
) -> None:
    """PyYAML's parser messages become one plain sentence naming the line that matters."""
    error = rejected(data)
    assert error.line == line
    assert str(error).startswith("invalid YAML: ")
    assert sentence in str(error)
    assert "<" not in str(error)  # none of PyYAML's <block end> tokens
