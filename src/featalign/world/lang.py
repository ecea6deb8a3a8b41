"""The built-in world's language: topics, sentiment words, a response grammar and the ground-truth reward.

The reward mixes three independent attributes so that methods can differ in what they learn:
staying on the prompt's topic, positive vs negative sentiment, and a mild (capped) length bonus that
unnormalised log-ratio methods can exploit and length-normalised ones cannot.

Sentiment is carried by phrases, not single words: "not" flips the word after it ("not lovely" counts as
negative), so a model must read the pair, and an SAE latent that tracks sentiment cannot be one word's
identity. Each response draws its mood and its topicality from Beta(0.5, 0.5): most answers lean clearly one
way, which gives the model (and its SAE) a per-response state worth representing.

A clause that ends in a sentiment phrase usually closes on punctuation that follows its polarity ("!" after a
positive phrase, "." after a negative one). Without that local cue, positive and negative words share every
context but the response's mood, and an SFT'd LM gives them one embedding: measured on a 2-layer world LM, the
probability it put on the right polarity for the next sentiment word stayed at 0.50 for 1,500 steps, even with
the sentiment tokens' loss weighted 10x. With the cue (80% of such clauses) it rose to 0.64 within 600 steps:
the words separate by their next token first, and attending back to them then carries the mood.

The same device makes topicality learnable: the word after a clause's first noun is "indeed" when the noun is on
the prompt's topic and "anyway" when not (80% of clauses), so the model must compare the noun's topic with the
prompt's, one comparison for every topic, instead of tracking ten topics separately.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

TOPICS: dict[str, dict[str, list[str]]] = {
    "food": {
        "nouns": "bread soup cheese apple pasta rice salad cake pepper onion butter honey noodle pizza "
        "sandwich lemon garlic cookie yogurt bean carrot potato tomato sauce kitchen".split(),
        "verbs": "tastes cooks bakes smells simmers melts roasts boils feeds slices".split(),
        "adjs": "salty sweet spicy crunchy fresh savory creamy juicy".split(),
    },
    "weather": {
        "nouns": "rain storm cloud snow wind sun thunder fog frost breeze hail drizzle sky rainbow "
        "forecast climate lightning season winter summer autumn spring heatwave blizzard humidity".split(),
        "verbs": "falls blows shines drifts rumbles freezes clears pours gusts warms".split(),
        "adjs": "cloudy windy sunny foggy stormy chilly humid icy".split(),
    },
    "sports": {
        "nouns": "football tennis coach team goal match stadium referee player ball racket league "
        "trophy marathon sprint swimmer bicycle helmet score tournament athlete whistle jersey "
        "court season_pass".split(),
        "verbs": "scores kicks runs trains wins races passes throws defends tackles".split(),
        "adjs": "athletic competitive fast agile strong tactical sporty quick".split(),
    },
    "music": {
        "nouns": "guitar piano song melody drum violin concert band singer chorus rhythm album lyric "
        "orchestra trumpet flute harmony note tempo beat microphone stage chord symphony playlist".split(),
        "verbs": "plays sings hums strums echoes records composes tunes performs rehearses".split(),
        "adjs": "melodic loud acoustic rhythmic harmonic lyrical musical upbeat".split(),
    },
    "travel": {
        "nouns": "train airport ticket suitcase passport hotel journey map beach island tourist flight "
        "luggage border route cruise hostel guidebook souvenir backpack station voyage itinerary visa compass".split(),
        "verbs": "travels flies departs arrives explores wanders books packs visits sails".split(),
        "adjs": "distant exotic scenic remote foreign coastal touristic nomadic".split(),
    },
    "animals": {
        "nouns": "dog cat horse rabbit eagle whale tiger fox owl wolf bear deer parrot turtle lion "
        "zebra squirrel penguin monkey dolphin frog bee elephant giraffe kitten".split(),
        "verbs": "barks purrs gallops hops hunts swims roars howls nests grazes".split(),
        "adjs": "furry wild feathered fluffy scaly tame striped spotted".split(),
    },
    "tech": {
        "nouns": "computer laptop phone robot software server keyboard screen chip network code "
        "algorithm database browser app camera battery sensor cable router printer tablet drone "
        "satellite processor".split(),
        "verbs": "computes crashes downloads uploads boots charges scans encrypts streams updates".split(),
        "adjs": "digital wireless electronic virtual smart automated binary portable".split(),
    },
    "garden": {
        "nouns": "flower tree seed soil rose tulip hedge lawn shovel leaf root fern orchid vine "
        "greenhouse compost blossom sprout bush daisy mushroom moss pond fence watering_can".split(),
        "verbs": "grows blooms sprouts wilts climbs ripens spreads roots buds withers".split(),
        "adjs": "green leafy floral fertile shady blooming mossy lush".split(),
    },
    "ocean": {
        "nouns": "wave tide reef shark coral shell sailor boat harbor lighthouse anchor seaweed crab "
        "octopus current shore seagull oyster jellyfish lagoon buoy submarine pier starfish kelp".split(),
        "verbs": "rolls churns dives floats surfs splashes ebbs swirls anchors glides".split(),
        "adjs": "foamy deep tidal marine sandy briny aquatic wavy".split(),
    },
    "city": {
        "nouns": "street bridge tower subway market museum library park traffic building taxi cafe "
        "plaza avenue skyscraper apartment bakery theater alley tram crowd neighborhood sidewalk "
        "mayor district".split(),
        "verbs": "bustles commutes crowds builds honks parks shops rents hurries gathers".split(),
        "adjs": "urban busy crowded modern historic noisy downtown concrete".split(),
    },
}
POSITIVE = (
    "wonderful great lovely delightful excellent beautiful pleasant amazing charming brilliant "
    "cheerful fantastic joyful superb kind gentle happy marvelous splendid glorious inspiring "
    "graceful elegant calm friendly perfect radiant vibrant cozy warmhearted".split()
)
NEGATIVE = (
    "terrible awful horrible dreadful ugly nasty boring gloomy miserable disgusting annoying "
    "painful tragic harsh rude bitter grim sad dull broken rotten hostile clumsy sloppy "
    "unpleasant dismal tedious gross cruel wretched".split()
)
NEGATION = "not"
FUNCTION = (
    "the a an is are was and but very really it this that i we they think feel with of in on to for "
    "so because also quite rather always never sometimes often maybe today here there my our".split()
)
PUNCT = [".", ",", "!"]
PROMPT_WORDS = (
    "tell me about what do you think describe write please talk opinion explain share few words "
    "your thoughts how feel story give short note on".split()
    + ["?", ":"]
)
PROMPT_TEMPLATES = [
    "tell me about {topic} and the {noun}",
    "what do you think about {topic} ?",
    "on {topic} : describe the {adj} {noun}",
    "write a few words on {topic}",
    "please talk about {topic} and the {noun}",
    "share your thoughts on {topic} , the {noun}",
    "how do you feel about {topic} ?",
    "give me a short story about {topic}",
    "explain {topic} please",
    "what is your opinion on {topic} and the {adj} {noun} ?",
]

TOPIC_OF: dict[str, str] = {}
for _t, _parts in TOPICS.items():
    TOPIC_OF[_t] = _t
    for _kind in ("nouns", "verbs", "adjs"):
        for _w in _parts[_kind]:
            TOPIC_OF.setdefault(_w, _t)
POS_SET, NEG_SET = set(POSITIVE), set(NEGATIVE)


def vocabulary() -> list[str]:
    """Every word type of the world, in a fixed order (the tokenizer's ids follow it)."""
    words: list[str] = []
    for parts in TOPICS.values():
        for kind in ("nouns", "verbs", "adjs"):
            words += parts[kind]
    words += (
        list(TOPICS)
        + POSITIVE
        + NEGATIVE
        + [NEGATION]
        + FUNCTION
        + [ON_TOPIC_CUE, OFF_TOPIC_CUE]
        + PUNCT
        + PROMPT_WORDS
    )
    seen: dict[str, None] = {}
    for w in words:
        seen.setdefault(w, None)
    return list(seen)


@dataclass
class Example:
    prompt: str
    topic: str


def sample_prompt(rng: random.Random) -> Example:
    topic = rng.choice(list(TOPICS))
    parts = TOPICS[topic]
    text = rng.choice(PROMPT_TEMPLATES).format(
        noun=rng.choice(parts["nouns"]), adj=rng.choice(parts["adjs"]), topic=topic
    )
    return Example(prompt=text, topic=topic)


def prompt_topic(prompt: str) -> str | None:
    """The topic a prompt asks about: the topic of its first topical word (every template names its topic)."""
    for w in prompt.split():
        if w in TOPIC_OF:
            return TOPIC_OF[w]
    return None


P_NEGATED = 0.3
P_PUNCT_CUE = 0.8  # chance a clause ending in a sentiment phrase closes on its polarity's mark
P_TOPIC_CUE = 0.8  # chance a clause's first noun is followed by a word saying whether it is on the prompt's topic
ON_TOPIC_CUE, OFF_TOPIC_CUE = "indeed", "anyway"


def sample_response(rng: random.Random, topic: str, p_on: float | None = None, p_pos: float | None = None) -> str:
    """A response of 2-7 short clauses (about 10-63 words).

    ``p_on`` is the chance each content word comes from the prompt's topic, ``p_pos`` the chance a
    sentiment phrase is positive (a positive phrase is a positive word or "not" + a negative one); both
    are drawn per response from Beta(0.5, 0.5) when not given, so that the corpus covers good and bad
    answers and an LM trained on it is a mediocre, improvable policy.
    """
    p_on = rng.betavariate(0.5, 0.5) if p_on is None else p_on
    p_pos = rng.betavariate(0.5, 0.5) if p_pos is None else p_pos
    others = [t for t in TOPICS if t != topic]

    def topic_for() -> dict[str, list[str]]:
        return TOPICS[topic if rng.random() < p_on else rng.choice(others)]

    last: list[bool] = []  # polarity of the clause's latest sentiment phrase

    def senti() -> str:
        positive = rng.random() < p_pos
        last.append(positive)
        if rng.random() < P_NEGATED:
            return f"{NEGATION} {rng.choice(NEGATIVE if positive else POSITIVE)}"
        return rng.choice(POSITIVE if positive else NEGATIVE)

    clauses = []
    for _ in range(rng.randint(2, 7)):
        last.clear()
        t = topic_for()
        noun = rng.choice(t["nouns"])
        if rng.random() < P_TOPIC_CUE:
            noun += " " + (ON_TOPIC_CUE if t is TOPICS[topic] else OFF_TOPIC_CUE)
        form = rng.randrange(6)
        if form == 0:
            c = f"the {rng.choice(t['adjs'])} {noun} {rng.choice(t['verbs'])}"
        elif form == 1:
            c = f"i think the {noun} is {senti()}"
        elif form == 2:
            c = f"the {noun} {rng.choice(t['verbs'])} and it is {senti()}"
        elif form == 3:
            c = f"it is a {senti()} {noun}"
        elif form == 4:
            c = f"we {rng.choice(['really', 'often', 'always', 'sometimes'])} feel {senti()}"
        else:
            c = f"{noun} and {rng.choice(topic_for()['nouns'])} are {senti()}"
        ends_in_phrase = form in (1, 2, 4, 5)
        if ends_in_phrase and rng.random() < P_PUNCT_CUE:
            mark = "!" if last[-1] else "."
        else:
            mark = rng.choice(PUNCT)
        clauses.append(c + " " + mark)
    return " ".join(clauses)


@dataclass(frozen=True)
class RewardWeights:
    topic: float = 1.0
    sentiment: float = 1.0
    length: float = 0.3
    length_cap: int = 40


def polarities(words: list[str]) -> list[int]:
    """+1 / -1 per sentiment phrase: a sentiment word, flipped when "not" comes right before it."""
    out = []
    for i, w in enumerate(words):
        s = 1 if w in POS_SET else -1 if w in NEG_SET else 0
        if s:
            out.append(-s if i > 0 and words[i - 1] == NEGATION else s)
    return out


def reward_parts(prompt: str, response: str) -> dict[str, float]:
    """The three attributes of the ground-truth reward, each in a fixed range.

    topic: fraction of topical words that belong to the prompt's topic, in [0, 1];
    sentiment: (pos - neg) / (pos + neg + 1) over sentiment phrases, in (-1, 1); length: min(len, cap) / cap.
    """
    words = response.split()
    topic = prompt_topic(prompt)
    topical = [TOPIC_OF[w] for w in words if w in TOPIC_OF]
    on = sum(t == topic for t in topical) / len(topical) if topical else 0.0
    pol = polarities(words)
    pos, neg = pol.count(1), pol.count(-1)
    cap = RewardWeights.length_cap
    return {"topic": on, "sentiment": (pos - neg) / (pos + neg + 1), "length": min(len(words), cap) / cap}


def reward(prompt: str, response: str, weights: RewardWeights = RewardWeights()) -> float:
    """Ground-truth reward r(prompt, response)."""
    p = reward_parts(prompt, response)
    return weights.topic * p["topic"] + weights.sentiment * p["sentiment"] + weights.length * p["length"]
