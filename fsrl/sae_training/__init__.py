"""Training SAEs with sae-lens (`fsrl sae train`) and measuring them (`fsrl sae evaluate`).

One job a module: `config` (a run's settings, the architectures), `pipeline` (train_sae: corpus
to quality.json), `runner` (sae-lens's runner and activation store), `cache` (activation caches
on disk), `writer` (the saved SAE folder), `exclusions` (positions left out), `evaluation`
(held-out figures with our own SAE reader) and `cli` (the command's flags and summary)."""
