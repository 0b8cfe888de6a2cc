"""Configuration: the engine's keys and defaults, and the one frozen, validated config.

The config is built from defaults, recipe defaults, YAML and command line.
"""
