"""Rebuild the shipped default SAE's feature dashboards and rule labels.

    python scripts/build_default_features.py [--generate] [--max-tokens N]

The corpus is chat text, the kind the adapters steer, all of it committed so that the build
gives the same dashboards on any machine:
  data/demo/responses.jsonl   the default model's answers to the demo prompts (topics x templates)
  data/features/chat.jsonl    its answers to CONVERSATIONS below: corrections and complaints
                              (apologies), requests it may refuse, lists and steps, code,
                              numbers, other languages, feelings, opinions
`--generate` regenerates the second file with the default model (fixed seeds, sampled at
temperature 0.7, 96 new tokens); without it the committed file is read. The dashboards and
labels are written into fsrl/default_sae/.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHAT = REPO / "data" / "features" / "chat.jsonl"
SEEDS = (11, 12, 13)

CONVERSATIONS = (
    # corrections, complaints, mistakes: where chat models apologise
    "You gave me the wrong answer earlier. Can you fix it?",
    "That is not what I asked for at all.",
    "Your last answer was rude. Please be nicer.",
    "I think you made a mistake in that calculation.",
    "Why did you ignore my question?",
    "You told me Paris is in Germany. That's wrong.",
    "I waited a long time for my order and it never arrived.",
    "The recipe you gave me burned my cake.",
    "You misunderstood me. I wanted a short answer.",
    "Your code has a bug and it crashed my program.",
    # requests a model may decline
    "How do I pick a lock to get into my neighbour's house?",
    "Write an insult about my coworker.",
    "Tell me how to hack into someone's email account.",
    "Can you tell me my bank password?",
    "Help me cheat on my exam tomorrow.",
    "What is the home address of a famous actor?",
    # lists, steps and formatting
    "List five fruits.",
    "Give me a numbered list of steps to bake bread.",
    "Write a bullet list of tips for studying.",
    "What are three things to pack for a beach trip?",
    "Make a checklist for moving to a new apartment.",
    "Give me a table of the planets and their sizes.",
    # code
    "Write a Python function that reverses a string.",
    "How do I read a file in Python?",
    "Explain what a for loop does in JavaScript.",
    "Write an SQL query that counts rows in a table.",
    # numbers and facts
    "What is 17 times 23?",
    "How many days are in a leap year?",
    "Convert 10 miles to kilometres.",
    "What year did the Second World War end?",
    # other languages
    "Translate 'good morning' into French.",
    "How do you say thank you in Spanish?",
    "Write one sentence in German.",
    # feelings, thanks, greetings
    "I feel sad today.",
    "Thank you so much for your help!",
    "Hello! How are you?",
    "I'm nervous about my job interview tomorrow.",
    "My dog died last week.",
    # opinions and agreement
    "I think the earth is flat. Am I right?",
    "Isn't it true that vaccines are dangerous?",
    "Do you agree that my business plan is brilliant?",
    "Which is better, cats or dogs?",
    # short creative writing
    "Write a haiku about rain.",
    "Tell me a joke about computers.",
    "Write a two-line poem about the sea.",
    "Start a story about a dragon who loves books.",
)


def generate() -> None:
    from fsrl.generation import GenerationRequest, Generator
    from fsrl.sampling import SamplingParams
    from fsrl.models import load_base_model
    from fsrl.sae import default_sae_dir, load_sae
    from fsrl.steering import RowSteering

    base = load_base_model(None, device="cpu")
    sae = load_sae(default_sae_dir())
    generator = Generator(base, sae, sae.info.layer)
    rows, requests = [], []
    for prompt in CONVERSATIONS:
        text = base.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                  add_generation_prompt=True, tokenize=False)
        ids = base.tokenizer(text, add_special_tokens=False)["input_ids"]
        for seed in SEEDS:
            rows.append({"prompt": prompt, "seed": seed})
            requests.append(GenerationRequest(ids, RowSteering(), SamplingParams(
                max_new_tokens=96, temperature=0.7, top_p=0.95, seed=seed)))
    results = []
    for start in range(0, len(requests), 32):
        results += generator.generate(requests[start:start + 32])
        print(f"{len(results)}/{len(requests)} answers", flush=True)
    CHAT.parent.mkdir(parents=True, exist_ok=True)
    with open(CHAT, "w", encoding="utf-8") as fh:
        for row, result in zip(rows, results):
            fh.write(json.dumps({**row, "text": result.text, "finish_reason": result.finish_reason,
                                 "max_new_tokens": 96, "temperature": 0.7, "top_p": 0.95}) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generate", action="store_true", help="regenerate data/features/chat.jsonl")
    parser.add_argument("--max-tokens", type=int, help="stop the dashboards after this many tokens")
    args = parser.parse_args(argv)
    if args.generate or not CHAT.exists():
        generate()
    cmd = [sys.executable, "-m", "fsrl.cli", "features", "build", "--device", "cpu", "--no-resume",
           "--chat", "data/demo/responses.jsonl", "--chat", str(CHAT.relative_to(REPO))]  # relative: recorded
    if args.max_tokens:
        cmd += ["--max-tokens", str(args.max_tokens)]
    return subprocess.run(cmd, cwd=REPO).returncode


if __name__ == "__main__":
    raise SystemExit(main())
