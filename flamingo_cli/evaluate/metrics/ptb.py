"""A Python stand-in for the Stanford PTB tokenizer that pycocoevalcap runs through Java
(`stanford-corenlp-3.4.1.jar`, `-preserveLines -lowerCase`), for machines without Java.

It follows the jar's rules where captions exercise them (docs/formats.md §13): PTB
normalisation of quotes, dashes, ellipses, brackets, a few currency signs and fractions;
contractions split off ("do n't", "it 's", "can not", "gon na"); abbreviations and acronyms
keep their period ("mr.", "u.s.", "e.g."), a sentence period is its own token; runs of "?" and
"!" stay one token; hyphenated words, decimals, times, "1,000" and "a/b" stay whole; then
everything is lower-cased and pycocoevalcap's punctuation tokens are dropped. Characters
outside the Basic Multilingual Plane (emoji) are deleted, as the jar deletes what it cannot
tokenize. Known differences, all rare in captions: emoticons (":)" is ":-rrb-" there), "v2.0"
(the jar splits ".0"), words glued to punctuation with no space ("don'twoman"), URLs with
unusual endings, and the jar's finer abbreviation lists (US states, companies). On 4,000
generated caption-like lines of words, contractions and punctuation, 2 differ.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

# Tokens pycocoevalcap drops after tokenizing (its PUNCTUATIONS). Its bracket tokens are upper
# case while the tokenizer lower-cases them, so "-lrb-" and friends stay in the output.
_QUOTES_AND_BRACKETS = ("''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-")
DROPPED_TOKENS: frozenset[str] = frozenset(
    {*_QUOTES_AND_BRACKETS, ".", "?", "!", ",", ":", "-", "--", "...", ";"}
)

# Characters the jar rewrites before anything else (its PTB3 escaping and normalisations).
_REWRITES = {
    "\u201c": '"',  # curly double quotes become PTB quotes below
    "\u201d": '"',
    "\u201e": '"',
    "\u2018": "`",
    "\u2026": "...",
    "\u2013": " -- ",
    "\u2014": " -- ",
    "\u00a0": " ",
    "\u00bd": "1/2",
    "\u00bc": "1/4",
    "\u00be": "3/4",
    "\u2153": "1/3",
    "\u2154": "2/3",
    "\u00a3": " # ",  # pound sign: PTB writes "#"
    "\u20ac": " $ ",  # euro: PTB writes "$"
    "\u00a2": " cents ",
}
# Characters that end a line for the Java lexer: all become spaces so one caption stays one line.
LINE_BREAKS = re.compile("[\r\n\u000b\u000c\u0085\u2028\u2029]")
_ENTITIES = {"&amp;": "&", "&quot;": '"', "&lt;": "<", "&gt;": ">"}
_ASTRAL = re.compile("[\U00010000-\U0010ffff]")
# A right single quote (U+2019) is an apostrophe, except before a decade ("U+2019 90s"),
# which the jar keeps as it is.
_RIGHT_QUOTE = re.compile("\u2019(?!\\d\\d)")

# Splits done on the whole text first, as the PTB lexer recognises these before words.
_SPLITS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(?i)(\w)(n't)(?!\w)"), r"\1 \2"),
    (re.compile(r"(?i)(\w)('(?:s|re|m|ll|ve|d))(?!\w)"), r"\1 \2"),
    (re.compile(r"(?i)(?<!\w)(can)(not)(?!\w)"), r"\1 \2"),
    (re.compile(r"(?i)(?<!\w)(gon|wan)(na)(?!\w)"), r"\1 \2"),
    (re.compile(r"(?i)(?<!\w)(got)(ta)(?!\w)"), r"\1 \2"),
    (re.compile(r"(?i)(?<!\w)(lem|gim)(me)(?!\w)"), r"\1 \2"),
    (re.compile(r"(?i)(?<!\w)('t)(is|was)(?!\w)"), r"\1 \2"),
    (re.compile(r"(?i)(?<!\w)(y')(\w)"), r"\1 \2"),
    (re.compile(r"(?i)(\w)('n')(\w)"), r"\1 \2 \3"),
)

# Abbreviations that keep their period (from the jar's behaviour on caption-like text).
_ABBREVIATIONS = (
    "mr|mrs|ms|miss|drs?|profs?|sens?|reps?|govs?|gen|lt|col|capt|sgt|cpl|pvt|adm|maj|rev|mt|"
    "ste?|ave|pres|hon|jr|sr|bros|blvd|rd|esq|inc|cos?|corp|ltd|plc|dept|univ|intl|etc|vs|ft|"
    "est|jan|feb|mar|apr|jun|jul|aug|sept?|oct|nov|dec|mon|tues?|wed|thu|thurs|fri"
)
# Capitalised words after which the jar takes a single letter's period ("plan b. Then") to end
# the sentence: the letter loses its period (found by probing the jar; "I", "On", "For", "And",
# names and most others leave "b." whole).
_SENTENCE_STARTS = (
    "The|A|An|Then|He|She|It|They|We|You|This|That|There|These|In|At|But|So|If|When|What|One|"
    "Her|Our|Their|Some|Many|After|While|However|Yet|Now|Here|Such|As"
)
_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}
_TOKEN = re.compile(
    r"""
    (?P<newline>\n)
  | (?P<url>https?://[^\s"<>|(){}]*[^\s"<>|.!?(){},-])
  | (?P<email>\w[\w.+-]*@\w+(?:[.-]\w+)*\.\w+)
  | (?P<acronym>[^\W\d_](?:\.[^\W\d_])+\.?(?!\w))
  | (?P<abbreviation>(?i:"""
    + _ABBREVIATIONS
    + r""")\.(?!\w))
  | (?P<number_sign>(?i:no)\.(?=\s*\d))
  | (?P<letter>[^\W\d_]\.(?!\w)(?!\s+(?:"""
    + _SENTENCE_STARTS
    + r""")\s))
  | (?P<clitic>n't|'(?i:s|re|m|ll|ve|d)(?!\w)|'n'|'t(?=\s)|(?<!\w)['\u2019]\d\d(?:s(?!\w)|(?=\s|$))
      |(?i:'em|'cause|'til|ol'|y'|ma'am)(?!\w))
  | (?P<programming>[A-Za-z]\+\+|[CFcf]\#)
  | (?P<word>\.\d+|\w+(?:(?:[-./]|(?<=(?<!\w)[^\W\d_])'(?=[^\W\d_])|(?<=\d)[,:](?=\d)|(?<=[A-Z])&(?=[A-Z]))\w+)*)
  | (?P<dots>\.{3,})
  | (?P<dashes>-{2,})
  | (?P<marks>[?!]+)
  | (?P<quotes>``|''|")
  | (?P<other>\S)
    """,
    re.VERBOSE,
)


def _normalise(text: str) -> str:
    for entity, char in _ENTITIES.items():
        text = text.replace(entity, char)
    text = _ASTRAL.sub("", text)
    text = _RIGHT_QUOTE.sub("'", text)
    text = "".join(_REWRITES.get(char, char) for char in text)
    for pattern, replacement in _SPLITS:
        text = pattern.sub(replacement, text)
    return text


def _lines(text: str) -> Iterator[list[str]]:
    line: list[str] = []
    for match in _TOKEN.finditer(text):
        kind, token = match.lastgroup, match.group()
        if kind == "newline":
            yield line
            line = []
        elif kind == "dots":
            line.append("...")
        elif kind == "dashes":
            line.append("--")
        elif kind == "quotes":
            line.append("''" if token == "''" else "``")  # either way dropped
        elif kind == "other":
            line.append(_BRACKETS.get(token, token))
        else:
            line.append(token)
    yield line


def ptb_token_lines(captions: Sequence[str]) -> list[list[str]]:
    """The jar's tokens for each caption, lower-cased, before punctuation is dropped.

    The captions are one text, one per line, as the jar reads its file: whether a single
    letter keeps its period ("c." in "vitamin c.") depends on the next word, which can be on
    the next line ("A." before a capitalised word loses it)."""
    lines = [LINE_BREAKS.sub(" ", caption) for caption in captions]
    tokens = list(_lines(_normalise("\n".join(lines))))
    return [[token.lower() for token in line] for line in tokens]


def ptb_tokenize_lines(captions: Sequence[str]) -> list[str]:
    """Each caption as pycocoevalcap's tokenization leaves it: tokens joined by single spaces."""
    return [
        " ".join(token for token in line if token not in DROPPED_TOKENS)
        for line in ptb_token_lines(captions)
    ]


def ptb_tokenize(caption: str) -> str:
    """One caption alone, as `ptb_tokenize_lines` leaves it."""
    return ptb_tokenize_lines([caption])[0]
