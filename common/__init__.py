"""What the cacher and the trainer both need, below them and above the cache format (DEVELOPERS.md, layers).

models (names -> local folders, hub, weight hashes), smollm2 (the embedded default teacher), tokenizers
(load, fingerprint), datasets (data set specs -> rows), templates (prompt formats), sequences (rows ->
token windows and masks), gsm8k (final answers). Imports shared/ at most; never cacher, trainer or above.
"""
