"""The example requests a demo adapter's README shows, with the answers they get.

    python -m fsrl.demo.examples bullets      # writes adapters/bullets/examples.json

Each example is asked as a user of the server asks it (`POST /generate` with `compare: true`,
the adapter's shipped scale and decoding): the steered and the base answer are written beside
the request, so the README shows what the request returns, not what it should. None of these
prompts is in the demo's training, selection or evaluation sets.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

EXAMPLES: dict[str, tuple[str, ...]] = {
    "bullets": ("What should I name my new goldfish?", "Explain what a rainbow is to a child.",
                "How do I get ready for a job fair?"),
}


def example_request(adapter_id: str, prompt: str, scale: float, presence_penalty: float) -> dict[str, Any]:
    """The body of the `/generate` request the README shows."""
    body: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}], "adapter": adapter_id,
                            "steering_scale": scale, "compare": True, "max_new_tokens": 160}
    if presence_penalty:
        body["presence_penalty"] = presence_penalty
    return body


def answer_examples(adapter_dir: Path, scale: float, presence_penalty: float) -> list[dict[str, Any]]:
    """Each example's request and its steered and base answers (greedy, as the server gives them)."""
    from fsrl.adapter import load_adapter
    from fsrl.corpus import chat_ids
    from fsrl.generation import GenerationRequest, Generator
    from fsrl.models import load_base_model
    from fsrl.sae import default_sae_dir, load_sae
    from fsrl.sampling import SamplingParams
    from fsrl.steering import RowSteering

    base = load_base_model(None, "cpu")
    sae = load_sae(default_sae_dir())
    site = sae.site_at()
    adapter = load_adapter(adapter_dir, sae=sae, layer=site.layer, base_model_fingerprint=base.fingerprint)
    gen = Generator(base, sae, site.layer)
    out = []
    for prompt in EXAMPLES[adapter.id]:
        body = example_request(adapter.id, prompt, scale, presence_penalty)
        sampling = SamplingParams(max_new_tokens=body["max_new_tokens"], presence_penalty=presence_penalty)
        ids = chat_ids(base.tokenizer, prompt)
        steered, plain = gen.generate([GenerationRequest(ids, RowSteering(adapter, scale), sampling),
                                       GenerationRequest(ids, RowSteering(), sampling)])
        out.append({"request": body, "steered": steered.text, "steered_finish_reason": steered.finish_reason,
                    "base": plain.text, "base_finish_reason": plain.finish_reason})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fsrl.demo.examples", description=__doc__.splitlines()[0])
    parser.add_argument("id", choices=sorted(EXAMPLES))
    args = parser.parse_args(argv)
    folder = Path("adapters") / args.id
    ev = json.loads((folder / "eval.json").read_text())
    penalty = float(ev["generation"].get("presence_penalty", 0.0))
    examples = answer_examples(folder, float(ev["scale"]), penalty)
    (folder / "examples.json").write_text(json.dumps(examples, indent=1) + "\n")
    for e in examples:
        print(f"### {e['request']['messages'][0]['content']}\n--- steered:\n{e['steered']}\n--- base:\n{e['base'][:300]}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
