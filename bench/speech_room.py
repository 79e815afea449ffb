"""`python -m bench.speech_room`: fit server/speech.py's SPEECH_FLOOR_MS to espeak-ng's own speech.

The speech queue's pre-check (`server.speech.speech_seconds_at_least`) must stay below the
length espeak-ng speaks a text in (a text that fits is never refused before its synthesis) and
near it on prose and numbers (one that does not fit is refused then, not after a synthesis for
nothing). Its estimate is linear in what `count_phonemes` counts, per language:

    unstressed phonemes x (fixed + per_phoneme x 165 / rate) + stressed vowels x stressed x 165 / rate
    + (clauses closed by a comma x comma + by a full stop x stop + by an abbreviation's dot x dot
       + one-word clauses closed by a full stop x short stop) x 165 / rate   (rate <= 165 only)

This synthesises the texts of two sets (`fit`, `check`: prose of 1-6 sentences from the sentence
banks, digits and abbreviations, emoji alone and together, repeated short words, greetings, comma
lists, abbreviations' dots, initials, short exclamations, sentences of two words; `check` with
other prose, emoji, short words, abbreviations, initials, exclamations and sentences) at six rate
and voice-variant pairs, and finds by linear programming, per language, the weights that keep
every `fit` text at most `--margin` of its speech while they come as close to it as they can on
prose, digits, exclamations and comma lists at the default rate, with each pause's weight at most
the pause espeak-ng makes there (measured) plus `--pause-allowance`. It prints the weights
(milliseconds, rounded down), the measured pauses and, for both sets, the estimate over the
speech by kind of text. About a minute on 2 cores.
"""

from __future__ import annotations

import argparse

import numpy as np

from streamgen.cli import number_where, seed_number

RATES_AND_VARIANTS = ((165, None), (80, None), (450, None), (120, "f3"), (250, "m3"), (165, "klatt"))
DIGITS_AND_ABBREVIATIONS = (
    "In 1987, 2,345 people paid $19.99 each; by 2023 it was 4,567,890 at 12.5% off.",
    "Call 555 0123 or 555 0199 before 10:30 on 12/05/2024, code 8472 9931 7730.",
    "Dr. J.R.R. Smith of NASA, the FBI and the UN met Mr. Lee at 5 p.m. in the U.S.A.",
)
# (emoji, short words by language, greetings) of each set
SHORT_TEXTS = {
    "fit": (
        "😀 😂 🎉 👍 ❤️ 🙂 🚀 🌍 😍 🤩 😇 🥳",
        {"en-us": "the a of to and in", "en": "the a of to and in", "de": "der die das und zu ein",
         "fr": "le la les de et un", "es": "el la los de y un", "it": "il lo la di e un"},
        {"en-us": "Good morning everyone", "en": "Good morning everyone", "de": "Guten Morgen zusammen",
         "fr": "Bonjour tout le monde", "es": "Buenos días a todos", "it": "Buongiorno a tutti"},
    ),
    "check": (
        "😎 🤔 🐱 🍎 🏀 🎂 😴 👋",
        {"en-us": "or as if so we he", "en": "or as if so we he", "de": "er sie wir zum vom ob",
         "fr": "je tu ce se ne que", "es": "yo tu lo que con por", "it": "io tu ci si non che"},
        {"en-us": "Thanks", "en": "Thanks", "de": "Danke", "fr": "Merci", "es": "Gracias", "it": "Grazie"},
    ),
}  # fmt: skip
# Abbreviations (espeak-ng's phoneme pass ends a clause at their dot, its speech barely pauses
# there in English), short exclamations and questions (a pause shorter than prose's full stop) and
# sentences of two words (what prose draws out before its full stops, they do not) of each set
SHORT_SENTENCES = {
    "fit": {
        "en-us": (("Mr. Brown and Mrs. Green met Dr. Lee at St. James.", "See Fig. 3 and Vol. 2, e.g. pp. 10 to 12, etc."),
                  "Wow! Really? Yes. No! Okay?", "We sat. Birds sang. Kids played. Dogs barked. Time passed."),
        "en": (("Mr. Brown and Mrs. Green met Dr. Lee at St. James.", "See Fig. 3 and Vol. 2, e.g. pp. 10 to 12, etc."),
               "Wow! Really? Yes. No! Okay?", "We sat. Birds sang. Kids played. Dogs barked. Time passed."),
        "de": (("Dr. Müller und Prof. Schmidt trafen Hr. Weber.", "Siehe z. B. Nr. 5, usw. bzw. ca. 3 Std."),
               "Ja! Nein? Gut. Hallo! Echt?", "Wir saßen. Vögel sangen. Kinder spielten. Hunde bellten. Zeit verging."),
        "fr": (("M. Dupont et Mme Martin chez le Dr. Petit.", "Voir p. ex. le chap. 3, etc."),
               "Ah ! Quoi ? Oui. Non ! Bien ?", "Il pleut. Elle dort. Nous partons. Tu ris. Ils mangent."),
        "es": (("El Sr. García y la Sra. López con el Dr. Ruiz.", "Ud. y el Lic. Pérez, p. ej. pág. 5, etc."),
               "¡Ay! ¿Sí? No. ¡Vale! ¿Qué?", "Llueve mucho. Ella duerme. Nosotros salimos. Tú ríes. Ellos comen."),
        "it": (("Il Sig. Rossi e la Sig.ra Bianchi dal Dott. Verdi.", "Il Prof. Galli e l'Avv. Ferri, ecc., pag. 5."),
               "Ah! Cosa? Sì. No! Bene?", "Piove forte. Lei dorme. Noi partiamo. Tu ridi. Loro mangiano."),
    },
    "check": {
        "en-us": (("Dr. Smith went to St. Paul's.", "Prof. Ng and Gen. Lee, approx. 5 min. vs. Sgt. Pepper."),
                  "Hi! Really? Yes.", "Eat first. Then sleep. Cars honk. Rain falls. Night comes."),
        "en": (("Mr. Jones met Prof. Adams.", "Prof. Ng and Gen. Lee, approx. 5 min. vs. Sgt. Pepper."),
               "Dr. Who? Mr. Bean!", "Eat first. Then sleep. Cars honk. Rain falls. Night comes."),
        "de": (("Dr. Klein sprach mit Fr. Wolf.", "Dr. Weiß, d. h. Fr. Dr. Lang, ggf. mit Prof. Roth."),
               "Hi! Really? Yes.", "Iss zuerst. Dann schlaf. Autos hupen. Regen fällt. Nacht kommt."),
        "fr": (("Mme Durand et M. Blanc.", "Mlle Roux et Mgr Blanc, cf. p. 12."),
               "Oui ! Non ? Bon.", "Il mange. Tu dors. Elle vient. On part. Ils chantent."),
        "es": (("La Dra. Gómez y el Sr. Díaz.", "La Srta. Ruiz y el Ing. Soto, aprox. a las 5."),
               "¡Hola! ¿Qué? Sí.", "Come bien. Duerme ya. Llueve hoy. Viene pronto. Todos cantan."),
        "it": (("Il Dott. Neri e la Sig.ra Conti.", "L'Ing. Riva e il Dott. Sala, cfr. pag. 7."),
               "Sì! No? Bene.", "Mangia bene. Dormi ora. Piove oggi. Viene presto. Tutti cantano."),
    },
}  # fmt: skip
# initials (espeak's speech pauses 8-21 ms at most of their dots, its phoneme pass ends a clause)
INITIALS = {"fit": ("P. Q. R. S. T. U.", "J. K. Rowling, E. B. White."),
            "check": ("K. L. M. N. O.", "H. G. Wells, T. S. Eliot.")}  # fmt: skip


def texts(language: str, which: str, seed: int) -> list[tuple[str, str]]:
    """(kind, text) of one language's set."""
    from streamgen.data.sentences import sample_sentence

    rng = np.random.default_rng(seed)
    emoji, words, greeting = SHORT_TEXTS[which]
    emoji, words, greeting = emoji.split(), words[language].split(), greeting[language]
    out = [
        (
            "prose",
            " ".join(sample_sentence(rng, language, "train" if which == "fit" else "test") for _ in range(n)),
        )
        for n in (1, 2, 3, 4, 6)
        for _ in range(2)
    ]
    out += [("digits", text) for text in DIGITS_AND_ABBREVIATIONS]
    out += [("emoji", " ".join(emoji[:k])) for k in (1, 3, 8)] + [("emoji", " ".join([emoji[0]] * 3))]
    # each other emoji alone: some names are mostly stressed vowels, which the 8 together hid
    out += [("emoji", e) for e in emoji[1:]]
    out += [("short words", " ".join(words[i % len(words)] for i in range(k))) for k in (3, 12, 30)]
    out += [("short words", " ".join([words[0]] * 20)), ("short words", " ".join([words[1]] * 20))]
    out += [
        ("greeting", f"{greeting} {emoji[0]}"),
        ("greeting", greeting),
        ("greeting", f"{greeting}, {greeting}."),
    ]
    # each short word as a comma list: a comma's pause and the drawn-out word before it vary with
    # the word (with German "die" alone fitted, "er, er, ..." came out at 1.02 of its speech)
    out += [("commas", ", ".join([word] * 12) + ",") for word in words]
    out += [("commas", "one, two, three, four, five.")]
    abbreviations, exclamations, two_words = SHORT_SENTENCES[which][language]
    out += [("abbreviations", text) for text in abbreviations]
    out += [("initials", text) for text in INITIALS[which]]
    out += [("exclamations", exclamations), ("two words", two_words)]
    return out


def features(text: str, voice) -> np.ndarray:
    """What the estimate multiplies its weights by (see the module docstring)."""
    from streamgen.data.speech import count_phonemes

    count = count_phonemes(text, voice)
    slower = 165 / voice.rate
    pauses = slower if voice.rate <= 165 else 0.0
    return np.array([count.unstressed, count.unstressed * slower, count.stressed * slower,
                     count.comma_pauses * pauses, count.stop_pauses * pauses,
                     count.abbreviation_dots * pauses, count.short_stop_pauses * pauses])  # fmt: skip


def measure(language: str, which: str, seed: int) -> list[dict]:
    from streamgen.data.speech import Voice, synthesize

    rows = []
    for kind, text in texts(language, which, seed):
        for rate, variant in RATES_AND_VARIANTS:
            voice = Voice(language=language, rate=rate, variant=variant)
            rows.append({"kind": kind, "text": text, "rate": rate, "variant": variant,
                         "x": features(text, voice), "seconds": synthesize(text, voice).duration})  # fmt: skip
    return rows


def measured_pauses(language: str) -> tuple[float, float]:
    """The silence (seconds) espeak-ng adds at a comma and at a full stop between two of the
    language's greetings, at the default rate and voice."""
    from streamgen.data.speech import Voice, synthesize

    greeting, voice = SHORT_TEXTS["fit"][2][language], Voice(language=language)

    def silence(text: str) -> float:
        phonemes = synthesize(text, voice).phonemes[:-2]  # (not the end's)
        return sum(p.end - p.start for p in phonemes if p.symbol == "_")

    alone = silence(f"{greeting} {greeting}.")
    return silence(f"{greeting}, {greeting}.") - alone, silence(f"{greeting}. {greeting}.") - alone


def fit(rows: list[dict], margin: float, comma_most: float, stop_most: float) -> np.ndarray:
    """The weights (seconds) keeping every row at most `margin` of its speech, with the largest sum
    of estimate over speech on prose, digits, exclamations and comma lists at the default rate and
    voice (the exclamations and comma lists give the one-word clauses' and the commas' weights
    something to aim at: without, either could come out 0, German and Italian commas did). A
    comma's weight is at most `comma_most`, each full stop's (an abbreviation's dot, a one-word
    clause's) at most `stop_most`: unbounded, the full stop took in what prose's sentences draw
    out before it (en-us 708 ms, for 345 ms of pause), which sentences of two words do not."""
    from scipy.optimize import linprog

    x = np.stack([r["x"] for r in rows])
    seconds = np.array([r["seconds"] for r in rows])
    aimed_kinds = ("prose", "digits", "exclamations", "commas")
    aimed = np.array([r["kind"] in aimed_kinds and r["rate"] == 165 and r["variant"] is None for r in rows])
    bounds = [(0, None)] * 3 + [(0, comma_most)] + [(0, stop_most)] * 3
    result = linprog(-(x[aimed] / seconds[aimed, None]).sum(0), A_ub=x, b_ub=margin * seconds, bounds=bounds)
    if not result.success:
        raise RuntimeError(f"no weights fit: {result.message}")
    return np.floor(result.x * 10000) / 10000  # down to 0.1 ms: below, never above


def ratios(rows: list[dict], weights: np.ndarray) -> dict:
    """Estimate over speech by kind of text: at the default rate and voice, and at any."""
    out: dict[str, list[float]] = {}
    for r in rows:
        ratio = float(r["x"] @ weights / r["seconds"])
        out.setdefault("any text, rate, variant", []).append(ratio)
        if r["rate"] == 165 and r["variant"] is None:
            out.setdefault(r["kind"], []).append(ratio)
    return {k: [round(min(v), 2), round(max(v), 2)] for k, v in out.items()}


def share_of_speech(text: str) -> float:
    """An argparse type: --margin, a share of a text's speech in (0, 1] (a negative one ended in
    linprog's infeasibility, raised with a traceback; above 1 the pre-check could refuse a text that
    fits, the one thing it must not do)."""
    return number_where(text, lambda v: 0 < v <= 1, "a share of the speech in (0, 1]")


def allowance_ms(text: str) -> float:
    """An argparse type: --pause-allowance, 0 or more milliseconds, inf for any (a negative one was
    a bound below zero, linprog's traceback)."""
    return number_where(text, lambda v: v >= 0, "a number of milliseconds (0 or more, or inf)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--margin",
        type=share_of_speech,
        default=0.90,
        help="the most of its speech any fitted text's estimate is (default: %(default)g)",
    )
    # (numpy's generator refused a negative seed with a traceback)
    p.add_argument(
        "--seed", type=seed_number, default=1, help="of the prose drawn from the sentence banks (default: 1)"
    )
    p.add_argument(
        "--pause-allowance",
        type=allowance_ms,
        default=25.0,
        help="ms a comma's or a full stop's weight may exceed the pause espeak-ng makes there (inf: any; "
        "default: %(default)g)",
    )


def main(args) -> dict:
    from streamgen.data.speech import LANGUAGES

    result = {}
    for language in LANGUAGES:
        fitted = measure(language, "fit", args.seed)
        pauses = measured_pauses(language)
        weights = fit(fitted, args.margin, *(pause + args.pause_allowance / 1000 for pause in pauses))
        result[language] = {
            "ms": [round(1000 * w, 1) for w in weights],  # SPEECH_FLOOR_MS's order
            "pauses_ms": [round(1000 * pause, 1) for pause in pauses],  # at a comma, at a full stop
            "fit": ratios(fitted, weights),
            "check": ratios(measure(language, "check", args.seed + 1), weights),
        }
    return result


if __name__ == "__main__":
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    print(json.dumps(main(parser.parse_args()), indent=1, ensure_ascii=False))
