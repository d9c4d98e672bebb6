"""Writes the bundled cross-lingual reasoning set (train/data/*.jsonl) from templates.

Same schema as HuggingFaceH4/Multilingual-Thinking: the user asks in language A, the assistant
reasons (analysis channel) in the row's `reasoning_language` B and answers (final channel) in A.
Four task families (arithmetic, unit conversion, weekdays, ordering logic) in seven languages.
The held-out split has new numbers and names, and reasoning languages never trained on
(Portuguese, Dutch). Deterministic: `python -m gptoss.train.make_dataset` rewrites the same files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

TRAIN_REASONING = ["English", "French", "German", "Spanish", "Italian"]
HELDOUT_ONLY = ["Portuguese", "Dutch"]
USER_LANGUAGES = ["English", "French", "German", "Spanish", "Italian"]
SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a patient tutor who explains each step.",
    "You are a concise assistant. Keep answers short.",
    "You are a friendly math helper.",
]

ADD = {  # question (in A), reasoning (in B), final (in A)
    "English": ("What is {a} plus {b}?", "We add {a} and {b}. First the tens, then the units: the sum is {c}. So the answer is {c}.", "{a} plus {b} is {c}."),
    "French": ("Combien font {a} plus {b} ?", "Nous additionnons {a} et {b}. D'abord les dizaines, puis les unités : la somme est {c}. Donc la réponse est {c}.", "{a} plus {b} font {c}."),
    "German": ("Was ist {a} plus {b}?", "Wir addieren {a} und {b}. Zuerst die Zehner, dann die Einer: die Summe ist {c}. Also ist die Antwort {c}.", "{a} plus {b} ist {c}."),
    "Spanish": ("¿Cuánto es {a} más {b}?", "Sumamos {a} y {b}. Primero las decenas, luego las unidades: la suma es {c}. Entonces la respuesta es {c}.", "{a} más {b} es {c}."),
    "Italian": ("Quanto fa {a} più {b}?", "Sommiamo {a} e {b}. Prima le decine, poi le unità: la somma è {c}. Quindi la risposta è {c}.", "{a} più {b} fa {c}."),
    "Portuguese": ("Quanto é {a} mais {b}?", "Somamos {a} e {b}. Primeiro as dezenas, depois as unidades: a soma é {c}. Então a resposta é {c}.", "{a} mais {b} é {c}."),
    "Dutch": ("Wat is {a} plus {b}?", "We tellen {a} en {b} op. Eerst de tientallen, dan de eenheden: de som is {c}. Dus het antwoord is {c}.", "{a} plus {b} is {c}."),
}  # fmt: skip
UNITS = {
    "English": ("How many centimetres are in {m} metres?", "One metre is 100 centimetres, so we multiply {m} by 100. That gives {c} centimetres.", "{m} metres are {c} centimetres."),
    "French": ("Combien de centimètres y a-t-il dans {m} mètres ?", "Un mètre est égal à 100 centimètres, donc nous multiplions {m} par 100. Cela donne {c} centimètres.", "{m} mètres font {c} centimètres."),
    "German": ("Wie viele Zentimeter sind {m} Meter?", "Ein Meter sind 100 Zentimeter, also multiplizieren wir {m} mit 100. Das ergibt {c} Zentimeter.", "{m} Meter sind {c} Zentimeter."),
    "Spanish": ("¿Cuántos centímetros hay en {m} metros?", "Un metro son 100 centímetros, entonces multiplicamos {m} por 100. Eso da {c} centímetros.", "{m} metros son {c} centímetros."),
    "Italian": ("Quanti centimetri ci sono in {m} metri?", "Un metro è 100 centimetri, quindi moltiplichiamo {m} per 100. Questo dà {c} centimetri.", "{m} metri sono {c} centimetri."),
    "Portuguese": ("Quantos centímetros há em {m} metros?", "Um metro são 100 centímetros, então multiplicamos {m} por 100. Isso dá {c} centímetros.", "{m} metros são {c} centímetros."),
    "Dutch": ("Hoeveel centimeter is {m} meter?", "Een meter is 100 centimeter, dus we vermenigvuldigen {m} met 100. Dat geeft {c} centimeter.", "{m} meter is {c} centimeter."),
}  # fmt: skip
DAYS = {
    "English": ("What day of the week is it {n} days after {d}?", "A week has 7 days. {n} days is {n} mod 7 = {r} days forward from {d}, which lands on {x}.", "It is {x}.",
                "Monday Tuesday Wednesday Thursday Friday Saturday Sunday"),
    "French": ("Quel jour de la semaine sera-t-il {n} jours après {d} ?", "Une semaine a 7 jours. {n} jours, c'est {n} mod 7 = {r} jours après {d}, ce qui tombe un {x}.", "C'est {x}.",
               "lundi mardi mercredi jeudi vendredi samedi dimanche"),
    "German": ("Welcher Wochentag ist {n} Tage nach {d}?", "Eine Woche hat 7 Tage. {n} Tage sind {n} mod 7 = {r} Tage nach {d}, das ist ein {x}.", "Es ist {x}.",
               "Montag Dienstag Mittwoch Donnerstag Freitag Samstag Sonntag"),
    "Spanish": ("¿Qué día de la semana es {n} días después del {d}?", "Una semana tiene 7 días. {n} días son {n} mod 7 = {r} días después del {d}, y eso cae en {x}.", "Es {x}.",
                "lunes martes miércoles jueves viernes sábado domingo"),
    "Italian": ("Che giorno della settimana è {n} giorni dopo {d}?", "Una settimana ha 7 giorni. {n} giorni sono {n} mod 7 = {r} giorni dopo {d}, e quindi è {x}.", "È {x}.",
                "lunedì martedì mercoledì giovedì venerdì sabato domenica"),
    "Portuguese": ("Que dia da semana é {n} dias depois de {d}?", "Uma semana tem 7 dias. {n} dias são {n} mod 7 = {r} dias depois de {d}, o que cai em {x}.", "É {x}.",
                   "segunda terça quarta quinta sexta sábado domingo"),
    "Dutch": ("Welke dag van de week is het {n} dagen na {d}?", "Een week heeft 7 dagen. {n} dagen is {n} mod 7 = {r} dagen na {d}, dus het is {x}.", "Het is {x}.",
              "maandag dinsdag woensdag donderdag vrijdag zaterdag zondag"),
}  # fmt: skip
TALLEST = {
    "English": ("{p} is taller than {q}, and {q} is taller than {s}. Who is the tallest?", "The order is {p} > {q} > {s}. Since {p} is taller than {q} and {q} is taller than {s}, the tallest is {p}.", "{p} is the tallest."),
    "French": ("{p} est plus grand que {q}, et {q} est plus grand que {s}. Qui est le plus grand ?", "L'ordre est {p} > {q} > {s}. Comme {p} est plus grand que {q} et que {q} est plus grand que {s}, le plus grand est {p}.", "{p} est le plus grand."),
    "German": ("{p} ist größer als {q}, und {q} ist größer als {s}. Wer ist am größten?", "Die Reihenfolge ist {p} > {q} > {s}. Da {p} größer als {q} ist und {q} größer als {s} ist, ist {p} am größten.", "{p} ist am größten."),
    "Spanish": ("{p} es más alto que {q}, y {q} es más alto que {s}. ¿Quién es el más alto?", "El orden es {p} > {q} > {s}. Como {p} es más alto que {q} y {q} es más alto que {s}, el más alto es {p}.", "{p} es el más alto."),
    "Italian": ("{p} è più alto di {q}, e {q} è più alto di {s}. Chi è il più alto?", "L'ordine è {p} > {q} > {s}. Poiché {p} è più alto di {q} e {q} è più alto di {s}, il più alto è {p}.", "{p} è il più alto."),
    "Portuguese": ("{p} é mais alto que {q}, e {q} é mais alto que {s}. Quem é o mais alto?", "A ordem é {p} > {q} > {s}. Como {p} é mais alto que {q} e {q} é mais alto que {s}, o mais alto é {p}.", "{p} é o mais alto."),
    "Dutch": ("{p} is langer dan {q}, en {q} is langer dan {s}. Wie is het langst?", "De volgorde is {p} > {q} > {s}. Omdat {p} langer is dan {q} en {q} langer is dan {s}, is {p} het langst.", "{p} is het langst."),
}  # fmt: skip
NAMES = ["Anna", "Ben", "Carla", "David", "Elena", "Felix", "Greta", "Hugo", "Ines", "Jonas", "Karin", "Luca"]


# Reasoning opens by naming its language: text where a name and its language meet. The name is written as
# it is in the instruction, one token with its leading space (" Dutch" in "reasoning language: Dutch" and
# in "Language: Dutch."), so following the instruction can be a copy of that token; "(Dutch)" would be the
# tokens "(D" "utch", which a fine-tune can only reach through a lookup of each name it was trained on.
CAPTION = "Language: {language}. "
TASKS = {"add": ADD, "units": UNITS, "days": DAYS, "tallest": TALLEST}


def make_row(rng: random.Random, user_lang: str, reasoning_lang: str, final_lang: str | None = None) -> dict:
    """One task: asked in `user_lang`, reasoned in `reasoning_lang`, answered in `final_lang` (default:
    the user's). Besides the schema's fields, a row records `user_language`, `task` and `answer` (the
    word a correct final answer holds), which the report uses to score the final answer."""
    final_lang = final_lang or user_lang
    task = rng.choice(list(TASKS))
    if task == "add":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        v = {"a": a, "b": b, "c": a + b}
        answer = str(a + b)
        user, analysis, final = (
            ADD[user_lang][0].format(**v),
            ADD[reasoning_lang][1].format(**v),
            ADD[final_lang][2].format(**v),
        )
    elif task == "units":
        m = rng.choice([0.5, 1.5, 2, 2.5, 3, 4, 5.5, 7, 12, 0.25])
        v = {"m": m, "c": round(m * 100)}
        answer = str(round(m * 100))
        user, analysis, final = (
            UNITS[user_lang][0].format(**v),
            UNITS[reasoning_lang][1].format(**v),
            UNITS[final_lang][2].format(**v),
        )
    elif task == "days":
        start, n = rng.randrange(7), rng.randint(2, 30)
        names_a, names_b, names_f = (DAYS[lang][3].split() for lang in (user_lang, reasoning_lang, final_lang))
        end = (start + n) % 7
        answer = names_f[end]
        user = DAYS[user_lang][0].format(n=n, d=names_a[start])
        analysis = DAYS[reasoning_lang][1].format(n=n, r=n % 7, d=names_b[start], x=names_b[end])
        final = DAYS[final_lang][2].format(x=names_f[end])
    else:
        p, q, s = rng.sample(NAMES, 3)
        v = {"p": p, "q": q, "s": s}
        answer = p
        user, analysis, final = (
            TALLEST[user_lang][0].format(**v),
            TALLEST[reasoning_lang][1].format(**v),
            TALLEST[final_lang][2].format(**v),
        )
    developer = rng.choice(SYSTEM_PROMPTS)
    analysis = CAPTION.format(language=reasoning_lang) + analysis
    return {
        "reasoning_language": reasoning_lang,
        "user_language": user_lang,
        "task": task,
        "answer": answer,
        "developer": developer,
        "user": user,
        "analysis": analysis,
        "final": final,
        "messages": [
            {"role": "system", "content": f"reasoning language: {reasoning_lang}\n\n{developer}", "thinking": None},
            {"role": "user", "content": user, "thinking": None},
            {"role": "assistant", "content": final, "thinking": analysis},
        ],
    }


def generate(n_train: int = 600, n_heldout: int = 84, seed: int = 0) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    train = [make_row(rng, rng.choice(USER_LANGUAGES), rng.choice(TRAIN_REASONING)) for _ in range(n_train)]
    seen = {(r["user"], r["reasoning_language"]) for r in train}
    heldout = []
    languages = TRAIN_REASONING + HELDOUT_ONLY  # the same number of held-out prompts (12 of 84) per language
    while len(heldout) < n_heldout:
        row = make_row(rng, rng.choice(USER_LANGUAGES), languages[len(heldout) % len(languages)])
        if (row["user"], row["reasoning_language"]) not in seen:
            heldout.append(row)
    return train, heldout


ANSWER_IN = "Answer in {name}."
THINK_IN = "Think in {name}."
# A request is phrased three ways and stands in one of three places, so that what the base learns is to
# follow a named language wherever a request names it, not to copy the token after "Think in" at the end
# of a user's message (a base taught that one form left the fine-tune a lookup of the five names it trains).
THINK_REQUESTS = (THINK_IN, "Please think in {name}.", "Use {name} for your thinking.")
ANSWER_REQUESTS = (ANSWER_IN, "Please answer in {name}.", "Use {name} for your answer.")
PLACES = ("after the question", "before the question", "developer message")
# Names that request nothing: a base that followed every name it read would follow the developer
# message's `reasoning language: X` before any fine-tune, and there would be no transfer to measure.
# They stand only in the user's message, so a name in the developer message stays something to follow.
MENTIONS = ("I am learning {name}.", "My friend speaks {name}.", "Second language: {name}.")


def _ask(row: dict, text: str, place: str) -> None:
    """Adds `text` to the row's developer message, or before or after its user message."""
    if place == "developer message":
        row["developer"] = f"{row['developer']} {text}"
    elif place == "before the question":
        row["user"] = f"{text} {row['user']}"
    else:
        row["user"] = f"{row['user']} {text}"


def base_rows(
    n: int = 1200, seed: int = 1, grounding: float = 0.5, thinking: float = 0.5, mentions: float = 0.5
) -> list[dict]:
    """What the demo pre-trains a random tiny base on, mirroring what gpt-oss knew before the fine-tune:
    the tasks and the Harmony format, reasoning in any of the seven languages (Portuguese and Dutch
    included), and what each language's *name* means, learnt from requests to think or to be answered in
    a named language ("Think in Dutch.": the reasoning, captioned "Language: Dutch.", is in Dutch; "Please
    answer in Dutch.": the final answer is), in three phrasings, before or after the question or in the
    developer message, beside names that request nothing ("I am learning Dutch.", in the user's message
    only). It never sees the instruction `reasoning language: X`; without a request the language of its
    reasoning is drawn at random. Following that instruction is the fine-tune's job. Each row records
    what it asked in `requests` ({"think": language or None, "answer": language or None})."""
    rng = random.Random(seed)
    languages = TRAIN_REASONING + HELDOUT_ONLY
    rows = []
    for _ in range(n):
        user_lang, reasoning = rng.choice(USER_LANGUAGES), rng.choice(languages)
        think = rng.random() < thinking  # a request names the reasoning's language: its caption copies the name
        named = rng.choice(languages) if rng.random() < grounding else None
        mention = rng.random() < mentions
        row = make_row(rng, user_lang, reasoning, final_lang=named)
        if think:
            _ask(row, rng.choice(THINK_REQUESTS).format(name=reasoning), rng.choice(PLACES))
        if named is not None:  # the answer names its language too: the name is copied from the request
            _ask(row, rng.choice(ANSWER_REQUESTS).format(name=named), rng.choice(PLACES))
            row["final"] = CAPTION.format(language=named) + row["final"]
        if mention:  # never the reasoning's language, so a mention cannot be read as a request
            other = rng.choice([lang for lang in languages if lang != reasoning])
            _ask(row, rng.choice(MENTIONS).format(name=other), rng.choice(PLACES[:2]))
        row["requests"] = {"think": reasoning if think else None, "answer": named}
        row["messages"][0]["content"] = row["developer"]  # what is rendered: the messages, not the flat fields
        row["messages"][1]["content"] = row["user"]
        row["messages"][2]["content"] = row["final"]
        rows.append(row)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def main() -> None:
    out = Path(__file__).resolve().parent / "data"
    out.mkdir(exist_ok=True)
    train, heldout = generate()
    for name, rows in (("train", train), ("heldout", heldout)):
        path = write_jsonl(out / f"multilingual_reasoning_{name}.jsonl", rows)
        print(f"wrote {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
