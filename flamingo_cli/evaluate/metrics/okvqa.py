"""OK-VQA answer stemming, as OpenFlamingo 2.0.1's `open_flamingo/eval/ok_vqa_utils.py` does it
(OK-VQA v1.1's procedure), so predictions compare with the stemmed answers its annotation files
hold (docs/formats.md §13).

The `nltk` backend is that procedure: NLTK's `word_tokenize` and `pos_tag`, then per word a
manual table, else WordNet's verb lemma for words ending in "ing", else `inflection`'s
singular for words tagged NNS or NNPS. It needs NLTK's data (punkt_tab, the averaged
perceptron tagger, WordNet) and the `inflection` package; nothing here downloads data.

Without them the `fallback` backend runs and says so: the same tokenizer rules without the
sentence splitter (NLTK's data-free word tokenizer, or a regex without NLTK), the same manual
table, then for "ing" words Porter's step-1b rules in place of WordNet (riding -> ride,
running -> run, skiing -> ski), and for a word that looks like a plural noun (ends in "s",
not "ss"/"us"/"is", not a listed function word) `inflection`'s singular, or simple suffix rules
without it. It agrees with the NLTK backend on the common shapes of answers (a noun, a plural,
a gerund) and may differ on verbs in the third person ("runs" is tagged VBZ and kept by NLTK).
"""

from __future__ import annotations

import functools
import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

StemmerBackend = Literal["nltk", "fallback"]

# Words the OK-VQA procedure maps by hand (its stemming rules miss or mangle them).
_MANUAL_PAIRS = """
police=police las=las vegas=vegas yes=yes jeans=jean hell's=hell domino's=domino
morning=morn clothes=cloth are=are riding=ride leaves=leaf dangerous=danger clothing=cloth
texting=text kiting=kite firefighters=firefight ties=tie married=married teething=teeth
gloves=glove tennis=tennis dining=dine directions=direct waves=wave christmas=christmas
drives=drive pudding=pud coding=code plating=plate quantas=quanta hornes=horn graves=grave
mating=mate paned=pane alertness=alert sunbathing=sunbath tenning=ten wetness=wet
urinating=urine sickness=sick braves=brave firefighting=firefight lenses=lens
reflections=reflect backpackers=backpack eatting=eat designers=design curiousity=curious
playfulness=play blindness=blind hawke=hawk tomatoe=tomato rodeoing=rodeo brightness=bright
circuses=circus skateboarders=skateboard staring=stare electronics=electron
electicity=elect mountainous=mountain socializing=social hamburgers=hamburg caves=cave
transitions=transit wading=wade creame=cream toileting=toilet sautee=saute
buildings=build belongings=belong stockings=stock walle=wall cumulis=cumuli
travelers=travel conducter=conduct browsing=brows pooping=poop haircutting=haircut
toppings=top hearding=heard sunblocker=sunblock bases=base markings=mark mopeds=mope
kindergartener=kindergarten pies=pie scrapbooking=scrapbook couponing=coupon meetings=meet
elevators=elev lowes=low men's=men childrens=children shelves=shelve paintings=paint
raines=rain paring=pare expressions=express routes=rout pease=peas vastness=vast
awning=awn boy's=boy drunkenness=drunken teasing=teas conferences=confer ripeness=ripe
suspenders=suspend earnings=earn reporters=report kid's=kid containers=contain
corgie=corgi porche=porch microwaves=microwave batter's=batter sadness=sad
apartments=apart oxygenize=oxygen striping=stripe purring=pure professionals=profession
piping=pipe farmer's=farmer potatoe=potato emirates=emir womens=women veteran's=veteran
wilderness=wilder propellers=propel alpes=alp charioteering=chariot swining=swine
illness=ill crepte=crept adhesives=adhesive regent's=regent decorations=decor
rabbies=rabbi overseas=oversea travellers=travel casings=case smugness=smug doves=dove
nationals=nation mustange=mustang ringe=ring gondoliere=gondolier vacationing=vacate
reminders=remind baldness=bald settings=set glaced=glace coniferous=conifer
revelations=revel personals=person daughter's=daughter badness=bad projections=project
polarizing=polar vandalizers=vandal minerals=miner protesters=protest controllers=control
weddings=wed sometimes=sometime earing=ear
"""
MANUAL_MATCHES: dict[str, str] = dict(pair.split("=", 1) for pair in _MANUAL_PAIRS.split())

# Fallback: words ending in "s" that are not plural nouns.
_NOT_PLURAL = frozenset(
    """is was has does this his hers its ours yours theirs us thus yes always perhaps unless
    across plus less various famous nervous delicious gorgeous dangerous glass grass gas bus
    news series species physics mathematics""".split()  # noqa: SIM905
)
# Fallback: "-ing" words WordNet has no verb for, so the NLTK backend keeps them.
_NOT_GERUND = frozenset({"something", "nothing", "anything", "everything"})
_VOWELS = frozenset("aeiou")
_E_ENDING = re.compile(r"(?:[^aeiou]c|[^aeioun]g|[^aeiou]v|[bdgpt]l)$")
_FALLBACK_TOKEN = re.compile(r"\w+(?:[-']\w+)*|[^\w\s]")


@dataclass(frozen=True)
class OkvqaStemmer:
    """Stems answers one way; `backend` says which ("nltk" or "fallback")."""

    backend: StemmerBackend
    _stem: Callable[[str], str]

    def stem(self, text: str) -> str:
        return self._stem(text)


@functools.cache
def okvqa_stemmer() -> OkvqaStemmer:
    """The NLTK procedure when NLTK, its data and `inflection` are installed, else the
    documented fallback (decided once per process)."""
    if importlib.util.find_spec("nltk") is None or importlib.util.find_spec("inflection") is None:
        return OkvqaStemmer("fallback", _fallback_stem)
    try:
        _nltk_stem("riding bikes")  # loads the tokenizer, tagger and WordNet data
    except (LookupError, OSError):  # data missing, or unreadable
        return OkvqaStemmer("fallback", _fallback_stem)
    return OkvqaStemmer("nltk", _nltk_stem)


def stem_answer(text: str) -> str:
    """One answer stemmed by `okvqa_stemmer()` (see `okvqa_stemmer().backend`)."""
    return okvqa_stemmer().stem(text)


def _nltk_stem(text: str) -> str:
    import inflection
    import nltk  # type: ignore[import-untyped]
    from nltk.corpus.reader import VERB  # type: ignore[import-untyped]

    lemmatizer = _lemmatizer()
    words: list[str] = []
    for token, tag in nltk.pos_tag(nltk.tokenize.word_tokenize(text)):
        if token in MANUAL_MATCHES:
            words.append(MANUAL_MATCHES[token])
        elif token.endswith("ing"):
            words.append(str(lemmatizer.lemmatize(token, VERB)))
        elif tag.startswith(("NNS", "NNPS")):
            words.append(str(inflection.singularize(token)))
        else:
            words.append(token)
    return " ".join(words)


@functools.cache
def _lemmatizer() -> Any:
    import nltk

    return nltk.stem.WordNetLemmatizer()


def _fallback_tokens(text: str) -> list[str]:
    try:
        from nltk.tokenize import NLTKWordTokenizer  # type: ignore[import-untyped]
    except ImportError:
        return _FALLBACK_TOKEN.findall(text)
    return list(NLTKWordTokenizer().tokenize(text))


def _fallback_stem(text: str) -> str:
    words: list[str] = []
    for token in _fallback_tokens(text):
        if token in MANUAL_MATCHES:
            words.append(MANUAL_MATCHES[token])
        elif token.endswith("ing"):
            words.append(porter_ing(token))
        elif _looks_plural(token):
            words.append(singularize(token))
        else:
            words.append(token)
    return " ".join(words)


def porter_ing(word: str) -> str:
    """Porter's step 1b for "-ing", standing in for WordNet's verb lemma: drop it when a vowel
    stays before it; then "at"/"bl"/"iz" get an "e" unless the stem is one short syllable
    (eat-ing -> eat, as Porter's step 5 would leave it), a doubled consonant other than l/s/z
    is undoubled (runn-ing -> run), and a short consonant-vowel-consonant stem (hik-ing ->
    hike) or one ending in a consonant then c, g (not ng), v or a -ble/-dle/-gle/-ple/-tle
    ending (danc-ing -> dance, juggl-ing -> juggle) gets an "e"."""
    stem = word[:-3]
    if word in _NOT_GERUND or all(_is_consonant(stem, i) for i in range(len(stem))):
        return word  # "sing", "thing": no vowel before "ing"
    if stem.endswith(("at", "bl", "iz")):
        return stem + "e" if _measure(stem) > 1 or _short_cvc(stem) else stem
    if len(stem) > 1 and stem[-1] == stem[-2] and stem[-1] not in "aeiouylsz":
        return stem[:-1]
    if _short_cvc(stem) or _E_ENDING.search(stem):
        return stem + "e"
    return stem


def _is_consonant(stem: str, index: int) -> bool:
    char = stem[index]
    if char in _VOWELS:
        return False
    if char == "y":
        return index == 0 or not _is_consonant(stem, index - 1)
    return True


def _pattern(stem: str) -> str:
    return "".join("c" if _is_consonant(stem, i) else "v" for i in range(len(stem)))


def _measure(stem: str) -> int:
    """Porter's measure: how many vowel groups are followed by a consonant group."""
    return len(re.findall(r"v+c+", _pattern(stem)))


def _short_cvc(stem: str) -> bool:
    """One vowel group (Porter's measure 1) ending consonant-vowel-consonant, the last not
    w, x or y."""
    if len(stem) < 3 or stem[-1] in "wxy":
        return False
    pattern = _pattern(stem)
    return pattern.endswith("cvc") and _measure(stem) == 1


def _looks_plural(word: str) -> bool:
    lowered = word.lower()
    return (
        len(lowered) > 3
        and lowered.isalpha()
        and lowered.endswith("s")
        and not lowered.endswith(("ss", "us", "is"))
        and lowered not in _NOT_PLURAL
    )


def singularize(word: str) -> str:
    """`inflection.singularize` when installed, else suffix rules (-ies -> -y, -ves -> -f,
    -ches/-shes/-xes/-zes/-sses -> drop "es", else drop "s")."""
    try:
        import inflection
    except ImportError:
        for suffix, replacement in (
            ("ies", "y"),
            ("ves", "f"),
            ("ches", "ch"),
            ("shes", "sh"),
            ("xes", "x"),
            ("zes", "z"),
        ):
            if word.endswith(suffix):
                return word[: -len(suffix)] + replacement
        return word[:-1]
    return str(inflection.singularize(word))
