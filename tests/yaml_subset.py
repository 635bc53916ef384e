"""A strict parser for the YAML subset deploy/ is written in (PyYAML is not a dependency).

Supported: ``---`` documents, comments, block mappings and sequences (a mapping may start on
a ``- `` line), plain, single- and double-quoted scalars, one-line flow sequences of
scalars, ``{}``, and ``|`` / ``|-`` literal blocks.  Plain scalars are null, true/false,
integers, floats or strings.  Everything else raises ``YamlSubsetError`` with the line:
anchors, aliases, tags, flow mappings, tabs, duplicate keys, and the YAML 1.1 booleans
(``yes``, ``on``, ...) that parsers disagree on and must be quoted.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

_KEY = re.compile(r"""^("(?:[^"\\]|\\.)*"|'(?:[^']|'')*'|[^\s#'"{}\[\],&*!|>%@`-][^#]*?)"""
                  r"""\s*:(?:\s+|$)""")
_INT = re.compile(r"^[-+]?(0|[1-9]\d*)$")
_FLOAT = re.compile(r"^[-+]?\d+\.\d+$")
_AMBIGUOUS = {"yes", "no", "on", "off", "y", "n"}


class YamlSubsetError(ValueError):
    """Text outside the supported subset, or not valid YAML."""


@dataclass
class _Line:
    number: int
    indent: int
    text: str  # without indentation and trailing comment


def parse_all(source: str) -> list[Any]:
    """Every non-empty document of ``source``."""
    documents: list[list[str]] = [[]]
    for raw in source.splitlines():
        if raw.rstrip() == "---":
            documents.append([])
        else:
            documents[-1].append(raw)
    parsed = [_Parser(lines, offset).document() for lines, offset in _with_offsets(documents)]
    return [doc for doc in parsed if doc is not None]


def _with_offsets(documents: list[list[str]]) -> list[tuple[list[str], int]]:
    result, offset = [], 0
    for lines in documents:
        result.append((lines, offset))
        offset += len(lines) + 1
    return result


def _strip_comment(text: str) -> str:
    quote = None
    for i, char in enumerate(text):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"" and (i == 0 or text[i - 1] in " [,:-"):
            quote = char
        elif char == "#" and (i == 0 or text[i - 1] == " "):
            return text[:i].rstrip()
    return text.rstrip()


class _Parser:
    def __init__(self, raw: list[str], offset: int) -> None:
        self.raw = raw
        self.offset = offset
        self.pos = 0

    def fail(self, message: str, index: int | None = None) -> YamlSubsetError:
        line = self.offset + (self.pos if index is None else index) + 1
        return YamlSubsetError(f"line {line}: {message}")

    def peek(self) -> _Line | None:
        while self.pos < len(self.raw):
            raw = self.raw[self.pos]
            if "\t" in raw[: len(raw) - len(raw.lstrip())]:
                raise self.fail("tab in indentation")
            text = _strip_comment(raw.strip())
            if text:
                return _Line(self.pos, len(raw) - len(raw.lstrip()), text)
            self.pos += 1
        return None

    def document(self) -> Any:
        first = self.peek()
        if first is None:
            return None
        value = self.block(first.indent)
        if self.peek() is not None:
            raise self.fail("unexpected indentation")
        return value

    def block(self, indent: int) -> Any:
        line = self.peek()
        assert line is not None
        if _is_item(line.text):
            return self.sequence(indent)
        if _KEY.match(line.text):
            return self.mapping(indent)
        raise self.fail(f"expected 'key: value' or '- item', got {line.text!r}")

    def nested(self, indent: int, *, sequence_allowed: bool) -> Any:
        line = self.peek()
        if line is None or line.indent < indent:
            return None
        if line.indent > indent or (sequence_allowed and _is_item(line.text)):
            return self.block(line.indent)
        return None

    def mapping(self, indent: int) -> dict[str, Any]:
        result: dict[str, Any] = {}
        while (line := self.peek()) is not None and line.indent == indent:
            match = _KEY.match(line.text)
            if match is None or _is_item(line.text):
                break
            key = _scalar(match.group(1), self)
            rest = line.text[match.end():]
            if not isinstance(key, str) or key in result:
                raise self.fail(f"duplicate or non-string key {key!r}")
            if rest in ("|", "|-"):
                self.pos += 1
                result[key] = self.literal(indent, keep_newline=rest == "|")
            elif rest:
                result[key] = _scalar(rest, self)
                self.pos += 1
            else:
                self.pos += 1
                result[key] = self.nested(indent, sequence_allowed=True)
        return result

    def sequence(self, indent: int) -> list[Any]:
        items: list[Any] = []
        while (line := self.peek()) is not None and line.indent == indent:
            if not _is_item(line.text):
                break
            rest = line.text[1:].lstrip()
            if _is_item(rest):
                raise self.fail("'- - item' (a sequence inside a sequence) is not supported")
            if not rest:
                self.pos += 1
                items.append(self.nested(indent + 1, sequence_allowed=False))
            elif _KEY.match(rest):
                # "- key: value": the mapping's column is that of "key"
                column = indent + len(line.text) - len(rest)
                self.raw[self.pos] = " " * column + self.raw[self.pos].strip()[len(
                    line.text) - len(rest):]
                items.append(self.mapping(column))
            else:
                items.append(_scalar(rest, self))
                self.pos += 1
        return items

    def literal(self, indent: int, *, keep_newline: bool) -> str:
        lines: list[str] = []
        column = None
        while self.pos < len(self.raw):
            raw = self.raw[self.pos]
            width = len(raw) - len(raw.lstrip())
            if raw.strip() and width <= indent:
                break
            if raw.strip() and column is None:
                column = width
            lines.append(raw[column:] if raw.strip() else "")
            self.pos += 1
        text = "\n".join(lines).rstrip("\n")
        return text + "\n" if keep_newline and text else text


def _is_item(text: str) -> bool:
    return text == "-" or text.startswith("- ")


def _scalar(text: str, parser: _Parser) -> Any:
    if text.startswith('"'):
        if not text.endswith('"') or len(text) < 2:
            raise parser.fail(f"unterminated double-quoted scalar {text!r}")
        try:
            return json.loads(text)
        except ValueError as exc:
            raise parser.fail(f"bad double-quoted scalar {text!r}: {exc}") from exc
    if text.startswith("'"):
        if not text.endswith("'") or len(text) < 2:
            raise parser.fail(f"unterminated single-quoted scalar {text!r}")
        return text[1:-1].replace("''", "'")
    if text.startswith("["):
        return _flow_sequence(text, parser)
    if text == "{}":
        return {}
    if text[0] in "{&*!|>%@`":
        raise parser.fail(f"unsupported YAML construct: {text!r}")
    return _plain(text, parser)


def _plain(text: str, parser: _Parser) -> Any:
    if ": " in text or text.endswith(":"):
        raise parser.fail(f"': ' inside a plain scalar: {text!r} (quote it)")
    lowered = text.lower()
    if lowered in ("null", "~"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in _AMBIGUOUS:
        raise parser.fail(f"{text!r} is a boolean to some YAML parsers: quote it")
    if _INT.match(text):
        return int(text)
    if _FLOAT.match(text):
        return float(text)
    return text


def _flow_sequence(text: str, parser: _Parser) -> list[Any]:
    if not text.endswith("]"):
        raise parser.fail(f"a flow sequence must end on its line: {text!r}")
    inner = text[1:-1].strip()
    items, current, quote = [], "", None
    for char in inner:
        if quote:
            quote = None if char == quote and not current.endswith("\\") else quote
        elif char in "'\"":
            quote = char
        elif char in "[]{}":
            raise parser.fail(f"nested flow collections are not supported: {text!r}")
        elif char == ",":
            items.append(current.strip())
            current = ""
            continue
        current += char
    if quote:
        raise parser.fail(f"unterminated quote in {text!r}")
    if current.strip():
        items.append(current.strip())
    if any(not item for item in items):
        raise parser.fail(f"empty item in {text!r}")
    return [_scalar(item, parser) for item in items]
