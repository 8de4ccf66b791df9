"""Quality, safety and PII filters over one batch of records.

    kept, rejected, counters = quality_batch(batch, QualityConfig())

Each row goes through the rules in a fixed order and is rejected by the first
one that fires; ``reason`` names it (``quality:<rule>``, ``safety:blocklist``,
``pii:<kind>``) and ``detail`` holds the measured value and the threshold.
Rows that survive have PII redacted (``<EMAIL>``, ``<PHONE>``, ``<IP>``,
``<SECRET>``) unless the config drops rows with that kind instead.

This module holds the config, the measurements and heuristic rules, and the batch
step; the safety filters (blocklist, PII) live in data_engine/safety.py.

The heuristics follow Gopher (Rae et al. 2021) and C4 (Raffel et al. 2020).
The corpus also holds Python source, docstrings and worked maths, so defaults
looser than Gopher's say why below; they were checked on stdlib docstrings and
source and on worked solutions. ``None`` switches a rule off.
"""
from __future__ import annotations

import re
from collections import Counter
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

import pyarrow as pa
from pydantic import Field, PrivateAttr

from data_engine.safety import (
    PII_KINDS, blocklist_pattern, blocklist_verdict, redact_all_pii, scrub_pii,
)
from data_engine.schema import ShardResult, Strict, reject_table

STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with",  # Gopher's eight
              "a", "an", "in", "is", "it", "its", "for", "on", "as", "by", "or", "if", "not",
              "are", "this", "from", "at", "was", "can", "will", "we", "then", "so", "than", "when")
PiiKind = Literal["secret", "email", "ip", "phone"]
PiiAction = Literal["redact", "drop"]
NgramN = Annotated[int, Field(ge=1)]
Fraction = Annotated[float, Field(ge=0, le=1)]


class QualityConfig(Strict):
    """Every threshold of the quality stage; ``None`` disables that rule."""
    # Gopher: 50..100k. 50 would drop 86% of stdlib docstrings and most short
    # problems; below 5 words ("Return self+value.") there is nothing to learn.
    min_words: int | None = Field(5, ge=0, description="quality:word_count below this many words")
    max_words: int | None = Field(100_000, ge=1, description="quality:word_count above this many words")
    # Gopher: 3..10. Code identifiers (os.path.join(...)) are long tokens,
    # and equations split into short ones.
    min_mean_word_length: float | None = Field(2.5, ge=0, description="quality:mean_word_length, in characters")
    max_mean_word_length: float | None = Field(12.0, ge=0, description=(
        "quality:mean_word_length, in characters"))
    # Hashtags (#word) and prose ellipses per word. Python comments ("# x")
    # and doctest continuation prompts ("... ") are not counted.
    max_symbol_word_ratio: float | None = Field(0.1, ge=0, description=(
        "quality:symbol_ratio, hashtags and ellipses per word"))
    # Gopher: 0.8. Source and equations have many tokens without a letter
    # ("=", "+", "0", "2x^2" has one); 0.5 still catches number tables.
    min_alpha_word_ratio: float | None = Field(0.5, ge=0, le=1, description=(
        "quality:alpha_words, share of words with a letter"))
    max_bullet_line_frac: float | None = Field(0.9, ge=0, le=1, description=(
        "quality:bullet_lines, share of lines starting with a bullet"))
    max_ellipsis_line_frac: float | None = Field(0.3, ge=0, le=1, description=(
        "quality:ellipsis_lines, share of lines ending in ..."))
    # Gopher: 0.3 / 0.2. Lines are compared stripped; blank lines and lines
    # without a letter or digit ("}", ")", '\"\"\"') are ignored, since code repeats them.
    max_dup_line_frac: float | None = Field(0.3, ge=0, le=1, description=(
        "quality:dup_lines, share of lines repeating an earlier one"))
    max_dup_line_char_frac: float | None = Field(0.2, ge=0, le=1, description=(
        "quality:dup_line_chars, chars in repeated lines / all"))
    max_top_ngram_char_frac: dict[NgramN, Fraction] = Field(
        default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16}, description=(
        "quality:top_<n>gram: n -> max chars of the top n-gram"))
    max_dup_ngram_char_frac: dict[NgramN, Fraction] = Field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}, description=(
        "quality:dup_<n>gram: n -> max chars in repeated n-grams"))
    # Gopher: 2 of its 8 stop words. Here 1 of a wider set of function words:
    # short docstrings ("Return True if x is odd.") lack Gopher's 8, while
    # word salad, keyword lists and tables still hold none.
    min_stop_words: int | None = Field(1, ge=0, description="quality:stop_words, fewest stop words a row needs")
    stop_words: list[str] = Field(default_factory=lambda: list(STOP_WORDS), description=(
        "the words min_stop_words counts"))
    # Code and equation-heavy text (at least code_line_frac of its non-empty
    # lines look like code: keywords, "x = ...", trailing ":" or brackets) is
    # judged with these fields replaced: code has few stop words, long
    # identifiers, one-letter names and repeated idioms ("self.x + other.x");
    # equations are mostly tokens without letters, and step-by-step solutions
    # repeat their phrasing ("so the expression becomes"). Duplicate *lines*
    # are still judged as prose.
    code_line_frac: float | None = Field(0.5, ge=0, le=1, description=(
        "share of code-like lines from which code_overrides apply"))
    code_overrides: dict[str, Any] = Field(default_factory=lambda: {
        "min_stop_words": None, "min_alpha_word_ratio": 0.15,
        "min_mean_word_length": 1.0, "max_mean_word_length": 20.0,
        "max_top_ngram_char_frac": {2: 0.35, 3: 0.3, 4: 0.3},
        "max_dup_ngram_char_frac": {5: 0.45, 6: 0.42, 7: 0.39, 8: 0.36, 9: 0.33, 10: 0.3}}, description=(
        "fields replaced when judging code-like text"))
    # C4-style page junk; any match rejects. C4's "{" rule is left out: code.
    junk_phrases: list[str] = Field(default_factory=lambda: [
        "lorem ipsum", "enable javascript", "javascript is disabled",
        "javascript must be enabled", "please enable cookies", "uses cookies to"], description=(
        "quality:junk_phrase, any one rejects (case-insensitive)"))
    # Safety. blocklist_file None = data_engine/resources/blocklist.txt.
    blocklist_file: Path | None = Field(None, description="one term per line; None: the shipped list")
    blocklist_extra: list[str] = Field(default_factory=list, description="terms added to the blocklist")
    blocklist_min_hits: int | None = Field(1, ge=1, description="safety:blocklist at this many hits; None: off")
    pii_kinds: list[PiiKind] = Field(default_factory=lambda: list(PII_KINDS), description=(
        "PII searched for: secret, email, ip, phone"))
    pii_action: PiiAction = Field("redact", description=(
        "redact (to <EMAIL>, <PHONE>, ...) or drop (reject pii:<kind>)"))
    pii_action_by_kind: dict[PiiKind, PiiAction] = Field(default_factory=dict, description=(
        "per-kind pii_action, e.g. {secret: drop}"))
    redact_rejected: bool = Field(False, description=(
        "rejected/ keeps rows as they came, for audit; true: with every PII kind found redacted"))
    # Loopback, unspecified, link-local, multicast and reserved addresses
    # (127.0.0.1, 0.0.0.0, ::1, 255.255.255.0) are in every tutorial and name
    # no one's machine. Private ranges are redacted: config dumps leak them.
    ip_skip_local: bool = Field(True, description="leave loopback, link-local and reserved IPs alone")
    _code: "QualityConfig" = PrivateAttr()

    def model_post_init(self, _context: Any) -> None:
        # Built and validated once, here: an unknown or bad override fails at
        # config time, naming its key (extra="forbid").
        fields = {**self.model_dump(), **self.code_overrides, "code_overrides": {}}
        try:
            self._code = type(self)(**fields) if self.code_overrides else self
        except ValueError as err:
            raise ValueError(f"quality.code_overrides: {err}") from None

    def for_text(self, doc: "Doc") -> "QualityConfig":
        """The config that judges ``doc``: the code variant for code-like text."""
        is_code = self.code_line_frac is not None and code_line_frac(doc) >= self.code_line_frac
        return self._code if is_code else self


# --- measurements ---------------------------------------------------------------

_BULLETS = ("-", "*", "•", "·", "▪", "‣", "◦", "●", "–", "—", "➢", "►")
_PROSE_ELLIPSIS = re.compile(r"(?<=\S)(?:\.\.\.|…)|(?<!\S)…")
_HASHTAG = re.compile(r"(?<!\S)#\w")
_CODE_LINE = re.compile(  # code, an equation or arithmetic, or a reasoning-format tag
    r"^(?:(?:def|class|return|import|from|if|elif|else|for|while|try|except|finally|with|raise"
    r"|yield|assert|pass|break|continue|lambda|async|await|del|global|nonlocal)\b|@\w|#[\s!]|>>>|\.\.\.)"
    r"|[:()\[{,;\\]$|^[)\]}]|\s[-+*/%]?=\s|==|\w\.\w+\(|\d\s*[-+*/^=<>]\s*[-(\d]"
    r"|\[-?\d|\w=\w|^</?(?:think|answer)>")
_ALPHA_WORD = re.compile(r"\S*[^\W\d_]\S*")  # one match per word holding a letter
_ALNUM = re.compile(r"[^\W_]")
_STRIP = "\"'`.,;:!?()[]{}<>*_~"


class Doc:
    """One text with the pieces the rules share, computed once."""

    def __init__(self, text: str):
        self.text = text
        self.words = text.split()
        self.nonempty = [line for line in map(str.strip, text.splitlines()) if line]
        # the smallest n seen with no repeated word n-gram: then no longer n-gram repeats either
        self.unique_from: int | None = None

    def known_unique(self, n: int) -> bool:
        """True when no word n-gram can repeat (known from this or a shorter n)."""
        return self.unique_from is not None and n >= self.unique_from

    def saw_unique(self, n: int) -> None:
        self.unique_from = n if self.unique_from is None else min(n, self.unique_from)

    @cached_property  # two rules read it
    def bare_words(self) -> list[str]:
        return [w for w in (w.strip(_STRIP) for w in self.words) if w]


def mean_word_length(doc: Doc) -> float:
    words = doc.bare_words
    return sum(map(len, words)) / len(words) if words else 0.0


def symbol_word_ratio(doc: Doc) -> float:
    text = doc.text  # the substring tests skip a regex scan that could not match
    symbols = (len(_HASHTAG.findall(text)) if "#" in text else 0) \
        + (len(_PROSE_ELLIPSIS.findall(text)) if "..." in text or "…" in text else 0)
    return symbols / max(len(doc.words), 1)


def alpha_word_ratio(doc: Doc) -> float:
    return len(_ALPHA_WORD.findall(doc.text)) / max(len(doc.words), 1)


def _line_frac(doc: Doc, predicate: Callable[[str], bool]) -> float:
    return sum(map(predicate, doc.nonempty)) / max(len(doc.nonempty), 1)


def bullet_line_frac(doc: Doc) -> float:
    return _line_frac(doc, lambda line: line.startswith(_BULLETS))


def ellipsis_line_frac(doc: Doc) -> float:
    return _line_frac(doc, lambda line: line.endswith(("...", "…")))


def code_line_frac(doc: Doc) -> float:
    """Share of non-empty lines that look like code or an equation."""
    return _line_frac(doc, lambda line: bool(_CODE_LINE.search(line)))


def _dup_lines(doc: Doc) -> tuple[int, list[str]]:
    """(lines considered, the lines that repeat an earlier one)."""
    lines = [line for line in doc.nonempty if _ALNUM.search(line)]
    seen: set[str] = set()
    dups = [line for line in lines if line in seen or seen.add(line)]
    return len(lines), dups


def dup_line_frac(doc: Doc) -> float:
    n_lines, dups = _dup_lines(doc)
    return len(dups) / max(n_lines, 1)


def dup_line_char_frac(doc: Doc) -> float:
    return sum(map(len, _dup_lines(doc)[1])) / max(len(doc.text), 1)


def _ngrams(doc: Doc, n: int) -> list[tuple[str, ...]]:
    return list(zip(*(doc.words[i:] for i in range(n))))


def _gram_chars(gram: tuple[str, ...]) -> int:
    return sum(map(len, gram)) + len(gram) - 1  # as if joined by single spaces


def top_ngram_char_frac(doc: Doc, n: int) -> float:
    """Chars covered by the most frequent word n-gram (if it repeats) / all chars."""
    if doc.known_unique(n):
        return 0.0
    grams = Counter(_ngrams(doc, n))
    if not grams:
        return 0.0
    gram, count = grams.most_common(1)[0]
    if count == 1:
        doc.saw_unique(n)
    return _gram_chars(gram) * count / max(len(doc.text), 1) if count > 1 else 0.0


def dup_ngram_char_frac(doc: Doc, n: int) -> float:
    """Chars in n-grams seen before (non-overlapping, as Gopher) / all chars."""
    if doc.known_unique(n):
        return 0.0
    grams = _ngrams(doc, n)
    if len(set(grams)) == len(grams):
        doc.saw_unique(n)
        return 0.0  # the common case, decided without the scan below
    seen, dup_chars, i = set(), 0, 0
    while i < len(grams):
        if grams[i] in seen:
            dup_chars += _gram_chars(grams[i])
            i += n
        else:
            seen.add(grams[i])
            i += 1
    return dup_chars / max(len(doc.text), 1)


def stop_word_count(doc: Doc, stop_words: list[str]) -> int:
    stops = frozenset(w.lower() for w in stop_words)
    return sum(w.lower() in stops for w in doc.bare_words)


# --- rules: each returns None, or (rule name, detail) ------------------------------

Verdict = tuple[str, dict] | None


def _bound(rule: str, value: float, lo: float | None = None, hi: float | None = None) -> Verdict:
    if lo is not None and value < lo:
        return rule, {"value": round(value, 4), "min": lo}
    if hi is not None and value > hi:
        return rule, {"value": round(value, 4), "max": hi}
    return None


def _range_rule(name: str, measure: Callable[[Doc, QualityConfig], float], lo_key: str | None,
                hi_key: str | None):
    def rule(doc: Doc, cfg: QualityConfig) -> Verdict:
        lo = getattr(cfg, lo_key) if lo_key else None
        hi = getattr(cfg, hi_key) if hi_key else None
        return None if lo is None and hi is None else _bound(name, measure(doc, cfg), lo, hi)
    return rule


def _ngram_rule(prefix: str, measure: Callable[[Doc, int], float], key: str):
    def rule(doc: Doc, cfg: QualityConfig) -> Verdict:
        verdicts = (_bound(f"{prefix}_{n}gram", measure(doc, n), hi=limit)
                    for n, limit in sorted(getattr(cfg, key).items()))
        return next((v for v in verdicts if v), None)  # lazily: stop at the first
    return rule


def _rule_junk(doc: Doc, cfg: QualityConfig) -> Verdict:
    lowered = doc.text.lower()
    hit = next((p for p in cfg.junk_phrases if p.lower() in lowered), None)
    return ("junk_phrase", {"phrase": hit}) if hit else None


# In order of cost; the first that fires names the reason (quality:<name>,
# with n for the n-gram rules: quality:top_2gram, quality:dup_5gram, ...).
QUALITY_RULES: dict[str, Callable[[Doc, QualityConfig], Verdict]] = {
    name: _range_rule(name, lambda d, c, f=measure: f(d), lo, hi)
    for name, measure, lo, hi in (
        ("word_count", lambda d: len(d.words), "min_words", "max_words"),
        ("mean_word_length", mean_word_length, "min_mean_word_length", "max_mean_word_length"),
        ("symbol_ratio", symbol_word_ratio, None, "max_symbol_word_ratio"),
        ("alpha_words", alpha_word_ratio, "min_alpha_word_ratio", None),
        ("bullet_lines", bullet_line_frac, None, "max_bullet_line_frac"),
        ("ellipsis_lines", ellipsis_line_frac, None, "max_ellipsis_line_frac"),
        ("dup_lines", dup_line_frac, None, "max_dup_line_frac"),
        ("dup_line_chars", dup_line_char_frac, None, "max_dup_line_char_frac"))
} | {
    "stop_words": _range_rule("stop_words", lambda d, c: stop_word_count(d, c.stop_words),
                              "min_stop_words", None),
    "junk_phrase": _rule_junk,
    "top_ngram": _ngram_rule("top", top_ngram_char_frac, "max_top_ngram_char_frac"),
    "dup_ngram": _ngram_rule("dup", dup_ngram_char_frac, "max_dup_ngram_char_frac"),
}


def quality_verdict(text: str, cfg: QualityConfig) -> Verdict:
    """The first quality rule that rejects ``text``, or None."""
    doc = Doc(text)
    cfg = cfg.for_text(doc)
    return next((v for v in (rule(doc, cfg) for rule in QUALITY_RULES.values()) if v), None)


# --- the batch step -----------------------------------------------------------------

def _check_row(text: str, cfg: QualityConfig, blocklist: re.Pattern | None
               ) -> tuple[str, dict[str, int], Verdict]:
    """(text to keep, redactions per kind, (reason, detail) if rejected)."""
    verdict = quality_verdict(text, cfg)
    if verdict:
        return text, {}, (f"quality:{verdict[0]}", verdict[1])
    verdict = blocklist_verdict(text, cfg, blocklist)
    if verdict:
        return text, {}, (f"safety:{verdict[0]}", verdict[1])
    redacted, counts, verdict = scrub_pii(text, cfg)
    if verdict:
        return text, {}, (f"pii:{verdict[0]}", verdict[1])
    return redacted, counts, None


def quality_batch(batch: pa.Table, cfg: QualityConfig | None = None) -> ShardResult:
    """ShardResult(kept, rejected, counters) for one batch of records.

    kept: the input's columns, rows that pass, ``text`` redacted.
    rejected: REJECT_SCHEMA; reason is quality:<rule>, safety:blocklist or
    pii:<kind>; detail is JSON with the measured value and the threshold.
    counters: rows_in, rows_kept, rows_rejected, "reject:<reason>" per reason,
    "redact:<kind>" (spans replaced) and redacted_rows.
    """
    cfg = cfg or QualityConfig()
    ids, texts = batch.column("id").to_pylist(), batch.column("text").to_pylist()
    sources = batch["source"].to_pylist() if "source" in batch.column_names else [None] * len(ids)
    counters: Counter = Counter(rows_in=batch.num_rows)
    blocklist = blocklist_pattern(cfg) if cfg.blocklist_min_hits is not None else None
    new_texts, keep, rejected = [], [], []
    for row_id, text, source in zip(ids, texts, sources):
        out, redactions, verdict = _check_row(text or "", cfg, blocklist)
        keep.append(verdict is None)
        if verdict is None:
            new_texts.append(out)
            counters.update({f"redact:{k}": v for k, v in redactions.items()})
            counters["redacted_rows"] += bool(redactions)
        else:
            if cfg.redact_rejected and text:
                text = redact_all_pii(text, cfg)
            rejected.append({"id": row_id, "text": text, "source": source,
                             "reason": verdict[0], "detail": verdict[1]})
            counters[f"reject:{verdict[0]}"] += 1
    kept = batch.filter(pa.array(keep, pa.bool_()))
    field = batch.schema.field("text")  # keep the input's type (string or large_string)
    kept = kept.set_column(kept.schema.get_field_index("text"), field, pa.array(new_texts, field.type))
    counters.update(rows_kept=kept.num_rows, rows_rejected=len(rejected))
    return ShardResult(kept, reject_table(rejected), dict(counters))
