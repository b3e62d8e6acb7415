"""Writes openvino_reranker/calibration_pairs.jsonl, the built-in calibration set of `openvino-reranker quantize`.

    python tools/make_calibration_pairs.py [OUT]

Every sentence below was written for this project from general knowledge (no text copied from any source), so the
set is as free to use as the rest of the repository (Apache-2.0). Each topic holds facts, each fact a question, a
keyword query and the sentence that answers it, plus a few background sentences. Every query (each fact's question
and its keyword query) gets six documents, the mix a reranker sees: the answer inside a passage of its topic (two to
six sentences), the answer alone, another fact of the same topic (related, not the answer), a passage of the same
topic without the answer, a short passage of another topic and a long one (every sentence of three other topics,
200-400 tokens, so that long pairs are calibrated too). A few topics are in French, German and Spanish, for
multilingual models. Seeded: the same file every run.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "openvino_reranker" / "calibration_pairs.jsonl"

# topic -> (facts: (question, keyword query, answer sentence), background sentences)
TOPICS: dict[str, tuple[list[tuple[str, str, str]], list[str]]] = {
    "water": ([
        ("at what temperature does water boil at sea level", "water boiling point sea level",
         "At sea level pure water boils at 100 degrees Celsius, which is 212 degrees Fahrenheit."),
        ("why does water boil at a lower temperature on a mountain", "boiling point altitude",
         "Higher up, the air pressure is lower, so water reaches its boiling point at a lower temperature; on a "
         "high mountain it can boil below 90 degrees Celsius."),
        ("why does ice float on water", "ice density float",
         "Ice floats because water expands when it freezes, so solid ice is about nine percent less dense than "
         "liquid water."),
    ], [
        "Water is a molecule of two hydrogen atoms bound to one oxygen atom.",
        "Most of the fresh water on Earth is locked in glaciers and ice sheets.",
        "Salt dissolved in water lowers its freezing point, which is why roads are salted in winter.",
        "Water has a high heat capacity, so oceans warm and cool slowly compared with land.",
    ]),
    "solar": ([
        ("how do solar panels make electricity", "photovoltaic cell how it works",
         "A solar cell is a semiconductor: light knocks electrons loose in the silicon, and the electric field "
         "built into the cell drives them through a circuit as direct current."),
        ("why do solar installations need an inverter", "solar inverter purpose",
         "Panels produce direct current, and an inverter converts it into the alternating current that homes and "
         "the grid use."),
        ("how efficient are commercial solar panels", "solar panel efficiency percent",
         "Typical commercial panels convert around twenty percent of the sunlight that reaches them into "
         "electricity."),
    ], [
        "Solar output depends on the angle of the panel, the season and how cloudy the sky is.",
        "Panels lose a little efficiency as they get hot.",
        "Batteries let a household use solar energy after sunset.",
        "Large solar farms are often built in deserts, where the sky is clear most of the year.",
    ]),
    "heart": ([
        ("how many chambers does the human heart have", "heart chambers number",
         "The human heart has four chambers: two atria that receive blood and two ventricles that pump it out."),
        ("what is a normal resting heart rate for adults", "resting heart rate normal range",
         "For most adults a resting heart rate between 60 and 100 beats per minute is considered normal."),
        ("what does blood pressure measure", "blood pressure meaning systolic diastolic",
         "Blood pressure is the force of blood on the artery walls, given as the pressure while the heart beats "
         "over the pressure while it rests between beats."),
    ], [
        "Regular exercise strengthens the heart muscle.",
        "Arteries carry blood away from the heart and veins bring it back.",
        "Red blood cells carry oxygen bound to a protein called hemoglobin.",
        "A doctor listens to the heart with a stethoscope.",
    ]),
    "bread": ([
        ("why does bread dough need to rise", "yeast dough rising",
         "Yeast feeds on the sugars in flour and releases carbon dioxide, and the gas trapped in the gluten "
         "network makes the dough rise."),
        ("what is sourdough", "sourdough starter",
         "Sourdough is leavened by a starter, a culture of wild yeast and lactic acid bacteria kept alive with "
         "regular feedings of flour and water."),
        ("why knead bread dough", "kneading gluten",
         "Kneading develops gluten, the stretchy protein network that holds the gas and gives bread its chewy "
         "structure."),
    ], [
        "A basic bread needs only flour, water, salt and yeast.",
        "Bread is baked in a hot oven, often with steam for the first minutes to get a good crust.",
        "Whole wheat flour contains the bran and germ of the grain.",
        "Flatbreads such as tortillas are made without any leavening.",
    ]),
    "rivers": ([
        ("which is the longest river in africa", "longest river africa",
         "The Nile is the longest river in Africa, flowing north for more than 6,600 kilometres to the "
         "Mediterranean Sea."),
        ("what is a river delta", "river delta definition",
         "A delta forms where a river slows down as it enters a sea or lake and drops the sediment it carries, "
         "building new land in a fan shape."),
        ("how do meanders form in a river", "meander formation erosion",
         "A river erodes the outer bank of a bend, where the water flows fastest, and deposits sand on the inner "
         "bank, so the bends slowly grow into meanders."),
    ], [
        "The Amazon carries more water than any other river.",
        "Many of the world's oldest cities were founded on river banks.",
        "Dams hold back river water to generate electricity and store water for dry seasons.",
        "The area drained by a river and its tributaries is called its basin.",
    ]),
    "computers": ([
        ("what does a cpu do", "cpu function processor",
         "The central processing unit executes a program's instructions: it fetches each one from memory, decodes "
         "it and carries out the arithmetic, logic or data movement it asks for."),
        ("what is the difference between ram and storage", "ram vs ssd storage",
         "RAM holds the data a computer is working on and is cleared when the power goes off, while a disk or SSD "
         "keeps files permanently."),
        ("what is an operating system", "operating system purpose",
         "An operating system manages the hardware and runs programs, giving each one memory, processor time and "
         "access to files and devices."),
    ], [
        "Modern processors have several cores that run instructions in parallel.",
        "A compiler translates source code into machine instructions.",
        "Binary numbers use only the digits zero and one.",
        "Computers connect to each other over networks using agreed protocols.",
    ]),
    "python": ([
        ("how do I read a file line by line in python", "python read file lines",
         "In Python, open the file in a with statement and loop over the file object: each iteration gives one "
         "line, and the file is closed when the block ends."),
        ("what is a list comprehension in python", "python list comprehension syntax",
         "A list comprehension builds a list in one expression, such as [x * x for x in numbers if x > 0], "
         "instead of a loop that appends to a list."),
        ("how to install a package with pip", "pip install package",
         "Run pip install followed by the package name, preferably inside a virtual environment so that the "
         "project's packages stay separate from the system's."),
    ], [
        "Python uses indentation to mark blocks of code.",
        "The standard library includes modules for files, networking, dates and JSON.",
        "Python's dictionaries map keys to values and keep insertion order.",
        "Exceptions are handled with try and except blocks.",
    ]),
    "space": ([
        ("how far is the moon from the earth", "distance earth moon km",
         "The Moon is on average about 384,400 kilometres from the Earth."),
        ("why does the moon have phases", "moon phases cause",
         "The Moon's phases come from how much of its sunlit half faces the Earth as it orbits us once a month."),
        ("which planet is the largest in the solar system", "largest planet",
         "Jupiter is the largest planet in the solar system, more than eleven times wider than the Earth."),
    ], [
        "Mars has two small moons and the tallest volcano known in the solar system.",
        "Light from the Sun takes about eight minutes to reach the Earth.",
        "Saturn's rings are made of countless pieces of ice and rock.",
        "The first crewed landing on the Moon took place in 1969.",
    ]),
    "trains": ([
        ("how fast do high speed trains go", "high speed rail top speed",
         "High-speed trains in regular service usually run at 250 to 320 kilometres per hour on dedicated tracks."),
        ("when was the first public steam railway opened", "first public railway steam",
         "The first public railway to use steam locomotives opened in England in 1825."),
        ("how does a maglev train work", "maglev magnetic levitation",
         "A maglev train floats above its guideway on magnetic fields, which also push it forward, so there is no "
         "wheel friction."),
    ], [
        "Freight trains carry heavy goods such as coal, grain and containers over long distances.",
        "Many cities run underground metro lines beneath their streets.",
        "Electric trains draw power from overhead wires or a third rail.",
        "A train timetable lists when each service arrives and departs.",
    ]),
    "coffee": ([
        ("where does coffee come from originally", "coffee origin history",
         "Coffee plants are native to the highlands of Ethiopia, and coffee drinking spread from Yemen across the "
         "Middle East in the fifteenth century."),
        ("how much caffeine is in a cup of coffee", "caffeine content cup",
         "A typical cup of brewed coffee contains roughly 80 to 100 milligrams of caffeine, depending on the beans "
         "and how it is made."),
        ("what is the difference between arabica and robusta", "arabica robusta difference",
         "Arabica beans are sweeter and more aromatic, while robusta beans are more bitter, hardier to grow and "
         "contain about twice as much caffeine."),
    ], [
        "Coffee beans are the roasted seeds of a cherry-like fruit.",
        "Espresso is made by forcing hot water through finely ground coffee under pressure.",
        "Brazil is the largest coffee producer in the world.",
        "Roasting turns green coffee beans brown and develops their flavour.",
    ]),
    "birds": ([
        ("why do birds migrate", "bird migration reason",
         "Many birds migrate to follow food and daylight: they breed where summers are rich in insects and move "
         "to warmer regions when winter comes."),
        ("how do birds navigate during migration", "bird navigation magnetic field",
         "Migrating birds find their way using the position of the sun and stars, landmarks and the Earth's "
         "magnetic field."),
        ("which bird is the fastest", "fastest bird speed dive",
         "The peregrine falcon is the fastest bird, reaching more than 300 kilometres per hour when it dives."),
    ], [
        "Birds are the only living animals with feathers.",
        "Penguins cannot fly but are excellent swimmers.",
        "Many songbirds learn their songs from their parents.",
        "Hummingbirds can hover and even fly backwards.",
    ]),
    "climate": ([
        ("what causes the greenhouse effect", "greenhouse effect cause",
         "Gases such as carbon dioxide and methane let sunlight through but absorb the heat the Earth radiates "
         "back, which keeps the lower atmosphere warmer."),
        ("what is the difference between weather and climate", "weather vs climate",
         "Weather is the state of the atmosphere on a given day, while climate is the average pattern of weather "
         "over decades."),
        ("why is sea level rising", "sea level rise causes",
         "Sea level rises as glaciers and ice sheets melt and as sea water expands when it warms."),
    ], [
        "Forests store large amounts of carbon in wood and soil.",
        "Weather stations record temperature, rainfall, wind and pressure.",
        "Burning coal, oil and gas releases carbon dioxide.",
        "Arctic sea ice covers a smaller area in summer than it did a few decades ago.",
    ]),
    "libraries": ([
        ("how do library classification systems work", "library classification dewey",
         "Classification systems such as the Dewey Decimal system give every book a number by subject, so books "
         "on the same subject stand together on the shelves."),
        ("can I borrow ebooks from a public library", "library ebook lending",
         "Many public libraries lend ebooks and audiobooks through an app, with a limited number of copies and a "
         "loan period like printed books."),
        ("what was the library of alexandria", "library of alexandria history",
         "The Library of Alexandria in ancient Egypt was one of the largest libraries of the ancient world and "
         "collected scrolls from across the Mediterranean."),
    ], [
        "Libraries offer reading rooms, study spaces and computers for the public.",
        "A library card lets a member borrow books for a few weeks.",
        "Rare books are kept in archives with controlled temperature and humidity.",
        "Librarians help readers find sources for their questions.",
    ]),
    "volcanoes": ([
        ("why do volcanoes erupt", "volcano eruption cause magma",
         "A volcano erupts when molten rock, lighter than the solid rock around it, rises and the gases dissolved "
         "in it expand until the pressure breaks through the surface."),
        ("what is the ring of fire", "ring of fire pacific volcanoes",
         "The Ring of Fire is a belt of volcanoes and earthquakes around the Pacific Ocean, where oceanic plates "
         "sink beneath other plates."),
        ("is volcanic soil fertile", "volcanic soil farming",
         "Weathered volcanic ash makes very fertile soil, which is why farms often surround active volcanoes."),
    ], [
        "Lava is magma that has reached the surface.",
        "Some volcanoes have been dormant for thousands of years.",
        "Ash clouds from large eruptions can disrupt air travel.",
        "Hawaii's islands were built by volcanic eruptions over millions of years.",
    ]),
    "music": ([
        ("how many keys does a piano have", "piano number of keys",
         "A standard modern piano has 88 keys: 52 white keys and 36 black keys."),
        ("what is an octave in music", "octave definition frequency",
         "An octave is the interval between one note and the next note of the same name, whose frequency is "
         "twice as high."),
        ("how does a violin produce sound", "violin sound strings bow",
         "The bow's hair grips and releases a string many times a second, making it vibrate, and the wooden body "
         "amplifies the vibration."),
    ], [
        "An orchestra is divided into strings, woodwinds, brass and percussion.",
        "Tempo is the speed at which a piece of music is played.",
        "Many folk songs were passed on by ear long before they were written down.",
        "A chord is three or more notes played together.",
    ]),
    "gardening": ([
        ("when should I plant tomatoes", "tomato planting time frost",
         "Plant tomatoes outdoors after the last frost, once the soil has warmed, because the plants are killed by "
         "cold nights."),
        ("how often should I water houseplants", "watering houseplants frequency",
         "Most houseplants should be watered when the top few centimetres of soil are dry; too much water rots "
         "the roots."),
        ("what is compost made of", "compost ingredients",
         "Compost is made from kitchen scraps, leaves and grass clippings that microbes break down into dark, "
         "crumbly soil."),
    ], [
        "Mulch keeps soil moist and holds back weeds.",
        "Bees and other insects pollinate many fruit and vegetable plants.",
        "Some plants prefer shade while others need full sun.",
        "Crop rotation helps keep soil healthy in a vegetable garden.",
    ]),
    "money": ([
        ("what is inflation", "inflation definition prices",
         "Inflation is the rate at which prices in general rise over time, so that the same amount of money buys "
         "less."),
        ("how does compound interest work", "compound interest explained",
         "With compound interest, the interest earned is added to the balance, so each period's interest is "
         "calculated on a larger amount."),
        ("what does a central bank do", "central bank role interest rates",
         "A central bank issues a country's currency and sets its key interest rate to keep prices stable."),
    ], [
        "A budget lists expected income and spending.",
        "Shares give their owners a part of a company.",
        "Banks lend out part of the money deposited with them.",
        "Exchange rates say how much one currency is worth in another.",
    ]),
    "languages": ([
        ("how many languages are spoken in the world", "number of languages world",
         "Roughly seven thousand languages are spoken in the world today, many of them by small communities."),
        ("what is a language family", "language family definition",
         "A language family is a group of languages descended from a common ancestor, such as the Indo-European "
         "family that includes English, Hindi and Russian."),
        ("is it easier for children to learn a second language", "children second language learning",
         "Children who hear a language early usually reach a native-like accent more easily than adults, although "
         "adults often learn grammar and vocabulary faster at first."),
    ], [
        "Some languages are written from right to left.",
        "Dictionaries record the meanings and spellings of words.",
        "Many words in English were borrowed from French and Latin.",
        "Sign languages have their own grammar and vocabulary.",
    ]),
    "fr_cuisine": ([
        ("comment faire une vinaigrette", "recette vinaigrette",
         "Pour une vinaigrette, on mélange une cuillère de vinaigre, une pincée de sel et de la moutarde, puis on "
         "ajoute trois cuillères d'huile en fouettant."),
        ("quelle est la différence entre une crêpe et une galette", "crêpe galette différence",
         "La crêpe se fait avec de la farine de blé et se mange souvent sucrée, tandis que la galette bretonne est "
         "faite de farine de sarrasin et se mange salée."),
    ], [
        "Le pain se vend frais chaque matin dans les boulangeries.",
        "Le fromage est souvent servi avant le dessert.",
        "Une soupe de légumes se prépare avec des poireaux, des carottes et des pommes de terre.",
    ]),
    "de_verkehr": ([
        ("wie schnell darf man auf der autobahn fahren", "autobahn tempolimit",
         "Auf vielen Abschnitten der deutschen Autobahn gibt es kein allgemeines Tempolimit, empfohlen sind "
         "jedoch 130 Kilometer pro Stunde."),
        ("wie funktioniert ein fahrradschloss mit zahlen", "zahlenschloss fahrrad",
         "Ein Zahlenschloss öffnet sich, wenn die Ringe die richtige Zahlenfolge zeigen, weil dann die Kerben "
         "aller Scheiben in einer Linie liegen."),
    ], [
        "Viele Menschen fahren in der Stadt mit dem Fahrrad zur Arbeit.",
        "Die Bahn verbindet die großen Städte mit schnellen Zügen.",
        "Im Winter braucht ein Auto Winterreifen.",
    ]),
    "es_salud": ([
        ("cuántas horas debe dormir un adulto", "horas de sueño adulto",
         "Se recomienda que un adulto duerma entre siete y nueve horas cada noche."),
        ("por qué es importante beber agua", "importancia beber agua",
         "El agua regula la temperatura del cuerpo, transporta nutrientes y ayuda a los riñones a eliminar "
         "desechos."),
    ], [
        "Caminar treinta minutos al día mejora la salud del corazón.",
        "Las frutas y verduras aportan vitaminas y fibra.",
        "El médico recomienda lavarse las manos con frecuencia.",
    ]),
}


def passage(rng: random.Random, sentences: list[str], lo: int, hi: int) -> str:
    return " ".join(rng.sample(sentences, min(len(sentences), rng.randint(lo, hi))))


def long_passage(rng: random.Random, topics) -> str:
    """Every sentence of a few topics, shuffled: 200-400 tokens, so that calibration sees long pairs too."""
    sentences = [sentence for facts, background in topics for sentence in background + [f[2] for f in facts]]
    rng.shuffle(sentences)
    return " ".join(sentences)


def make_pairs(seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    names = sorted(TOPICS)
    pairs = []
    for name in names:
        facts, background = TOPICS[name]
        others = [t for t in names if t != name]
        for i, (question, keywords, answer) in enumerate(facts):
            siblings = [f[2] for j, f in enumerate(facts) if j != i]
            with_answer = background + siblings
            long_answer = rng.sample(with_answer, min(len(with_answer), rng.randint(1, 5)))
            long_answer.insert(rng.randint(0, len(long_answer)), answer)
            documents = [
                " ".join(long_answer),
                answer,
                rng.choice(siblings),
                passage(rng, background, 1, 4),
            ]
            near, far = (TOPICS[t] for t in rng.sample(others, 2))
            documents.append(passage(rng, near[1] + [f[2] for f in near[0]], 1, 6))
            documents.append(long_passage(rng, [far, *(TOPICS[t] for t in rng.sample(others, 2))]))
            for query in (question, keywords):
                pairs += [{"query": query, "document": document} for document in documents]
    rng.shuffle(pairs)
    return pairs


def main() -> int:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else OUT
    pairs = make_pairs()
    out.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    print(f"wrote {len(pairs)} pairs to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
