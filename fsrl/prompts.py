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
    template: int = 0   # index into its split's templates


def demo_prompts() -> list[DemoPrompt]:
    out = []
    for split, topics in (("train", TRAIN_TOPICS), ("heldout", HELDOUT_TOPICS)):
        for t_i, topic in enumerate(topics):
            for k, template in enumerate(TEMPLATES):
                out.append(DemoPrompt(id=f"{split}-{t_i:02d}-{k}", topic=topic,
                                      text=template.format(topic=topic), split=split, template=k))
    return out


def eval_prompts() -> list[DemoPrompt]:
    """The frozen evaluation set: every EVAL_TOPICS topic through every EVAL_TEMPLATES template."""
    return [DemoPrompt(id=f"eval-{t_i:02d}-{k}", topic=topic, text=template.format(topic=topic), split="eval",
                       template=k)
            for t_i, topic in enumerate(EVAL_TOPICS) for k, template in enumerate(EVAL_TEMPLATES)]


def eval_set_digest() -> str:
    """sha256 (first 16 hex digits) of the evaluation prompts, in order."""
    import hashlib

    return hashlib.sha256("\n".join(p.text for p in eval_prompts()).encode()).hexdigest()[:16]
