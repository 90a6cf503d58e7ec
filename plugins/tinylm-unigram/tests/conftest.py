"""Shared set-up for the tinylm-unigram tests: plugin isolation, the Hypothesis
profile, and the corpora (none of them needs a file outside this repository)."""

import os
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from tinylm import plugins

settings.register_profile("ci", derandomize=True, max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=40, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else "dev")

DATA = Path(__file__).parent / "data"
HEAD = Path(__file__).resolve().parents[3] / "tests" / "data" / "tinyshakespeare_head.txt"


@pytest.fixture(autouse=True)
def _isolate_plugins(monkeypatch):
    """Only the built-ins load unless a test registers the plugin itself."""
    monkeypatch.setenv(plugins.ALLOW_ENV, "")
    plugins.reset()
    yield
    plugins.reset()


def generated_text(n_lines: int, seed: int = 0) -> list:
    """Lines of pseudo-English: Zipf-distributed made-up words (so that a vocabulary of
    thousands of pieces has something to find), capitals and punctuation."""
    rng = random.Random(seed)
    onsets = ["", "b", "c", "d", "f", "g", "h", "l", "m", "n", "p", "r", "s", "t", "v", "w",
              "br", "ch", "st", "th", "tr", "pl", "gr", "sh", "qu", "sp"]
    vowels = ["a", "e", "i", "o", "u", "ea", "ou", "ai", "ie", "y"]
    codas = ["", "", "n", "r", "s", "t", "l", "ng", "st", "rd", "ck", "m", "x", "th"]
    lexicon = sorted({"".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
                              for _ in range(rng.choice([1, 1, 2, 2, 3, 4])))
                      for _ in range(12000)})
    rng.shuffle(lexicon)
    weights = [1.0 / (k + 1) for k in range(len(lexicon))]
    lines = []
    for _ in range(n_lines):
        words = rng.choices(lexicon, weights, k=rng.randint(4, 16))
        if rng.random() < 0.5:
            words[0] = words[0].capitalize()
        line = " ".join(words)
        lines.append(line + rng.choice([".", ".", ",", "?", "!", ";", ""]))
    return lines


def head_lines() -> list:
    """tests/data/tinyshakespeare_head.txt of the main repository (generated lines if
    the plugin is tested outside it)."""
    if HEAD.exists():
        return HEAD.read_text(encoding="utf-8").split("\n")
    return generated_text(1500, seed=7)


SCRIPTS = {  # alphabets to make words from: accents, combining vowel signs, CJK, Hangul
    "latin": list("abcdefghijklmnopqrstuvwxyzéèêëàâäôöûüùçñøåæœß"),
    "cyrillic": list("абвгдеёжзийклмнопрстуфхцчшщъыьэюя"),
    "greek": list("αβγδεζηθικλμνξοπρστυφχψωάέήίόύώ"),
    "arabic": list("ابتثجحخدذرزسشصضطظعغفقكلمنهوي"),
    "devanagari": [c + v for c in "कखगघचछजझटठडढणतथदधनपफबभमयरलवशसह"
                   for v in ("", "ा", "ि", "ी", "ु", "े", "ो")],
    "hangul": [chr(0xAC00 + k) for k in range(0, 11172, 37)],
    "cjk": [chr(0x4E00 + k) for k in range(0, 3000, 7)] + list("のはをにがでとてしたるいうかな"),
}


def multilingual_generated(n_lines: int, seed: int = 0) -> list:
    """Lines of made-up words in seven scripts (one script a line, Zipf-distributed
    words, CJK without spaces): enough text for thousands of multilingual pieces."""
    rng = random.Random(seed)
    lexicons = {}
    for name, chars in SCRIPTS.items():
        words = {"".join(rng.choice(chars) for _ in range(rng.randint(1, 4 if name == "cjk" else 7)))
                 for _ in range(2500)}
        lexicons[name] = sorted(words)
        rng.shuffle(lexicons[name])
    lines = []
    for _ in range(n_lines):
        name = rng.choice(list(SCRIPTS))
        lex = lexicons[name]
        words = rng.choices(lex, [1.0 / (k + 1) for k in range(len(lex))], k=rng.randint(3, 12))
        sep = "" if name == "cjk" else " "
        lines.append(sep.join(words) + rng.choice([".", ",", "!", "?", "", "。" if name == "cjk" else ";"]))
    return lines


def multilingual_lines(n: int = 400, seed: int = 0) -> list:
    """Lines in 16 languages and 9 scripts (tests/data/multilingual.txt), and random
    word spans of them, so that a few hundred pieces are worth learning."""
    base = (DATA / "multilingual.txt").read_text(encoding="utf-8").split("\n")
    base = [b for b in base if b]
    rng = random.Random(seed)
    out = list(base)
    for _ in range(n):
        words = rng.choice(base).split(" ")
        a = rng.randrange(len(words))
        out.append(" ".join(words[a:a + rng.randint(1, 8)]))
    return out


TRICKY = [
    "", " ", "   ", "  Hello   world  ", "\tTabs\tand\nnewlines\r\n", "ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３",
    "½ ¼ ﬁ ™ ① Ǆ", "e\u0301 A\u0300\u0301 x\u0308", "가각 ᄀ ᅡ ㄱㅏ ﾊﾟ ｶﾞ", "<s> </s> <unk>",
    "\u2581leading meta", "emoji 😀👍🏽 and ∑∫", "Zero\u200bwidth\ufeffmarks", "UPPER lower MiXeD",
    "numbers 1234567890 3.14", "Ελληνικά κείμενα και 日本語のテキスト, Привет мир!",
    "\x01control\x7fchars", "a" * 300, "antidisestablishmentarianism " * 5,
]
