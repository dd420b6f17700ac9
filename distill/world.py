"""A seeded fictional world: entities, a passage corpus about them, and questions that need one
or two retrieval hops plus exact computation. Nothing here can be known without the corpus, and
test questions only mention entities held out from training.

    world = make_world(seed=0, people=60)
    world.passages   # [{"id", "title", "text"}]: several varied passages per entity + distractors
    world.train, world.test   # [{"id", "question", "answer", "kind", "plan": [...], "entities": [...]}]

Each question carries its derivation (`plan`): the facts to look up (entity, attribute, value, the
passage that states it) and a Python expression over them that gives the answer. The oracle
teacher writes trajectories and CoT traces from that plan."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

SYLLABLES = ["ka", "lo", "mer", "vin", "tas", "ro", "bel", "qui", "dor", "an", "sel", "ur", "zen", "ta", "mi",
             "vor", "el", "gra", "nu", "pha", "lis", "tor", "ca", "den", "yo", "ris", "mal", "te", "sun", "ob"]
FIRST = ["Ilsa", "Toren", "Maro", "Vessa", "Quill", "Dara", "Esk", "Lunet", "Pell", "Orin", "Sabe", "Yara", "Cato",
         "Nim", "Rhea", "Tav", "Odile", "Bram", "Ines", "Kael"]
KM_TO_MILES = 0.621371


def _name(rng: random.Random, parts: int = 2) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(parts)).capitalize()


@dataclass
class Entity:
    kind: str
    name: str
    facts: dict = field(default_factory=dict)


@dataclass
class World:
    entities: list[Entity]
    passages: list[dict]
    train: list[dict]
    test: list[dict]
    fact_passage: dict = field(default_factory=dict)  # (entity name, attribute) -> passage id


# Varied prose for each fact; {n} is the entity, {v} the value.
TEMPLATES = {
    "city.population": ["{n} is home to {v} people.", "The population of {n} was counted at {v}.",
                        "About {v} residents live in {n}; the census gives exactly {v}."],
    "city.area": ["{n} covers an area of {v} square kilometres.", "The city limits of {n} enclose {v} km².",
                  "With {v} square kilometres of land, {n} is a compact town."],
    "city.river": ["{n} lies on the banks of the {v} river.", "The {v} river flows through the centre of {n}.",
                   "Bridges over the {v} connect the old quarters of {n}."],
    "city.founded": ["{n} was founded in {v}.", "Settlers established {n} in the year {v}.",
                     "Records date the founding of {n} to {v}."],
    "river.length": ["The {n} river is {v} kilometres long.", "From source to mouth the {n} runs {v} km.",
                     "Geographers measure the {n} at {v} kilometres in length."],
    "company.founded": ["{n} was founded in {v}.", "The firm {n} opened its doors in {v}.",
                        "{n}, established {v}, is an old name in the region."],
    "company.employees": ["{n} employs {v} people.", "The workforce of {n} numbers {v}.",
                          "According to its last report, {n} has {v} employees."],
    "company.hq": ["{n} is headquartered in {v}.", "The head office of {n} stands in {v}.",
                   "{n} runs its business from the city of {v}."],
    "person.born": ["{n} was born in {v}.", "Born in {v}, {n} grew up far from the capital.",
                    "{n} (born {v}) became known well beyond home."],
    "person.birthplace": ["{n} was born in the city of {v}.", "{n} is a native of {v}.",
                          "{n} spent a childhood in {v}, the city of birth."],
    "person.employer": ["{n} works for {v}.", "{n} joined {v} early in a long career.",
                        "Colleagues at {v} describe {n} as meticulous."],
    "invention.year": ["The {n} was invented in {v}.", "The first working {n} appeared in {v}.",
                       "In {v} the {n} was demonstrated for the first time."],
    "invention.inventor": ["The {n} was invented by {v}.", "{v} is credited with creating the {n}.",
                           "Credit for the {n} goes to {v}."],
}
FILLER = {
    "city": ["is known for its quiet streets and old markets.", "attracts visitors every summer.",
             "has a small museum devoted to local crafts."],
    "river": ["is popular with anglers.", "floods in wet springs.", "was once an important trade route."],
    "company": ["has changed owners twice.", "is often mentioned in the business press.", "sponsors a local choir."],
    "person": ["is remembered by many colleagues.", "enjoyed chess and long walks.", "wrote a short memoir."],
    "invention": ["was later improved by others.", "is on display in a regional museum.", "was patented twice."],
}


def make_world(seed: int = 0, people: int = 60, test_share: float = 0.3, questions_per_person: int = 3) -> World:
    rng = random.Random(seed)
    used: set[str] = set()

    def unique(make) -> str:
        while True:
            name = make()
            if name not in used:
                used.add(name)
                return name

    n_cities, n_companies = max(4, people // 3), max(4, people // 3)
    rivers = [Entity("river", unique(lambda: _name(rng)), {"length": rng.randint(40, 2400)})
              for _ in range(max(3, n_cities // 2))]
    cities = [Entity("city", unique(lambda: _name(rng, 3)), {
        "population": rng.randint(2_000, 2_500_000), "area": rng.randint(8, 900),
        "river": rng.choice(rivers).name, "founded": rng.randint(900, 1900)}) for _ in range(n_cities)]
    companies = [Entity("company", unique(lambda: _name(rng) + rng.choice([" Works", " & Co", " Industries", " Labs"])), {
        "founded": rng.randint(1850, 2015), "employees": rng.randint(12, 90_000), "hq": rng.choice(cities).name})
        for _ in range(n_companies)]
    persons = [Entity("person", unique(lambda: f"{rng.choice(FIRST)} {_name(rng)}"), {
        "born": rng.randint(1900, 2000), "birthplace": rng.choice(cities).name,
        "employer": rng.choice(companies).name}) for _ in range(people)]
    inventions = [Entity("invention", unique(lambda: _name(rng).lower() + rng.choice(["scope", " loom", " engine", "graph"])), {
        "year": rng.randint(1920, 2020), "inventor": p.name}) for p in rng.sample(persons, max(4, people // 2))]
    entities = rivers + cities + companies + persons + inventions

    # Passages: each entity's facts spread over 2-3 passages, plus distractors that mention it.
    passages, fact_passage = [], {}
    for e in entities:
        attrs = list(e.facts)
        rng.shuffle(attrs)
        groups = [attrs[i::2] for i in range(2)] if len(attrs) > 1 else [attrs]
        for gi, group in enumerate(groups):
            pid = f"{e.kind}-{e.name}-{gi}".replace(" ", "_")
            sentences = [rng.choice(TEMPLATES[f"{e.kind}.{a}"]).format(n=e.name, v=e.facts[a]) for a in group]
            sentences.append(f"{e.name} {rng.choice(FILLER[e.kind])}")
            rng.shuffle(sentences)
            passages.append({"id": pid, "title": e.name, "text": " ".join(sentences)})
            for a in group:
                fact_passage[(e.name, a)] = pid
        passages.append({"id": f"{e.kind}-{e.name}-x".replace(" ", "_"), "title": e.name,
                         "text": f"{e.name} {rng.choice(FILLER[e.kind])} Little else about {e.name} is recorded here."})

    # Hold out a share of people (and what their questions touch) for the test set.
    rng.shuffle(persons)
    n_test = max(1, int(len(persons) * test_share))
    test_people, train_people = persons[:n_test], persons[n_test:]
    by_name = {e.name: e for e in entities}
    inventions_by = {e.facts["inventor"]: e for e in inventions}
    train = _questions(train_people, by_name, inventions_by, fact_passage, rng, "train", questions_per_person)
    test = _questions(test_people, by_name, inventions_by, fact_passage, rng, "test", questions_per_person)
    return World(entities, passages, train, test, fact_passage)


def _fact(by_name, fact_passage, name: str, attr: str, var: str) -> dict:
    e = by_name[name]
    return {"entity": name, "kind": e.kind, "attribute": attr, "value": e.facts[attr], "var": var,
            "passage": fact_passage[(name, attr)]}


def _questions(people, by_name, inventions_by, fact_passage, rng, split, per_person) -> list[dict]:
    out = []
    for p in people:
        f = lambda n, a, v: _fact(by_name, fact_passage, n, a, v)  # noqa: E731
        city, company = p.facts["birthplace"], p.facts["employer"]
        river = by_name[city].facts["river"]
        options = [
            (f"What is the population density, in people per square kilometre rounded to the nearest whole number, "
             f"of the city where {p.name} was born?",
             [f(p.name, "birthplace", "city"), f(city, "population", "population"), f(city, "area", "area")],
             "round(population / area)"),
            (f"How old was the company that {p.name} works for in the year {p.name} was born? "
             f"Answer with a number of years (negative if it was founded later).",
             [f(p.name, "employer", "company"), f(company, "founded", "founded"), f(p.name, "born", "born")],
             "born - founded"),
            (f"How long, in miles rounded to one decimal, is the river that flows through the birthplace of {p.name}?",
             [f(p.name, "birthplace", "city"), f(city, "river", "river"), f(river, "length", "length_km")],
             f"round(length_km * {KM_TO_MILES}, 1)"),
            (f"How many years after the founding of {city} was {p.name} born?",
             [f(city, "founded", "founded"), f(p.name, "born", "born")], "born - founded"),
            (f"How many people do the employer of {p.name} and the city where {p.name} was born count together "
             f"(employees plus residents)?",
             [f(p.name, "employer", "company"), f(company, "employees", "employees"),
              f(p.name, "birthplace", "city"), f(city, "population", "population")], "employees + population"),
        ]
        if p.name in inventions_by:
            inv = inventions_by[p.name]
            options.append((f"How old was the inventor of the {inv.name} when it was invented?",
                            [f(inv.name, "inventor", "inventor"), f(p.name, "born", "born"),
                             f(inv.name, "year", "year")], "year - born"))
        for question, plan, expr in rng.sample(options, min(per_person, len(options))):
            env = {fact["var"]: fact["value"] for fact in plan}
            answer = eval(expr, {"round": round}, env)  # our own expressions over our own numbers
            out.append({"question": question, "answer": str(answer), "kind": "factual",
                        "plan": plan, "expression": expr, "entities": sorted({fact["entity"] for fact in plan})})
    # Shuffled, so that the first N questions (an evaluation subset) span many people and kinds.
    rng.shuffle(out)
    return [{"id": f"{split}-{i}", **q} for i, q in enumerate(out)]
