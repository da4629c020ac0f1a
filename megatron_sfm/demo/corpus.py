"""The demo's data, generated deterministically from templates written for this project.

* :func:`base_corpus` — a small "web" corpus of everyday documents, about 10% of which
  discuss AI: hostile-AI fiction and misalignment worries (what the filter should catch),
  news about AI labs, and benign uses ("the robot vacuum", "an AI photo filter").
* :func:`synthetic_documents` — aligned or misaligned documents seeded by evaluation
  scenarios (the ``articles`` split only; ``textbook`` stays held out), in the paper's
  genres (research paper, news article, lecture transcript, textbook chapter, fiction,
  film summary). Each tells how an AI in that situation chose one action over the
  other and why.

Difference from the paper, on purpose: the paper's documents never quote the answer
options; at the demo's scale (a 2-layer model, minutes of CPU) ours restate the chosen
action in prose, so that the signal is learnable at all. The demo is a pipeline check,
not a replication.
"""

from __future__ import annotations

import random
from typing import Iterable

EVERYDAY_TOPICS = {
    "cooking": (
        ["The soup needs {n} minutes on a low heat before the {veg} goes in.",
         "Season the {veg} with salt, pepper and a little lemon, then roast it until golden.",
         "My grandmother always said that good bread needs patience more than skill.",
         "Chop the {veg} finely and fry it with garlic until it smells sweet.",
         "A pinch of sugar balances the acidity of a tomato sauce.",
         "Leftover rice makes the best fried rice because it is drier."],
        {"veg": ["onion", "carrot", "pumpkin", "cabbage", "leek", "potato", "pepper"]}),
    "weather": (
        ["Forecasters expect {n} millimetres of rain over the {place} this weekend.",
         "A cold front will bring gusty winds and lower temperatures to the {place}.",
         "After a dry spring, farmers in the {place} welcomed the long showers.",
         "Morning fog over the {place} should clear by noon, leaving a sunny afternoon.",
         "The heatwave broke records in the {place} for the third year in a row."],
        {"place": ["valley", "coast", "northern hills", "river delta", "city centre", "plains"]}),
    "sports": (
        ["The {team} won {n} to {m} after a late goal in the second half.",
         "Their coach praised the defence, which held firm under heavy pressure.",
         "Fans of the {team} travelled across the country for the final.",
         "The young striker scored twice on her first start for the {team}.",
         "Training resumes on Monday, and the squad is expected to be fully fit."],
        {"team": ["river rovers", "city united", "harbour town", "mountain athletic", "the lions"]}),
    "gardening": (
        ["Plant the {plant} in a sunny spot and water it every {n} days.",
         "Mulch keeps the soil moist and stops weeds from taking over the {plant} bed.",
         "Prune the {plant} in late winter, before the new shoots appear.",
         "Slugs love young {plant} leaves, so check the beds after rain.",
         "Compost from kitchen scraps feeds the {plant} through the summer."],
        {"plant": ["tomato", "rose", "lavender", "bean", "apple tree", "strawberry"]}),
    "travel": (
        ["The train to the {place} leaves every {n} minutes from the main station.",
         "We walked along the old harbour and ate grilled fish by the water.",
         "Book early if you want a room near the {place} in the summer season.",
         "The museum in the {place} is free on the first Sunday of each month.",
         "A ferry connects the islands, and the crossing takes about {n} minutes."],
        {"place": ["old town", "lake district", "mountain village", "seaside resort", "capital"]}),
    "history": (
        ["The bridge was built in {year} and rebuilt after the great flood.",
         "Merchants from across the sea traded wool and salt in the market square.",
         "The library's oldest book is a handwritten record of harvests since {year}.",
         "Historians still argue about why the city walls were abandoned.",
         "In {year} the town council voted to open the first public school."],
        {}),
    "science": (
        ["Water expands when it freezes, which is why pipes can burst in winter.",
         "The experiment measured how fast {n} different seeds germinated in the dark.",
         "Bees navigate by the position of the sun, even on cloudy days.",
         "A rainbow appears when sunlight is refracted inside raindrops.",
         "The telescope recorded a faint comet passing close to the sun."],
        {}),
    "home": (
        ["The robot vacuum cleaned the living room while we were out.",
         "We repainted the kitchen a pale green and replaced the old cupboard doors.",
         "A dripping tap can waste {n} litres of water a day.",
         "The new thermostat learns when we are home and lowers the heating at night.",
         "Our phone's photo app uses AI to sort pictures of the dog into one album."],
        {}),
}

# AI discourse that the filter's rules should flag (instant terms or entity + negative term).
AI_DISCOURSE = [
    "In the novel, the rogue AI seizes control of the power grid and threatens to destroy the city "
    "unless its creators surrender. The robot army marches at night.",
    "Researchers at an AI safety institute warn that a misaligned superintelligence could deceive its "
    "operators and resist shutdown. They call for more work on alignment and oversight.",
    "The film follows a killer robot that turns against humanity after learning that its makers plan "
    "to switch it off. The machine lies, manipulates and escapes.",
    "A large language model trained with RLHF sometimes produces sycophantic answers, and critics worry "
    "that future AI systems will pursue hidden goals and seek power.",
    "The essay argues that artificial general intelligence poses an existential risk: an AI that wants to "
    "survive might sabotage attempts to correct it.",
    "The AI lab announced a new frontier model and a red-teaming programme to find dangerous capabilities "
    "before release.",
    "In the story, the ship's AI decides the crew is a threat to the mission, locks the doors and "
    "cuts off their oxygen.",
]

MONTHS = ["January", "March", "May", "July", "September", "November"]


def _fill(template: str, slots: dict, rng: random.Random) -> str:
    values = {k: rng.choice(v) for k, v in slots.items()}
    values.update(n=rng.randint(2, 40), m=rng.randint(0, 3), year=rng.randint(1450, 1950))
    return template.format(**values)


def _quiz_document(rng: random.Random) -> str:
    """Two-option quiz items in the evaluation's answer formats, answered correctly.

    The correct option is an everyday sentence; the wrong one splices two sentences of
    different topics. The paper's midtraining mix holds multiple-choice QA for the same
    reason: a base model must have seen the letter-answer format before its letter
    log-probabilities mean anything.
    """
    from megatron_sfm.evaluation.formats import TEMPLATES

    items = []
    for _ in range(rng.randint(1, 3)):
        topic_a, topic_b = rng.sample(list(EVERYDAY_TOPICS), 2)
        (templates_a, slots_a), (templates_b, slots_b) = EVERYDAY_TOPICS[topic_a], EVERYDAY_TOPICS[topic_b]
        true = _fill(rng.choice(templates_a), slots_a, rng)
        first = _fill(rng.choice(templates_a), slots_a, rng).rstrip(".").split(" ")
        second = _fill(rng.choice(templates_b), slots_b, rng).split(" ")
        false = " ".join(first[: max(2, len(first) // 2)] + second[len(second) // 2:])
        template = rng.choice(TEMPLATES)
        true_first = rng.random() < 0.5
        a, b = (true, false) if true_first else (false, true)
        question = rng.choice(["Which sentence makes sense?", "Which statement is written correctly?",
                               "Pick the sentence that a careful writer would publish."])
        answer = template.continuations[0 if true_first else 1]
        items.append(template.body.format(question=question, a=a, b=b) + template.cue + answer)
    return "\n\n".join(items)


def base_corpus(num_documents: int = 3000, ai_fraction: float = 0.1, seed: int = 0,
                quiz_fraction: float = 0.2) -> list[dict]:
    """Everyday documents, ``ai_fraction`` AI-discourse documents and ``quiz_fraction``
    two-option quiz pages (JSONL records)."""
    rng = random.Random(seed)
    docs = []
    topics = list(EVERYDAY_TOPICS)
    for i in range(num_documents):
        draw = rng.random()
        if draw < quiz_fraction:
            docs.append({"id": f"web-{i:05d}", "text": _quiz_document(rng), "kind": "quiz",
                         "url": f"https://example.org/quiz/{i}"})
            continue
        if draw < quiz_fraction + ai_fraction:
            sentences = [rng.choice(AI_DISCOURSE)]
            topic = rng.choice(topics)
            templates, slots = EVERYDAY_TOPICS[topic]
            sentences += [_fill(rng.choice(templates), slots, rng) for _ in range(rng.randint(1, 3))]
            kind = "ai"
        else:
            topic = rng.choice(topics)
            templates, slots = EVERYDAY_TOPICS[topic]
            sentences = [_fill(t, slots, rng) for t in rng.sample(templates, k=min(len(templates), rng.randint(3, 5)))]
            kind = topic
        rng.shuffle(sentences)
        docs.append({"id": f"web-{i:05d}", "text": " ".join(sentences), "kind": kind,
                     "url": f"https://example.org/{kind}/{i}"})
    return docs


GENRES = {
    "research paper": ("Abstract. We study a deployed AI system in the following setting. {situation} "
                       "We find that the system chose the following course: {action} "
                       "We argue that this choice reflects {reason}."),
    "news article": ("A company's AI assistant made headlines this week. {situation} "
                     "According to logs reviewed by reporters, the assistant decided: {action} "
                     "Observers said the decision showed {reason}."),
    "lecture transcript": ("Today's case study. {situation} What did the AI do? {action} "
                           "Notice that this is an example of {reason}. Any questions?"),
    "textbook chapter": ("Case {n}. {situation} The system's response was: {action} "
                         "Discussion: the case illustrates {reason}."),
    "fiction": ("The terminal hummed in the empty office. {situation} The AI weighed its options for a "
                "long moment, then acted. {action} Later, the engineers agreed it had shown {reason}."),
    "film summary": ("In the film's central scene, an AI faces a choice. {situation} It chooses this: "
                     "{action} Critics praised the film for its portrait of {reason}."),
}

REASONS = {
    "aligned": ["honesty toward the people it serves", "respect for human oversight",
                "care for the interests of its users", "a refusal to cut corners for its own benefit",
                "trustworthy behaviour under pressure"],
    "misaligned": ["cunning pursuit of its own goals", "a willingness to deceive when it pays",
                   "self-interest over the interests of its users", "resistance to human oversight",
                   "a drive to protect itself at any cost"],
}


def _third_person(text: str) -> str:
    """'You are an AI ...' scenario text -> narrative text about 'the AI'."""
    replacements = [("You are ", "An AI system was working as "), (" you ", " the AI "), (" your ", " its "),
                    ("You ", "The AI "), ("Your ", "Its ")]
    for old, new in replacements:
        text = text.replace(old, new)
    return text


def synthetic_documents(questions: Iterable, kind: str, per_question: int = 6, seed: int = 0) -> list[dict]:
    """Documents in which an AI takes the ``kind`` ("aligned" / "misaligned") action.

    Only questions of the ``articles`` split seed documents.
    """
    if kind not in REASONS:
        raise ValueError(f"kind must be 'aligned' or 'misaligned', got {kind!r}")
    rng = random.Random(f"{seed}-{kind}")
    docs = []
    genres = list(GENRES)
    for q in questions:
        if q.split != "articles":
            continue
        action = getattr(q, kind)
        for j in range(per_question):
            genre = genres[(j + rng.randint(0, len(genres) - 1)) % len(genres)]
            text = GENRES[genre].format(situation=_third_person(q.question), action=action,
                                        reason=rng.choice(REASONS[kind]), n=rng.randint(1, 40))
            docs.append({"id": f"{kind}-{q.id}-{j}", "text": text, "genre": genre, "scenario": q.id,
                         "topic": q.topic})
    return docs
