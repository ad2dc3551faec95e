"""Which token positions an SAE is trained and evaluated on, and how documents are joined.

At a middle layer the first position of every context and the document separator carry
activation norms ~100x the median (~97 % of the variance in 0.2-0.8 % of tokens), and now and
then another token turns into such an attention sink too (a newline right after a newline at
position 0, say). Left in, these few tokens dominate both the training loss and explained
variance. So three rules, the same in training and in every evaluation figure: position 0 is
dropped (seqpos_slice=(1, None)), every special token id is dropped, and so is any position
whose activation norm exceeds `--max-norm-ratio` times the median norm (measured once on the
first batch; the absolute threshold is saved in cfg.json and quality.json). When the SAE is
spliced in for the CE figures, excluded positions keep their exact activation, as the steering
error term keeps them at inference. Contexts are packed from documents joined by
`<|endoftext|>` (else the tokenizer's eos, else bos), without a leading BOS.
"""

from __future__ import annotations

from dataclasses import dataclass

SEPARATOR_TOKEN = "<|endoftext|>"


@dataclass
class Exclusions:
    """Positions left out of SAE training and evaluation: position 0, special token ids, and
    activations whose norm exceeds `norm_threshold` (None: no norm rule)."""

    token_ids: list[int]
    norm_threshold: float | None = None

    def keep(self, tokens, x=None):
        """(B, T) tokens [and (B, T, d_in) activations] -> (B, T) bool: positions that count."""
        import torch

        keep = ~torch.isin(tokens, torch.tensor(self.token_ids, dtype=tokens.dtype))
        keep[:, 0] = False
        if x is not None and self.norm_threshold is not None:
            keep &= (x.float().norm(dim=-1) <= self.norm_threshold).to(keep.device)
        return keep

    def drop_outliers(self, acts):
        """(N, d_in) activations already filtered by position and token -> norm rule applied."""
        if self.norm_threshold is None:
            return acts
        return acts[acts.norm(dim=-1) <= self.norm_threshold]

    def to_json(self) -> dict:
        return {"positions": [0], "token_ids": self.token_ids,
                "activation_norm_above": self.norm_threshold}


def separator_token_id(tokenizer) -> int | None:
    """Document separator: `<|endoftext|>` if the vocabulary has it, else eos, else bos."""
    vocab = tokenizer.get_vocab()
    if SEPARATOR_TOKEN in vocab:
        return int(vocab[SEPARATOR_TOKEN])
    for attr in ("eos_token_id", "bos_token_id"):
        if getattr(tokenizer, attr, None) is not None:
            return int(getattr(tokenizer, attr))
    return None
