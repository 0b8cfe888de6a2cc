"""Recipes shipped with the launcher; run one with `python -m launcher recipe=<module name>`.

Modules whose names start with `_` are helpers shared by recipes, not recipes.
"""
