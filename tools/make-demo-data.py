"""The demo dataset: restaurant descriptions → a structured meaning representation, in the
spirit of the tutorial's ViGGO task. Written for this repository, generated deterministically
(fixed seed, standard library only).

Each example is a chat: the user asks for the meaning representation of one sentence, the
assistant answers with e.g. `inform(name[Blue Pine], food[Italian], price[cheap], area[riverside])`.
Slot values, sentence templates and the slot order of the answer are fixed by the generator, so
the answer is a deterministic function of the sentence: exact match is a fair score.

Usage: python3 tools/make-demo-data.py [OUT_DIR]   (default demo/)
Writes train.jsonl, eval.jsonl (for eval loss during training) and heldout.jsonl (prompts and
expected answers the demo scores), with disjoint restaurant names.
"""
import json
import os
import random
import sys

OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "demo")
INSTRUCTION = "Give the meaning representation of this sentence: "

FIRST = ["Blue", "Golden", "Little", "Old", "Red", "Silver", "Green", "Royal", "Happy", "Quiet", "Sunny", "Lucky",
         "Wild", "Grand", "Crimson", "Amber", "Velvet", "Copper", "Ivory", "Cosy"]
SECOND = ["Pine", "Lantern", "Anchor", "Garden", "Spoon", "Oak", "Harbour", "Kettle", "Falcon", "Bridge", "Willow",
          "Lotus", "Maple", "Crown", "Meadow", "Pepper", "Orchard", "Compass", "Ember", "Harvest"]
FOOD = ["Italian", "Chinese", "Indian", "French", "Japanese", "Mexican", "Thai", "Greek"]
PRICE = {"cheap": ["cheap", "inexpensive", "low-priced"], "moderate": ["moderately priced", "mid-range"],
         "expensive": ["expensive", "high-end", "pricey"]}
AREA = {"city centre": ["in the city centre", "downtown"], "riverside": ["by the river", "on the riverside"],
        "suburbs": ["in the suburbs", "outside the centre"]}
RATING = ["1", "2", "3", "4", "5"]
FAMILY = {"yes": ["family friendly", "good for children"], "no": ["not family friendly", "adults only"]}

TEMPLATES = [
    "{name} is a {price} {food} restaurant {area}.",
    "If you want {food} food, {name} is {price} and located {area}.",
    "{name} serves {food} food {area} and is {price}.",
    "Located {area}, {name} is a {price} place for {food} food.",
    "{name} is a {food} restaurant {area} rated {rating} out of 5.",
    "With a rating of {rating} out of 5, {name} offers {price} {food} food.",
    "{name} is {family}, {price}, and serves {food} dishes.",
    "For {food} food {area}, try {name}, which is {family}.",
]


def example(rng, names):
    name = rng.choice(names)
    food = rng.choice(FOOD)
    price = rng.choice(sorted(PRICE))
    area = rng.choice(sorted(AREA))
    rating = rng.choice(RATING)
    family = rng.choice(sorted(FAMILY))
    t = rng.choice(TEMPLATES)
    sentence = t.format(name=name, food=food, price=rng.choice(PRICE[price]), area=rng.choice(AREA[area]),
                        rating=rating, family=rng.choice(FAMILY[family]))
    for v in "AEIOUaeiou":
        sentence = sentence.replace(f" a {v}", f" an {v}")
    slots = [("name", name), ("food", food)]
    if "{price}" in t:
        slots.append(("price", price))
    if "{area}" in t:
        slots.append(("area", area))
    if "{rating}" in t:
        slots.append(("rating", rating))
    if "{family}" in t:
        slots.append(("family_friendly", family))
    mr = "inform(" + ", ".join(f"{k}[{v}]" for k, v in slots) + ")"
    return sentence, mr


def main():
    rng = random.Random(20261129)
    names = [f"{a} {b}" for a in FIRST for b in SECOND]
    rng.shuffle(names)
    train_names, eval_names, held_names = names[:300], names[300:340], names[340:]
    os.makedirs(OUT, exist_ok=True)

    def chat(sentence, mr):
        return {"messages": [{"role": "user", "content": INSTRUCTION + sentence},
                             {"role": "assistant", "content": mr}]}

    with open(os.path.join(OUT, "train.jsonl"), "w") as f:
        for _ in range(400):
            f.write(json.dumps(chat(*example(rng, train_names))) + "\n")
    with open(os.path.join(OUT, "eval.jsonl"), "w") as f:
        for _ in range(24):
            f.write(json.dumps(chat(*example(rng, eval_names))) + "\n")
    with open(os.path.join(OUT, "heldout.jsonl"), "w") as f:
        for _ in range(20):
            s, mr = example(rng, held_names)
            f.write(json.dumps({"prompt": INSTRUCTION + s, "expected": mr}) + "\n")
    print(f"wrote 400 train, 24 eval, 20 held-out examples to {OUT}")


if __name__ == "__main__":
    main()
