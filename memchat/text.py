"""Text helpers shared by the query path and the training data: one definition each.

- ``content_words``: the stemmed words that carry meaning (overlap and support checks).
- ``question_kind``: what kind of answer a question asks for, from its question word
  ("who" -> a name, "when"/"what year" -> a date, "how many" -> a number, ...).
- ``answer_spans``: the short spans of a sentence that can be answers (dates, numbers,
  names, noun-like phrases), each with its kind. The extractive reader scores them;
  the training data turns them into cloze questions with ``wh_word``.

These are surface heuristics over English punctuation and capitalisation, with no
tagger or parser (none ships offline): good enough to propose candidates that a model
then ranks, not to decide alone. Deliberately left out: sentence splitting (it lives
with the chunker, ``chunking.split_sentences``) and anything that loads a model.
"""

from __future__ import annotations

import functools
import re
import string
import unicodedata
from collections import Counter
from typing import Sequence
from dataclasses import dataclass

WORD = re.compile(r"[^\W_]+", re.UNICODE)
STOPWORDS = frozenset(
    """a an the of in on at to for from by with and or but nor is are was were be been being am what which who whom
    whose when where why how did does do done that this these those it its as than then into about after before during
    many much can could would should will shall may might must has have had having not no yes there their they them he
    she his her him we our us you your i me my so such if also any some all each other one ones more most very just
    only own same too both either neither s t text according question answer passage please write""".split()
)


def _letter_words(text: str) -> list[str]:
    return [w for w in WORD.findall(text.lower()) if not any(c.isdigit() for c in w)]


def _function_share(words: list[str]) -> float:
    return sum(w in STOPWORDS for w in words) / len(words) if words else 0.0


def english_share(text: str) -> float:
    """Share of ``text``'s words (numbers left out) that are English function words (``STOPWORDS``): about 0.35 to
    0.45 for English prose, near 0 for German, French or Japanese (config.ReaderConfig.min_english_share)."""
    return _function_share(_letter_words(text))


def reads_as_english(text: str, min_share: float, min_words: int) -> bool:
    """False only when ``text`` has ``min_words`` words (numbers left out) or more and too few English function
    words among them: a table of figures and labels says nothing about its language, and English is the default."""
    words = _letter_words(text)  # split once: the count and the share read the same words
    return len(words) < min_words or _function_share(words) >= min_share


def normalize(text: str) -> str:
    """Lower-case letters and digits only: the key for exact-duplicate checks."""
    return " ".join(WORD.findall(unicodedata.normalize("NFKC", text).lower()))


@functools.lru_cache(maxsize=1 << 18)
def stem(word: str) -> str:
    """The Snowball (Porter 2) English stem of a lower-case word: change/changes/changed/changing -> chang.

    One stem for every inflection matters: the reader's "does the answer repeat the
    question" and the abstention's coverage both compare stems. Cached: ~40 us a call uncached.
    """
    return _stemmer().stemWord(word)


@functools.lru_cache(maxsize=1)
def _stemmer():
    import snowballstemmer

    return snowballstemmer.stemmer("english")


def content_words(text: str) -> set[str]:
    """Stemmed words that carry meaning (no stop words, no single letters)."""
    words = WORD.findall(unicodedata.normalize("NFKC", text).lower())
    return {stem(w) for w in words if w not in STOPWORDS and (len(w) > 1 or w.isdigit())}


def content_word_list(text: str) -> list[str]:
    """``content_words`` in order, with repeats (for BM25-style counting)."""
    words = WORD.findall(unicodedata.normalize("NFKC", text).lower())
    return [stem(w) for w in words if w not in STOPWORDS and (len(w) > 1 or w.isdigit())]


# ---------------------------------------------------------------------------
# SQuAD answer metrics (Rajpurkar et al. 2016): pure functions, checkable by hand
# ---------------------------------------------------------------------------
_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD v1.1: lower case, drop punctuation, drop a/an/the, collapse white space."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in golds))


def _f1(pred: list[str], gold: list[str]) -> float:
    if not pred or not gold:  # SQuAD v2's rule: both empty is a match, one empty is not
        return float(pred == gold)
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, golds: Sequence[str]) -> float:
    pred = normalize_answer(prediction).split()
    return max((_f1(pred, normalize_answer(g).split()) for g in golds), default=0.0)


def contains_gold(prediction: str, golds: Sequence[str]) -> float:
    pred = f" {normalize_answer(prediction)} "
    return float(any(g and f" {g} " in pred for g in map(normalize_answer, golds)))


# ---------------------------------------------------------------------------
# Answer kinds
# ---------------------------------------------------------------------------
DATE, NUMBER, NAME, PHRASE, CLAUSE = "date", "number", "name", "phrase", "clause"
KINDS = (DATE, NUMBER, NAME, PHRASE, CLAUSE)

_MONTHS = ("january february march april may june july august september october november december "
           "jan feb mar apr jun jul aug sep sept oct nov dec").split()
_MONTH = set(_MONTHS)
_UNITS = set(
    """percent per cent million millions billion billions thousand thousands hundred hundreds trillion dozen
    years year months month weeks week days day hours hour minutes minute seconds second decades decade centuries century
    yr yrs km kilometers kilometres miles mile meters metres m cm mm kg g mg ml l feet ft inches metre meter tons tonnes
    degrees °c °f people times species members
    μm µm nm μg µg ng μl µl mmol μmol µmol kda mg/ml mg/kg μg/ml µg/ml ng/ml iu/ml""".split()
)
_DATE_UNITS = {"century", "centuries", "decade", "decades", "bc", "bce", "ad", "ce", "bp"}
_ERAS = {"BC", "BCE", "AD", "CE", "BP"}
_YEAR_BEFORE = {"in", "since", "by", "until", "till", "from", "during", "before", "after", "around", "circa", "c."}
_YEARISH = re.compile(r"^(1[0-9]{3}|20[0-9]{2})s?$|^[0-9]{2,4}s$")
_HAS_DIGIT = re.compile(r"\d")
_NUMBER_WORDS = set("one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
                    "seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred "
                    "thousand million billion trillion dozen half".split())

PLACE = "place"  # a question kind only: answered by a NAME span ("Where ...?" -> "the Atlantic")

# The question word that decides: the first one in the question ("Where did the water flow when it
# moved west?" asks for a place, not a date). Each pattern is tried at that position.
_WH = re.compile(r"\b(what|which|when|who|whom|whose|where|how)\b", re.I)
_KIND_AT_WH = [
    (re.compile(r"(what|which)\s+(year|decade|century|date|month|day|time|period|era)\b|when\b|how long ago\b", re.I), DATE),
    (re.compile(r"how\s+(many|much|long|far|old|large|big|tall|high|deep|wide|often|fast)\b|"
                r"what\s+(percentage|percent|proportion|number|amount|fraction)\b", re.I), NUMBER),
    (re.compile(r"(who|whom|whose)\b", re.I), NAME),
    (re.compile(r"where\b", re.I), PLACE),
]


def question_kind(question: str) -> str | None:
    """The kind of answer ``question`` asks for (DATE, NUMBER, NAME, PLACE), or None when any phrase may do."""
    for m in _WH.finditer(question):
        rest = question[m.start():]
        for pattern, kind in _KIND_AT_WH:
            if pattern.match(rest):
                return kind
        if m.group(1).lower() in {"what", "which"} and not re.match(r"(what|which)\s+(year|decade|century|date|month|day|"
                                                                     r"time|period|era|percentage|percent|proportion|"
                                                                     r"number|amount|fraction)\b", rest, re.I):
            return None  # "what/which" + anything else: a phrase
    return None


_DESCRIBE = re.compile(
    r"^\W*(how|why)\b(?!\s+(many|much|long|far|old|large|big|tall|high|deep|wide|often|fast)\b)|"
    r"\b(what|which)\s+(\w+\s+){0,2}(methods?|ways?|mechanisms?|roles?|functions?|purposes?|effects?|results?|"
    r"reasons?|causes?|symptoms?|benefits?|advantages?|challenges?|steps?|strateg\w+|approach\w*|findings?)\b|"
    r"^\W*(describe|explain)\b", re.I)


# Words skipped when the words around an answer's slot are compared: they vary between a question and its sentence.
DETERMINERS = {"a", "an", "the", "this", "that", "these", "those", "its", "their", "his", "her"}
_SLOT_WH = {"what", "which", "who", "whom", "whose", "when", "where"}
_PREPOSITIONS = set("""about across after against along among around at before behind below beneath beside between beyond by
during for from in inside into near of off on onto out outside over past since through throughout to toward towards under
until upon with within without""".split())


def slot_words(question: str, n: int = 2) -> list[str]:
    """The stems of the words just before the answer's slot, nearest first; [] when the question does not show them.

    SQuAD-style questions keep the source sentence's words around the answer. Where the question word stays in
    place ("The inside is lined with what?"), the words before it are the words before the answer in the sentence
    ("lined with an epithelium"). Where it moved to the front and left its preposition at the end ("What did water
    flow across?"), that preposition is the word before the answer ("flowed ... across the Amazonas Basin").
    """
    words = [t.text.lower() for t in tokens(question) if _is_word(t)]
    for i, w in enumerate(words):
        if w in _SLOT_WH:
            if i == 0:
                break
            return _nearest_stems(words[:i], n)
        if w in {"why", "how"}:
            return []
    return [stem(words[-1])] if words and words[-1] in _PREPOSITIONS else []


def words_before(toks: Sequence["Token"], start: int, n: int = 2) -> list[str]:
    """The stems of the ``n`` words of a sentence's ``tokens`` that end by character ``start``, nearest first
    (determiners skipped)."""
    return _nearest_stems([t.text.lower() for t in toks if t.end <= start and _is_word(t)], n)


def _nearest_stems(words: Sequence[str], n: int) -> list[str]:
    """The stems of the last ``n`` lower-case ``words`` that are no determiner, last first."""
    return [stem(w) for w in words if w not in DETERMINERS][::-1][:n]


def slot_match(slot: Sequence[str], before: Sequence[str]) -> float:
    """How well the words before a span match a question's ``slot_words``: the k-th nearest of each side, 1/k each."""
    return sum(1.0 / (k + 1) for k, (q, s) in enumerate(zip(slot, before)) if q == s)


def asks_for_description(question: str) -> bool:
    """Whether the question asks for a description (how, why, what methods/effects...): a clause, not a name."""
    return bool(_DESCRIBE.search(question))


def kind_matches(question_kind: str | None, span_kind: str) -> bool:
    """Whether a span of ``span_kind`` is the kind of answer the question asks for."""
    if question_kind is None:
        return False
    return span_kind == (NAME if question_kind == PLACE else question_kind)


def wh_word(kind: str) -> str:
    """The question word that asks for an answer of ``kind`` (for cloze questions)."""
    return {DATE: "When", NUMBER: "How many", NAME: "Who"}.get(kind, "What")


# ---------------------------------------------------------------------------
# Candidate answer spans
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Token:
    text: str
    start: int  # character offsets in the sentence
    end: int


@dataclass(frozen=True)
class Span:
    text: str  # exactly sentence[start:end]
    start: int
    end: int
    kind: str  # DATE | NUMBER | NAME | PHRASE

    @property
    def words(self) -> int:
        return len(self.text.split())


_TOKEN = re.compile(r"[^\W_](?:[\w'’.\-–/,%°]*[\w%°])?|\$|€|£|\S", re.UNICODE)
_INNER_COMMA = re.compile(r"^\d{1,3}(,\d{3})+(\.\d+)?$")


def tokens(sentence: str) -> list[Token]:
    """Words (keeping inner hyphens, apostrophes, decimal points and thousands commas) and punctuation."""
    out = []
    for m in _TOKEN.finditer(sentence):
        text, start, end = m.group(), m.start(), m.end()
        # "Paris," -> "Paris" + ","; a trailing "." that is no decimal point is punctuation
        while len(text) > 1 and text[-1] in ",." and not _INNER_COMMA.match(text) and not re.match(r"^\d+\.\d+$", text):
            text, end = text[:-1], end - 1
        if len(text) > 1 and "," in text and not _INNER_COMMA.match(text):  # "a,b" glued words: split at the comma
            pos = start
            for part in text.split(","):
                if part:
                    out.append(Token(part, pos, pos + len(part)))
                pos += len(part) + 1
            continue
        out.append(Token(text, start, end))
    return out


def _is_word(t: Token) -> bool:
    return t.text[:1].isalnum()


def _is_stop(t: Token) -> bool:
    return t.text.lower() in STOPWORDS


def _is_cap(t: Token) -> bool:
    return t.text[:1].isupper()


def _is_initial(t: Token) -> bool:
    return len(t.text) == 1 and t.text.isupper()


def _initial_stop(toks, j: int) -> bool:
    """toks[j] is an initial whose full stop stays inside a name: "David G. Booth", "J. R. R. Tolkien"."""
    return (_is_initial(toks[j]) and j + 2 < len(toks) and toks[j + 1].text == "." and _is_word(toks[j + 2])
            and _is_cap(toks[j + 2]))


def _plural_possessive(toks, j: int) -> bool:
    """``toks[j]`` is a plural with its possessive apostrophe right after it ("Peasants'")."""
    return (j + 1 < len(toks) and toks[j + 1].text in {"'", "’"} and toks[j].text.endswith("s")
            and toks[j].end == toks[j + 1].start)


def _is_numeric(t: Token) -> bool:
    low = t.text.lower()
    # "twenty-five" is a number; "two-page" is not (every part must be a number word)
    return bool(_HAS_DIGIT.search(low)) or all(part in _NUMBER_WORDS for part in low.split("-"))


# sentence-initial capitalised words that are not names ("Within the last ...", "During ...")
_COMMON_INITIAL = set("""within during although however while since after before because despite among between under
over through throughout following according unlike like until upon once today most many some several""".split())
_CONNECTORS = {"of", "the", "and", "de", "von", "van", "du", "la", "for", "on"}  # inside names: Bank of England
MAX_SPAN_WORDS = 8  # SQuAD answers: median 2 words, 90% at most 8 (Rajpurkar et al. 2016)


MAX_CLAUSE_WORDS = 30  # long answers (how/why questions on papers) are a clause, rarely more


def _starts_name(toks, i: int) -> bool:
    """A capitalised word that can open a name: not a stop word, not a month (that opens a date), and not a
    sentence's capitalised first word when it is a common opener ("However") or an adverb before a comma
    ("Notably,": a -ly word long enough not to be a short name such as Italy or Emily)."""
    t = toks[i]
    if not (_is_word(t) and _is_cap(t)) or _is_stop(t) or t.text.lower() in _MONTH:
        return False
    if i == 0 and not (len(toks) > 1 and _is_cap(toks[1])):
        word = t.text.lower()
        if word in _COMMON_INITIAL or (len(word) >= 7 and word.endswith("ly") and len(toks) > 1 and toks[1].text == ","):
            return False
    return True


def answer_spans(sentence: str, max_words: int = MAX_SPAN_WORDS, clauses: bool = False,
                 lists: bool = False) -> list[Span]:
    """Candidate answers in ``sentence``: dates, numbers (with units), names and content phrases.

    Spans never start or end on a stop word or punctuation (but the words between quotation marks are also
    taken whole), and never cross a comma, semicolon or bracket (except inside a number). With ``clauses``, the
    longer stretches between such marks (up to MAX_CLAUSE_WORDS words) are candidates too, of kind CLAUSE. With
    ``lists``, enumerations ("A, B, and C") are too: a PHRASE up to ``max_words`` (a NAME when every item is a
    name), longer ones a CLAUSE (with ``clauses``).
    Duplicates (same offsets) are dropped;
    the order is by position.
    """
    toks = tokens(sentence)
    n = len(toks)
    found: dict[tuple[int, int], str] = {}

    def add(i: int, j: int, kind: str, exact: bool = False) -> None:  # tokens i..j inclusive
        while i <= j and (not _is_word(toks[i]) or (_is_stop(toks[i]) and not _is_numeric(toks[i]) and not exact)):
            i += 1
        while j >= i and (not _is_word(toks[j]) or (_is_stop(toks[j]) and not _is_numeric(toks[j]) and not exact)):
            j -= 1
        limit = MAX_CLAUSE_WORDS if kind == CLAUSE else max_words
        if i > j or sum(1 for t in toks[i : j + 1] if _is_word(t)) > limit:
            return
        key = (toks[i].start, toks[j].end)
        rank = KINDS.index(kind)
        if key not in found or KINDS.index(found[key]) > rank:
            found[key] = kind

    i = 0
    while i < n:  # numbers and dates: a numeric run plus a month, currency or unit around it
        t = toks[i]
        if _is_numeric(t) or t.text.lower() in _MONTH:
            j = i
            while j + 1 < n and (_is_numeric(toks[j + 1]) or toks[j + 1].text.lower() in _MONTH
                                 or (toks[j + 1].text in {"–", "-", "to"}
                                     or toks[j + 1].text == "and" and i > 0 and toks[i - 1].text.lower() == "between")
                                 # "1773 to 1775", "March to June 2010": a range runs on to a number or a month
                                 and j + 2 < n and (_is_numeric(toks[j + 2]) or toks[j + 2].text.lower() in _MONTH)
                                 # "January 30, 2020": the year after a month and day's comma
                                 or toks[j + 1].text == "," and j + 2 < n and _YEARISH.match(toks[j + 2].text)
                                 and any(x.text.lower() in _MONTH for x in toks[i : j + 1])):
                j += 1
            s = i - 1 if i > 0 and toks[i - 1].text in {"$", "€", "£", "c.", "AD", "BC"} else i
            u = j + 1 if j + 1 < n and toks[j + 1].text.lower() in _UNITS else j
            e = u + 1 if u + 1 < n and toks[u + 1].text in _ERAS else u  # "11–13th century AD", "3000 yr BP"
            words = [x.text.lower() for x in toks[s : e + 1]]
            has_digit = any(_HAS_DIGIT.search(w) for w in words)
            nxt = toks[j + 1].text if j + 1 < n else ""
            counted = (nxt.islower() and not _is_stop(toks[j + 1]) and (nxt.endswith("s") or nxt in _UNITS)
                       and not toks[j].text.endswith("s") and not (i > 0 and toks[i - 1].text.lower() in _YEAR_BEFORE))
            is_date = (any(w in _MONTH for w in words) or any(w in _DATE_UNITS for w in words)
                       # a bare year-like number is a count when a noun follows it ("1250 to 1750 adults")
                       or any(_YEARISH.match(w) for w in words) and not counted)
            if has_digit or _is_numeric(toks[s]):
                add(s, j, DATE if is_date else NUMBER)
                for end in sorted({u, e} - {j}):
                    add(s, end, DATE if is_date else NUMBER)
                # each end of a range on its own ("March to June 2010" -> "March", "June 2010"): a question may
                # ask when it began or ended
                cuts = [k for k in range(i + 1, j) if toks[k].text in {"–", "-", "to", "and"}]
                ends = zip([i] + [c + 1 for c in cuts], [c - 1 for c in cuts] + [j]) if cuts else ()
                for a, b in ends:
                    if b >= a and (_is_numeric(toks[a]) or toks[a].text.lower() in _MONTH):
                        add(a, b, DATE if is_date else NUMBER)
            elif all(_is_cap(x) and x.text.lower() in _MONTH for x in toks[i : j + 1]) and (i > 0 or t.text != "May"):
                add(i, j, DATE)  # a month alone ("in March") is a date, not a name ("May" opening a sentence may not be)
            i = j + 1
            continue
        i += 1

    i = 0
    while i < n:  # names: runs of capitalised words, with connectors inside
        if _starts_name(toks, i):
            j = i
            while j + 1 < n:
                nxt = toks[j + 1]
                if _is_word(nxt) and _is_cap(nxt):
                    j += 1
                elif _initial_stop(toks, j):
                    j += 2
                elif nxt.text.lower() in _CONNECTORS and j + 2 < n and _is_cap(toks[j + 2]) and _is_word(toks[j + 2]):
                    j += 2
                elif _plural_possessive(toks, j) and j + 2 < n and _is_cap(toks[j + 2]) and _is_word(toks[j + 2]):
                    j += 2  # "the German Peasants' War"
                else:
                    break
            add(i, j, NAME)
            if j > i:  # "NASA's CALIPSO satellite" -> also "CALIPSO"; a possessive ends a name
                for k in range(i, j + 1):
                    if _is_cap(toks[k]) and not _is_stop(toks[k]) and not _is_initial(toks[k]):
                        add(k, k, NAME)
                cuts = [k for k in range(i, j) if toks[k].text.endswith(("'s", "’s")) or _plural_possessive(toks, k)]
                for a, b in zip([i] + [c + 1 for c in cuts], cuts + [j]):
                    if b > a:
                        add(a, b, NAME)
            i = j + 1
            continue
        i += 1

    # phrases: maximal runs of words between punctuation and clause words, and their "X of Y" joins
    breaks = {",", ";", ":", "(", ")", "[", "]", "—", "–", '"', "“", "”", "?", "!", "."}
    runs: list[tuple[int, int]] = []
    i = 0
    while i < n:
        if _is_word(toks[i]) and not _is_stop(toks[i]):
            j = i
            while j + 1 < n:
                if _is_word(toks[j + 1]) and not _is_stop(toks[j + 1]) and toks[j + 1].text not in breaks:
                    j += 1
                elif _initial_stop(toks, j):
                    j += 2
                else:
                    break
            runs.append((i, j))
            i = j + 1
        else:
            i += 1
    for a, (i, j) in enumerate(runs):
        add(i, j, PHRASE)
        # "the X of the Y", "X and Y", "areas controlled by Russia": join with the next run across one or two
        # connector words
        if a + 1 < len(runs):
            i2, j2 = runs[a + 1]
            gap = [toks[k].text.lower() for k in range(j + 1, i2)]
            if gap and len(gap) <= 2 and all(g in {"of", "the", "and", "a", "an", "in", "for", "by", "'s", "’s"} for g in gap):
                add(i, j2, PHRASE)
    # quoted: the words between quotation marks, whole (a term named or defined: the phrase "all possible
    # algorithms"), its stop words kept
    opened = None
    for k, t in enumerate(toks):
        if t.text in _QUOTES_OPEN and opened is None:
            opened = k
        elif t.text in _QUOTES_CLOSE and opened is not None:
            if k > opened + 1:
                add(opened + 1, k - 1, PHRASE, exact=True)
            opened = None
    if clauses:  # clauses: the stretches between commas, semicolons and brackets, and pairs of them
        segs: list[tuple[int, int]] = []
        i = 0
        while i < n:
            j = i
            while j < n and toks[j].text not in breaks:
                j += 1
            if j > i:
                segs.append((i, j - 1))
            i = j + 1
        for a, (i, j) in enumerate(segs):
            ends = [j] if a + 1 == len(segs) else [j, segs[a + 1][1]]  # the stretch, and it with the next one
            for end in ends:
                words = sum(1 for t in toks[i : end + 1] if _is_word(t))
                if max_words < words <= MAX_CLAUSE_WORDS:
                    add(i, end, CLAUSE)
    if lists:
        for i, j in _enumerations(toks):
            words = sum(1 for t in toks[i : j + 1] if _is_word(t))
            if words <= max_words:
                add(i, j, NAME if _names_only(toks, i, j) else PHRASE)
            elif clauses:
                add(i, j, CLAUSE)
    return [Span(sentence[s:e], s, e, kind) for (s, e), kind in sorted(found.items())]


_LIST_JOINS = {"and", "or"}
_QUOTES_OPEN, _QUOTES_CLOSE = {'"', "“"}, {'"', "”"}
MAX_LIST_ITEM_WORDS = 6  # an item of an enumeration is a short noun phrase ("alveolar ducts", "protein chip")
MAX_LIST_ITEMS = 8  # items read back from the join; longer runs of commas are tables or keyword lists


def _names_only(toks: list[Token], i: int, j: int) -> bool:
    """Every word of ``toks[i..j]`` but the list's joins and names' connectors is capitalised: a list of names
    ("Neil Armstrong, Michael Collins and Buzz Aldrin") answers a who- or where-question as one name does."""
    words = [t for t in toks[i : j + 1] if _is_word(t) and t.text.lower() not in _LIST_JOINS | _CONNECTORS]
    return bool(words) and all(_is_cap(t) for t in words)


def _enumerations(toks: list[Token]) -> list[tuple[int, int]]:
    """Token ranges (inclusive) of enumerations, "A, B, and C" / "A, B or C": three or more items, commas
    between them and "and"/"or" before the last. Where the first item starts and the last one ends is ambiguous
    without a parser ("consists of respiratory bronchioles, ...", "... and Spain agreed"), so every start and end
    up to one word longer than the longest middle item, not on a stop word, gives one range."""
    n, out = len(toks), []
    for k, t in enumerate(toks):
        if t.text.lower() not in _LIST_JOINS or k == 0 or k + 1 >= n or not _is_word(toks[k + 1]):
            continue
        b, items = (k - 1 if toks[k - 1].text == "," else k), []
        while True:  # the items before the join, nearest first: each ends where a comma follows
            s = b - 1
            while s >= 0 and _is_word(toks[s]) and toks[s].text.lower() not in _LIST_JOINS and b - s <= MAX_LIST_ITEM_WORDS:
                s -= 1
            if s == b - 1:
                break
            items.append((s + 1, b - 1))
            if s < 0 or toks[s].text != "," or len(items) >= MAX_LIST_ITEMS:
                break
            b = s
        if len(items) < 2:  # the first item and at least one between commas, then the last
            continue
        longest = max(j - i + 1 for i, j in items[:-1]) + 1  # the middle items (between commas) are exact
        first_i, first_j = items[-1]
        starts = [i for i in range(max(first_i, first_j - longest + 1), first_j + 1) if not _is_stop(toks[i])]
        ends = []
        for e in range(k + 1, min(n, k + 1 + longest)):
            if not _is_word(toks[e]) or toks[e].text.lower() in _LIST_JOINS:
                break
            if not _is_stop(toks[e]) or _is_numeric(toks[e]):
                ends.append(e)
        out += [(i, e) for i in starts for e in ends]
    return out
