"""A small stop-word language identifier for the reasoning-language metric.

How it works: each language has ~25 of its most frequent function words (articles, pronouns,
prepositions, conjunctions, auxiliaries). A text's words are lower-cased and counted against each
list; the language with the most hits wins, and a text with fewer than 2 hits in total (or a tie)
is "unknown". Function words are frequent in any sentence and rarely shared across these
languages, so a sentence or two is enough; digits and symbols carry no vote.
"""

from __future__ import annotations

import re

STOPWORDS = {
    "English": "the a an and is are of to in we so that this it then which for with be was there our first next",
    "French": "le la les un une et est sont de des du que qui nous donc ce cette il elle en pour avec puis dans au",
    "German": "der die das ein eine und ist sind von zu im wir also dass dies es dann mit für auf den dem nicht",
    "Spanish": "el la los las un una y es son de del que nosotros entonces este esta en para con por luego lo se",
    "Italian": "il lo la gli le un una e è sono di del che noi quindi questo questa in per con poi nel della si",
    "Portuguese": "o os a as um uma e é são de do da que nós então este esta em para com por depois no na",
    "Dutch": "de het een en is zijn van te in we dus dat dit er dan met voor op niet ook naar bij",
}
_VOCAB = {lang: set(words.split()) for lang, words in STOPWORDS.items()}
_WORD = re.compile(r"[^\W\d_]+", re.UNICODE)


def identify(text: str) -> str:
    """The language of `text` (a key of STOPWORDS), or "unknown"."""
    words = [w.lower() for w in _WORD.findall(text)]
    scores = {lang: sum(w in vocab for w in words) for lang, vocab in _VOCAB.items()}
    best = max(scores.values(), default=0)
    winners = [lang for lang, s in scores.items() if s == best]
    return winners[0] if best >= 2 and len(winners) == 1 else "unknown"
