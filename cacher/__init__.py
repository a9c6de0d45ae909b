"""The cacher: run a teacher once over a data set and write its top-k cache through `shared`.

Never imports `trainer`.
"""
