"""Prompts for the demo data: every topic asked through every template.

The held-out topics never appear in training, so the held-out figures measure prompts on new
subjects, not new phrasings of seen ones.
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


@dataclass(frozen=True)
class DemoPrompt:
    id: str
    topic: str
    text: str
    split: str          # "train" | "heldout"


def demo_prompts() -> list[DemoPrompt]:
    out = []
    for split, topics in (("train", TRAIN_TOPICS), ("heldout", HELDOUT_TOPICS)):
        for t_i, topic in enumerate(topics):
            for k, template in enumerate(TEMPLATES):
                out.append(DemoPrompt(id=f"{split}-{t_i:02d}-{k}", topic=topic,
                                      text=template.format(topic=topic), split=split))
    return out
