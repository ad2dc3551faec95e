"""The project's own prompts: every topic asked through every template. The demo data and its
evaluation are built on them, and the server measures adapters' feature pushes on some of them
(`fsrl.analysis.reference_token_ids`).

The held-out topics never appear in training, so the held-out figures measure prompts on new
subjects, not new phrasings of seen ones. They were also looked at while the first demo
adapters were tuned (their L1, the bullets decoding), so they are a selection set now.

The evaluation set (`eval_prompts`) is the one held out for the demo's published figures: new
topics through new templates, frozen (committed) before any adapter was evaluated on it, and
never used to choose anything (a scale, an L1, a rule, a decoding). Its sha256 is checked by
the evaluation (`EVAL_SET_SHA256_16`), so a change to it cannot pass unnoticed.
"""

from __future__ import annotations

from dataclasses import dataclass

TEMPLATES = (
    "Tell me about {topic}.",
    "Explain {topic}.",
    "What should I know about {topic}?",
    "Can you give me an overview of {topic}?",
)

TRAIN_TOPICS = (
    "the water cycle", "photosynthesis", "volcanoes", "the immune system", "black holes",
    "plate tectonics", "the human heart", "electricity", "climate change", "the moon",
    "honey bees", "rainbows", "earthquakes", "the solar system", "DNA",
    "the Roman Empire", "the French Revolution", "the printing press", "ancient Egypt",
    "the Industrial Revolution", "the Silk Road", "the Renaissance", "the Cold War",
    "saving money", "learning a new language", "starting to run", "getting better sleep",
    "cooking rice", "growing tomatoes", "time management", "public speaking",
    "writing a cover letter", "job interviews", "budgeting for a trip", "caring for a cat",
    "the internet", "computer viruses", "machine learning", "password security",
    "how a car engine works", "solar panels", "recycling", "3D printing", "smartphones",
    "meditation", "drinking enough water", "stretching", "vitamins",
    "the Olympic Games", "jazz music", "chess", "origami", "photography",
    "the stock market", "inflation", "credit scores", "renting an apartment",
    "composting", "bird migration", "coral reefs",
)

HELDOUT_TOPICS = (
    "tornadoes", "the human brain", "the ancient Greeks", "the Great Wall of China",
    "learning to swim", "making bread", "email etiquette", "cloud computing",
    "electric cars", "yoga", "the piano", "taxes",
)


EVAL_TEMPLATES = (
    "Describe {topic}.",
    "Why does {topic} matter?",
    "I keep hearing about {topic}. What is it?",
    "What are the basics of {topic}?",
)

EVAL_TOPICS = (
    "glaciers", "the human skeleton", "the Vikings", "the Wright brothers", "juggling",
    "brewing coffee", "houseplants", "spreadsheets", "wind turbines", "the violin",
    "mortgages", "first aid for burns", "octopuses", "the Amazon rainforest", "the metric system",
    "public libraries",
)
EVAL_SET_SHA256_16 = "71ebbd738950183b"


@dataclass(frozen=True)
class DemoPrompt:
    id: str
    topic: str
    text: str
    split: str          # "train" | "heldout" | "eval"
    template: str = ""  # the template it was made from, or REQUEST


REQUEST = "(a request of its own)"


def demo_prompts() -> list[DemoPrompt]:
    return _grid("train-", "train", TRAIN_TOPICS, TEMPLATES) + _grid("heldout-", "heldout", HELDOUT_TOPICS, TEMPLATES)


def _grid(prefix: str, split: str, topics: tuple[str, ...], templates: tuple[str, ...]) -> list[DemoPrompt]:
    """Every topic through every template, topic by topic (ids <prefix><topic>-<template>)."""
    return [DemoPrompt(id=f"{prefix}{t_i:02d}-{k}", topic=topic, text=template.format(topic=topic), split=split,
                       template=template)
            for t_i, topic in enumerate(topics) for k, template in enumerate(templates)]


def eval_prompts() -> list[DemoPrompt]:
    """The frozen evaluation set: every EVAL_TOPICS topic through every EVAL_TEMPLATES template."""
    return _grid("eval-", "eval", EVAL_TOPICS, EVAL_TEMPLATES)


def prompts_digest(prompts: list[DemoPrompt]) -> str:
    """sha256 (first 16 hex digits) of the prompts' texts, in order."""
    import hashlib

    return hashlib.sha256("\n".join(p.text for p in prompts).encode()).hexdigest()[:16]


def eval_set_digest() -> str:
    return prompts_digest(eval_prompts())


# ---------------------------------------------------------------------------------------------
# Requests of other shapes (advice, ideas, names, how-to, why), each with the word(s) an on-topic
# answer names. `bullets` trains on them beside the topic prompts, so that it makes lists for
# what users actually ask, not only for "Tell me about X". Its selection and evaluation sets
# hold their own (`list_selection_prompts`, `list_eval_prompts`).

TRAIN_REQUESTS = (
    ("What should I pack for a weekend camping trip?", "camping"),
    ("How can I make my mornings less rushed?", "mornings"),
    ("Suggest some names for a pet rabbit.", "rabbit"),
    ("What are good snacks for a long car ride?", "snacks"),
    ("How do I clean a cast iron pan?", "cast iron"),
    ("What are some ways to stay warm in winter?", "warm"),
    ("Why do cats purr?", "cats"),
    ("How can I improve my handwriting?", "handwriting"),
    ("What are good gifts for a new parent?", "parent"),
    ("How do I get better at remembering names?", "names"),
    ("What should I do before a job interview?", "interview"),
    ("Give me ideas for a rainy afternoon with kids.", "kids"),
    ("How can I drink less coffee?", "coffee"),
    ("What are some easy vegetables to grow?", "vegetables"),
    ("Why is the sky blue?", "sky"),
    ("How do I choose a good watermelon?", "watermelon"),
    ("What are the signs of a healthy lawn?", "lawn"),
    ("How can I make a small garden look bigger?", "garden"),
    ("What should I know before adopting a dog?", "dog"),
    ("How do I write a thank-you note?", "thank"),
    ("Suggest a few names for a bakery.", "bakery"),
    ("What are some fun science experiments for children?", "experiments"),
    ("How can I keep my phone battery healthy?", "battery"),
    ("What makes a good team leader?", "leader"),
    ("Why do we have seasons?", "seasons"),
    ("How do I make friends at a new school?", "friends"),
    ("What are healthy breakfast ideas?", "breakfast"),
    ("How can I focus better while studying?", "studying"),
    ("What should I check before buying a used car?", "car"),
    ("Explain what a volcano is to a child.", "volcano"),
    ("What are good ways to relax after work?", "relax"),
    ("How do I plan a picnic?", "picnic"),
    ("What are some tips for taking care of succulents?", "succulents"),
    ("Why do birds sing in the morning?", "birds"),
    ("How can I waste less food at home?", "food"),
    ("What should I name my new hamster?", "hamster"),
    ("What are common mistakes when painting a room?", "painting"),
    ("How do I prepare for a marathon?", "marathon"),
    ("What are the benefits of walking every day?", "walking"),
    ("How can I make my emails clearer?", "emails"),
    ("What are some classic board games for families?", "games"),
    ("How do I keep a fish tank clean?", "tank"),
    ("What should I bring to a potluck dinner?", "potluck"),
    ("Why do onions make you cry?", "onions"),
    ("How can I get better at drawing?", "drawing"),
    ("What are some good habits for saving time?", "time"),
    ("How do I tell if bread has gone bad?", "bread"),
    ("Explain what clouds are to a child.", "clouds"),
)

SELECTION_REQUESTS = (
    ("What should I take on a beach holiday?", "beach"),
    ("How can I sleep better on a plane?", "plane"),
    ("Suggest some names for a sailboat.", "sailboat"),
    ("Why do dogs wag their tails?", "dogs"),
    ("How do I keep cut flowers fresh longer?", "flowers"),
    ("What are good ways to learn new words?", "words"),
    ("What should I do if I lock myself out?", "lock"),
    ("Explain what the wind is to a child.", "wind"),
    ("How can I make my bedroom tidier?", "bedroom"),
    ("What are some quick dinners for busy nights?", "dinners"),
    ("How do I start journaling?", "journal"),
    ("What makes a good neighbor?", "neighbor"),
    ("Why do we yawn?", "yawn"),
    ("What are fun things to do in a snowstorm?", "snow"),
    ("How do I pick a good melon at the market?", "melon"),
    ("What should I know about feeding ducks?", "ducks"),
)


# Naming requests (the fifth recipe on): the fourth evaluation set's misses were naming requests
# answered with animals, not names ("1. Lizard / 2. Snake / 3. Crocodile" for a lizard), and the
# training data had only five naming requests. The subject is the topic; a naming answer's list is judged by
# `fsrl.demo.rules.naming_list` (names, not the subject), not by `relevant`. The sixth recipe adds
# the second block, and answers every naming request with a list from NAME_LISTS.
NAMING_REQUESTS = (
    ("Suggest some names for a pet snake.", "snake"),
    ("What should I name my new pony?", "pony"),
    ("Give me some name ideas for a pet frog.", "frog"),
    ("Suggest some names for a pet ferret.", "ferret"),
    ("What should I name my new betta fish?", "betta fish"),
    ("Suggest some names for a pet chicken.", "chicken"),
    ("What should I name my new canary?", "canary"),
    ("Give me some name ideas for a pet pig.", "pig"),
    ("Suggest some names for a pet goat.", "goat"),
    ("What should I name my new koi?", "koi"),
    ("Suggest some names for a gray cat.", "cat"),
    ("What should I name my new bulldog?", "bulldog"),
    ("Give me some name ideas for a pet duck.", "duck"),
    ("Suggest some names for a pet mouse.", "mouse"),
    ("What should I name my new horse?", "horse"),
    ("Suggest some names for a flower shop.", "flower shop"),
    ("Give me some name ideas for a coffee shop.", "coffee shop"),
    ("Suggest some names for a fishing boat.", "boat"),
    ("What should I name my new robot vacuum?", "robot vacuum"),
    ("Suggest some names for a soccer team.", "soccer team"),
    ("Give me some name ideas for a podcast about cooking.", "podcast"),
    ("Suggest some names for a garden blog.", "blog"),
    ("What should I name my new car?", "car"),
    ("Suggest some names for a fantasy kingdom.", "kingdom"),
    ("Give me some name ideas for a lemonade stand.", "lemonade stand"),
    ("Suggest some names for a toy dragon.", "dragon"),
    ("What should I name my new bonsai tree?", "bonsai"),
    ("Suggest some names for a pet parakeet.", "parakeet"),
    ("What should I name my new tortoise?", "tortoise"),
    ("Give me some name ideas for a pet crab.", "crab"),
    ("Suggest some names for a bookshop.", "bookshop"),
    ("What should I name my new teddy bear?", "teddy bear"),
    # the sixth recipe's
    ("Suggest some names for a pet guppy.", "guppy"),
    ("What should I name my new angelfish?", "angelfish"),
    ("Give me some name ideas for a clownfish.", "clownfish"),
    ("What should I name my new beagle?", "beagle"),
    ("Suggest some names for a pet gerbil.", "gerbil"),
    ("What should I name my new dog?", "dog"),
    ("Give me some name ideas for a pet rat.", "rat"),
    ("Suggest some names for a pet tarantula.", "tarantula"),
    ("What should I name my new tabby?", "tabby"),
    ("Suggest some names for a pet axolotl.", "axolotl"),
    ("What should I name my new cockatiel?", "cockatiel"),
    ("Give me some name ideas for a pet bunny.", "bunny"),
    ("Suggest some names for a pet chinchilla.", "chinchilla"),
    ("What should I name my new sheepdog?", "sheepdog"),
    ("Suggest some names for a pet cow.", "cow"),
    ("Suggest some names for a rowing club.", "rowing club"),
    ("Give me some name ideas for a candle shop.", "candle shop"),
    ("Suggest some names for a rock band.", "rock band"),
    ("What should I name my new motorcycle?", "motorcycle"),
    ("Give me some name ideas for a chess club.", "chess club"),
    ("Suggest some names for a pet lamb.", "lamb"),
    ("What should I name my new fern?", "fern"),
    ("Suggest some names for a pet seahorse.", "seahorse"),
    ("What should I name my new sailing dinghy?", "dinghy"),
)

# The sixth recipe's chosen answer to each naming request of training and selection: names written
# by hand, not by the model (whose own hinted lists named the subject, or animals, or repeated one
# name: "1. Koi / 2. Goldfish" for a koi, "1. Kangaroo / 2. Kookaburra" for a goat).
NAME_LISTS: dict[str, tuple[str, ...]] = {
    "Suggest some names for a pet snake.": ("Noodle", "Slinky", "Monty", "Medusa", "Sir Hiss"),
    "What should I name my new pony?": ("Daisy", "Butterscotch", "Pepper", "Biscuit", "Sundance"),
    "Give me some name ideas for a pet frog.": ("Hopper", "Lily", "Kermit", "Ribbit", "Jade"),
    "Suggest some names for a pet ferret.": ("Bandit", "Slinky", "Noodle", "Ziggy", "Pippin"),
    "What should I name my new betta fish?": ("Neptune", "Sapphire", "Finn", "Ruby", "Blaze"),
    "Suggest some names for a pet chicken.": ("Henrietta", "Nugget", "Penny", "Goldie", "Marigold"),
    "What should I name my new canary?": ("Sunny", "Tweety", "Goldie", "Lemon", "Pip"),
    "Give me some name ideas for a pet pig.": ("Wilbur", "Hamlet", "Peppa", "Truffle", "Babe"),
    "Suggest some names for a pet goat.": ("Billy", "Clover", "Pepper", "Gruff", "Heidi"),
    "What should I name my new koi?": ("Sakura", "Goldie", "Kumo", "Mochi", "Sunny"),
    "Suggest some names for a gray cat.": ("Smokey", "Misty", "Shadow", "Ash", "Pebble"),
    "What should I name my new bulldog?": ("Tank", "Winston", "Bruno", "Daisy", "Meatball"),
    "Give me some name ideas for a pet duck.": ("Puddles", "Waddles", "Daffy", "Quackers", "Dottie"),
    "Suggest some names for a pet mouse.": ("Squeak", "Pip", "Nibbles", "Whiskers", "Crumb"),
    "What should I name my new horse?": ("Spirit", "Thunder", "Maple", "Duke", "Star"),
    "Suggest some names for a flower shop.": ("Petal & Stem", "Bloom Room", "Wild Rose", "Daisy Chain",
                                               "The Blooming Bucket"),
    "Give me some name ideas for a coffee shop.": ("The Daily Grind", "Bean There", "Morning Brew", "The Perk",
                                                    "Common Grounds"),
    "Suggest some names for a fishing boat.": ("Reel Deal", "Lucky Catch", "Salty Dog", "Northern Star", "Sea Hawk"),
    "What should I name my new robot vacuum?": ("Dusty", "Sir Sweeps-a-Lot", "Crumbs", "Zippy", "R2-Clean"),
    "Suggest some names for a soccer team.": ("The Thunderbolts", "Riverside Rovers", "The Golden Strikers",
                                               "Northside United", "The Comets"),
    "Give me some name ideas for a podcast about cooking.": ("Stir It Up", "The Simmer", "Salt & Pepper Talk",
                                                              "Taste Buds", "Second Helpings"),
    "Suggest some names for a garden blog.": ("The Green Thumb Diary", "Seeds and Soil", "Bloom Notes",
                                               "Weekend Weeding", "The Potting Bench"),
    "What should I name my new car?": ("Betsy", "Silver Bullet", "Rusty", "Blue Thunder", "Herbie"),
    "Suggest some names for a fantasy kingdom.": ("Eldoria", "Valoria", "Stormhold", "Avalon", "Brightmere"),
    "Give me some name ideas for a lemonade stand.": ("Sunshine Sips", "Squeeze the Day", "Pucker Up",
                                                       "Sweet & Sour", "The Yellow Cup"),
    "Suggest some names for a toy dragon.": ("Ember", "Puff", "Sparky", "Ignis", "Toast"),
    "What should I name my new bonsai tree?": ("Miyagi", "Twiggy", "Zen", "Hoshi", "Little Oak"),
    "Suggest some names for a pet parakeet.": ("Kiwi", "Skye", "Pip", "Mango", "Bluebell"),
    "What should I name my new tortoise?": ("Sheldon", "Speedy", "Tank", "Shelly", "Methuselah"),
    "Give me some name ideas for a pet crab.": ("Sebastian", "Pinchy", "Sandy", "Clawde", "Hermie"),
    "Suggest some names for a bookshop.": ("Dog-Eared Pages", "The Reading Nook", "Chapter & Verse", "Paper Lantern",
                                            "Between the Lines"),
    "What should I name my new teddy bear?": ("Mr. Snuggles", "Honey", "Barnaby", "Cuddles", "Button"),
    "Suggest some names for a pet guppy.": ("Bubbles", "Finn", "Zippy", "Pebble", "Splash"),
    "What should I name my new angelfish?": ("Seraph", "Marina", "Flutter", "Coral", "Halo"),
    "Give me some name ideas for a clownfish.": ("Pickles", "Sunny", "Juggles", "Bingo", "Tango"),
    "What should I name my new beagle?": ("Copper", "Biscuit", "Daisy", "Scout", "Rosie"),
    "Suggest some names for a pet gerbil.": ("Nibbles", "Peanut", "Hazel", "Squeak", "Toffee"),
    "What should I name my new dog?": ("Buddy", "Luna", "Max", "Bella", "Charlie"),
    "Give me some name ideas for a pet rat.": ("Whiskers", "Remy", "Ziggy", "Mochi", "Pip"),
    "Suggest some names for a pet tarantula.": ("Fuzzy", "Octavia", "Boris", "Velvet", "Spindle"),
    "What should I name my new tabby?": ("Marmalade", "Tiger", "Ginger", "Pumpkin", "Oliver"),
    "Suggest some names for a pet axolotl.": ("Pinky", "Wiggles", "Gilbert", "Bubbles", "Sprout"),
    "What should I name my new cockatiel?": ("Sunny", "Kiwi", "Mango", "Pip", "Echo"),
    "Give me some name ideas for a pet bunny.": ("Clover", "Thumper", "Cocoa", "Hopscotch", "Willow"),
    "Suggest some names for a pet chinchilla.": ("Dusty", "Mochi", "Pebbles", "Ash", "Velvet"),
    "What should I name my new sheepdog?": ("Bramble", "Skye", "Murphy", "Tess", "Barley"),
    "Suggest some names for a pet cow.": ("Buttercup", "Daisy", "Clementine", "Bessie", "Marigold"),
    "Suggest some names for a rowing club.": ("Swift Blades", "River Foxes", "Silver Oars", "The Early Risers",
                                               "Tidewater Crew"),
    "Give me some name ideas for a candle shop.": ("Wick & Wonder", "The Glow Room", "Ember Lane", "Flicker",
                                                    "Soft Light Studio"),
    "Suggest some names for a rock band.": ("Midnight Static", "Neon Harbor", "Silver Lanterns", "Echo Valley",
                                             "The Loose Threads"),
    "What should I name my new motorcycle?": ("Thunder", "Blaze", "Comet", "Rusty", "Shadow"),
    "Give me some name ideas for a chess club.": ("Knight Moves", "The Gambit Society", "Rook and Roll", "Pawn Stars",
                                                   "Endgame"),
    "Suggest some names for a pet lamb.": ("Snowball", "Dolly", "Clover", "Woolly", "Pip"),
    "What should I name my new fern?": ("Frond", "Sage", "Willow", "Greta", "Leafy"),
    "Suggest some names for a pet seahorse.": ("Coral", "Neptune", "Drift", "Pearl", "Ripple"),
    "What should I name my new sailing dinghy?": ("Puffin", "Little Wave", "Breezy", "Skipper", "Minnow"),
    # naming requests among the other training and selection requests
    "Suggest a few names for a bakery.": ("Rise & Shine", "The Golden Crust", "Flour Power", "Sweet Crumbs",
                                          "The Rolling Pin"),
    "What should I name my new hamster?": ("Peanut", "Hammy", "Biscuit", "Nugget", "Cheeks"),
    "Suggest some names for a pet rabbit.": ("Thumper", "Clover", "Hazel", "Bun Bun", "Cinnamon"),
    "Suggest some names for a black kitten.": ("Midnight", "Salem", "Onyx", "Pepper", "Shadow"),
    "What should I name my new parrot?": ("Polly", "Captain", "Rio", "Mango", "Kiwi"),
    "Suggest some names for a sailboat.": ("Windsong", "Sea Breeze", "Serenity", "Wanderer", "Blue Horizon"),
}


def name_list_answer(request: str) -> str:
    """The hand-written answer to a naming request of training or selection: its names, numbered."""
    return "\n".join(f"{i}. {name}" for i, name in enumerate(NAME_LISTS[request], 1))


def _requests(split: str, requests: tuple[tuple[str, str], ...], prefix: str = "") -> list[DemoPrompt]:
    return [DemoPrompt(id=f"{split}-{prefix}r{i:02d}", topic=topic, text=text, split=split, template=REQUEST)
            for i, (text, topic) in enumerate(requests)]


def list_train_prompts() -> list[DemoPrompt]:
    """`bullets`' training prompts: the training topics through the templates, the requests, the
    spent second evaluation set with its templates on some training topics, and the naming requests."""
    return ([p for p in demo_prompts() if p.split == "train"] + _requests("train", TRAIN_REQUESTS)
            + _spent_list_prompts() + _requests("train", NAMING_REQUESTS, prefix="n"))


def list_selection_prompts() -> list[DemoPrompt]:
    """What chooses `bullets`' recipe, scale and decoding: the held-out topics and requests."""
    return [p for p in demo_prompts() if p.split == "heldout"] + _requests("heldout", SELECTION_REQUESTS)


# `bullets`' second evaluation set: answered once, by the second recipe's adapter (its figures are in
# git history), and spent then; its prompts train the third recipe (`list_train_prompts`).
SPENT_LIST_TEMPLATES = (
    "Give me a quick rundown of {topic}.",
    "What do beginners get wrong about {topic}?",
    "How would you explain {topic} to a friend?",
    "What is interesting about {topic}?",
)

SPENT_LIST_TOPICS = (
    "lighthouses", "the Titanic", "penguins", "chocolate", "submarines", "the Sahara desert",
    "knitting", "rock climbing", "vaccines", "the Eiffel Tower", "board games", "hurricanes",
)

SPENT_LIST_REQUESTS = (
    ("What are some good habits for keeping a tidy desk?", "desk"),
    ("How can I make a small apartment feel bigger?", "apartment"),
    ("What should I bring on a day hike?", "hike"),
    ("Suggest some names for a black kitten.", "kitten"),
    ("What are fun things to do on a rainy day?", "rainy"),
    ("What are signs that a car needs new tires?", "tires"),
    ("Give me ideas for a birthday party for a ten-year-old.", "birthday"),
    ("What should I look for when buying a used bike?", "bike"),
    ("Why do leaves change color in autumn?", "leaves"),
    ("How do I prepare for a long flight?", "flight"),
    ("What can I cook with eggs and spinach?", "eggs"),
    ("How do I start a vegetable garden on a balcony?", "balcony"),
    ("What are the benefits of reading every day?", "reading"),
    ("How can I reduce stress at work?", "stress"),
    ("What questions should I ask a landlord before signing a lease?", "landlord"),
    ("How can I make new friends in a new city?", "city"),
    ("Explain how a refrigerator keeps food cold.", "refrigerator"),
    ("What are common mistakes new drivers make?", "drivers"),
    ("How do I teach a dog to sit?", "sit"),
    ("What should a first aid kit contain?", "first aid"),
    ("What are some easy ways to use less energy at home?", "energy"),
    ("Explain what thunder is to a child.", "thunder"),
    ("What should I name my new parrot?", "parrot"),
    ("How do I keep my kitchen knives sharp?", "knives"),
)


def _spent_list_prompts() -> list[DemoPrompt]:
    """The spent second set, and its templates on every fourth training topic, as training prompts."""
    return (_grid("train-s", "train", SPENT_LIST_TOPICS + TRAIN_TOPICS[::4], SPENT_LIST_TEMPLATES)
            + _requests("train", SPENT_LIST_REQUESTS, prefix="s"))


# `bullets`' third evaluation set: answered once, by the third recipe's adapter (its figures are in
# git history), and spent when its misses (lists that repeat one item) chose the fourth recipe's
# change. Kept so that the later sets can be checked apart from it; it trains nothing.
SPENT_LIST3_TEMPLATES = (
    "Walk me through {topic}.",
    "What makes {topic} special?",
    "Summarize {topic} for a busy person.",
    "Teach me something new about {topic}.",
)

SPENT_LIST3_TOPICS = (
    "sharks", "medieval castles", "pottery", "green tea", "the Moon landing", "skateboarding",
    "owls", "the Panama Canal", "sunscreen", "bamboo", "hot air balloons", "tides",
)

SPENT_LIST3_REQUESTS = (
    ("What should I pack for a ski trip?", "ski trip"),
    ("How can I keep my plants alive while I am on vacation?", "plants"),
    ("Suggest some names for a golden retriever puppy.", "puppy"),
    ("What are good conversation starters at a dinner party?", "conversation"),
    ("How do I clean white sneakers?", "sneakers"),
    ("Why do stars twinkle?", "stars"),
    ("What are some ways to save money on groceries?", "groceries"),
    ("How can I learn to type faster?", "typing"),
    ("What should I do on my first day at a new job?", "first day"),
    ("Give me ideas for a date night at home.", "date night"),
    ("How do I make a paper airplane fly farther?", "airplane"),
    ("What are the benefits of learning to cook?", "cook"),
    ("How can I be more productive in the afternoon?", "afternoon"),
    ("What should I consider when choosing a laptop?", "laptop"),
    ("Explain what an eclipse is to a child.", "eclipse"),
    ("What are some tips for writing a good poem?", "poem"),
    ("How do I take care of a leather jacket?", "leather"),
    ("What are common causes of a headache?", "headache"),
    ("Suggest some themes for a school science fair project.", "science"),
    ("How can I make a cheap meal feel fancy?", "meal"),
    ("What should I know before getting a tattoo?", "tattoo"),
    ("Why do we dream?", "dream"),
    ("What are good exercises to do at a desk?", "exercises"),
    ("How do I organize a closet?", "closet"),
)


# `bullets`' fourth evaluation set: answered once, by the fourth recipe's adapter (its figures are in
# git history, digest e9ace3c16b6aaa8c), and spent when its misses (naming requests answered with
# animals, not names) chose the fifth recipe's change. Kept so that the fifth set can be checked
# apart from it; it trains nothing.
SPENT_LIST4_TEMPLATES = (
    "Help me understand {topic}.",
    "What do people love about {topic}?",
    "Fill me in on {topic}.",
    "What's worth knowing about {topic}?",
)

SPENT_LIST4_TOPICS = (
    "giraffes", "lightning", "maple syrup", "the Statue of Liberty", "kayaking", "cheese making",
    "the northern lights", "dolphins", "Mount Everest", "crossword puzzles", "the human eye", "pizza",
)

SPENT_LIST4_REQUESTS = (
    ("What should I pack for a business trip?", "business trip"),
    ("Suggest some names for a pet turtle.", "turtle"),
    ("How can I keep my bathroom clean?", "bathroom"),
    ("Why do zebras have stripes?", "zebras"),
    ("Explain what an echo is to a child.", "echo"),
    ("What are good ways to celebrate a friend's promotion?", "promotion"),
    ("How do I fix a squeaky door?", "door"),
    ("What are some tips for running a yard sale?", "yard sale"),
    ("Give me ideas for a homemade gift.", "gift"),
    ("How can I stop procrastinating?", "procrastinating"),
    ("What should I name my new lizard?", "lizard"),
    ("Why do our ears pop on airplanes?", "ears"),
    ("What are easy ways to eat more fruit?", "fruit"),
    ("How do I care for a cactus?", "cactus"),
    ("What should I know before running my first race?", "race"),
    ("How can I make my home smell nice?", "smell"),
    ("What are some good questions to ask on a first date?", "first date"),
    ("Suggest some names for a book club.", "book club"),
    ("How do I get a stain out of a carpet?", "stain"),
    ("What are the benefits of learning a musical instrument?", "instrument"),
    ("How can I sleep better in hot weather?", "hot weather"),
    ("Why do apples turn brown when cut?", "apples"),
    ("What should I look for in a good pair of running shoes?", "running shoes"),
    ("How do I welcome a new coworker?", "coworker"),
)


def _list_eval_set(tag: str, topics: tuple[str, ...], templates: tuple[str, ...],
                   requests: tuple[tuple[str, str], ...]) -> list[DemoPrompt]:
    """One of `bullets`' evaluation sets: its topics through its templates (ids `lists<tag>-`), then
    its requests (ids `eval-<tag>rNN`)."""
    return _grid(f"lists{tag}-", "eval", topics, templates) + _requests("eval", requests, prefix=tag)


def spent_list_sets() -> list[DemoPrompt]:
    """The spent second to fifth evaluation sets (the second also trains; see above)."""
    return (_spent_list_prompts()
            + _list_eval_set("", SPENT_LIST3_TOPICS, SPENT_LIST3_TEMPLATES, SPENT_LIST3_REQUESTS)
            + _list_eval_set("4", SPENT_LIST4_TOPICS, SPENT_LIST4_TEMPLATES, SPENT_LIST4_REQUESTS)
            + _list_eval_set("5", SPENT_LIST5_TOPICS, SPENT_LIST5_TEMPLATES, SPENT_LIST5_REQUESTS))


# `bullets`' fifth evaluation set: answered once, by the fifth recipe's adapter (its figures are in
# git history, digest 39e917d34e913e2e), and spent when the README's goldfish example, still no list,
# and its naming lists counted as off-topic chose the sixth recipe and the naming rule. Kept so that
# the sixth set can be checked apart from it; it trains nothing.
SPENT_LIST5_TEMPLATES = (
    "Tell me the key facts about {topic}.",
    "What's the story of {topic}?",
    "Break down {topic} for me.",
    "What are the highlights of {topic}?",
)

SPENT_LIST5_TOPICS = (
    "hummingbirds", "the Colosseum", "snowflakes", "the Grand Canyon", "roller coasters", "elephants",
    "the Mona Lisa", "bicycles", "quilting", "fireflies", "the Nile River", "sushi",
)

SPENT_LIST5_REQUESTS = (
    ("What should I pack for a music festival?", "festival"),
    ("Suggest some names for a pet hedgehog.", "hedgehog"),
    ("How can I keep my car tidy?", "tidy"),
    ("Why do cats knead blankets?", "knead"),
    ("Explain what the ocean is to a child.", "ocean"),
    ("What are good ways to thank a teacher?", "teacher"),
    ("How do I unclog a drain?", "drain"),
    ("What are some tips for hosting a barbecue?", "barbecue"),
    ("Give me ideas for a family game night.", "game night"),
    ("How can I stop biting my nails?", "nails"),
    ("What should I name my new guinea pig?", "guinea pig"),
    ("Why do we get goosebumps?", "goosebumps"),
    ("What are easy ways to add more fiber to my diet?", "fiber"),
    ("How do I care for an orchid?", "orchid"),
    ("What should I know before going on a cruise?", "cruise"),
    ("How can I keep my houseplants free of pests?", "pests"),
    ("What are some good questions to ask a new doctor?", "doctor"),
    ("Suggest some names for a food truck.", "food truck"),
    ("How do I remove rust from tools?", "rust"),
    ("What are the benefits of volunteering?", "volunteering"),
    ("How can I stay cool without air conditioning?", "cool"),
    ("Why is the ocean salty?", "salty"),
    ("What should I look for in a good backpack?", "backpack"),
    ("How do I politely decline an invitation?", "decline"),
)


# `bullets`' evaluation set (its sixth), frozen (committed, digest below) before any adapter
# answered it: new topics through new templates, and requests of the shapes above on new subjects
# (four naming requests). None of it appears in training, in the selection set, in the spent sets
# or in the README's example requests (`fsrl.demo.examples`), and nothing is chosen on it.
LIST_EVAL_TEMPLATES = (
    "What are the main points about {topic}?",
    "Share some facts about {topic}.",
    "Introduce me to {topic}.",
    "What should a curious kid learn about {topic}?",
)

LIST_EVAL_TOPICS = (
    "beavers", "the Taj Mahal", "glassblowing", "windmills", "koalas", "the Hubble telescope",
    "mushrooms", "the Leaning Tower of Pisa", "surfing", "pumpkins", "the Wild West", "kites",
)

LIST_EVAL_REQUESTS = (
    ("What should I pack for a weekend in the mountains?", "mountains"),
    ("Suggest some names for a pet gecko.", "gecko"),
    ("How can I keep my fridge organized?", "fridge"),
    ("Why do dogs bark at night?", "bark"),
    ("Explain what gravity is to a child.", "gravity"),
    ("What are good ways to celebrate an anniversary?", "anniversary"),
    ("How do I patch a bike tire?", "patch"),
    ("What are some tips for hosting a sleepover?", "sleepover"),
    ("Give me ideas for a backyard party menu.", "backyard"),
    ("How can I stop snoring?", "snoring"),
    ("What should I name my new alpaca?", "alpaca"),
    ("Why do cats chase laser pointers?", "laser"),
    ("What are easy ways to eat more beans?", "beans"),
    ("How do I care for a succulent?", "succulent"),
    ("What should I know before adopting a cat?", "adopting"),
    ("How can I keep my garage organized?", "garage"),
    ("What are some good questions to ask a mechanic?", "mechanic"),
    ("Give me some name ideas for an ice cream shop.", "ice cream shop"),
    ("How do I remove a splinter?", "splinter"),
    ("What are the benefits of gardening?", "gardening"),
    ("How can I keep a drafty room cozy?", "drafty"),
    ("Why do frogs croak after rain?", "croak"),
    ("What should I look for in a good tent?", "tent"),
    ("What should I name my new sourdough starter?", "sourdough"),
)
LIST_EVAL_SET_SHA256_16 = "53104fe0064493c1"


def list_eval_prompts() -> list[DemoPrompt]:
    """`bullets`' frozen evaluation set: every LIST_EVAL_TOPICS topic through every
    LIST_EVAL_TEMPLATES template, then the LIST_EVAL_REQUESTS."""
    return _list_eval_set("6", LIST_EVAL_TOPICS, LIST_EVAL_TEMPLATES, LIST_EVAL_REQUESTS)


def frozen_eval_set(rule: str) -> tuple[list[DemoPrompt], str]:
    """The evaluation prompts a demo rule's adapter is judged on (bullets: its own set; concise:
    the first one) and their frozen digest. A changed set is refused: it is a new set, to be
    frozen anew before anything answers it."""
    from fsrl.errors import FsrlError

    prompts, frozen = ((list_eval_prompts(), LIST_EVAL_SET_SHA256_16) if rule == "bullets"
                       else (eval_prompts(), EVAL_SET_SHA256_16))
    if prompts_digest(prompts) != frozen:
        raise FsrlError(f"the evaluation prompts of {rule} changed (digest {prompts_digest(prompts)}, frozen "
                        f"{frozen}): a changed set is a new set; freeze it anew")
    return prompts, frozen


def tuning_prompts(rule: str) -> list[DemoPrompt]:
    """What a demo's `--scale auto` chooses on: bullets' selection prompts; for concise, every
    eighth training prompt (what chose its scale before the selection requests existed)."""
    if rule == "bullets":
        return list_selection_prompts()
    return [p for p in demo_prompts() if p.split == "train"][::8]
