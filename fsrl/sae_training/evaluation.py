"""Held-out quality figures of an SAE, read with our own reader (fsrl.sae.load_sae), so they
describe exactly what is served: explained variance, L0, dead features, CE loss recovered, and
agreement with sae-lens's own reader."""

from __future__ import annotations

from pathlib import Path

from fsrl.errors import FsrlError
from fsrl.sae_training.exclusions import Exclusions
from fsrl.sites import Site, attach


def pack_contexts(tokenizer, rows: list[str], context_size: int, separator: int | None,
                  max_tokens: int):
    """Held-out rows -> (n, context_size) token ids, packed like training: documents joined by
    the separator, no BOS, cut into contexts."""
    import torch

    ids: list[int] = []
    need = max(context_size, (max_tokens // context_size) * context_size)
    for row in rows:
        ids.extend(tokenizer(row, add_special_tokens=False)["input_ids"])
        if separator is not None:
            ids.append(separator)
        if len(ids) >= need:
            break
    n = min(len(ids), need) // context_size
    if n == 0:
        raise FsrlError(f"held-out text is shorter than one context ({context_size} tokens); "
                        "use a bigger corpus or a larger --eval-fraction")
    return torch.tensor(ids[: n * context_size]).view(n, context_size)


def layer_activations(base, site: Site, tokens):
    """Residual stream at `site` for (B, T) tokens -> (B, T, d_in) float32."""
    return base.activations(site, tokens).float()


def _ce_loss(base, site: Site, tokens, keep, edit) -> tuple[float, int]:
    """Summed next-token CE over positions t with keep[t] and keep[t+1] (an ordinary target),
    with `edit(x, keep)` applied to the residual stream at `site`."""
    import torch
    import torch.nn.functional as F

    handle = attach(base.layers, site, lambda x: edit(x, keep.to(x.device)))
    try:
        with torch.no_grad():
            logits = base.model(tokens.to(base.device)).logits.float()  # (B, T, V)
    finally:
        handle.remove()
    # position t predicts token t+1
    mask = (keep[:, :-1] & keep[:, 1:]).to(logits.device)  # (B, T-1)
    targets = tokens[:, 1:].flatten().to(logits.device)
    losses = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets,
                             reduction="none").view(mask.shape)  # (B, T-1)
    return float(losses[mask].sum()), int(mask.sum())


def evaluate_sae(base, sae, layer: int, tokens, excl: Exclusions, ce_tokens: int = 4096,
                 batch_size: int = 32, ce_batch_size: int = 8) -> dict:
    """Held-out quality figures for `sae` at `layer`: explained variance, mean L0, dead share,
    CE loss clean / spliced / zero-ablated and CE loss recovered."""
    import torch
    from tqdm.auto import tqdm

    site = sae.site_at(layer)
    d_in = sae.d_in
    sq_err = torch.zeros((), dtype=torch.float64)
    sum_x = torch.zeros(d_in, dtype=torch.float64)
    sum_sq = torch.zeros((), dtype=torch.float64)
    n_tok, n_seen, l0_sum = 0, 0, 0.0
    fired = torch.zeros(sae.d_sae, dtype=torch.bool)
    for i in tqdm(range(0, tokens.shape[0], batch_size), desc="Evaluating SAE", unit="batch"):
        batch = tokens[i: i + batch_size]
        acts = layer_activations(base, site, batch)  # (B, T, d_in)
        keep = excl.keep(batch, acts)
        n_seen += keep.numel()
        x = acts[keep.to(acts.device)].to(sae.W_enc.device)  # (N, d_in)
        with torch.no_grad():
            f = sae.encode(x)  # (N, d_sae)
            x_hat = sae.decode(f)  # (N, d_in)
        sq_err += (x - x_hat).double().pow(2).sum().cpu()
        sum_x += x.double().sum(0).cpu()
        sum_sq += x.double().pow(2).sum().cpu()
        n_tok += x.shape[0]
        active = f > 0
        l0_sum += float(active.sum())
        fired |= active.any(0).cpu()
    total_var = sum_sq - sum_x.pow(2).sum() / n_tok

    def clean(x, keep):
        return x

    def splice(x, keep):
        x = x.clone()
        x[keep] = sae.decode(sae.encode(x[keep])).to(x.dtype)
        return x

    def zero(x, keep):
        x = x.clone()
        x[keep] = 0
        return x

    n_ce = max(1, min(tokens.shape[0], ce_tokens // tokens.shape[1]))
    ce = {"clean": [0.0, 0], "spliced": [0.0, 0], "zero_ablation": [0.0, 0]}
    for i in tqdm(range(0, n_ce, ce_batch_size), desc="CE loss (clean/spliced/zero)",
                  unit="batch"):
        batch = tokens[i: min(i + ce_batch_size, n_ce)]
        keep = excl.keep(batch, layer_activations(base, site, batch))
        for name, edit in (("clean", clean), ("spliced", splice), ("zero_ablation", zero)):
            loss, count = _ce_loss(base, site, batch, keep, edit)
            ce[name][0] += loss
            ce[name][1] += count
    ce_clean, ce_spliced, ce_zero = (ce[k][0] / max(ce[k][1], 1)
                                     for k in ("clean", "spliced", "zero_ablation"))
    denom = ce_zero - ce_clean
    return {
        "explained_variance": round(float(1 - sq_err / total_var), 4),
        "mse_per_token": round(float(sq_err / n_tok), 4),
        "l0_mean": round(l0_sum / n_tok, 2),
        "dead_feature_share": round(1 - float(fired.float().mean()), 4),
        "dead_features": int((~fired).sum()),
        "eval_tokens": n_tok,
        "eval_positions_excluded_share": round(1 - n_tok / n_seen, 4),
        "ce_loss_clean": round(ce_clean, 4),
        "ce_loss_spliced": round(ce_spliced, 4),
        "ce_loss_zero_ablation": round(ce_zero, 4),
        "ce_loss_recovered": round((ce_zero - ce_spliced) / denom, 4) if denom > 0 else None,
        "ce_eval_tokens": ce["clean"][1],
    }


def sae_lens_parity(path: Path, sae, base, layer: int, tokens, excl: Exclusions) -> float:
    """Largest |difference| between our reader's and sae-lens's encode+decode on real
    activations (both in float32)."""
    import torch
    from sae_lens import SAE

    theirs = SAE.load_from_disk(str(path), device=str(sae.W_enc.device), dtype="float32")
    acts = layer_activations(base, sae.site_at(layer), tokens)  # (B, T, d_in)
    x = acts[excl.keep(tokens, acts).to(acts.device)].to(sae.W_enc.device)
    with torch.no_grad():
        f_ours, f_theirs = sae.encode(x), theirs.encode(x)
        diff = max(float((f_ours - f_theirs).abs().max()),
                   float((sae.decode(f_ours) - theirs.decode(f_theirs)).abs().max()))
    return float(f"{diff:.3g}")
