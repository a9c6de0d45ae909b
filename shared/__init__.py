"""kdcache's cache format: names, manifest, writer, reader, verification.

This package knows the on-disk layout specified in storage_layout.md and nothing about models,
tokenizers or training. It imports neither `cacher` nor `trainer`.
"""
