"""Typer apps `kdcache` and `kdtrain`: parse arguments, call one function, print."""
