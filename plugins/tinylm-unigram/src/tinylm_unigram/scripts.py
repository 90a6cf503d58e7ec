"""Unicode scripts of characters, for the trainer's piece-validity rule (SentencePiece's
``split_by_unicode_script``: a piece may not mix scripts; Hiragana, Katakana and the
prolonged sound mark U+30FC count as Han; digits and punctuation are Common).

The script comes from the ``regex`` module's ``\\p{Script=...}`` (its Unicode version,
which may differ from SentencePiece's built-in table on recently added characters).

    >>> script_ids("aΩж日カ1,")[:5].tolist() == [script_id("a"), script_id("Ω"),
    ...     script_id("ж"), script_id("日"), script_id("日")]
    True
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import regex

SCRIPTS = """Adlam Ahom Anatolian_Hieroglyphs Arabic Armenian Avestan Balinese Bamum Bassa_Vah
Batak Bengali Bhaiksuki Bopomofo Brahmi Braille Buginese Buhid Canadian_Aboriginal Carian
Caucasian_Albanian Chakma Cham Cherokee Chorasmian Common Coptic Cuneiform Cypriot
Cypro_Minoan Cyrillic Deseret Devanagari Dives_Akuru Dogra Duployan Egyptian_Hieroglyphs
Elbasan Elymaic Ethiopic Georgian Glagolitic Gothic Grantha Greek Gujarati Gunjala_Gondi
Gurmukhi Han Hangul Hanifi_Rohingya Hanunoo Hatran Hebrew Hiragana Imperial_Aramaic
Inherited Inscriptional_Pahlavi Inscriptional_Parthian Javanese Kaithi Kannada Katakana
Kawi Kayah_Li Kharoshthi Khitan_Small_Script Khmer Khojki Khudawadi Lao Latin Lepcha Limbu
Linear_A Linear_B Lisu Lycian Lydian Mahajani Makasar Malayalam Mandaic Manichaean Marchen
Masaram_Gondi Medefaidrin Meetei_Mayek Mende_Kikakui Meroitic_Cursive Meroitic_Hieroglyphs
Miao Modi Mongolian Mro Multani Myanmar Nabataean Nag_Mundari Nandinagari New_Tai_Lue Newa
Nko Nushu Nyiakeng_Puachue_Hmong Ogham Ol_Chiki Old_Hungarian Old_Italic Old_North_Arabian
Old_Permic Old_Persian Old_Sogdian Old_South_Arabian Old_Turkic Old_Uyghur Oriya Osage
Osmanya Pahawh_Hmong Palmyrene Pau_Cin_Hau Phags_Pa Phoenician Psalter_Pahlavi Rejang Runic
Samaritan Saurashtra Sharada Shavian Siddham SignWriting Sinhala Sogdian Sora_Sompeng
Soyombo Sundanese Syloti_Nagri Syriac Tagalog Tagbanwa Tai_Le Tai_Tham Tai_Viet Takri Tamil
Tangsa Tangut Telugu Thaana Thai Tibetan Tifinagh Tirhuta Toto Ugaritic Vai Vithkuqi Wancho
Warang_Citi Yezidi Yi Zanabazar_Square""".split()
_IDS = {name: k for k, name in enumerate(SCRIPTS)}
_PATTERN = regex.compile("|".join(rf"(?P<{n}>\p{{Script={n}}})" for n in SCRIPTS), regex.S)
_HAN = ("Hiragana", "Katakana")


@lru_cache(maxsize=None)
def script_id(ch: str) -> int:
    """A small int naming the script of one character (unassigned: Common)."""
    if ch == "\u30fc":
        return _IDS["Han"]
    m = _PATTERN.match(ch)
    name = m.lastgroup if m else "Common"
    return _IDS["Han"] if name in _HAN else _IDS[name]


def script_ids(text: str) -> np.ndarray:
    """``script_id`` of each character of ``text`` (int16), one lookup per distinct
    character."""
    chars = sorted(set(text))
    table = {c: script_id(c) for c in chars}
    return np.array([table[c] for c in text], dtype=np.int16) if text else np.zeros(0, np.int16)
