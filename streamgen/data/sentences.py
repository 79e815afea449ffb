"""Sentence banks for the avatar world: simple templated sentences in five languages.

Each language has four slots (subject, verb, object, ending); a sentence is one
choice per slot, so every language has thousands of sentences of 5-10 words
(2-4 s of speech). A sentence's split (train / val / test) is a hash of its text,
so splits are disjoint by sentence whatever the seed.
"""

from __future__ import annotations

import hashlib

import numpy as np

_BANKS: dict[str, tuple[tuple[str, ...], ...]] = {
    "en": (
        (
            "The old man",
            "My sister",
            "A small dog",
            "The teacher",
            "Our neighbour",
            "The young pilot",
            "Every child",
            "The baker",
            "A tired student",
            "The captain",
        ),
        (
            "found",
            "painted",
            "carried",
            "opened",
            "remembered",
            "cleaned",
            "bought",
            "watched",
            "moved",
            "described",
        ),
        (
            "a blue box",
            "the heavy door",
            "seven apples",
            "the broken clock",
            "a long letter",
            "the garden gate",
            "two paper boats",
            "the morning news",
            "a warm blanket",
            "the silver key",
        ),
        (
            "before lunch.",
            "in the rain.",
            "with great care.",
            "near the river.",
            "last summer.",
            "without a word.",
            "at the market.",
            "very slowly.",
            "after the storm.",
            "every morning.",
        ),
    ),
    "de": (
        (
            "Der alte Mann",
            "Meine Schwester",
            "Ein kleiner Hund",
            "Die Lehrerin",
            "Unser Nachbar",
            "Der junge Pilot",
            "Jedes Kind",
            "Der Bäcker",
            "Eine müde Studentin",
            "Der Kapitän",
        ),
        ("fand", "malte", "trug", "öffnete", "kaufte", "putzte", "sah", "bewegte", "suchte", "beschrieb"),
        (
            "eine blaue Kiste",
            "die schwere Tür",
            "sieben Äpfel",
            "die kaputte Uhr",
            "einen langen Brief",
            "das Gartentor",
            "zwei Papierboote",
            "die Zeitung",
            "eine warme Decke",
            "den silbernen Schlüssel",
        ),
        (
            "vor dem Mittag.",
            "im Regen.",
            "mit großer Sorgfalt.",
            "am Fluss.",
            "letzten Sommer.",
            "ohne ein Wort.",
            "auf dem Markt.",
            "sehr langsam.",
            "nach dem Sturm.",
            "jeden Morgen.",
        ),
    ),
    "fr": (
        (
            "Le vieil homme",
            "Ma sœur",
            "Un petit chien",
            "La maîtresse",
            "Notre voisin",
            "Le jeune pilote",
            "Chaque enfant",
            "Le boulanger",
            "Une étudiante fatiguée",
            "Le capitaine",
        ),
        (
            "a trouvé",
            "a peint",
            "a porté",
            "a ouvert",
            "a acheté",
            "a nettoyé",
            "a regardé",
            "a déplacé",
            "a cherché",
            "a décrit",
        ),
        (
            "une boîte bleue",
            "la porte lourde",
            "sept pommes",
            "la vieille horloge",
            "une longue lettre",
            "le portail du jardin",
            "deux bateaux en papier",
            "le journal",
            "une couverture chaude",
            "la clé en argent",
        ),
        (
            "avant midi.",
            "sous la pluie.",
            "avec grand soin.",
            "près de la rivière.",
            "l'été dernier.",
            "sans un mot.",
            "au marché.",
            "très lentement.",
            "après l'orage.",
            "chaque matin.",
        ),
    ),
    "es": (
        (
            "El anciano",
            "Mi hermana",
            "Un perro pequeño",
            "La maestra",
            "Nuestro vecino",
            "El joven piloto",
            "Cada niño",
            "El panadero",
            "Una estudiante cansada",
            "El capitán",
        ),
        ("encontró", "pintó", "llevó", "abrió", "compró", "limpió", "miró", "movió", "buscó", "describió"),
        (
            "una caja azul",
            "la puerta pesada",
            "siete manzanas",
            "el reloj roto",
            "una carta larga",
            "la puerta del jardín",
            "dos barcos de papel",
            "el periódico",
            "una manta caliente",
            "la llave de plata",
        ),
        (
            "antes del almuerzo.",
            "bajo la lluvia.",
            "con mucho cuidado.",
            "cerca del río.",
            "el verano pasado.",
            "sin decir nada.",
            "en el mercado.",
            "muy despacio.",
            "después de la tormenta.",
            "cada mañana.",
        ),
    ),
    "it": (
        (
            "Il vecchio",
            "Mia sorella",
            "Un piccolo cane",
            "La maestra",
            "Il nostro vicino",
            "Il giovane pilota",
            "Ogni bambino",
            "Il fornaio",
            "Una studentessa stanca",
            "Il capitano",
        ),
        (
            "ha trovato",
            "ha dipinto",
            "ha portato",
            "ha aperto",
            "ha comprato",
            "ha pulito",
            "ha guardato",
            "ha spostato",
            "ha cercato",
            "ha descritto",
        ),
        (
            "una scatola blu",
            "la porta pesante",
            "sette mele",
            "l'orologio rotto",
            "una lunga lettera",
            "il cancello del giardino",
            "due barche di carta",
            "il giornale",
            "una coperta calda",
            "la chiave d'argento",
        ),
        (
            "prima di pranzo.",
            "sotto la pioggia.",
            "con grande cura.",
            "vicino al fiume.",
            "l'estate scorsa.",
            "senza una parola.",
            "al mercato.",
            "molto lentamente.",
            "dopo il temporale.",
            "ogni mattina.",
        ),
    ),
}


def bank_language(espeak_language: str) -> str:
    """espeak voice name ("en-us", "de") -> sentence bank key ("en", "de")."""
    return espeak_language.split("-")[0]


def sentence_split(text: str) -> str:
    """train / val / test by a stable hash of the sentence (10% test, 10% val)."""
    bucket = int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:4], "little") % 10
    return "test" if bucket == 0 else "val" if bucket == 1 else "train"


def sample_sentence(rng: np.random.Generator, espeak_language: str, split: str) -> str:
    """A random sentence of the language whose split is `split`."""
    slots = _BANKS[bank_language(espeak_language)]
    for _ in range(1000):
        text = " ".join(slot[int(rng.integers(len(slot)))] for slot in slots)
        if sentence_split(text) == split:
            return text
    # cannot happen: every bank has 10^4 sentences
    raise RuntimeError(f"no {split} sentence found for {espeak_language}")
