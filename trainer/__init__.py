"""The trainer: stream a cache written by `shared` and train students with sparse KD losses.

Never imports `cacher`.
"""
