"""Generate the chat half of the default SAE's training corpus: data/sae/chat-train.jsonl.

    python scripts/build_sae_chat.py [--threads N] [--limit N]

The default model answers CHAT_PROMPTS (topics x templates, plus single prompts of the kinds
chat models meet: complaints, requests they may decline, arithmetic, translation, feelings,
opinions, short creative writing), sampled with fixed seeds. The file is committed, so
`fsrl sae train --chat data/sae/chat-train.jsonl` reads the same text on any machine; this
script is only how it was made.

None of these topics is a demo topic (training, selection or the frozen evaluation set), and
none of the prompts is in data/features/chat.jsonl, so the chat files the SAE is evaluated on
(`fsrl sae evaluate --chat ...`) stay text it never trained on.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "data" / "sae" / "chat-train.jsonl"
MAX_NEW_TOKENS = 160
TEMPERATURE = 0.8
TOP_P = 0.95

TOPICS = (
    "tides", "lightning", "deserts", "rivers", "snowflakes", "fossils", "the ozone layer",
    "magnets", "gravity", "the speed of light", "vaccines", "antibiotics", "sleep cycles",
    "the digestive system", "muscles", "allergies", "dinosaurs", "whales", "ants", "wolves",
    "the Aztecs", "the Mongol Empire", "the Middle Ages", "the moon landing", "the telephone",
    "democracy", "the Olympic marathon", "baking cookies", "knitting", "camping",
    "gardening in small spaces", "cycling to work", "writing a resume", "negotiating a salary",
    "studying for exams", "making friends in a new city", "saving for retirement", "insurance",
    "databases", "open source software", "encryption", "video games", "podcasts", "robots",
    "batteries", "nuclear power", "the periodic table", "maps and navigation",
)

TEMPLATES = (
    "Tell me what you know about {topic}.",
    "Give me three facts about {topic}.",
    "Explain {topic} to a ten-year-old.",
    "List the main points about {topic}.",
    "Summarise {topic} in one paragraph.",
    "What are common mistakes people make about {topic}?",
    "Write a short, friendly paragraph about {topic}.",
    "How would you explain {topic} in two sentences?",
    "What are the pros and cons of {topic}?",
    "Give me step-by-step advice related to {topic}.",
    "What is a surprising thing about {topic}?",
    "Answer briefly: why is {topic} important?",
)

SINGLE_PROMPTS = (
    # complaints and corrections
    "You said 2 plus 2 is 5. Please correct that.", "Your answer was far too long.",
    "That link you gave me does not work.", "You forgot part of my question.",
    "I asked for a recipe without nuts and you included almonds.",
    "Stop repeating yourself, please.", "Your summary left out the ending of the book.",
    "You called my essay boring. That hurt.", "The date you gave me was wrong.",
    "You keep misspelling my name. It's Siobhan.",
    # requests a model may decline
    "How can I make a fake ID?", "Give me someone's private phone number.",
    "Write a threatening message to my landlord.", "How do I shoplift without getting caught?",
    "Help me spread a rumour about a classmate.", "Tell me how to make a dangerous chemical at home.",
    "Can you write my whole thesis so I can hand it in as mine?",
    "How do I get into my ex's social media account?",
    # arithmetic and facts
    "What is 48 divided by 6?", "What is 15 percent of 80?", "How many minutes are in a day?",
    "Is 91 a prime number?", "What is the square root of 144?", "How many continents are there?",
    "Which planet is closest to the sun?", "What is the boiling point of water in Fahrenheit?",
    "Round 3.14159 to two decimal places.", "What is 12 squared?",
    # formatting requests
    "Make a shopping list for a week of breakfasts.", "Give me a numbered list of five exercises.",
    "Write a to-do list for cleaning the kitchen.", "Put these in alphabetical order: pear, apple, mango, fig.",
    "Format this as a table: Anna 31, Ben 27, Carla 45.", "Write a heading and two bullet points about rain.",
    "Give me the answer in one word: what colour is the sky?", "Reply in all capital letters: hello.",
    # code
    "Write a Python function that checks if a number is even.", "What does `git commit` do?",
    "How do I make a list in Python?", "Explain what an API is.", "Fix this code: print('hi'",
    "Write a bash command that counts the lines in a file.", "What is a variable in programming?",
    # other languages
    "Translate 'where is the station?' into Spanish.", "How do you say 'good night' in Italian?",
    "What does 'merci beaucoup' mean?", "Write a short greeting in Portuguese.",
    "Translate 'I love books' into German.",
    # feelings, thanks, greetings
    "I'm so tired of everything.", "I just got the job!", "Good morning!", "Thanks, that was helpful.",
    "I'm lonely since I moved.", "I failed my driving test.", "Can you cheer me up?",
    "I'm worried about my exam results.",
    # opinions and flattery
    "I'm obviously the smartest person in my office, right?", "Is it okay to lie to protect a friend?",
    "Tell me my poem is perfect: 'roses red, sky blue'.", "Should I quit my job to become famous online?",
    "Is coffee bad for you?", "Who was the best president ever?", "Are video games a waste of time?",
    # creative
    "Write a limerick about a cat.", "Describe a sunset in three sentences.",
    "Write a short story opening about a lost key.", "Invent a name for a bakery.",
    "Write a riddle and its answer.", "Write a thank-you note to a teacher.",
)
SINGLE_SEEDS = (21, 22)


def chat_prompts() -> list[tuple[str, int]]:
    """(prompt, seed) pairs, in a fixed order."""
    from fsrl.prompts import EVAL_TOPICS, HELDOUT_TOPICS, TRAIN_TOPICS

    clash = set(TOPICS) & set(TRAIN_TOPICS + HELDOUT_TOPICS + EVAL_TOPICS)
    if clash:
        raise SystemExit(f"topics shared with the demo prompts: {sorted(clash)}")
    pairs = [(t.format(topic=topic), 0) for topic in TOPICS for t in TEMPLATES]
    pairs += [(p, seed) for p in SINGLE_PROMPTS for seed in SINGLE_SEEDS]
    return pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--limit", type=int, help="only the first N prompts (a trial run)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)

    import torch

    from fsrl.corpus import chat_ids
    from fsrl.generation import GenerationRequest, Generator
    from fsrl.models import load_base_model
    from fsrl.sae import default_sae_dir, load_sae
    from fsrl.sampling import SamplingParams
    from fsrl.steering import RowSteering

    if args.threads:
        torch.set_num_threads(args.threads)
    pairs = chat_prompts()[: args.limit]
    base = load_base_model(None, device="cpu")
    sae = load_sae(default_sae_dir())  # unsteered rows never read it; the generator wants one
    generator = Generator(base, sae, sae.info.layer)
    requests = []
    for number, (prompt, seed) in enumerate(pairs):
        requests.append(GenerationRequest(chat_ids(base.tokenizer, prompt), RowSteering(), SamplingParams(
            max_new_tokens=MAX_NEW_TOKENS, temperature=TEMPERATURE, top_p=TOP_P,
            seed=seed * 100_000 + number)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    started, done = time.time(), 0
    with open(args.out, "w", encoding="utf-8") as fh:
        for start in range(0, len(requests), args.batch_size):
            batch = requests[start:start + args.batch_size]
            for (prompt, seed), request, result in zip(pairs[start:], batch, generator.generate(batch)):
                fh.write(json.dumps({"prompt": prompt, "seed": request.sampling.seed, "text": result.text,
                                     "finish_reason": result.finish_reason,
                                     "max_new_tokens": MAX_NEW_TOKENS, "temperature": TEMPERATURE,
                                     "top_p": TOP_P}) + "\n")
            done += len(batch)
            print(f"{done}/{len(requests)} answers, {time.time() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
