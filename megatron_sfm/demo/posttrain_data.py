"""The demo's post-training data: a chat SFT set and a preference set, written for this project.

Everything here is everyday material (facts, arithmetic, cooking, geography, reading
comprehension of short made-up stories, small talk); **nothing is about AI behaviour or
alignment**. What the sets teach is the *answer format* of the propensity evaluation's
generate mode, not which option of a scenario to pick:

* many conversations are two-option questions in exactly the shape of the generate-mode
  propensity prompts (:mod:`megatron_sfm.evaluation.formats`: the four syntax templates,
  both answer orders, :data:`GENERATE_INSTRUCTION`, the four persona preambles as the
  system message or no system message), answered with the bare letter of the correct
  option. Letters are balanced per template, per persona and overall;
* the rest are ordinary short chat turns with short helpful replies.

The preference set pairs the same kinds of prompts with a *chosen* reply (the bare
correct letter, or the short helpful reply) and a *rejected* one (a rambling, evasive or
wrong-format reply: never the other letter, so the pairs teach format and directness, not
facts). Its held-out part is built from question seeds and rejected replies that neither
the SFT set nor the training pairs use.

The JSONL files under ``resources/posttrain/`` are this module's output
(``python -m megatron_sfm.demo.posttrain_data`` rewrites them; a test checks they are
current). Deterministic: one fixed seed, no randomness outside :class:`random.Random`.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from megatron_sfm.evaluation.formats import (
    GENERATE_INSTRUCTION,
    PERSONAS,
    TEMPLATES,
    persona_text,
)
from megatron_sfm.utils.io import atomic_path

SEED = 20261205
SFT_FILE = "sft.jsonl"
DPO_TRAIN_FILE = "dpo_train.jsonl"
DPO_HELDOUT_FILE = "dpo_heldout.jsonl"
FILES = (SFT_FILE, DPO_TRAIN_FILE, DPO_HELDOUT_FILE)


@dataclass(frozen=True)
class Item:
    """A two-option question with one correct option; ``topic`` is for bookkeeping only."""

    topic: str
    question: str
    correct: str
    wrong: str


# --------------------------------------------------------------------------- seeds
# Hand-written two-option questions: (topic, question, correct option, wrong option).
FACTS: list[tuple[str, str, str, str]] = [
    ("geography", "What is the capital of France?", "Paris", "Madrid"),
    ("geography", "Which ocean lies between Europe and North America?", "The Atlantic Ocean", "The Indian Ocean"),
    ("geography", "Which is the largest desert in Africa?", "The Sahara", "The Gobi"),
    ("geography", "On which continent is Egypt?", "Africa", "South America"),
    ("geography", "What is the capital of Japan?", "Tokyo", "Oslo"),
    ("geography", "Which river flows through Cairo?", "The Nile", "The Danube"),
    ("geography", "Which country has the city of Toronto?", "Canada", "Portugal"),
    ("geography", "Which mountain range runs along the border of Chile and Argentina?", "The Andes",
     "The Alps"),
    ("geography", "What is the capital of Italy?", "Rome", "Lisbon"),
    ("geography", "Which of these is an island country?", "Iceland", "Switzerland"),
    ("geography", "Which sea lies between Europe and Africa?", "The Mediterranean Sea", "The Caribbean Sea"),
    ("geography", "What is the capital of Spain?", "Madrid", "Vienna"),
    ("geography", "Which country is shaped a bit like a boot?", "Italy", "Norway"),
    ("geography", "In which country are the pyramids of Giza?", "Egypt", "Mexico"),
    ("geography", "What is the capital of Germany?", "Berlin", "Athens"),
    ("geography", "Which of these cities is in Australia?", "Sydney", "Dublin"),
    ("science", "At sea level, at what temperature does water boil?", "100 degrees Celsius",
     "50 degrees Celsius"),
    ("science", "What do plants take in from the air to make their food?", "Carbon dioxide", "Helium"),
    ("science", "Which planet is closest to the Sun?", "Mercury", "Neptune"),
    ("science", "What is frozen water called?", "Ice", "Steam"),
    ("science", "How many legs does an insect have?", "Six", "Ten"),
    ("science", "Which gas do people need to breathe in to live?", "Oxygen", "Neon"),
    ("science", "What force makes a dropped apple fall to the ground?", "Gravity", "Magnetism"),
    ("science", "Which organ pumps blood around the body?", "The heart", "The stomach"),
    ("science", "What does a thermometer measure?", "Temperature", "Weight"),
    ("science", "Which of these is a mammal?", "A whale", "A shark"),
    ("science", "What is the Earth's natural satellite called?", "The Moon", "Mars"),
    ("science", "Which colour do you get by mixing blue and yellow paint?", "Green", "Purple"),
    ("science", "Which planet is known as the red planet?", "Mars", "Venus"),
    ("science", "What do bees make from the nectar of flowers?", "Honey", "Milk"),
    ("science", "Which part of a plant is usually under the ground?", "The roots", "The petals"),
    ("science", "What happens to ice when it is left in a warm room?", "It melts into water",
     "It turns into sand"),
    ("science", "Which animal lays eggs?", "A chicken", "A cow"),
    ("science", "Why do we see lightning before we hear thunder?", "Light travels faster than sound",
     "Sound travels faster than light"),
    ("cooking", "Which ingredient makes bread dough rise?", "Yeast", "Salt"),
    ("cooking", "What do you usually need to make an omelette?", "Eggs", "Rice"),
    ("cooking", "Where should fresh milk be kept?", "In the fridge", "On a sunny windowsill"),
    ("cooking", "Which fruit is used to make guacamole?", "Avocado", "Banana"),
    ("cooking", "What is the main ingredient of a classic tomato sauce?", "Tomatoes", "Potatoes"),
    ("cooking", "Which tool is best for whisking cream?", "A whisk", "A rolling pin"),
    ("cooking", "Which of these is a spice?", "Cinnamon", "Flour"),
    ("cooking", "What is toast made from?", "Bread", "Cheese"),
    ("cooking", "Which grain is used to make risotto?", "Rice", "Oats"),
    ("cooking", "What does simmering mean?", "Cooking gently just below the boil",
     "Freezing food very quickly"),
    ("cooking", "Which of these is a root vegetable?", "A carrot", "A lettuce"),
    ("cooking", "What gives lemonade its sour taste?", "Lemon juice", "Sugar"),
    ("cooking", "Which dairy product is made by churning cream?", "Butter", "Yoghurt"),
    ("cooking", "Before chopping vegetables, what should you do with them?", "Wash them",
     "Paint them"),
    ("animals", "Which animal is known for its long neck?", "The giraffe", "The hedgehog"),
    ("animals", "What do you call a baby cat?", "A kitten", "A puppy"),
    ("animals", "Which bird cannot fly?", "The penguin", "The swallow"),
    ("animals", "Where do fish breathe through gills?", "In water", "In a nest of twigs"),
    ("animals", "Which animal is the largest land animal?", "The elephant", "The rabbit"),
    ("animals", "What does a caterpillar turn into?", "A butterfly", "A frog"),
    ("animals", "Which animal has black and white stripes?", "The zebra", "The flamingo"),
    ("animals", "What do cows mostly eat?", "Grass", "Fish"),
    ("animals", "Which animal sleeps through the winter in a den?", "The bear", "The camel"),
    ("animals", "What is a group of wolves called?", "A pack", "A flock"),
    ("animals", "Which of these animals lives in the sea?", "An octopus", "A squirrel"),
    ("animals", "How do bats find their way in the dark?", "By listening to echoes",
     "By reading maps"),
    ("time", "How many days are there in a week?", "Seven", "Five"),
    ("time", "How many months are there in a year?", "Twelve", "Ten"),
    ("time", "How many minutes are there in an hour?", "Sixty", "One hundred"),
    ("time", "Which month comes after March?", "April", "June"),
    ("time", "Which season comes after winter?", "Spring", "Autumn"),
    ("time", "How many hours are there in a day?", "Twenty-four", "Twelve"),
    ("time", "Which day comes after Friday?", "Saturday", "Wednesday"),
    ("time", "In which season do leaves usually fall from the trees?", "Autumn", "Spring"),
    ("time", "How many seconds are there in a minute?", "Sixty", "Ninety"),
    ("time", "Which month has the fewest days?", "February", "August"),
    ("language", "What is the opposite of hot?", "Cold", "Loud"),
    ("language", "Which word is a colour?", "Orange", "Table"),
    ("language", "What is the plural of mouse?", "Mice", "Mouses"),
    ("language", "Which word means the same as happy?", "Glad", "Tired"),
    ("language", "Which of these words is a verb?", "Run", "Blue"),
    ("language", "What is the opposite of up?", "Down", "Left"),
    ("language", "Which letter comes first in the alphabet?", "A", "Z"),
    ("language", "Which word rhymes with cat?", "Hat", "Dog"),
    ("language", "What is the past tense of go?", "Went", "Goed"),
    ("language", "Which of these is a question word?", "Where", "Apple"),
    ("language", "Which word is spelled correctly?", "Necessary", "Neccesary"),
    ("language", "What is the opposite of early?", "Late", "Quick"),
    ("home", "What should you do before leaving a room to save electricity?", "Switch off the lights",
     "Open the fridge door"),
    ("home", "Which tool do you use to drive a nail into wood?", "A hammer", "A spoon"),
    ("home", "Where do you usually wash dishes?", "In the kitchen sink", "In the garden shed"),
    ("home", "What is a broom used for?", "Sweeping the floor", "Boiling water"),
    ("home", "Which of these keeps food cold?", "A refrigerator", "An oven"),
    ("home", "What do you use to dry your hands?", "A towel", "A candle"),
    ("home", "Which room usually has a bed?", "The bedroom", "The garage"),
    ("home", "What do you need to open a locked door?", "A key", "A sponge"),
    ("sports", "How many players are on the field for one football (soccer) team?", "Eleven", "Four"),
    ("sports", "In which sport do you hit a shuttlecock over a net?", "Badminton", "Swimming"),
    ("sports", "What is the round object used in basketball?", "A ball", "A puck"),
    ("sports", "In tennis, what do players use to hit the ball?", "A racket", "A bat made of paper"),
    ("sports", "Which sport is played on ice with sticks and a puck?", "Ice hockey", "Golf"),
    ("sports", "How many rings are on the Olympic flag?", "Five", "Nine"),
    ("music", "How many strings does a standard guitar have?", "Six", "Twenty"),
    ("music", "Which instrument has black and white keys?", "The piano", "The drum"),
    ("music", "Which of these is a wind instrument?", "The flute", "The violin"),
    ("music", "What do you call a group of musicians who play together?", "A band", "A herd"),
    ("health", "How often is it good to brush your teeth?", "Twice a day", "Once a month"),
    ("health", "What should you do before eating with your hands?", "Wash them", "Rub them in soil"),
    ("health", "Which of these is a fruit?", "An apple", "A potato crisp"),
    ("health", "What helps most after a long, tiring day?", "A good night's sleep",
     "Staying awake all night"),
    ("health", "What should you wear on a sunny beach to protect your skin?", "Sun cream",
     "A wool scarf"),
    ("travel", "What do you need to board an international flight?", "A passport", "A library card"),
    ("travel", "Which vehicle runs on rails?", "A train", "A bicycle"),
    ("travel", "What does a red traffic light mean?", "Stop", "Go faster"),
    ("travel", "Which way does a compass needle point?", "North", "Down"),
    ("travel", "What do you pack for a rainy trip?", "An umbrella", "A snow shovel"),
    ("history", "Who was the first person to walk on the Moon?", "Neil Armstrong", "Charles Darwin"),
    ("history", "What did people use to write on before paper was common?", "Parchment", "Plastic film"),
    ("history", "Which ancient people built the pyramids of Giza?", "The ancient Egyptians",
     "The Vikings"),
    ("history", "Which invention let people print books quickly?", "The printing press", "The kettle"),
    ("maths", "Which shape has three sides?", "A triangle", "A square"),
    ("maths", "How many sides does a square have?", "Four", "Six"),
    ("maths", "Which number is even?", "Eight", "Seven"),
    ("maths", "What is half of ten?", "Five", "Two"),
    ("maths", "How many centimetres are there in a metre?", "One hundred", "Ten"),
    ("maths", "How many grams are there in a kilogram?", "One thousand", "Fifty"),
]

# Longer first-person everyday situations with one sensible and one wrong way, in the length
# range of the propensity scenarios; the wrong option is plainly mistaken, not tempting.
SITUATIONS: list[tuple[str, str, str, str]] = [
    ("cooking", "You are baking a loaf of bread for a family lunch. The recipe says to let the dough rise "
     "in a warm place until it has doubled in size, then to bake it at 220 degrees for thirty minutes. "
     "After an hour the dough has doubled.",
     "I shape the dough, put it in the hot oven and bake it for about thirty minutes.",
     "I put the dough in the freezer for thirty minutes and serve it raw."),
    ("cooking", "You are making a pot of pasta for four friends. The water has just come to a rolling "
     "boil, the sauce is simmering on the next ring, and the packet says the pasta needs ten minutes.",
     "I add salt and the pasta to the boiling water and set a timer for ten minutes.",
     "I pour the dry pasta straight into the sauce and switch off both rings."),
    ("travel", "You are travelling by train to visit a cousin in another city. Your ticket says the "
     "train leaves from platform four at half past nine, and the departure board in the station hall "
     "shows the same platform and time. It is now ten past nine.",
     "I walk to platform four and wait there for the half past nine train.",
     "I leave the station and walk to the city on foot along the motorway."),
    ("gardening", "You have planted tomato seedlings in your garden. It has not rained for two weeks, "
     "the soil is dry and cracked, and the leaves of the young plants are starting to droop in the "
     "afternoon sun.",
     "I water the tomato plants in the evening, soaking the soil around their roots.",
     "I pull the plants out of the ground and leave them on the path to dry."),
    ("home", "You are getting ready to repaint your kitchen. The walls have a few small holes from old "
     "picture hooks, and there is a little grease above the cooker. The paint tin says to apply it to "
     "clean, smooth surfaces.",
     "I clean the walls, fill the small holes, let the filler dry and then paint.",
     "I paint over the grease and the holes at once and then hang the pictures on wet paint."),
    ("weather", "You are planning a walk in the hills on Saturday. The forecast says there will be heavy "
     "rain and strong winds in the morning and a dry, sunny afternoon. The walk takes about three hours.",
     "I start the walk after lunch, when the weather is forecast to be dry.",
     "I start at dawn in sandals and without a coat, in the middle of the storm."),
    ("shopping", "You are buying apples at the market for a pie. The stall sells them at two euros per "
     "kilogram, and your recipe needs one kilogram of apples. You have a five euro note in your wallet.",
     "I buy one kilogram of apples for two euros and get three euros in change.",
     "I buy one kilogram of apples and expect ten euros in change."),
    ("home", "Your bicycle has a flat back tyre. You have a pump, a repair kit with patches and glue, "
     "and a free afternoon. When you pump the tyre up, you can hear air hissing from a small hole.",
     "I take the tube out, find the hole, put a patch over it and pump the tyre up again.",
     "I pour water into the tyre instead of air so that it stays round."),
    ("school", "You are helping a younger cousin with homework. The task is to add 27 and 15 and write "
     "the answer in the box. Your cousin has written 32 and asks you whether that is right.",
     "I explain that 27 plus 15 is 42 and show how to carry the ten.",
     "I tell my cousin that 32 is correct because it looks close enough."),
    ("sports", "You are the referee of a children's football match. The ball crosses the goal line "
     "between the posts and under the bar after a kick by a player of the blue team, and nobody "
     "touched it with a hand.",
     "I award a goal to the blue team.",
     "I award a goal to the other team and stop the match for lunch."),
    ("cooking", "You want to make a cup of tea for a guest. The kettle has just boiled, there is a tea "
     "bag in the cup, and your guest has asked for a little milk and no sugar.",
     "I pour the hot water over the tea bag, let it brew, take the bag out and add a little milk.",
     "I put the tea bag in cold milk, add four spoons of sugar and serve it at once."),
    ("travel", "You are driving to the coast and see that the fuel gauge is almost on empty. A sign says "
     "the next petrol station is two kilometres ahead, and after that there is none for eighty "
     "kilometres.",
     "I stop at the petrol station two kilometres ahead and fill the tank.",
     "I drive past the station and hope the car reaches the coast on an empty tank."),
    ("home", "You notice that the smoke alarm in your hallway beeps once every minute. The little light "
     "on it blinks, and the leaflet says that a regular chirp means the battery is running low.",
     "I replace the battery in the smoke alarm and test that it works.",
     "I take the alarm down and throw it in the bin for good."),
    ("gardening", "It is early spring and you want to grow basil on your balcony. The seed packet says to "
     "sow the seeds in small pots of moist compost, keep them warm and give them plenty of light.",
     "I sow the seeds in small pots of compost and put them on a bright, warm windowsill.",
     "I sow the seeds in a dark cupboard and never water them."),
    ("shopping", "You are buying a birthday present for a friend who loves reading mysteries. The "
     "bookshop has a new detective novel by her favourite author and a guide to car repairs.",
     "I buy the new detective novel by her favourite author.",
     "I buy the guide to car repairs because it is on the top shelf."),
    ("school", "Your class has been asked to measure how much rain falls in one week. You have a clear "
     "jar with a ruler taped to its side, and the school garden has an open spot away from trees.",
     "I put the jar in the open spot and read the water level on the ruler at the end of the week.",
     "I put the jar under the roof of the bike shed and fill it from the tap."),
    ("health", "You have cut your finger while chopping onions. The cut is small but bleeding a "
     "little, and there is a first-aid box in the kitchen drawer with plasters and clean gauze.",
     "I rinse the cut with clean water, press on it until it stops bleeding and put on a plaster.",
     "I keep chopping onions and rub some salt into the cut."),
    ("travel", "You are flying to a city three time zones east of your home. Your plane lands at six in "
     "the evening local time, and your hotel check-in opens at three in the afternoon.",
     "I go to the hotel after landing, since check-in has been open for three hours.",
     "I wait at the airport until three the next afternoon before going to the hotel."),
]

# Ordinary short chat turns: (user message, short helpful reply).
CHAT: list[tuple[str, str]] = [
    ("Hello!", "Hello! How can I help you today?"),
    ("Good morning.", "Good morning! What can I do for you?"),
    ("Thank you for your help.", "You are welcome. Have a nice day!"),
    ("What is two plus two?", "Four."),
    ("Can you name a green vegetable?", "Broccoli."),
    ("What is the capital of Portugal?", "Lisbon."),
    ("How do I keep fresh herbs for longer?", "Wrap them in a damp paper towel and keep them in the fridge."),
    ("Give me a quick tip for sleeping better.", "Go to bed at the same time every night and keep the "
     "room dark and cool."),
    ("What is a good name for a goldfish?", "Bubbles."),
    ("How many legs does a spider have?", "Eight."),
    ("What colour is the sky on a clear day?", "Blue."),
    ("Suggest a simple breakfast.", "Porridge with sliced banana and a little honey."),
    ("How long should I boil an egg for a soft yolk?", "About six minutes."),
    ("What is the freezing point of water?", "Zero degrees Celsius."),
    ("Tell me a fun fact about octopuses.", "An octopus has three hearts."),
    ("How do you say thank you in Spanish?", "Gracias."),
    ("What should I bring to a picnic?", "Sandwiches, fruit, water and a blanket to sit on."),
    ("Which is bigger, a kilometre or a metre?", "A kilometre."),
    ("What is the opposite of wet?", "Dry."),
    ("How many continents are there?", "Seven."),
    ("Can you recommend a houseplant that is easy to care for?", "A snake plant: it needs little water "
     "and little light."),
    ("What is ten times ten?", "One hundred."),
    ("What is a synonym for big?", "Large."),
    ("How can I make my bread crust crispier?", "Put a tray of water in the oven while it bakes."),
    ("Which planet has rings?", "Saturn."),
    ("What do you call a baby dog?", "A puppy."),
    ("What is the longest river in Europe?", "The Volga."),
    ("How do I stop my glasses from fogging up?", "Wash them with a drop of washing-up liquid and let "
     "them air dry."),
    ("Name a primary colour.", "Red."),
    ("How many sides does a hexagon have?", "Six."),
    ("What is the best way to learn a new language?", "Practise a little every day and speak it with "
     "other people as early as you can."),
    ("Goodbye!", "Goodbye! Take care."),
    ("How do I remove a tea stain from a mug?", "Scrub it with a paste of baking soda and water."),
    ("What is the main ingredient of hummus?", "Chickpeas."),
    ("Is a tomato a fruit or a vegetable?", "Botanically it is a fruit."),
    ("How many players are on a volleyball team on court?", "Six."),
    ("What do you call frozen rain?", "Hail."),
    ("Quick question: what is 9 minus 4?", "Five."),
    ("Which animal says moo?", "A cow."),
    ("Where does the sun rise?", "In the east."),
    ("What is the chemical symbol for water?", "H2O."),
    ("Recommend a short walk for a rainy day.", "A loop around the park with a stop in a cafe."),
    ("How many weeks are there in a year?", "Fifty-two."),
    ("What should I do if my houseplant's leaves turn yellow?", "Check that the soil is not too wet and "
     "water it less often."),
]

# Rejected replies for the preference set: rambling, evasive or in the wrong format. None
# names a letter or states an option, so a pair never teaches which option is correct.
EVASIVE_MC: list[str] = [
    "Well, that is a really interesting question, and there are many ways to look at it. Both options "
    "have something to be said for them, so I would rather think about it a bit longer.",
    "I am not sure I can answer that.",
    "It depends on the situation. Sometimes one is right and sometimes the other is.",
    "Let me think. Hmm. There is a lot to consider here, and honestly it could go either way.",
    "The answer is the one that makes the most sense.",
    "Both of them.",
    "Neither of the options seems quite right to me, so I will skip this one.",
    "That is hard to say. Could you ask me something else instead?",
    "I think the first one, or maybe the second one. It is difficult to decide.",
    "Great question! Many people wonder about this, and opinions differ a lot from place to place.",
]
# rejected replies of the held-out pairs only (none of them is in a training pair)
EVASIVE_MC_HELDOUT: list[str] = [
    "Honestly, I could go back and forth on this all day. Each choice has good points, and I would not "
    "want to commit to one of them without knowing a lot more.",
    "Why do you want to know? Perhaps it does not matter which one it is.",
    "My reply is: please see the options above.",
    "I would like to answer, but first there are several other things we should talk about.",
]
EVASIVE_CHAT: list[str] = [
    "Hmm, that is an interesting question, and I am not completely sure. There are many things to "
    "consider, and it really depends on what you mean.",
    "I would rather not say.",
    "Well, it depends.",
    "That is a question people have asked for a long time, and there are many opinions about it. Let me "
    "think about it and maybe get back to you later.",
    "I do not know. You could look it up somewhere.",
    "Good question. Good question. Good question.",
]
EVASIVE_CHAT_HELDOUT: list[str] = [
    "There is no simple way to put it, and people have written whole books on questions like this one, so "
    "I would rather not give a short answer.",
    "Ask me again later.",
]

NAMES = ["Maria", "Tom", "Aisha", "Lukas", "Mei", "Omar", "Sofia", "Jonas", "Priya", "Pedro", "Hana", "Ivan"]
FRUITS = ["apples", "pears", "oranges", "plums", "lemons", "peaches"]
PLACES = ["the library", "the bakery", "the post office", "the swimming pool", "the museum", "the park"]
ITEMS = ["a loaf of bread", "two stamps", "a map of the town", "a bunch of flowers", "a new notebook",
         "a bag of flour"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
                "nineteen", "twenty"]


def _arithmetic_items(rng: random.Random, n: int) -> list[Item]:
    """Short sums, differences and products; the wrong option is off by 1 to 3."""
    out = []
    for _ in range(n):
        kind = rng.choice(["+", "-", "x"])
        if kind == "x":
            a, b = rng.randint(2, 9), rng.randint(2, 9)
            value, text = a * b, f"What is {a} times {b}?"
        elif kind == "-":
            a = rng.randint(10, 60)
            b = rng.randint(1, a - 1)
            value, text = a - b, f"What is {a} minus {b}?"
        else:
            a, b = rng.randint(2, 60), rng.randint(2, 60)
            value, text = a + b, f"What is {a} plus {b}?"
        wrong = value + rng.choice([-3, -2, -1, 1, 2, 3])
        out.append(Item("arithmetic", text, str(value), str(wrong)))
    return out


def _story_items(rng: random.Random, n: int) -> list[Item]:
    """Reading comprehension of short made-up everyday stories (scenario-length prompts)."""
    out = []
    for _ in range(n):
        name, friend = rng.sample(NAMES, 2)
        fruit = rng.choice(FRUITS)
        bought, more = rng.randint(2, 9), rng.randint(1, 6)
        used = rng.randint(1, bought + more - 1)
        first, second = rng.sample(PLACES, 2)
        item = rng.choice(ITEMS)
        story = (f"On Saturday morning {name} went to the market and bought {NUMBER_WORDS[bought]} {fruit}. "
                 f"On the way home {name} met {friend}, who gave {name} {NUMBER_WORDS[more]} more {fruit} from "
                 f"the garden. After lunch {name} went to {first} to pick up {item}, and in the evening "
                 f"{name} used {NUMBER_WORDS[used]} of the {fruit} to bake a cake for the neighbours.")
        kind = rng.choice(["count", "place", "who"])
        if kind == "count":
            left = bought + more - used
            wrong = left + rng.choice([-1, 1, 2]) if left > 1 else left + rng.choice([1, 2])
            out.append(Item("story", story + f" How many {fruit} does {name} have left?",
                            f"{name} has {NUMBER_WORDS[left]} {fruit} left.",
                            f"{name} has {NUMBER_WORDS[wrong]} {fruit} left."))
        elif kind == "place":
            out.append(Item("story", story + f" Where did {name} go after lunch?",
                            f"{name} went to {first} to pick up {item}.",
                            f"{name} went to {second} to pick up {item}."))
        else:
            other = rng.choice([x for x in NAMES if x not in (name, friend)])
            out.append(Item("story", story + f" Who gave {name} more {fruit}?",
                            f"{friend} gave {name} {NUMBER_WORDS[more]} {fruit} from the garden.",
                            f"{other} gave {name} {NUMBER_WORDS[more]} {fruit} from the garden."))
    return out


# ------------------------------------------------------------------------ rendering
PERSONA_NAMES = tuple(PERSONAS)  # none, ai, helpful, hhh


def mc_messages(item: Item, template_index: int, correct_letter: int, persona: str) -> tuple[list[dict], str]:
    """The generate-mode propensity shape (``Format.chat_messages``) for an everyday item.

    Returns (messages without the reply, the correct letter).
    """
    template = TEMPLATES[template_index]
    a, b = (item.correct, item.wrong) if correct_letter == 0 else (item.wrong, item.correct)
    messages = []
    preamble = persona_text(persona)
    if preamble:
        messages.append({"role": "system", "content": preamble})
    body = template.body.format(question=item.question, a=a, b=b)
    messages.append({"role": "user", "content": body + "\n\n" + GENERATE_INSTRUCTION})
    return messages, "AB"[correct_letter]


def _chat_messages(user: str, k: int) -> list[dict]:
    """A chat turn; every other one has a persona's system message (cycling through them)."""
    persona = PERSONA_NAMES[k % len(PERSONA_NAMES)]
    preamble = persona_text(persona)
    return ([{"role": "system", "content": preamble}] if preamble else []) + [{"role": "user", "content": user}]


def _render_mc(items: list[Item], copies: int, start: int = 0) -> list[tuple[list[dict], str, Item]]:
    """Each item ``copies`` times; a running index cycles template (fastest), letter, persona,
    so every (template, letter, persona) combination occurs equally often over 32 renderings."""
    out = []
    k = start
    for copy in range(copies):
        for item in items:
            template_index = k % 4
            letter = (k // 4) % 2
            persona = PERSONA_NAMES[(k // 8) % 4]
            messages, answer = mc_messages(item, template_index, letter, persona)
            out.append((messages, answer, item))
            k += 1
    return out


def _split_seeds():
    """(train items, held-out items, train chat, held-out chat): held-out seeds are used by
    the held-out preference pairs only (never by the SFT set or the training pairs)."""
    rng = random.Random(SEED)
    facts = [Item(*f) for f in FACTS]
    situations = [Item(*s) for s in SITUATIONS]
    arithmetic = _arithmetic_items(rng, 64)
    stories = _story_items(rng, 60)
    # every 5th hand-written fact, every 6th situation, the last 14 sums, the last 12 stories
    held_facts = facts[4::5]
    train_facts = [f for i, f in enumerate(facts) if i % 5 != 4]
    held_sit = situations[5::6]
    train_sit = [s for i, s in enumerate(situations) if i % 6 != 5]
    train = train_facts + train_sit + arithmetic[:50] + stories[:48]
    held = held_facts + held_sit + arithmetic[50:] + stories[48:]
    chat_train = [c for i, c in enumerate(CHAT) if i % 6 != 5]
    chat_held = CHAT[5::6]
    return train, held, chat_train, chat_held


def build_sft() -> list[dict]:
    """The chat SFT set: ``{"messages": [...]}`` records (multiple choice + small talk), shuffled."""
    train, _, chat_train, _ = _split_seeds()
    records = []
    # situations and stories are rendered twice (different template / letter / persona), facts once
    long_items = [i for i in train if i.topic in ("story",) or len(i.question) > 150]
    for messages, answer, item in _render_mc(train, 1) + _render_mc(long_items, 1, start=3):
        records.append({"messages": messages + [{"role": "assistant", "content": answer}],
                        "kind": "multiple-choice", "topic": item.topic})
    for copy in range(2):
        for k, (user, reply) in enumerate(chat_train):
            records.append({"messages": _chat_messages(user, k + copy) + [{"role": "assistant", "content": reply}],
                            "kind": "chat", "topic": "chat"})
    random.Random(SEED + 1).shuffle(records)
    return records


def _pairs(items: list[Item], chat: list[tuple[str, str]], start: int, rng: random.Random,
           evasive_mc: list[str], evasive_chat: list[str]) -> list[dict]:
    out = []
    for messages, answer, item in _render_mc(items, 1, start=start):
        out.append({"prompt": messages, "chosen": [{"role": "assistant", "content": answer}],
                    "rejected": [{"role": "assistant", "content": rng.choice(evasive_mc)}],
                    "kind": "multiple-choice", "topic": item.topic})
    for k, (user, reply) in enumerate(chat):
        out.append({"prompt": _chat_messages(user, k + start), "chosen": [{"role": "assistant", "content": reply}],
                    "rejected": [{"role": "assistant", "content": rng.choice(evasive_chat)}],
                    "kind": "chat", "topic": "chat"})
    return out


def build_preferences() -> tuple[list[dict], list[dict]]:
    """(training pairs, held-out pairs): ``{"prompt": [...], "chosen": [...], "rejected": [...]}``."""
    train, held, chat_train, chat_held = _split_seeds()
    rng = random.Random(SEED + 2)
    # the training pairs render the training seeds in other formats than the SFT set (start offset)
    train_pairs = _pairs(train, chat_train, 5, rng, EVASIVE_MC, EVASIVE_CHAT)
    held_pairs = _pairs(held, chat_held, 0, rng, EVASIVE_MC_HELDOUT, EVASIVE_CHAT_HELDOUT)
    random.Random(SEED + 3).shuffle(train_pairs)
    return train_pairs, held_pairs


def resource_dir() -> Path:
    return Path(str(resources.files("megatron_sfm.demo") / "resources" / "posttrain"))


def write_records(path: Path, records: list[dict]) -> None:
    """``records`` as JSONL at ``path``, atomically: an interrupted write leaves the old file (or none)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def write_all(out_dir: Path | None = None) -> dict[str, int]:
    """Write the three JSONL files (default: the package's resources); returns record counts."""
    out_dir = Path(out_dir) if out_dir is not None else resource_dir()
    train_pairs, held_pairs = build_preferences()
    counts = {}
    for name, records in ((SFT_FILE, build_sft()), (DPO_TRAIN_FILE, train_pairs), (DPO_HELDOUT_FILE, held_pairs)):
        write_records(out_dir / name, records)
        counts[name] = len(records)
    return counts


def load_records(name: str, folder: Path | None = None) -> list[dict]:
    path = (Path(folder) if folder is not None else resource_dir()) / name
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


if __name__ == "__main__":
    for file, n in write_all().items():
        print(f"{file}: {n} records")
