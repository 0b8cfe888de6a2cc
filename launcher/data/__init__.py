"""Data sets and the order they are read in.

The order samples are drawn in (resumable, each sample's random numbers seeded by its place), batches cut at once
from indexed data, token shards bigger than memory, and streams.
"""
