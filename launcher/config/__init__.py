"""Configuration: the engine's keys and defaults, and the one frozen, validated config built from defaults, recipe
defaults, YAML and command line."""
