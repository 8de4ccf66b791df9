"""Quality, safety and PII: every rule fires on a crafted row and stays quiet
on prose, Python source and worked maths; exact redactions; drop mode."""
from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import textwrap

import pyarrow as pa
import pytest

from data_engine.quality import QUALITY_RULES, QualityConfig, quality_batch, quality_verdict
from data_engine.safety import blocklist_verdict, load_blocklist, scrub_pii
from data_engine.schema import RECORD_SCHEMA, REJECT_SCHEMA

PARAGRAPH = (
    "The river rises in the hills to the north of the town and runs for about forty miles "
    "before it reaches the sea. In the spring the water is high and fast, and the old mill "
    "on the east bank still turns for a few weeks each year. Most of the farms along the "
    "valley grow barley and keep a small herd of cattle, and the market on Saturday is where "
    "the whole district meets to trade, talk and argue about the weather.")

PYTHON_FUNCTION = textwrap.dedent('''\
    def moving_average(values, window):
        """Return the moving averages of ``values`` over ``window`` items.

        The first result is the mean of the first ``window`` values; each next
        one drops the oldest value and adds the newest.

        >>> moving_average([1, 2, 3, 4], 2)
        [1.5, 2.5, 3.5]
        """
        if window <= 0:
            raise ValueError("window must be positive")
        total = sum(values[:window])
        out = [total / window]
        for i in range(window, len(values)):
            total += values[i] - values[i - window]
            out.append(total / window)
        return out
    ''')

MATH_SOLUTIONS = [
    r"""Problem: Find the number of positive integers $n \le 100$ such that $n^2 + n$ is divisible by 6.

Solution: Since $n^2 + n = n(n+1)$ is a product of two consecutive integers, it is always even. So we need $3 \mid n(n+1)$, which holds when $n \equiv 0$ or $n \equiv 2 \pmod 3$. Among $1, \dots, 100$ there are 33 multiples of 3 and 33 numbers congruent to 2 mod 3. Hence the answer is $33 + 33 = 66$.""",
    """To find the greatest common divisor of 252 and 198, apply the Euclidean algorithm:
252 = 1 * 198 + 54
198 = 3 * 54 + 36
54 = 1 * 36 + 18
36 = 2 * 18 + 0
The last nonzero remainder is 18, so gcd(252, 198) = 18.""",
    """Compute (15 + (48 + 46)) * 7 - 38.

<think>
48 + 46 = 94, so the expression becomes (15 + 94) * 7 - 38.
15 + 94 = 109, so the expression becomes 109 * 7 - 38.
109 * 7 = 763, so the expression becomes 763 - 38.
763 - 38 = 725.
So the value is 725.
</think>
<answer>725</answer>""",
    """Step 1: 3x - 7 = 2x + 5
Step 2: 3x - 2x = 5 + 7
Step 3: x = 12
Answer: x = 12""",
]

REPEATED = "alpha beta gamma delta epsilon zeta eta theta iota kappa"
NGRAM_TEXT = f"The start of the text {REPEATED} then the middle part of it and {REPEATED} and the end"
SHORT_LINES = ["One of the lines.", "Two of the lines.", "Three of them.", "Four is here.",
               "Five is there.", "Six of the set.", "Seven at the end.", "Eight to go.",
               "Nine is fine.", "Ten is the last."]
LONG_LINE = "This long line is repeated once so that its characters weigh a lot in the text."

# (expected reason, text, config overrides isolating the rule where others would fire first)
CRAFTED = [
    ("quality:word_count", "Too short here.", {}),
    ("quality:word_count", " ".join(["the word"] * 10), {"max_words": 10}),
    ("quality:mean_word_length", "I a o u e y i a o u and the", {}),
    ("quality:mean_word_length", "The antidisestablishmentarianism supercalifragilisticexpialidocious "
     "pneumonoultramicroscopic floccinaucinihilipilification characterisation", {}),
    ("quality:symbol_ratio", "#love #life #happy #summer #sun #beach and the day was great", {}),
    ("quality:alpha_words", "The values are 123 345 567 789 901 113 223 334 445 556 667 778", {}),
    ("quality:bullet_lines", "- the first item of the list\n- the second item of the list\n"
     "- the third item here\n- and the fourth one", {}),
    ("quality:ellipsis_lines", "The story begins in the dark and cold night of the year...\n"
     "Then the hero wakes up in his small bed and looks around...\n"
     "She opens the old wooden door of the house very slowly...\n"
     "And that is the end of the tale we tell.", {}),
    ("quality:dup_lines", "Click here to read the news\nClick here to read the news\n"
     "Click here to read the news\nThe weather is fine today", {}),
    ("quality:dup_line_chars", "\n".join(SHORT_LINES + [LONG_LINE, LONG_LINE]), {}),
    ("quality:stop_words", "Apples bananas cherries grapes lemons mangoes oranges pears plums", {}),
    ("quality:junk_phrase", "Please enable JavaScript to view the comments on this page.", {}),
    ("quality:top_2gram", "the cat of the house and the dog of the farm and the bird of the tree "
     "with the fox of the wood", {}),
    ("quality:top_4gram", NGRAM_TEXT, {}),
    ("safety:blocklist", "This page links to free porn videos and more of the same.", {}),
] + [(f"quality:top_{n}gram", NGRAM_TEXT,
      {"max_top_ngram_char_frac": {n: 0.1}, "max_dup_ngram_char_frac": {}}) for n in (3, 4)] \
  + [(f"quality:dup_{n}gram", NGRAM_TEXT,
      {"max_top_ngram_char_frac": {}, "max_dup_ngram_char_frac": {n: 0.1}}) for n in range(5, 11)]


def batch(texts: list[str]) -> pa.Table:
    return pa.table({"id": [f"r{i}" for i in range(len(texts))], "text": texts,
                     "source": ["test"] * len(texts), "meta": ["{}"] * len(texts)},
                    schema=RECORD_SCHEMA)


def assert_partition(table: pa.Table, kept: pa.Table, rejected: pa.Table, counters: dict):
    kept_ids, rej_ids = kept["id"].to_pylist(), rejected["id"].to_pylist()
    assert sorted(kept_ids + rej_ids) == sorted(table["id"].to_pylist())
    assert not set(kept_ids) & set(rej_ids)
    assert kept.schema == table.schema and rejected.schema == REJECT_SCHEMA
    assert counters["rows_in"] == table.num_rows == counters["rows_kept"] + counters["rows_rejected"]
    assert sum(v for k, v in counters.items() if k.startswith("reject:")) == rejected.num_rows


@pytest.mark.parametrize("reason, text, overrides", CRAFTED,
                         ids=[f"{r}-{i}" for i, (r, _, _) in enumerate(CRAFTED)])
def test_each_rule_fires_on_its_crafted_row(reason, text, overrides):
    table = batch([text])
    kept, rejected, counters = quality_batch(table, QualityConfig(**overrides))
    assert_partition(table, kept, rejected, counters)
    assert rejected["reason"].to_pylist() == [reason]
    assert counters[f"reject:{reason}"] == 1
    detail = json.loads(rejected["detail"][0].as_py())
    if reason != "quality:junk_phrase":
        assert "value" in detail and ("min" in detail or "max" in detail)


def test_every_rule_has_a_crafted_row():
    fired = {r.split(":")[1] for r, _, _ in CRAFTED}
    named = {"top_ngram": "top_2gram", "dup_ngram": "dup_5gram"}
    assert {named.get(rule, rule) for rule in QUALITY_RULES} <= fired


def test_detail_holds_value_and_threshold():
    _, rejected, _ = quality_batch(batch(["Too short here."]))
    assert json.loads(rejected["detail"][0].as_py()) == {"value": 3, "min": 5}


@pytest.mark.parametrize("text", [PARAGRAPH, PYTHON_FUNCTION, *MATH_SOLUTIONS],
                         ids=["paragraph", "python", "math-aops", "math-gcd", "math-steps",
                              "math-linear"])
def test_rules_do_not_fire_on_good_text(text):
    assert quality_verdict(text, QualityConfig()) is None
    kept, rejected, _ = quality_batch(batch([text]))
    assert rejected.num_rows == 0 and kept["text"].to_pylist() == [text]


def _stdlib_texts() -> tuple[list[str], list[str]]:
    """Docstrings and function sources (5+ words; shorter fail word_count by design)."""
    docs, sources = [], []
    for name in ("argparse", "collections", "json", "statistics", "textwrap", "string",
                 "functools", "pathlib", "difflib", "fractions", "heapq", "shutil", "calendar"):
        module = importlib.import_module(name)
        for _, obj in inspect.getmembers(module):
            if getattr(obj, "__module__", None) != name:
                continue
            methods = [m for _, m in inspect.getmembers(obj, inspect.isfunction)] \
                if inspect.isclass(obj) else []
            for item in [obj, *methods]:
                docs.append(inspect.getdoc(item) or "")
                with contextlib.suppress(OSError, TypeError):
                    sources.append(inspect.getsource(item) if inspect.isfunction(item) else "")
    return ([d for d in docs if len(d.split()) >= 5], [s for s in sources if len(s.split()) >= 5])


def test_stdlib_docstrings_and_source_are_not_rejected_en_masse():
    cfg = QualityConfig()
    for texts in _stdlib_texts():
        rejected = sum(quality_verdict(t, cfg) is not None for t in texts)
        assert len(texts) > 500 and rejected / len(texts) < 0.05, (rejected, len(texts))


def test_rules_switch_off_with_none():
    text = "Apples bananas cherries grapes lemons mangoes oranges pears plums"
    assert quality_verdict(text, QualityConfig(min_stop_words=None)) is None


# --- safety ------------------------------------------------------------------------------

def test_blocklist_matches_words_case_insensitively_on_boundaries(tmp_path):
    cfg = QualityConfig()
    hit = blocklist_verdict("Visit PornHub or watch free   porn here.", cfg)
    assert hit == ("blocklist", {"value": 2, "min": 1, "terms": ["free porn", "pornhub"]})
    assert blocklist_verdict("He studied the kysela reaction and unicorns.", cfg) is None
    assert "child pornography" in load_blocklist(None)
    custom = tmp_path / "terms.txt"
    custom.write_text("# comment\nbad phrase\n")
    cfg = QualityConfig(blocklist_file=str(custom), blocklist_extra=["worse"])
    assert blocklist_verdict("A BAD  phrase and worse.", cfg)[1]["terms"] == ["bad phrase", "worse"]
    assert blocklist_verdict("free porn", cfg) is None  # the default list is replaced
    custom.write_text("# comment\nbad phrase\nnew term\n")  # edited: a live worker sees it
    assert blocklist_verdict("a new term", cfg)[1]["terms"] == ["new term"]


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="quality.blocklist_file"):
        quality_batch(batch([PARAGRAPH]), QualityConfig(blocklist_file=str(tmp_path / "no")))
    with pytest.raises(ValueError, match="code_overrides"):
        QualityConfig(code_overrides={"min_wordz": 3})
    with pytest.raises(ValueError, match="max_top_ngram_char_frac"):
        QualityConfig(max_top_ngram_char_frac={2: 1.5})
    with pytest.raises(ValueError, match="pii_action"):
        QualityConfig(pii_action="erase")


# --- PII -------------------------------------------------------------------------------

PII_TEXT = ("Write to jane.doe@example.com or call (212) 555-0147 or +44 20 7946 0958. "
            "The server is 203.0.113.9 (v6 2606:4700:4700::1111); use key AKIAIOSFODNN7EXAMPLE, "
            "token sk-proj-Abc123def456ghi789jkl012 and password=\"hunter22\". "
            "Digest a3f1c9e07b2d48e6f5a1b0c9d8e7f6a5.")
PII_REDACTED = ("Write to <EMAIL> or call <PHONE> or <PHONE>. The server is <IP> (v6 <IP>); "
                "use key <SECRET>, token <SECRET> and password=\"<SECRET>\". Digest <SECRET>.")


def test_pii_redaction_exact_output_and_counters():
    assert scrub_pii(PII_TEXT, QualityConfig()) == (
        PII_REDACTED, {"secret": 4, "email": 1, "ip": 2, "phone": 2}, None)
    key = ("Key:\n-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n"
           "-----END OPENSSH PRIVATE KEY-----\nDone.")
    assert scrub_pii(key, QualityConfig())[0] == "Key:\n<SECRET>\nDone."
    assert scrub_pii("login with password=Tr0ub4dor&3 now", QualityConfig())[0] == \
        "login with password=<SECRET> now"


def test_pii_lookalikes_are_left_alone():
    benign = ("Connect to 127.0.0.1:8080 or ::1 and mask 255.255.255.0; slice x[1::2]; "
              "version 3.11.2; def login(user, password=None): pass; pwd = os.getcwd(); "
              "10 = 2 * 5; 100 200 3000; on 2021-08-15; CamelCaseIdentifierThatIsVeryLong42Foo; "
              "see https://docs.python.org/3/library/ipaddress.html")
    assert scrub_pii(benign, QualityConfig()) == (benign, {}, None)


def test_quality_batch_redacts_and_counts():
    table = batch([PARAGRAPH + " Mail me at bob@example.org.", PARAGRAPH, PII_TEXT + " " + PARAGRAPH])
    kept, rejected, counters = quality_batch(table)
    assert_partition(table, kept, rejected, counters)
    assert kept["text"].to_pylist() == [PARAGRAPH + " Mail me at <EMAIL>.", PARAGRAPH,
                                        PII_REDACTED + " " + PARAGRAPH]
    assert {k: v for k, v in counters.items() if k.startswith("redact")} == {
        "redact:email": 2, "redact:phone": 2, "redact:ip": 2, "redact:secret": 4,
        "redacted_rows": 2}


def test_drop_mode_rejects_rows_with_pii():
    table = batch([PARAGRAPH + " Mail me at bob@example.org.", PARAGRAPH,
                   PARAGRAPH + " Server 198.51.100.7 is down."])
    kept, rejected, counters = quality_batch(table, QualityConfig(pii_action="drop"))
    assert_partition(table, kept, rejected, counters)
    assert kept["id"].to_pylist() == ["r1"]
    assert rejected["reason"].to_pylist() == ["pii:email", "pii:ip"]
    assert json.loads(rejected["detail"][0].as_py()) == {"value": 1, "action": "drop"}
    assert rejected["text"][0].as_py() == table["text"][0].as_py()  # unredacted, for audit
    _, rejected, _ = quality_batch(table, QualityConfig(pii_action="drop", redact_rejected=True))
    assert rejected["reason"].to_pylist() == ["pii:email", "pii:ip"]
    assert "@" not in rejected["text"][0].as_py() and "<EMAIL>" in rejected["text"][0].as_py()
    assert rejected["text"][1].as_py().endswith("Server <IP> is down.")


def test_per_kind_action_and_kinds_subset():
    table = batch([PARAGRAPH + " Mail bob@example.org, key AKIAIOSFODNN7EXAMPLE.",
                   PARAGRAPH + " Mail bob@example.org."])
    cfg = QualityConfig(pii_action_by_kind={"secret": "drop"})
    kept, rejected, _ = quality_batch(table, cfg)
    assert rejected["reason"].to_pylist() == ["pii:secret"]
    assert kept["text"].to_pylist() == [PARAGRAPH + " Mail <EMAIL>."]
    kept, _, counters = quality_batch(table, QualityConfig(pii_kinds=["secret"]))
    assert "redact:email" not in counters
    assert kept["text"][1].as_py().endswith("bob@example.org.")


def test_in_equals_kept_plus_rejected_on_a_mixed_batch():
    texts = [t for _, t, o in CRAFTED if not o] + [PARAGRAPH, PYTHON_FUNCTION, *MATH_SOLUTIONS,
                                                   PII_TEXT + " " + PARAGRAPH, "", None]
    table = batch(texts)
    kept, rejected, counters = quality_batch(table)
    assert_partition(table, kept, rejected, counters)
    assert kept.num_rows == 3 + len(MATH_SOLUTIONS)


@pytest.mark.parametrize("secret", [
    "-----BEGIN RSA PRIVATE KEY-----", "AKIAIOSFODNN7EXAMPLE", "ASIAY34FZKBOKMUTVV7A",
    "sk-proj-" + "aB3" * 8, "sk_live_" + "A1b2" * 5, "rk_test_" + "Zz9" * 6, "ghp_" + "A1" * 18,
    "gho_" + "b2" * 18, "github_pat_" + "c3" * 11, "xoxb-1234567890-abcdef",
    "AIza" + "Sy9" * 11 + "xy", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N",
])
def test_every_secret_pattern_is_found_behind_its_literal_prefilter(secret):
    """find_pii scans for the vendor patterns only when a literal they all contain is present;
    each pattern still fires, and the span covers the whole secret."""
    from data_engine.safety import _SECRET_LITERALS, _SECRET_PATTERNS, find_pii
    text = f"The deploy step reads {secret} from the vault, then exits."
    assert _SECRET_PATTERNS[0].search(secret).group() == secret
    assert any(lit in secret for lit in _SECRET_LITERALS)
    start = text.index(secret)
    assert find_pii(text, "secret", QualityConfig()) == [(start, start + len(secret))]


def test_ngram_rules_on_a_shared_doc_equal_fresh_ones():
    """A Doc remembers the shortest n without a repeated n-gram and skips longer n; in any
    order of n, the measures equal those of a fresh Doc per call."""
    import random
    from data_engine.quality import Doc, dup_ngram_char_frac, top_ngram_char_frac
    rng = random.Random(1)
    vocab = ["a", "bb", "the", "cat", "sat", "on", "mat", "xx"]
    texts = [PARAGRAPH, PYTHON_FUNCTION, "", "one two", "a b a b a b a b a b a b"]
    texts += [" ".join(rng.choice(vocab[:k]) for _ in range(rng.randint(1, 40))) for k in (2, 5, 8)
              for _ in range(20)]
    for text in texts:
        for order in (range(1, 12), range(11, 0, -1), rng.sample(range(1, 12), 11)):
            shared = Doc(text)
            for n in order:
                assert top_ngram_char_frac(shared, n) == top_ngram_char_frac(Doc(text), n), (text, n)
                assert dup_ngram_char_frac(shared, n) == dup_ngram_char_frac(Doc(text), n), (text, n)
