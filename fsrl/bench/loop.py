"""The generation loop timed: the same prompts through fsrl's Generator in several steering
modes, interleaved round by round (`fsrl bench` and `fsrl bench --adapters`)."""

from __future__ import annotations

import statistics
import time


def measure_rows(generator, modes: dict, prompt_tokens: int, new_tokens: int, repeats: int, sync) -> dict[str, float]:
    """Median tok/s of each mode, a `RowSteering` per row, on the same prompts and the same
    generation loop; the modes interleaved round by round, the first round a warm-up."""
    from fsrl.generation import GenerationRequest
    from fsrl.sampling import SamplingParams

    vocab = generator.base.model.config.vocab_size
    batch = len(next(iter(modes.values())))
    prompts = [[(17 * (b + 1) + 31 * t) % (vocab - 20) + 10 for t in range(prompt_tokens)] for b in range(batch)]
    sampling = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    samples: dict[str, list[float]] = {m: [] for m in modes}
    for rep in range(repeats + 1):
        for mode, rows in modes.items():
            reqs = [GenerationRequest(p, s, sampling) for p, s in zip(prompts, rows)]
            sync()
            t0 = time.perf_counter()
            out = generator.generate(reqs)
            sync()
            if rep:
                samples[mode].append(sum(r.completion_tokens for r in out) / (time.perf_counter() - t0))
    return {m: statistics.median(v) for m, v in samples.items()}
