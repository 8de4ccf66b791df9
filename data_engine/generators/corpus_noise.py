"""Planted noise for the demo corpus: the work that dedup, quality and ingest must do.

  * near duplicates: a few words edited, a boilerplate line added, a header
    prepended; word-5-gram Jaccard with the original stays >= 0.8;
  * junk rows: symbol soup, one line repeated, very short rows, lorem ipsum,
    and paragraphs full of (fake) emails, phone numbers, IPs and API keys;
  * malformed JSONL lines, one kind per ingest reject reason.

Exact duplicates need no generator: the same text under a new id.
All values are made up: example.com mail, 555 phone numbers, documentation IP
ranges (RFC 5737) and random key-shaped strings.
"""
from __future__ import annotations

import json
import random
import re
import string

JUNK_KINDS = ("symbol_soup", "repeated_lines", "very_short", "lorem_ipsum", "pii")
# Named after the reasons data_engine.ingest gives, so counts compare one to one.
MALFORMED_KINDS = ("bad_json", "missing_text", "wrong_type", "empty_text", "not_utf8")
NEAR_DUP_MIN_JACCARD = 0.8
NEAR_DUP_MIN_WORDS = 60

BOILERPLATE = (
    "Share this page with a friend.", "All rights reserved.", "Read more on our website.",
    "Click here to subscribe to our newsletter.", "Posted in Uncategorized.",
    "This page was last edited on 3 March.", "We use cookies to improve your experience.",
)
HEADERS = ("Updated:", "Posted by admin", "Reprinted with permission.", "[Archived copy]")
_NAV_LINES = ("Home | About | Contact | Login", "Loading...", "Buy now!!! Limited offer!!!",
              "404 Not Found", "Subscribe Subscribe Subscribe", "Next >>", "<br><br><br>")
_SHORT = ("ok", "Next page", "N/A", "thanks!", "click", "[deleted]", "see above", "+1", "lol", "Menu")
_LOREM = ("lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor "
          "incididunt ut labore et dolore magna aliqua enim ad minim veniam quis nostrud").split()
_SYMBOLS = "#$%&*@!~^|<>{}[]/\\=+_-;:?.,0123456789"


# ---------------------------------------------------------------- near duplicates
def word_shingles(text: str, n: int = 5) -> set[tuple[str, ...]]:
    words = text.lower().split()
    return {tuple(words[i:i + n]) for i in range(max(len(words) - n + 1, 1))}


def jaccard(a: str, b: str, n: int = 5) -> float:
    sa, sb = word_shingles(a, n), word_shingles(b, n)
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def near_duplicate(text: str, rng: random.Random) -> tuple[str, list[str], float]:
    """(edited text, edits applied, 5-gram Jaccard with ``text``), the Jaccard >= 0.8.

    ``text`` needs NEAR_DUP_MIN_WORDS words; fewer edits are tried until the
    copy is close enough, and a lone appended line always is at that length.
    """
    for n_edits in (3, 2, 2, 1, 1):
        edits = rng.sample(list(_EDITS), n_edits)
        new = text
        for name in edits:
            new = _EDITS[name](new, rng)
        score = jaccard(text, new)
        if new != text and score >= NEAR_DUP_MIN_JACCARD:
            return new, edits, score
    new = _append(text, rng)
    return new, ["append"], jaccard(text, new)


def _word_spans(text: str) -> list[re.Match]:
    return list(re.finditer(r"\S+", text))


def _substitute(text: str, rng: random.Random) -> str:
    """One word replaced by another word of the same text, as a careless edit would."""
    spans = _word_spans(text)
    target, donor = rng.sample(spans, 2)
    return text[:target.start()] + donor.group() + text[target.end():]


def _delete(text: str, rng: random.Random) -> str:
    target = rng.choice(_word_spans(text)[1:])
    return text[:target.start()].rstrip(" ") + text[target.end():]


def _typo(text: str, rng: random.Random) -> str:
    words = [m for m in _word_spans(text) if len(m.group()) >= 4]
    if not words:
        return _substitute(text, rng)
    m = rng.choice(words)
    w = m.group()
    i = rng.randrange(len(w) - 1)
    return text[:m.start()] + w[:i] + w[i + 1] + w[i] + w[i + 2:] + text[m.end():]


def _append(text: str, rng: random.Random) -> str:
    return f"{text}\n\n{rng.choice(BOILERPLATE)}"


def _prepend(text: str, rng: random.Random) -> str:
    return f"{rng.choice(HEADERS)}\n\n{text}"


_EDITS = {"substitute": _substitute, "delete": _delete, "typo": _typo,
          "append": _append, "prepend": _prepend}


# ---------------------------------------------------------------- junk
def junk_text(kind: str, rng: random.Random) -> tuple[str, dict]:
    """(text, extra meta) of one junk row of ``kind`` (one of JUNK_KINDS)."""
    if kind not in JUNK_KINDS:
        raise ValueError(f"kind must be one of {JUNK_KINDS}, got {kind!r}")
    if kind == "pii":
        return _pii(rng)
    return _JUNK[kind](rng), {}


def _symbol_soup(rng: random.Random) -> str:
    size = rng.randint(60, 400)
    return "".join(rng.choice(_SYMBOLS + " " * 4) for _ in range(size)).strip() or "#$%"


def _repeated_lines(rng: random.Random) -> str:
    line = rng.choice(_NAV_LINES)
    return "\n".join([line] * rng.randint(6, 30))


def _very_short(rng: random.Random) -> str:
    return rng.choice([rng.choice(_SHORT), f"Page {rng.randint(2, 99)} of {rng.randint(100, 400)}",
                       f"Item #{rng.randint(1000, 99999)}"])


def _lorem_ipsum(rng: random.Random) -> str:
    words = [rng.choice(_LOREM) for _ in range(rng.randint(30, 120))]
    return "Lorem ipsum " + " ".join(words) + "."


_JUNK = {"symbol_soup": _symbol_soup, "repeated_lines": _repeated_lines,
         "very_short": _very_short, "lorem_ipsum": _lorem_ipsum}

_PII_TEMPLATES = (
    "Please contact {name} at {email} or call {phone} if the invoice is wrong.",
    "The staging server runs at {ip}; log in with the key {key} and do not share it.",
    "Forwarded message from {email}: my new number is {phone}, my office is in building 4.",
    "Config dump: host={ip} user={user} api_key={key} retries=3",
    "Hi {name}, the backup at {ip} failed again. Ping me at {email} or {phone}. Token: {key}",
)
_FIRST = ("jane", "omar", "li", "maria", "tom", "aiko", "pavel", "nia", "carlos", "emma")
_LAST = ("doe", "haddad", "wei", "garcia", "smith", "tanaka", "novak", "okafor", "ruiz", "berg")


def _pii(rng: random.Random) -> tuple[str, dict]:
    first, last = rng.choice(_FIRST), rng.choice(_LAST)
    values = {
        "name": f"{first.capitalize()} {last.capitalize()}", "user": f"{first}{rng.randint(1, 99)}",
        "email": f"{first}.{last}{rng.randint(1, 99)}@example.com",
        "phone": f"+1 555-01{rng.randint(0, 99):02d}",  # 555-0100..0199: reserved for fiction
        "ip": rng.choice(["192.0.2", "198.51.100", "203.0.113"]) + f".{rng.randint(1, 254)}",
        "key": _fake_key(rng),
    }
    lines = [t.format(**values) for t in rng.sample(_PII_TEMPLATES, rng.randint(2, 3))]
    text = " ".join(lines)
    kinds = [kind for kind, slot in (("email", "email"), ("phone", "phone"), ("ip", "ip"), ("api_key", "key"))
             if values[slot] in text]
    return text, {"pii": ",".join(kinds)}


def _fake_key(rng: random.Random) -> str:
    alnum = string.ascii_letters + string.digits
    prefix, size, chars = rng.choice([("sk-", 40, alnum),
                                      ("AKIA", 16, string.ascii_uppercase + string.digits),
                                      ("tok_", 32, string.hexdigits.lower()[:16])])
    return prefix + "".join(rng.choice(chars) for _ in range(size))


# ---------------------------------------------------------------- malformed lines
def malformed_line(kind: str, rng: random.Random, row_id: str) -> bytes:
    """One JSONL line (no newline) that ingest must reject with reason ``kind``."""
    if kind not in MALFORMED_KINDS:
        raise ValueError(f"kind must be one of {MALFORMED_KINDS}, got {kind!r}")
    text = " ".join(rng.choice(_LOREM) for _ in range(12))
    if kind == "bad_json":
        whole = json.dumps({"id": row_id, "text": text, "source": "noise-malformed"})
        return rng.choice([whole[: len(whole) // 2], whole.replace('"', "'"), whole[:-1] + ",}"]).encode()
    if kind == "not_utf8":  # Latin-1 bytes in a UTF-8 file: the classic mojibake source
        return json.dumps({"id": row_id, "text": "caf\u00e9 " + text, "source": "noise-malformed"},
                          ensure_ascii=False).encode("latin-1")
    row = {"id": row_id, "source": "noise-malformed"}
    if kind == "missing_text":
        row.update(rng.choice([{"body": text}, {"text": None}, {}]))
    elif kind == "wrong_type":
        row["text"] = rng.choice([12345, [text], {"en": text}, True])
    else:
        row["text"] = rng.choice(["", "   ", "\n\t"])
    return json.dumps(row).encode()
